"""Run an untrusted Python program in a separate, limited interpreter and tell whether it finished.

`run_program(source)` starts a fresh `python -I` (isolated mode: no PYTHON* variables, no user site,
no script or cwd directory on sys.path) through subprocess -- fork+exec in C, so the parent's big
model arrays and threads are never duplicated into Python code. The child runs `_runner.py`, which:
  * sets RLIMIT_CPU (timeout + 2 s), RLIMIT_AS (memory_mb), RLIMIT_FSIZE, RLIMIT_CORE = 0, RLIMIT_NOFILE;
  * sees /dev/null as stdin, works in a private temporary directory (deleted afterwards), gets a
    sanitized environment (PATH, HOME/TMPDIR = that directory, single-threaded BLAS);
  * disables process creation (os.fork/exec*/spawn*/system/popen/posix_spawn, subprocess.Popen,
    _posixsubprocess.fork_exec), signalling (os.kill/killpg, pidfd_send_signal), leaving the
    process group (setsid/setpgid), chdir/chroot, uid/gid changes, links, os._exit, exit/quit/help,
    shutil.rmtree/move/chown; path operations (remove/unlink/rename/replace/mkdir/chmod/truncate...)
    and writing opens (open/io.open/os.open with write flags) only work inside the private
    directory; `import ctypes`/`resource` fail.
The parent starts the timeout when the child says READY, kills the whole process group (SIGKILL) on
expiry and always once the child is done, and closes the stdin pipe, which a watchdog thread in the
child treats as "parent gone, exit now".

Pass detection. The parent creates a random nonce per run and sends it over stdin; the runner keeps
it out of the program's namespace and writes "RESULT <nonce> PASS" to a dedicated pipe only after
`exec` of the whole program -- prompt + completion + test + `check(entry_point)` -- returned
normally. Everything else is a failure: an exception (SystemExit and KeyboardInterrupt included),
sys.exit/os._exit/self-kill/signals (no nonce line), a timeout, a crash. The program's stdout and
stderr are never parsed (stdout goes to /dev/null, only a stderr tail is kept for diagnostics), and
lines on the result pipe without the nonce are ignored, so printed or written fake markers count
for nothing. Asserts always run (`compile(optimize=0)`; -O cannot be injected through -I).

Threat model, honestly. The target is model completions: buggy code and *accidentally* hostile
code (deleting files, shelling out, exiting early, infinite loops, memory or fork bombs, killing
the parent). Those never count as passes and never touch anything outside the private directory.
This is NOT a security boundary against code written to escape: it is the same Python interpreter,
so a deliberate program can read the nonce from memory (gc, frames) and forge a pass, restore the
disabled functions (e.g. from a fresh copy of a C module), make its return value compare equal to
anything (`__eq__` returning True passes HumanEval's asserts), use a trace function to skip the
check call, read any file the user can read, open network sockets, or write through io.FileIO. The
child runs as the parent's user (root on the dev machines; dropping to `nobody` is impossible there
since the interpreter lives under /root). For code that is actively adversarial, run this whole
harness inside a container/VM, seccomp or namespace sandbox with no network.

Harness failures (the interpreter cannot start, no READY within `startup_timeout`) raise
SandboxError instead of being scored as failures, so a broken harness cannot silently lower Pass@1.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError, PipowerError

log = logging.getLogger(__name__)

_RUNNER = (Path(__file__).with_name("_runner.py")).read_text()
_MAX_RESULT_BYTES = 1 << 16       # what the result pipe may carry before we stop keeping it
_STDERR_TAIL = 4096


class SandboxError(PipowerError):
    """The sandbox itself failed (interpreter did not start...): the program was not judged."""


@dataclass
class RunResult:
    passed: bool
    result: str                   # "passed", "timed out", "failed: AssertionError", ...
    duration_s: float             # wall time from READY to the end (0 if it never started)
    returncode: int | None        # negative: killed by that signal
    stderr_tail: str = ""


def _sanitized_env(workdir: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "failed: no result"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "timed out (CPU time limit)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"failed: killed by {name}"
    return f"failed: exited without a result (exit code {returncode})"


def run_program(source: str, *, timeout: float = 3.0, memory_mb: int = 1024, fsize_mb: int = 16,
                nofile: int = 256, startup_timeout: float = 30.0,
                python: str | None = None) -> RunResult:
    """Run `source` in a fresh limited interpreter; passed only if it ran to its end.

    `timeout` is wall-clock seconds from the moment the program starts (interpreter start-up, up to
    `startup_timeout`, is not counted). Raises SandboxError if the child never got to the program.
    """
    if not timeout > 0 or memory_mb < 64:
        raise InvalidArgumentError(f"timeout must be > 0 and memory_mb >= 64 (got {timeout}, {memory_mb})")
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="pipower-sandbox-")
    config = {
        "nonce": nonce, "program": source, "workdir": workdir,
        "cpu_s": int(timeout) + 2, "memory_bytes": memory_mb << 20, "fsize_bytes": fsize_mb << 20,
        "nofile": nofile,
    }
    res_r, res_w = os.pipe()
    proc = None
    try:
        config["result_fd"] = res_w
        payload = json.dumps(config).encode()
        try:
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-c", _RUNNER],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(res_w,), cwd=workdir, env=_sanitized_env(workdir),
                start_new_session=True, close_fds=True)
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox interpreter: {e}") from e
        os.close(res_w)
        res_w = -1
        # stdin stays open afterwards: closing it is what tells the child's watchdog we are gone.
        # A payload larger than the pipe buffer is written from a thread so a child that never
        # reads cannot block us past startup_timeout.
        data = len(payload).to_bytes(8, "big") + payload
        if len(data) <= 16384:
            _send(proc.stdin, data)
        else:
            threading.Thread(target=_send, args=(proc.stdin, data), daemon=True).start()
        return _supervise(proc, res_r, nonce, timeout, startup_timeout)
    finally:
        if proc is not None:
            if proc.returncode is None:     # not reaped yet (an exception above): kill the group
                _killpg(proc.pid)
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()
            proc.stderr.close()
        for fd in (res_r, res_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _send(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass                            # died at start-up (reported as no READY) or closed by us


def _supervise(proc: subprocess.Popen, res_r: int, nonce: str, timeout: float,
               startup_timeout: float) -> RunResult:
    t0 = time.monotonic()
    t_ready = None
    result_buf, err_buf = b"", b""
    sel = selectors.DefaultSelector()
    sel.register(res_r, selectors.EVENT_READ, "result")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    timed_out = False
    result_open = stderr_open = True
    try:
        while result_open or stderr_open:
            deadline = t_ready + timeout if t_ready is not None else t0 + startup_timeout
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    if key.data == "result":
                        result_open = False
                    else:
                        stderr_open = False
                elif key.data == "result":
                    if len(result_buf) < _MAX_RESULT_BYTES:
                        result_buf += chunk
                    if t_ready is None and result_buf.startswith(b"READY\n"):
                        t_ready = time.monotonic()
                else:
                    err_buf = (err_buf + chunk)[-_STDERR_TAIL:]
            if not result_open and t_ready is None:
                break                   # result pipe closed before READY: start-up failure
    finally:
        sel.close()

    # Wait for the exit without reaping, so the process-group id cannot be reused before killpg.
    deadline = t_ready + timeout if t_ready is not None else t0 + startup_timeout
    while not timed_out and os.waitid(os.P_PID, proc.pid,
                                      os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            timed_out = True
        else:
            time.sleep(0.005)
    _killpg(proc.pid)
    returncode = proc.wait()
    duration = time.monotonic() - t_ready if t_ready is not None else 0.0
    stderr_tail = err_buf.decode("utf-8", "replace")

    if t_ready is None:
        what = (f"did not start within {startup_timeout:.0f} s" if timed_out
                else f"exited during start-up ({_describe_exit(returncode)})")
        raise SandboxError(f"sandbox interpreter {what}; stderr: {stderr_tail[-1000:]!r}")

    prefix = f"RESULT {nonce} ".encode()
    for line in result_buf.split(b"\n"):
        if line.startswith(prefix):                 # the first genuine report wins
            verdict, _, message = line[len(prefix):].decode("utf-8", "replace").partition(" ")
            passed = verdict == "PASS" and not timed_out and returncode == 0
            if passed:
                return RunResult(True, "passed", duration, returncode, stderr_tail)
            text = "timed out" if timed_out else f"failed: {message}"
            return RunResult(False, text, duration, returncode, stderr_tail)
    if timed_out:
        return RunResult(False, "timed out", duration, returncode, stderr_tail)
    return RunResult(False, _describe_exit(returncode), duration, returncode, stderr_tail)
