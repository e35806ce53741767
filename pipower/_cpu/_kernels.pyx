# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled CPU kernels (Cython + OpenMP). The loops live in _kernels_impl.h; this file threads them.

Each public function is a thin Python-visible wrapper: it checks dtypes, shapes and contiguity (raising
InvalidArgumentError with the offending name), allocates `out` when it is None, then runs a nogil kernel
on typed memoryviews. `n_threads` is the OpenMP team size for that call (clamped to the work available; 1 = no
parallel region at all, so tiny decode-time calls pay no team start-up).

Build facts (OpenMP compiled in or not, flags, compiler, Cython) are compiled into the module below and
read by pipower._cpu.BUILD_INFO.
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport parallel, prange

from ._checks cimport check_array, check_out, check_threads, invalid

cnp.import_array()

cdef extern from "_kernels_impl.h" nogil:
    const char *PIPOWER_BUILD_CFLAGS
    const char *PIPOWER_BUILD_LDFLAGS
    const char *PIPOWER_BUILD_COMPILER
    const char *PIPOWER_BUILD_CYTHON
    int PIPOWER_BUILD_PORTABLE
    long PIPOWER_OPENMP_VERSION
    int pp_omp_max_threads()
    const char *pp_simd_level()
    void pp_rms_norm_row(const float *x, const float *w, float *y, Py_ssize_t D, float eps)

# ---- build facts ----------------------------------------------------------------------------------
OPENMP = PIPOWER_OPENMP_VERSION != 0           # True iff the C compiler saw -fopenmp (_OPENMP defined)
OPENMP_VERSION = int(PIPOWER_OPENMP_VERSION)   # e.g. 201511 (OpenMP 4.5); 0 without OpenMP
CFLAGS = PIPOWER_BUILD_CFLAGS.decode()          # the flags setup.py added, e.g. "-O3 -march=native -fopenmp"
LDFLAGS = PIPOWER_BUILD_LDFLAGS.decode()
COMPILER = PIPOWER_BUILD_COMPILER.decode()
CYTHON_VERSION = PIPOWER_BUILD_CYTHON.decode()
PORTABLE = bool(PIPOWER_BUILD_PORTABLE)         # True: built without -march=native (PIPOWER_PORTABLE=1)
SIMD = pp_simd_level().decode().split()        # instruction sets the compiler targeted


def openmp_max_threads():
    """omp_get_max_threads() now (OMP_NUM_THREADS, affinity); 1 when built without OpenMP."""
    return pp_omp_max_threads()


cdef tuple _F32S = (np.dtype(np.float32),)


# ---- RMSNorm --------------------------------------------------------------------------------------
cdef void _rms_norm(const float[:, ::1] x, const float[::1] w, float eps, float[:, ::1] y,
                    int nt) noexcept nogil:
    # x, y: [T, D]; w: [D]. One row per iteration; rows are independent, so the result does not
    # depend on the thread count (each row is always summed by the same code in the same order).
    cdef Py_ssize_t T = x.shape[0], D = x.shape[1], t
    if nt <= 1:
        for t in range(T):
            pp_rms_norm_row(&x[t, 0], &w[0], &y[t, 0], D, eps)
    else:
        with parallel(num_threads=nt):
            for t in prange(T, schedule="static"):
                pp_rms_norm_row(&x[t, 0], &w[0], &y[t, 0], D, eps)


def rms_norm(x, weight, eps, out=None, n_threads=1):
    """y = x / sqrt(mean(x^2, axis=-1) + eps) * weight, row by row.

    x: float32 [T, D] C-contiguous; weight: float32 [D]; out: float32 [T, D] or None (allocated; may be
    `x` itself for in-place). Returns out. Sum of squares in double (see _kernels_impl.h).
    """
    cdef int nt = check_threads(n_threads)
    check_array(x, "x", _F32S, 2, True)
    check_array(weight, "weight", _F32S, 1, True)
    cdef Py_ssize_t T = x.shape[0], D = x.shape[1]
    if D == 0:
        raise invalid("x must have at least one column (D >= 1)")
    if weight.shape[0] != D:
        raise invalid(f"weight must have shape ({D},) to match x {x.shape}, got {weight.shape}")
    out = check_out(out, "out", (T, D))
    if T == 0:
        return out
    # More threads than rows only adds idle team members, and below ~64 K elements the OpenMP region
    # costs more than it saves (T = 8, D = 896: 1.6 us on one thread, 3.8 us on two). Rows are summed
    # by the same code whatever the thread count, so this changes no bits.
    nt = <int>min(nt, T)
    if T * D < 65536:
        nt = 1
    _rms_norm(x, weight, <float>eps, out, nt)
    return out
