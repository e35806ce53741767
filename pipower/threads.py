"""Thread pools: pipower's OpenMP team (pipower._cpu kernels) and NumPy's BLAS pool share the cores.

Idle threads of one pool busy-wait on a core the other pool needs: libgomp workers spin after each
parallel region (OMP_WAIT_POLICY=ACTIVE / GOMP_SPINCOUNT), OpenBLAS workers after each call. Measured
here (2 cores, OpenBLAS 0.3.31 pthreads, libgomp; a step = BLAS 4864x896 gemv + 64x896 @ 896x4864, then
three 2-thread OpenMP kernels; sum of the parts run alone ~3.3 ms):

    BLAS threads  libgomp idle policy             step     2-thread rms_norm [512, 896], back to back
    2             ACTIVE (spin forever)           17.0 ms   30 us
    2             default (spin ~300k)            14.4 ms   -
    2             PASSIVE (sleep at once)          3.5 ms  113 us   (futex wake ~50-70 us; 1 thread: 56 us)
    2             PASSIVE + GOMP_SPINCOUNT=1000    3.8 ms   29 us
    1             ACTIVE                           6.0 ms   30 us   (BLAS part itself 2x slower on 1 thread)

Limiting BLAS to 1 thread *around* each OpenMP kernel does not help (a BLAS worker already spinning
keeps spinning whatever the pool size says), so the rules are "one pool at a time":
  * pipower._cpu calls `openmp_env_defaults()` before libgomp loads: unless the user set either
    variable, OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=20000 - idle workers spin a while (so kernels
    run back to back keep a warm team) then sleep (so they do not steal BLAS's core for long). Kernels
    still skip the parallel region when the work is tiny. 20000 (was 1000): the Python between two
    kernels of a forward often outlasts 1000 spins (~20-40 us here), and each later region then pays a
    wake-up (~20 us; a 2-thread region after a 40 us gap: 19 us at 1000, 0.5 us at 20000, which spins
    ~0.4 ms). Qwen2.5-0.5B q8, 2 threads, five interleaved runs: decode step and 8-token forward ~3%
    faster. Inside a forward BLAS runs on one thread (`ops.forward_scope`), so the longer spin does not
    meet a second BLAS thread there.
  * `blas_threads(n)` limits the BLAS pool for a scope (one generate call, a benchmark), never per
    kernel: threadpoolctl.threadpool_limits() costs ~200 us per call (it rediscovers the loaded
    libraries), a cached ThreadpoolController.limit() ~5 us, the raw set_num_threads used here ~1 us.
  * `pool_info()` reports both pools and the relevant environment for `pipower info`.
"""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache

# Environment variables that decide how the pools behave; reported by pool_info().
_POOL_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
             "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS")


def openmp_env_defaults() -> None:
    """Short spin, then sleep, for idle OpenMP workers - unless the user chose a policy. Only effective
    before the OpenMP runtime is loaded (pipower._cpu calls it just before importing the extension)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "20000"  # libgomp: overrides PASSIVE's 0; ignored by other runtimes


@lru_cache(maxsize=None)
def _blas_controllers() -> tuple:
    """threadpoolctl's controllers for the BLAS libraries loaded now (discovery is slow: done once).

    NumPy loads its BLAS at import, so by the time pipower runs a kernel the list is complete.
    """
    import numpy  # noqa: F401  (make sure NumPy's BLAS is loaded before discovery)
    from threadpoolctl import ThreadpoolController
    return tuple(c for c in ThreadpoolController().lib_controllers if c.user_api == "blas")


def blas_num_threads() -> list[int]:
    """Current thread count of each loaded BLAS library."""
    return [c.get_num_threads() for c in _blas_controllers()]


@contextlib.contextmanager
def blas_threads(n: int):
    """Limit every loaded BLAS library to `n` threads inside the `with` block, then restore.

    ~1 us per enter/exit; use it around a whole call (a generate step, a benchmark), not per kernel.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    libs = _blas_controllers()
    before = [c.get_num_threads() for c in libs]
    try:
        for c in libs:
            c.set_num_threads(n)
        yield
    finally:
        for c, m in zip(libs, before, strict=True):
            c.set_num_threads(m)


def pool_info() -> dict:
    """BLAS and OpenMP pools as threadpoolctl sees them now, plus the environment that shapes them."""
    from threadpoolctl import threadpool_info
    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture",
            "filepath")
    pools = [{k: p.get(k) for k in keep if k in p} for p in threadpool_info()]
    return {
        "blas": [p for p in pools if p.get("user_api") == "blas"],
        "openmp": [p for p in pools if p.get("user_api") == "openmp"],
        "env": {k: os.environ[k] for k in _POOL_ENV if k in os.environ},
    }
