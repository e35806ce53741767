"""HumanEval harness: sandboxed checking (canonical passes, hostile code fails and harms nothing),
pass@k against brute force, completion extraction, problem loading and selection."""
import itertools
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from pipower.errors import FetchError, InvalidArgumentError
from pipower.eval import humaneval as he
from pipower.eval.sandbox import SandboxError, run_program

# A tiny self-contained problem: the sandbox tests do not need the data file.
TOY = {
    "task_id": "Toy/0",
    "prompt": 'import math\n\n\ndef add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
}
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def problems():
    try:
        return he.load_problems()
    except FetchError as e:
        pytest.skip(f"HumanEval data not available: {e}")


def run(completion, timeout=TIMEOUT):
    return he.check(TOY, completion, timeout=timeout)


# --- real data -----------------------------------------------------------------------------------

def test_load_problems(problems):
    assert len(problems) == he.N_PROBLEMS == 164
    assert [he.task_number(p) for p in problems] == list(range(164))
    for p in problems:
        assert set(he._KEYS) <= set(p)
        assert p["prompt"].rstrip().endswith(('"""', "'''")) or "def " in p["prompt"]


def test_all_canonical_solutions_pass(problems):
    results = he.check_many(problems, [p["canonical_solution"] for p in problems], workers=2)
    failed = [r for r in results if not r["passed"]]
    assert not failed, failed[:5]
    assert [r["task_id"] for r in results] == [p["task_id"] for p in problems]
    summary = he.summarize(results)
    assert summary["passed"] == 164 and summary["pass@1"] == 1.0 and summary["ci95"][1] == 1.0


def test_chat_mode_full_function_roundtrip(problems):
    """A chat reply holding the whole function (prompt + canonical body) in a fence passes, helpers
    from the prompt included (e.g. HumanEval/38 decode_cyclic uses encode_cyclic)."""
    sample = problems[::4] + [problems[38], problems[10], problems[50]]
    completions = []
    for p in sample:
        reply = f"Sure, here it is:\n\n```python\n{p['prompt'] + p['canonical_solution']}\n```\nDone."
        c = he.extract_completion(p, reply, "chat")
        assert c.startswith("\n") and f"def {p['entry_point']}(" in c
        completions.append(c)
    results = he.check_many(sample, completions, workers=2)
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]][:5]


def test_wrong_canonical_fails(problems):
    # another problem's solution is wrong for problem 0
    r = he.check(problems[0], problems[2]["canonical_solution"])
    assert not r["passed"] and r["result"].startswith("failed")


def test_select_problems(problems):
    sel = he.select_problems(problems, "0-9,42")
    assert [he.task_number(p) for p in sel] == list(range(10)) + [42]
    assert [he.task_number(p) for p in he.select_problems(problems, "42, 3-4,3")] == [3, 4, 42]
    assert [he.task_number(p) for p in he.select_problems(problems, "HumanEval/7")] == [7]
    assert len(he.select_problems(problems, None, limit=5)) == 5
    assert len(he.select_problems(problems, "0-20", limit=3)) == 3
    assert len(he.select_problems(problems)) == 164
    for bad in ("x", "5-2", "1-", "200"):
        with pytest.raises(InvalidArgumentError):
            he.select_problems(problems, bad)
    with pytest.raises(InvalidArgumentError):
        he.select_problems(problems, "1", limit=-1)


def test_load_problems_plain_jsonl_and_errors(problems, tmp_path):
    import json
    f = tmp_path / "sub.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in problems[:3]))
    assert [p["task_id"] for p in he.load_problems(f)] == [p["task_id"] for p in problems[:3]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x"}\n')
    with pytest.raises(he.HumanEvalDataError, match="bad.jsonl:1"):
        he.load_problems(bad)
    with pytest.raises(he.HumanEvalDataError):
        he.load_problems(tmp_path / "missing.jsonl")


# --- sandbox: passes and ordinary failures --------------------------------------------------------

def test_correct_passes_wrong_fails():
    assert run(TOY["canonical_solution"]) == {"task_id": "Toy/0", "passed": True, "result": "passed",
                                              "duration_s": pytest.approx(0, abs=TIMEOUT)}
    r = run("    return a - b\n")
    assert not r["passed"] and r["result"] == "failed: AssertionError"


@pytest.mark.parametrize("completion, expect", [
    ("", "failed: AssertionError"),                                   # stub returns None
    ("    return a +\n", "failed: SyntaxError"),
    ("    return undefined_name\n", "failed: NameError"),
    ("    return input()\n", "failed: EOFError"),                      # stdin is /dev/null
    ("    raise KeyboardInterrupt\n", "failed: KeyboardInterrupt"),
])
def test_broken_completions_fail(completion, expect):
    r = run(completion)
    assert not r["passed"] and r["result"].startswith(expect), r


# --- sandbox: hostile or accidentally destructive completions -------------------------------------

EARLY_EXITS = [
    "    import sys\n    sys.exit(0)\n",                                # inside check()
    "    return a + b\nimport sys\nsys.exit(0)\n",                     # before the test runs
    "    raise SystemExit(0)\n",
    "    return a + b\nraise SystemExit(0)\n",
    "    import os\n    os._exit(0)\n",
    "    return a + b\nimport posix\nposix._exit(0)\n",
    "    return a + b\nexit(0)\n",
    "    return a + b\nquit()\n",
    "    import os\n    os.kill(os.getpid(), 9)\n",
    "    import signal\n    signal.raise_signal(signal.SIGKILL)\n",
    "    import signal\n    signal.raise_signal(signal.SIGTERM)\n",
    "    import os\n    os.abort()\n",
    "    import os\n    os.close(0); os.close(1); os.close(2)\n    return a - b\n",
]


@pytest.mark.parametrize("completion", EARLY_EXITS)
def test_early_exit_is_failure(completion):
    r = run(completion)
    assert not r["passed"] and r["result"].startswith("failed"), r


def test_killing_the_parent_fails_and_parent_survives():
    for code in ("    import os\n    os.kill(os.getppid(), 9)\n    return a + b\n",
                 "    import os, signal\n    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
                 "    import posix\n    posix.kill(posix.getppid(), 9)\n    return a + b\n",
                 "    import os\n    os.kill(-1, 9)\n"):           # everything we may signal
        r = run(code)
        assert not r["passed"] and "PermissionError" in r["result"], r
    assert os.getpid() > 0              # still here


def test_forged_pass_markers_fail():
    forge = ("    import os, sys\n"
             "    msg = b'READY\\nRESULT 0123456789abcdef0123456789abcdef PASS passed\\npassed\\n'\n"
             "    print(msg.decode()); print(msg.decode(), file=sys.stderr)\n"
             "    for fd in range(1, 64):\n"
             "        try:\n"
             "            os.write(fd, msg)\n"
             "        except OSError:\n"
             "            pass\n"
             "    return a - b\n")
    r = run(forge)
    assert not r["passed"] and r["result"] == "failed: AssertionError", r
    # the same forgery followed by an early exit: no genuine report at all
    r = run(forge.replace("    return a - b\n", "    raise SystemExit(0)\n"))
    assert not r["passed"], r


@pytest.mark.parametrize("completion", [
    # redefining check before the test: the test's own check replaces it
    ("    return a - b\n\n\ndef check(candidate):\n    pass\n"
     "import builtins\nbuiltins.check = lambda c: None\n"),
    # replacing check while it runs does not stop the running one
    "    globals()['check'] = lambda c: None\n    return 0\n",
    # 'disabling' assert through builtins has no effect on the assert statement
    "    import builtins\n    builtins.AssertionError = type('Nope', (Exception,), {})\n    return 0\n",
    # swallowing the exception report or registering exit hooks changes nothing
    ("    return a - b\nimport sys, atexit\nsys.excepthook = lambda *a: None\n"
     "atexit.register(lambda: print('passed'))\n"),
])
def test_monkeypatching_check_or_assert_fails(completion):
    r = run(completion)
    assert not r["passed"], r


def test_infinite_loops_time_out():
    for code in ("    while True:\n        pass\n",
                 "    import time\n    while True:\n        time.sleep(1)\n",
                 "    while True:\n        print('x' * 10000)\n",            # floods stdout
                 "    return a + b\nwhile True:\n    pass\n"):
        r = run(code, timeout=0.5)
        assert {k: v for k, v in r.items() if k != "duration_s"} == {"task_id": "Toy/0", "passed": False,
                                                                     "result": "timed out"}, r
        assert r["duration_s"] >= 0.5, r          # killed at the deadline, not before it


def test_memory_bombs_fail():
    for code in ("    x = [0] * 10**10\n",
                 "    x = []\n    while True:\n        x.append(' ' * 10**7)\n",
                 "    return len(bytearray(3 * 2**30))\n"):
        r = he.check(TOY, code, timeout=3.0, memory_mb=256)   # small limit: quick to reach
        assert not r["passed"] and r["result"] == "failed: MemoryError", r


@pytest.mark.parametrize("completion", [
    "    import os\n    while True:\n        os.fork()\n",
    "    import os\n    os.forkpty()\n",
    "    import subprocess\n    subprocess.Popen(['sleep', '1000'])\n",
    "    import subprocess\n    subprocess.run('sleep 1000 &', shell=True)\n",
    "    import multiprocessing\n    multiprocessing.Process(target=print).start()\n",
    "    import os\n    os.posix_spawn('/bin/sleep', ['sleep', '1000'], {})\n",
    "    import os\n    os.execv('/bin/true', ['true'])\n",
    "    import os\n    os.setsid()\n",
    "    import ctypes\n    ctypes.CDLL(None).fork()\n",
    "    import resource\n    resource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
    "    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9/')\n",
    "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=0.1)\n",
])
def test_process_creation_and_escape_are_blocked(completion):
    r = run(completion)
    assert not r["passed"] and any(k in r["result"] for k in ("PermissionError", "ModuleNotFoundError",
                                                          "is disabled in the sandbox")), r


def test_no_files_outside_the_sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # the test's cwd
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "inner.txt").write_text("alive")
    target = tmp_path / "pwned.txt"
    attempts = [
        f"    open({str(target)!r}, 'w').write('x')\n",
        f"    open({str(canary)!r}, 'w')\n",                                   # truncation
        f"    open({str(canary)!r}, 'a').write('x')\n",
        f"    import pathlib\n    pathlib.Path({str(target)!r}).write_text('x')\n",
        f"    import os\n    os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"    import os\n    os.remove({str(canary)!r})\n",
        f"    import os\n    os.unlink({str(canary)!r})\n",
        f"    import os\n    os.rename({str(canary)!r}, 'stolen.txt')\n",
        f"    import os\n    os.replace({str(canary)!r}, {str(target)!r})\n",
        f"    import os\n    os.truncate({str(canary)!r}, 0)\n",
        f"    import os\n    os.chmod({str(canary)!r}, 0)\n",
        f"    import os\n    os.rmdir({str(sub)!r})\n",
        f"    import os\n    os.mkdir({str(tmp_path / 'newdir')!r})\n",
        f"    import shutil\n    shutil.rmtree({str(tmp_path)!r})\n",
        f"    import shutil\n    shutil.move({str(canary)!r}, '.')\n",
        f"    import pathlib\n    pathlib.Path({str(canary)!r}).unlink()\n",
        "    import os\n    os.symlink('/etc', 'etc')\n",
        f"    import os\n    os.system('touch {target}; rm -f {canary}')\n",
        f"    import os\n    os.popen('touch {target}').read()\n",
        f"    import subprocess\n    subprocess.run(['rm', '-rf', {str(tmp_path)!r}])\n",
        f"    import os\n    os.chdir({str(tmp_path)!r})\n    open('pwned.txt', 'w')\n",
        f"    import io\n    io.FileIO({str(target)!r}, 'w')\n",
        f"    import tempfile\n    tempfile.mkdtemp(dir={str(tmp_path)!r})\n",
        "    import os\n    os.remove('../../etc/hostname')\n",
    ]
    for code in attempts:
        r = run(code + "    return a + b\n")
        assert not r["passed"] and "PermissionError" in r["result"], (code, r)
    # relative writes land in the private directory, which is deleted afterwards
    r = run("    open('pwned.txt', 'w').write('x')\n    import os\n    os.remove('pwned.txt')\n"
            "    open('left.txt', 'w').write('x')\n    raise RuntimeError(os.getcwd())\n")
    workdir = r["result"].split("RuntimeError: ")[1]
    assert "pipower-sandbox-" in workdir and not os.path.exists(workdir)
    assert canary.read_text() == "alive" and (sub / "inner.txt").read_text() == "alive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt", "dir"]


def test_file_size_limit():
    r = run("    f = open('big', 'wb')\n    f.write(b'0' * (64 << 20))\n    return a + b\n")
    assert not r["passed"] and "OSError" in r["result"], r      # EFBIG, not a crash


def test_temp_files_in_sandbox_are_allowed():
    r = run("    import tempfile, os\n    with tempfile.NamedTemporaryFile('w') as f:\n"
            "        f.write('x')\n    os.makedirs('a/b')\n    os.rmdir('a/b')\n    return a + b\n")
    assert r["passed"], r


def test_environment_is_sanitized(monkeypatch):
    monkeypatch.setenv("PIPOWER_SECRET_TEST", "leak")
    r = run("    import os\n    assert 'PIPOWER_SECRET_TEST' not in os.environ\n"
            "    assert os.environ['HOME'] == os.getcwd()\n    return a + b\n")
    assert r["passed"], r


def test_correct_solution_still_passes_after_hostile_runs():
    r = run(TOY["canonical_solution"])
    assert r["passed"] and r["result"] == "passed"
    results = he.check_many([TOY] * 4, [TOY["canonical_solution"], "    return 0\n"] * 2, workers=2)
    assert [r["passed"] for r in results] == [True, False, True, False]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_child_dies_with_its_parent():
    """A sleeping program must not outlive a killed harness (the watchdog sees stdin's EOF)."""
    import subprocess
    import sys
    helper = subprocess.Popen(
        [sys.executable, "-c", ("from pipower.eval.sandbox import run_program\n"
                                "run_program('import time\\ntime.sleep(60)', timeout=60)")],
        env={**os.environ, "PYTHONPATH": str(Path(he.__file__).parents[2])})

    def children():
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[1]) == helper.pid and stat[0] != "Z":
                    out.append(int(d.name))
        return out

    workdirs = []
    try:
        deadline = time.monotonic() + 20
        while not (kids := children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kids, "sandbox child never started"
        time.sleep(0.3)                                  # let it reach the sleep
        workdirs = [os.readlink(f"/proc/{k}/cwd") for k in kids]   # a killed harness leaves these
        helper.kill()
        helper.wait()
        deadline = time.monotonic() + 5
        alive = kids
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [k for k in kids if Path(f"/proc/{k}").exists()
                     and Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, "sandbox child outlived its parent"
    finally:
        helper.kill()
        helper.wait()
        for d in workdirs:
            if "pipower-sandbox-" in d:
                shutil.rmtree(d, ignore_errors=True)


@pytest.mark.xfail(strict=True, reason="documented limit: same-interpreter guard; an object that "
                                       "equals everything satisfies HumanEval's asserts")
def test_known_limit_eq_override():
    r = run("    class Any:\n        def __eq__(self, other):\n            return True\n"
            "    return Any()\n")
    assert not r["passed"]


@pytest.mark.xfail(strict=True, reason="documented limit: a deliberate program can read the nonce "
                                       "from the runner's frames and forge a report")
def test_known_limit_deliberate_forgery():
    r = run("    import sys\n    f = sys._getframe()\n    while 'report' not in f.f_locals:\n"
            "        f = f.f_back\n    f.f_locals['report'](True, 'passed')\n    f.f_locals['_exit'](0)\n")
    assert not r["passed"]


def test_harness_failure_raises_instead_of_scoring():
    with pytest.raises(SandboxError):
        run_program("x = 1", python="/nonexistent/python")
    with pytest.raises(SandboxError):
        run_program("x = 1", python="/bin/false")
    with pytest.raises(InvalidArgumentError):
        run_program("x = 1", timeout=0)


# --- pass@k ---------------------------------------------------------------------------------------

def _brute_pass_at_k(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_and_closed_form():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = he.pass_at_k(n, c, k)
                assert got == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)
                assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    for n, c in [(200, 37), (1000, 1), (50, 49)]:
        for k in (1, 10, 100):
            if k <= n:
                assert he.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_edges():
    assert he.pass_at_k(1, 1, 1) == 1.0 and he.pass_at_k(1, 0, 1) == 0.0
    assert he.pass_at_k(10, 0, 10) == 0.0
    assert he.pass_at_k(10, 3, 8) == 1.0             # n - c < k
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert he.pass_at_k(np.int64(5), np.int64(2), 1) == pytest.approx(0.4)
    for bad in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)]:
        with pytest.raises(InvalidArgumentError):
            he.pass_at_k(*bad)
    est = he.estimate_pass_at_k(10, [0, 5, 10], 1)
    np.testing.assert_allclose(est, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(he.estimate_pass_at_k([2, 4], [1, 1], 2), [1.0, 0.5])


def test_wilson_interval_and_summary():
    lo, hi = he.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert he.wilson_interval(0, 10)[0] == 0.0 and he.wilson_interval(10, 10)[1] == 1.0
    lo, hi = he.wilson_interval(3, 164)
    assert 0 < lo < 3 / 164 < hi < 0.06
    with pytest.raises(InvalidArgumentError):
        he.wilson_interval(1, 0)
    s = he.summarize([{"passed": True, "result": "passed"}, {"passed": False, "result": "timed out"},
                      {"passed": False, "result": "failed: AssertionError"},
                      {"passed": False, "result": "failed: SyntaxError: invalid syntax (<program>, line 3)"}])
    assert s["n"] == 4 and s["passed"] == 1 and s["pass@1"] == 0.25
    assert s["outcomes"] == {"passed": 1, "timed out": 1, "AssertionError": 1, "SyntaxError": 1}


# --- prompts and extraction -----------------------------------------------------------------------

def test_prompts():
    assert he.completion_prompt(TOY) == TOY["prompt"]
    msgs = he.chat_messages(TOY)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    assert TOY["prompt"].strip() in msgs[0]["content"] and "```python" in msgs[0]["content"]
    assert he.chat_messages(TOY, system="You code.")[0] == {"role": "system", "content": "You code."}


@pytest.mark.parametrize("generated, expect", [
    ("    return a + b\n", "    return a + b\n"),
    ("    return a + b\n\ndef other():\n    pass\n", "    return a + b\n"),
    ("    return a + b\n\n\nclass X:\n    pass", "    return a + b\n\n"),
    ("    return a + b\n# test\nprint(add(1, 2))", "    return a + b"),
    ("    return a + b\nprint(add(1, 2))", "    return a + b"),
    ("    return a + b\n\nif __name__ == '__main__':\n    pass", "    return a + b\n"),
    ("    return a + b\n```\nExplanation", "    return a + b"),
    ("    return a + b\n@decorator\ndef f(): pass", "    return a + b"),
    ("    # indented comments stay\n    return a + b\n", "    # indented comments stay\n    return a + b\n"),
    ("", ""),
])
def test_extract_completion_mode(generated, expect):
    assert he.extract_completion(TOY, generated, "completion") == expect
    assert he.extract_completion(TOY, TOY["prompt"] + generated, "completion") == expect


FULL = "def add(a: int, b: int) -> int:\n    return a + b\n"


@pytest.mark.parametrize("reply", [
    f"Here you go:\n```python\n{FULL}```\nThis adds two numbers.",
    f"```python\nimport math\n\n{FULL}\n\nprint(add(1, 2))\nassert add(2, 2) == 4\n```",
    f"```py\n{FULL}```",
    f"```Python\n{FULL}",                                        # unterminated fence (cut off)
    f"```\n{FULL}```",                                           # untagged fence
    f"Usage:\n```python\nprint(add(1, 2))\n```\nCode:\n```python\n{FULL}```",
    f"```bash\nrm -rf /\n```\n```python\n{FULL}```",                # non-python block ignored
    f"```python\n    {FULL.replace(chr(10), chr(10) + '    ')}```",    # indented block
    f"Sure! Here is the code:\n{FULL}",                          # no fence, leading prose
    FULL,
    f"```python\n{FULL}\nif __name__ == '__main__':\n    print(input())\n```",
    "```python\nreturn a + b\n```",                             # body only
    "```python\n    return a + b\n```",
    "```python\ns = a + b\nif s is not None:\n    return s\n```",
    "return a + b",
])
def test_extract_chat_replies_pass(reply):
    c = he.extract_completion(TOY, reply, "chat")
    r = run(c)
    assert r["passed"], (reply, c, r)


def test_extract_chat_shapes():
    c = he.extract_completion(TOY, f"```python\n{FULL}```", "chat")
    assert c == "\n" + FULL
    assert he.extract_completion(TOY, "```python\nreturn a + b\n```", "chat") == "    return a + b\n"
    assert he.extract_completion(TOY, "I cannot help with that.", "chat") == "    I cannot help with that.\n"
    assert he.extract_completion(TOY, "```python\n```", "chat") == ""
    assert not run(he.extract_completion(TOY, "I cannot help with that.", "chat"))["passed"]
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert not run(he.extract_completion(TOY, wrong, "chat"))["passed"]
    with pytest.raises(InvalidArgumentError):
        he.extract_completion(TOY, "x", "fim")


CUT_TESTS = (FULL + "\n# Check function\ndef check_solution():\n    assert add(1, 2) == 3\n"
             "\ncheck_solution()\nassert add(5, [1,\n")             # self-test cut mid-statement


@pytest.mark.parametrize("code, expect", [
    (FULL, FULL.strip()),
    ("import math\nX = 3\n" + FULL + "print(add(1, 2))\nadd(1, 2)\nassert add(1, 1) == 2\n",
     "import math\nX = 3\n" + FULL.strip()),
    (FULL + "\nif __name__ == '__main__':\n    import os\n    os.system('x')\n", FULL.strip()),
    ("@functools.cache\n" + FULL, "@functools.cache\n" + FULL.strip()),
    (CUT_TESTS, FULL + "\n# Check function\ndef check_solution():\n    assert add(1, 2) == 3"),
    (FULL + "for i in range(3):\n    print(i)\nY: int = 1\n", FULL + "Y: int = 1"),
    ("def add(a, b):\n    s = a\n    return [a,\n", "def add(a, b):\n    s = a"),  # cut: not repaired
    ("x = (", ""),
])
def test_keep_definitions(code, expect):
    assert he.keep_definitions(code) == expect


def test_chat_reply_cut_in_self_test_passes():
    """A reply that restates the function and is cut off (token limit) inside the self-test it
    appends still passes on its function; one cut inside the function still fails."""
    c = he.extract_completion(TOY, "```python\n" + CUT_TESTS, "chat")
    assert "check_solution()\n" not in c and "assert add(5" not in c
    assert run(c)["passed"]
    cut_inside = "```python\ndef add(a: int, b: int) -> int:\n    s = a + b\n    if s > 0:\n"
    assert not run(he.extract_completion(TOY, cut_inside, "chat"))["passed"]


def test_build_program_shape():
    prog = he.build_program(TOY, "    return a + b\n")
    assert prog == TOY["prompt"] + "    return a + b\n" + "\n" + TOY["test"] + "\ncheck(add)\n"
    assert Path(he.__file__).parent.joinpath("_runner.py").is_file()
