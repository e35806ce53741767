"""Backend selection: which ops implementation runs the graph. Never silent about a fallback."""
from __future__ import annotations

import logging
import numbers
import os

from .errors import BackendError, InvalidArgumentError
from .ops import NumpyOps

log = logging.getLogger(__name__)
BACKENDS = ("auto", "numpy", "cython")


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cython_status() -> tuple[bool, str | None]:
    """(available, reason it is not) for the compiled CPU kernels."""
    from . import _cpu
    return _cpu.AVAILABLE, _cpu.IMPORT_ERROR


def make_ops(backend: str = "auto", threads: int | None = None) -> NumpyOps:
    """-> the ops object for `backend`. 'auto' = cython when built, else numpy with a logged warning."""
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    available = default_threads()
    if threads is None:
        threads = available
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise InvalidArgumentError(f"threads must be an integer >= 1 (None = all {available} cores available), "
                                   f"got {threads!r}")
    threads = int(threads)
    if threads > available:
        log.warning("%d threads requested but only %d cores are available to this process: the extra threads "
                    "share cores and usually make the kernels slower", threads, available)
    ok, why = cython_status()
    if backend == "cython" and not ok:
        raise BackendError(f"the Cython extension pipower._cpu is not built ({why}); reinstall pipower "
                           f"with a C compiler, or pass backend='numpy'")
    if backend in ("auto", "cython") and ok:
        from ._cpu.ops import CythonOps
        return CythonOps(n_threads=threads)
    if backend == "auto":
        log.warning("pipower._cpu extension not available (%s): running the NumPy reference backend, "
                    "which is much slower; see `pipower info`", why)
    return NumpyOps(n_threads=threads)
