"""Child side of `pipower.eval.sandbox`: runs ONE untrusted program in a fresh `python -I` interpreter.

Never imported: sandbox.py passes this file's text to `python -I -c`, so the child loads nothing from
pipower and needs only the standard library. Protocol with the parent:

  stdin      8-byte big-endian length, then that many bytes of JSON config
             {nonce, result_fd, program, workdir, cpu_s, memory_bytes, fsize_bytes, nofile}.
             The parent then keeps stdin open and writes nothing more: EOF means the parent is gone,
             and a watchdog thread ends the child (a sleeping program would otherwise outlive it).
  result_fd  "READY\\n" just before the program starts (the parent's wall clock starts there, so
             interpreter start-up does not eat into the program's timeout), then exactly one line
             "RESULT <nonce> PASS|FAIL <message>\\n" written by this runner, never by the program.

The nonce lives only in main()'s frame and in the closure of `report`; the program never receives
it. A program can still dig it out of this interpreter's memory (gc, frames): the guard below is
against buggy and accidentally hostile code, not a determined attacker (see sandbox.py).
"""


def main():
    import builtins
    import io
    import json
    import os
    import resource
    import signal
    import sys
    import threading
    import types

    # Private references taken before the program can replace anything.
    _exit, _write, _read = os._exit, os.write, os.read
    _realpath, _abspath, _dirname, _join = (os.path.realpath, os.path.abspath, os.path.dirname,
                                            os.path.join)
    _fsdecode, _fspath = os.fsdecode, os.fspath

    def read_exact(fd, n):
        buf = b""
        while len(buf) < n:
            chunk = _read(fd, n - len(buf))
            if not chunk:
                _exit(70)                   # parent vanished mid-config: nothing to report to
            buf += chunk
        return buf

    cfg = json.loads(read_exact(0, int.from_bytes(read_exact(0, 8), "big")))
    result_fd, program, workdir = cfg["result_fd"], cfg["program"], cfg["workdir"]

    def make_report(nonce):
        def report(ok, message):
            line = "\nRESULT " + nonce + (" PASS " if ok else " FAIL ")
            line += str(message).replace("\r", " ").replace("\n", " ")[:400] + "\n"
            try:
                _write(result_fd, line.encode("utf-8", "replace"))
            except BaseException:  # noqa: BLE001 - any failure to report means no pass
                _exit(71)
        return report

    report = make_report(cfg["nonce"])
    del cfg["nonce"]

    # --- resource limits (lowering limits needs no privilege; never raise above the current hard) --
    def limit(res, value):
        if value is None:
            return
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))

    limit(resource.RLIMIT_CPU, cfg["cpu_s"])           # SIGXCPU kills a spinning program
    limit(resource.RLIMIT_AS, cfg["memory_bytes"])     # a memory bomb gets MemoryError
    limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NOFILE, cfg["nofile"])
    # RLIMIT_NPROC is deliberately not set: it counts every process of the (real) user, so as root
    # it is ignored and as a normal user it would throttle the user's other jobs. Process creation
    # is disabled below instead, and the parent kills the whole process group afterwards.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # over-size writes raise OSError instead

    # --- stdin: the program sees /dev/null; the pipe becomes the parent-death watchdog -------------
    watch_fd = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

    def watchdog():
        try:
            _read(watch_fd, 1)
        finally:
            _exit(72)
    threading.Thread(target=watchdog, name="sandbox-watchdog", daemon=True).start()

    os.chdir(workdir)
    root = _realpath(workdir)

    # --- guard: disable what could harm the machine ------------------------------------------------
    def inside(path):
        """True when `path` (and the directory holding it) resolve inside the private workdir."""
        if isinstance(path, int):
            return True                     # an already-open descriptor
        p = _abspath(_fsdecode(_fspath(path)))
        real = _realpath(p)                 # where the data would go (links followed)
        if real == root:
            return True
        # ...and where the name itself lives (unlinking a link removes the link, not its target)
        for q in (real, _join(_realpath(_dirname(p)), "x")):
            if not q.startswith(root + os.sep):
                return False
        return True

    def disabled(name):
        def f(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        f.__name__ = name.rsplit(".", 1)[-1]
        return f

    def path_guarded(name, fn):
        def f(*args, **kwargs):
            if any(v is not None for k, v in kwargs.items() if k.endswith("dir_fd")):
                raise PermissionError(f"{name} with dir_fd is disabled in the sandbox")
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            paths += [v for k, v in kwargs.items() if k in ("path", "src", "dst", "name")]
            for p in paths:
                if not inside(p):
                    raise PermissionError(f"{name} outside the sandbox directory: {p!r}")
            return fn(*args, **kwargs)
        f.__name__ = getattr(fn, "__name__", name)
        return f

    import _io
    import _posixsubprocess
    import posix
    import shutil
    import socket
    import subprocess

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the sandbox directory: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and (dir_fd is not None or not inside(path)):
            raise PermissionError(f"writing outside the sandbox directory: {path!r}")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    for mod in (builtins, io, _io):
        mod.open = guarded_open

    class FileIO(_io.FileIO):       # direct io.FileIO(path, "w") bypasses open()
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"writing outside the sandbox directory: {file!r}")
            super().__init__(file, mode, *args, **kwargs)
    io.FileIO = _io.FileIO = FileIO
    for mod in (os, posix):
        if hasattr(mod, "open"):
            mod.open = guarded_os_open

    kill_names = [
        # processes
        "system", "popen", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp",
        "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
        "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
        "kill", "killpg", "_exit",
        # leaving the process group / sandbox, identity, scheduling of other processes
        "setsid", "setpgid", "setpgrp", "chdir", "fchdir", "chroot",
        "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
        "setgroups", "initgroups", "setpriority", "sched_setaffinity", "sched_setscheduler",
        "sched_setparam",
        # links could point a later write outside the sandbox
        "link", "symlink",
        "fchmod", "fchown", "lchmod",
    ]
    guard_names = [
        "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir",
        "makedirs", "truncate", "chmod", "chown", "lchown", "utime", "mkfifo", "mknod",
        "setxattr", "removexattr",
    ]
    for mod in (os, posix):
        for name in kill_names:
            if hasattr(mod, name):
                setattr(mod, name, disabled("os." + name))
        for name in guard_names:
            if hasattr(mod, name):
                setattr(mod, name, path_guarded("os." + name, getattr(mod, name)))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, disabled("shutil." + name))
    for name in ("pidfd_send_signal", "pthread_kill"):
        if hasattr(signal, name):
            setattr(signal, name, disabled("signal." + name))
    _posixsubprocess.fork_exec = disabled("_posixsubprocess.fork_exec")
    # No network: urllib, http.client, socket.create_connection... all go through socket.socket.
    for name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
        setattr(socket.socket, name, disabled("socket." + name))

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("subprocess.Popen is disabled in the sandbox")
    subprocess.Popen = Popen
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, disabled(name))
    # Importing these raises ImportError: ctypes reaches libc directly, resource could lift limits.
    for name in ("ctypes", "_ctypes", "resource", "cffi", "psutil"):
        sys.modules[name] = None

    # --- run ---------------------------------------------------------------------------------------
    module = types.ModuleType("__humaneval__")      # not __main__: `if __name__ == "__main__"` demo
    sys.modules["__humaneval__"] = module           # blocks are skipped, like the reference harness
    _BaseException, _type = BaseException, type
    del cfg
    _write(result_fd, b"READY\n")
    try:
        code = compile(program, "<program>", "exec", dont_inherit=True, optimize=0)  # keep asserts
        del program
        exec(code, module.__dict__)  # noqa: S102 - running the program is the point
    except _BaseException as e:
        try:
            name = _type(e).__name__
            text = str(e) if not isinstance(e, SystemExit) else repr(e.code)
        except _BaseException:
            name, text = "exception", ""
        if name == "SystemExit":
            report(False, f"SystemExit({text}) (the program exited before check() finished)")
        else:
            report(False, f"{name}: {text}" if text else name)
        _exit(0)
    report(True, "passed")
    _exit(0)


if __name__ == "__main__":        # `python -I -c <this file>`; importing it does nothing
    main()
