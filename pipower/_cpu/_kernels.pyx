# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled CPU kernels (Cython + OpenMP). The loops live in _kernels_impl.h; this file threads them.

Each public function is a thin Python-visible wrapper: it checks dtypes, shapes and contiguity and raises
ValueError with the offending name, allocates `out` when it is None, then runs a nogil kernel on typed
memoryviews. `n_threads` is the OpenMP team size for that call (clamped to the work available; 1 = no
parallel region at all, so tiny decode-time calls pay no team start-up).

Build facts (OpenMP compiled in or not, flags, compiler, Cython) are compiled into the module below and
read by pipower._cpu.BUILD_INFO.
"""
import numpy as np

from cython.parallel cimport parallel, prange
from libc.stdint cimport uint16_t

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
    void pp_f16_to_f32(const uint16_t *src, float *dst, Py_ssize_t n)
    void pp_bf16_to_f32(const uint16_t *src, float *dst, Py_ssize_t n)

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


# ---- argument checks ------------------------------------------------------------------------------
cdef object _F32 = np.dtype(np.float32)
cdef object _U16 = np.dtype(np.uint16)
cdef object _F16 = np.dtype(np.float16)


cdef int _check_threads(object n_threads) except -1:
    if not isinstance(n_threads, (int, np.integer)) or isinstance(n_threads, bool) or n_threads < 1:
        raise ValueError(f"n_threads must be an int >= 1, got {n_threads!r}")
    return <int>n_threads


cdef object _check(object a, str name, object dtypes, int ndim_min, int ndim_max):
    """Return `a` if it is a C-contiguous ndarray of one of `dtypes` with ndim in range, else raise."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype {want}, got {a.dtype}")
    if not (ndim_min <= a.ndim <= ndim_max):
        rng = str(ndim_min) if ndim_min == ndim_max else f"{ndim_min}..{ndim_max}"
        raise ValueError(f"{name} must be {rng}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    return a


cdef object _check_out(object out, str name, tuple shape):
    """`out` must be a writeable C-contiguous float32 array of exactly `shape`."""
    _check(out, name, (_F32,), len(shape), len(shape))
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


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
    cdef int nt = _check_threads(n_threads)
    _check(x, "x", (_F32,), 2, 2)
    _check(weight, "weight", (_F32,), 1, 1)
    cdef Py_ssize_t T = x.shape[0], D = x.shape[1]
    if D == 0:
        raise ValueError("x must have at least one column (D >= 1)")
    if weight.shape[0] != D:
        raise ValueError(f"weight must have shape ({D},) to match x {x.shape}, got {weight.shape}")
    if out is None:
        out = np.empty((T, D), dtype=np.float32)
    else:
        _check_out(out, "out", (T, D))
    if T == 0:
        return out
    # More threads than rows only adds idle team members.
    nt = <int>min(nt, T)
    _rms_norm(x, weight, <float>eps, out, nt)
    return out


# ---- 16-bit float rows -> float32 -----------------------------------------------------------------
cdef enum:
    KIND_F16 = 0
    KIND_BF16 = 1
    # Elements per thread are rounded to this so each thread's slice starts on a 64-byte line of dst.
    ALIGN_ELEMS = 16
    # Below this many elements one thread is faster than waking a team (~64 KiB of output).
    PARALLEL_MIN_ELEMS = 16384


cdef void _widen(const uint16_t[::1] src, float[::1] dst, int kind, int nt) noexcept nogil:
    # src, dst: [n] (the caller flattened [N, K]); thread p converts [p*per, min(n, (p+1)*per)).
    cdef Py_ssize_t n = src.shape[0], per, p, lo, hi
    if nt <= 1:
        if kind == KIND_F16:
            pp_f16_to_f32(&src[0], &dst[0], n)
        else:
            pp_bf16_to_f32(&src[0], &dst[0], n)
        return
    per = (n + nt - 1) // nt
    per = (per + ALIGN_ELEMS - 1) // ALIGN_ELEMS * ALIGN_ELEMS
    with parallel(num_threads=nt):
        for p in prange(nt, schedule="static"):
            lo = p * per
            hi = lo + per
            if hi > n:
                hi = n
            if lo < hi:
                if kind == KIND_F16:
                    pp_f16_to_f32(&src[lo], &dst[lo], hi - lo)
                else:
                    pp_bf16_to_f32(&src[lo], &dst[lo], hi - lo)


cdef object _widen_entry(object src, object out, object n_threads, tuple dtypes, int kind):
    cdef int nt = _check_threads(n_threads)
    _check(src, "src", dtypes, 1, 2)
    if out is None:
        out = np.empty(src.shape, dtype=np.float32)
    else:
        _check_out(out, "out", src.shape)
    cdef Py_ssize_t n = src.size
    if n == 0:
        return out
    if n < PARALLEL_MIN_ELEMS:
        nt = 1
    # Flat views: both arrays are C-contiguous, so [N, K] is just N*K consecutive elements.
    _widen(src.reshape(-1).view(np.uint16), out.reshape(-1), kind, nt)
    return out


def f16_to_f32(src, out=None, n_threads=1):
    """IEEE half -> float32, bit exact (NaN payloads kept, as numpy's astype does).

    src: float16 or uint16 (raw bits) [N, K] or [K], C-contiguous; out: float32 of the same shape or None.
    """
    return _widen_entry(src, out, n_threads, (_F16, _U16), KIND_F16)


def bf16_to_f32(src, out=None, n_threads=1):
    """bfloat16 (raw bits in uint16) -> float32, exact. src: uint16 [N, K] or [K]; out: float32 or None."""
    return _widen_entry(src, out, n_threads, (_U16,), KIND_BF16)
