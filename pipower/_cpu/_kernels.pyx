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
    ctypedef void (*pp_unary_loop)(char **args, const Py_ssize_t *dims, const Py_ssize_t *steps, void *data)
    void pp_silu_multiply(float *h, const float *g, Py_ssize_t n, pp_unary_loop exp_loop, void *exp_data)

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


# ---- SiLU product on NumPy's exp loop ---------------------------------------------------------------
cdef pp_unary_loop _exp_loop = NULL
cdef void *_exp_data = NULL


cdef str _find_exp_loop():
    """Point _exp_loop at NumPy's float32 -> float32 exp loop (what np.exp runs on this CPU) and check it
    against np.exp on values that reach every branch (tiny, huge, infinities, NaN, -0.0, over- and
    underflow, each length modulo a vector): "" when it matches bit for bit, else why not."""
    global _exp_loop, _exp_data
    cdef cnp.ufunc u = np.exp
    cdef int i, j, found = -1
    for i in range(u.ntypes):
        if all(u.types[i * u.nargs + j] == cnp.NPY_FLOAT for j in range(u.nargs)):
            found = i
            break
    if found < 0 or u.nargs != 2:
        return "NumPy's exp has no float32 -> float32 loop"
    cdef pp_unary_loop loop = <pp_unary_loop><void *>u.functions[found]     # a plain C loop: no GIL needed
    cdef void *data = u.data[found]
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4093) * 30, rng.uniform(-104, 89, 4099),
                        [0.0, -0.0, 1e-45, -1e-45, 88.72, 88.73, -87.34, -103.98, -104, 1e30, -1e30,
                         np.inf, -np.inf, np.nan]]).astype(np.float32)
    cdef float[::1] xv = x
    cdef char *args[2]
    cdef Py_ssize_t dims[1]
    cdef Py_ssize_t steps[2]
    with np.errstate(all="ignore"):
        for n in (1, 7, 16, 17, 33, x.size):
            got = np.empty(n, dtype=np.float32)
            args[0] = <char *>&xv[0]
            args[1] = <char *>cnp.PyArray_DATA(got)
            dims[0] = n
            steps[0] = steps[1] = 4
            loop(args, dims, steps, data)
            if not np.array_equal(got.view(np.uint32), np.exp(x[:n]).view(np.uint32)):
                return f"NumPy's float32 exp loop, called directly, differs from np.exp ({n} values)"
    _exp_loop, _exp_data = loop, data
    return ""


# "" when silu_multiply can run (NumPy's exp loop found and checked at import), else the reason it cannot
# (pipower._cpu.linear_ops then runs NumPy's formula instead and `pipower info` says why).
SILU_UNAVAILABLE = _find_exp_loop()


def exp_loop_pointers():
    """(address of NumPy's float32 exp loop, its data pointer) as ints, for kernels in other modules that
    compute SiLU products in C (_panel.gemm_silu); raises BackendError when SILU_UNAVAILABLE says why not."""
    if SILU_UNAVAILABLE:
        from pipower.errors import BackendError
        raise BackendError(f"NumPy's exp loop is unavailable: {SILU_UNAVAILABLE}")
    return <size_t><void *>_exp_loop, <size_t>_exp_data


cdef void _silu(float *h, const float *g, Py_ssize_t n, Py_ssize_t chunk, int nt) noexcept nogil:
    cdef Py_ssize_t c, a, parts = (n + chunk - 1) // chunk
    if nt <= 1:
        pp_silu_multiply(h, g, n, _exp_loop, _exp_data)
        return
    with parallel(num_threads=nt):
        for c in prange(parts, schedule="static"):
            a = c * chunk
            pp_silu_multiply(h + a, g + a, min(chunk, n - a), _exp_loop, _exp_data)


def silu_multiply(h, g, n_threads=1):
    """h *= silu(g) in place, bit for bit pipower.ops.multiply_by_activation(h, g, "silu") (NumPy's
    formula, exp by NumPy's own float32 loop) but in L1-sized passes and split over n_threads.
    h, g: float32 C-contiguous arrays of one shape (g is left as is). Returns h."""
    cdef int nt = check_threads(n_threads)
    if SILU_UNAVAILABLE:
        from pipower.errors import BackendError
        raise BackendError(f"silu_multiply is unavailable: {SILU_UNAVAILABLE}")
    for name, a in (("h", h), ("g", g)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise invalid(f"{name} must be a C-contiguous float32 array")
    if h.shape != g.shape:
        raise invalid(f"h and g must have one shape, got {h.shape} and {g.shape}")
    if not h.flags.writeable:
        raise invalid("h must be writeable (it is changed in place)")
    cdef Py_ssize_t n = h.size
    if n == 0:
        return h
    # Below ~16 K elements (one token's 4864 gate values: ~4 us on one thread) a team's start costs
    # more than it saves; whole chunks of 4 K per thread otherwise. The bits never depend on it.
    if n < 16384:
        nt = 1
    nt = <int>min(nt, (n + 4095) // 4096)
    _silu(<float *>cnp.PyArray_DATA(h), <const float *>cnp.PyArray_DATA(g), n, 4096, nt)
    return h
