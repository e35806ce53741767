# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense projections over pipower's weight formats (f32, f16, q8, q4; layouts in pipower/quant.py).

    gemv(fmt, data, scales, x [K], out [N])        decode: y = W x, row-parallel, reads W once
    gemm(fmt, data, scales, x [T, K], out [T, N])  Y = X W^T: T <= MAX_TOKENS batch-invariant row kernel
                                                    (row t bitwise gemv(x[t])), above it dequantized
                                                    row tiles + BLAS (large prompt prefills)
    dequantize_rows(fmt, data, scales, ...)         float32 rows exactly as quant.dequantize gives them

`fmt` is the QMatrix format name, `data`/`scales` its arrays (scales None for f32/f16); each row must be
contiguous, rows may be strided (the FFN bundles of pipower/arena.py interleave gate/up/down rows). The
row loops are C (_linear_impl.h); `simd=False` selects the portable C version instead of the AVX-512 one (for tests;
ignored when the module was built without AVX-512, see HAVE_AVX512). Accumulation is float32.
Results of gemv do not depend on n_threads (a row is always one dot product computed by the same code).
Bad arguments raise InvalidArgumentError (the checks of _checks.pxd, shared by every kernel module).
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport parallel, prange
from libc.math cimport sqrtf
from libc.stdint cimport int32_t, uint16_t

from ._checks cimport check_array, check_out, check_threads, invalid

cnp.import_array()

from libc.stdlib cimport malloc, free

cdef extern from "_int8_impl.h" nogil:
    int PP_HAVE_VNNI512
    Py_ssize_t pp_xq_bytes(Py_ssize_t K)
    pp_xq pp_xq_at(const char *buf, Py_ssize_t K, Py_ssize_t t)
    int PP_XQ_Q4, PP_XQ_Q8, PP_XQ_Q4E
    void pp_xq_quantize(const float *x, Py_ssize_t K, char *buf, int kind, int isa)
    void pp_gemm_int_rows(int fmt, int isa, const char *data, Py_ssize_t rs, const uint16_t *scales,
                          Py_ssize_t ss, const pp_xq *x, Py_ssize_t T, float *y, Py_ssize_t N, Py_ssize_t K,
                          Py_ssize_t n0, Py_ssize_t n1)

cdef extern from "_batch_impl.h" nogil:
    void pp_gemm_rows(int fmt, int simd, const char *data, Py_ssize_t rs, const uint16_t *scales,
                      Py_ssize_t ss, const float *x, Py_ssize_t T, float *y, Py_ssize_t N, Py_ssize_t K,
                      Py_ssize_t n0, Py_ssize_t n1)

cdef extern from "_linear_impl.h" nogil:
    int PP_HAVE_AVX512
    int PP_F32, PP_F16, PP_Q8, PP_Q4
    void pp_gemv_rows(int fmt, int simd, const char *data, Py_ssize_t rs, const uint16_t *scales,
                      Py_ssize_t ss, const float *x, float *y, Py_ssize_t K, Py_ssize_t n0, Py_ssize_t n1)
    void pp_dequant_rows(int fmt, const char *data, Py_ssize_t rs, const uint16_t *scales, Py_ssize_t ss,
                         const int32_t *idx, Py_ssize_t base, float *out, Py_ssize_t K, Py_ssize_t r0,
                         Py_ssize_t r1)

HAVE_AVX512 = bool(PP_HAVE_AVX512)   # the AVX-512 row kernels were compiled in
HAVE_VNNI512 = bool(PP_HAVE_VNNI512) # the AVX-512 VNNI integer-dot kernel was compiled in


def available_integer_kernels():
    """-> names of the integer-dot kernels this CPU and build run, slowest first."""
    return int_isas()


def integer_kernels():
    """-> (names of the integer-dot kernels this CPU and build run, slowest first, e.g. ("c", "avx2",
    "avxvnni", "avx512vnni"); the one simd=True uses: the last, or PIPOWER_INT_ISA's). Raises
    InvalidArgumentError when PIPOWER_INT_ISA names a kernel this machine lacks."""
    return int_isas(), INT_ISAS[check_simd(True)]


INT_ISAS = isa_names()        # every integer-dot kernel level, slowest first ("c", "avx2", "avxvnni", "avx512vnni")
FORMATS = ("f32", "f16", "q8", "q4")
FMT_CODE = {"f32": PP_F32, "f16": PP_F16, "q8": PP_Q8, "q4": PP_Q4}

cdef object _F32 = np.dtype(np.float32)
cdef object _F16 = np.dtype(np.float16)
cdef object _U16 = np.dtype(np.uint16)
cdef object _DATA_DTYPES = {"f32": (_F32,), "f16": (_F16, _U16), "q8": (np.dtype(np.int8),),
                            "q4": (np.dtype(np.uint8),)}
# Below this many weight bytes one thread beats waking the team (a wake-up costs a few microseconds).
cdef Py_ssize_t PARALLEL_MIN_BYTES = 1 << 16
# gemm dequantizes this many float32 bytes of W per tile (stays in L2 while BLAS uses it).
cdef Py_ssize_t GEMM_TILE_BYTES = 1 << 20
# gemm over at most this many tokens runs the batch-invariant row kernel (_batch_impl.h); more tokens
# (a long prompt's prefill) go to dequantize + BLAS, whose results depend on T.
MAX_TOKENS = 64


# Format name -> (code, accepted data type numbers, whether it has scales): check_weight's fast path.
cdef dict _FAST = {"f32": (PP_F32, cnp.NPY_FLOAT32, cnp.NPY_FLOAT32, False),
                   "f16": (PP_F16, cnp.NPY_FLOAT16, cnp.NPY_UINT16, False),
                   "q8": (PP_Q8, cnp.NPY_INT8, cnp.NPY_INT8, True),
                   "q4": (PP_Q4, cnp.NPY_UINT8, cnp.NPY_UINT8, True)}


cdef Py_ssize_t _fast_row_stride(object a, int t1, int t2):
    """_row_stride() for a 2-D ndarray of type t1 or t2 through NumPy's C API; -1 when anything is off
    (the caller then runs the Python checks, which raise the precise error)."""
    if not cnp.PyArray_Check(a):
        return -1
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_NDIM(arr) != 2:
        return -1
    cdef int t = cnp.PyArray_TYPE(arr)
    if t != t1 and t != t2:
        return -1
    cdef Py_ssize_t rows = cnp.PyArray_DIM(arr, 0), cols = cnp.PyArray_DIM(arr, 1)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(arr), s0, s1
    if rows <= 1 or cnp.PyArray_IS_C_CONTIGUOUS(arr):
        return cols
    s0, s1 = cnp.PyArray_STRIDE(arr, 0), cnp.PyArray_STRIDE(arr, 1)
    if (cols > 1 and s1 != item) or s0 % item or s0 < cols * item:
        return -1
    return s0 // item


cdef Py_ssize_t _row_stride(object a, str name) except -1:
    """Elements between consecutive rows of a 2-D ndarray (checked by check_array) whose rows must not
    overlap (C-contiguous, or row-strided views such as pipower.arena's FFN bundles)."""
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    cdef Py_ssize_t stride = _fast_row_stride(a, t, t)      # -1 here: the rows themselves are wrong
    if stride < 0:
        raise invalid(f"{name} must have contiguous, non-overlapping rows (strides {a.strides} for "
                      f"shape {a.shape}); use numpy.ascontiguousarray")
    return stride


def check_weight(fmt, data, scales, str name="w"):
    """Validate one matrix in format `fmt` -> (format code, N, K, rs, ss): the logical float matrix is
    [N, K]; row n's data starts rs bytes after row n-1's, its scales ss float16 elements after (0: none).
    Runs on every projection call, so the common case goes through NumPy's C API (~0.2 us, not ~1.3)."""
    cdef Py_ssize_t N, K, rs, ss = 0
    fast = _FAST.get(fmt)
    if fast is not None:
        code, t1, t2, quantized = fast
        rs = _fast_row_stride(data, t1, t2)
        if rs >= 0:
            N, K = cnp.PyArray_DIM(<cnp.ndarray>data, 0), cnp.PyArray_DIM(<cnp.ndarray>data, 1)
            if fmt == "q4":
                K *= 2
            if not quantized and scales is None:
                return code, N, K, rs * cnp.PyArray_ITEMSIZE(<cnp.ndarray>data), 0
            if quantized:
                ss = _fast_row_stride(scales, cnp.NPY_FLOAT16, cnp.NPY_FLOAT16)
                if (ss >= 0 and cnp.PyArray_DIM(<cnp.ndarray>scales, 0) == N
                        and cnp.PyArray_DIM(<cnp.ndarray>scales, 1) * 32 == K):
                    return code, N, K, rs, ss
    return _check_weight_slow(fmt, data, scales, name)


def _check_weight_slow(fmt, data, scales, str name):
    if fmt not in _DATA_DTYPES:
        raise invalid(f"{name}: unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_array(data, f"{name} data", _DATA_DTYPES[fmt], 2, False)
    cdef Py_ssize_t N = data.shape[0], K = data.shape[1], ss = 0
    cdef Py_ssize_t rs = _row_stride(data, f"{name} data") * data.itemsize
    if fmt == "q4":
        K *= 2
    if fmt == "f32" or fmt == "f16":
        if scales is not None:
            raise invalid(f"{name}: format {fmt} has no scales, got an array")
    else:
        check_array(scales, f"{name} scales", (_F16,), 2, False)
        if scales.shape[0] != N or scales.shape[1] * 32 != K:
            raise invalid(f"{name} scales must have shape ({N}, {K // 32}) for a {fmt} matrix of "
                          f"{N}x{K} (K a multiple of 32), got {scales.shape}")
        ss = _row_stride(scales, f"{name} scales")
    return FMT_CODE[fmt], N, K, rs, ss


cdef inline const char *_ptr(object a):
    return <const char *>cnp.PyArray_DATA(a)


cdef inline const uint16_t *_sptr(object scales):
    return NULL if scales is None else <const uint16_t *>cnp.PyArray_DATA(scales)


# ---- rows of a matrix, split over threads --------------------------------------------------------
cdef inline void _rows_part(int fmt, int simd, const char *data, Py_ssize_t rs, const uint16_t *scales,
                            Py_ssize_t ss, const float *x, const pp_xq *xq, Py_ssize_t T, float *y, Py_ssize_t N,
                            Py_ssize_t K, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    # rows [lo, hi): integer dots when xq is set, else one token (the tuned decode kernel) or T tokens
    if xq != NULL:
        pp_gemm_int_rows(fmt, simd, data, rs, scales, ss, xq, T, y, N, K, lo, hi)
    elif T == 1:
        pp_gemv_rows(fmt, simd, data, rs, scales, ss, x, y, K, lo, hi)
    else:
        pp_gemm_rows(fmt, simd, data, rs, scales, ss, x, T, y, N, K, lo, hi)


cdef void _rows(int fmt, int simd, const char *data, Py_ssize_t rs, const uint16_t *scales, Py_ssize_t ss,
                const float *x, const pp_xq *xq, Py_ssize_t T, float *y, Py_ssize_t N, Py_ssize_t K,
                int nt) noexcept nogil:
    # Y [T, N] = rows of W against T tokens. Thread p owns rows [p*per, (p+1)*per) (static, contiguous:
    # each thread streams its own part of W; per is a multiple of 16 so no two threads write one cache
    # line of y). Each (t, n) is one dot product whose arithmetic never depends on the thread or on T.
    cdef Py_ssize_t per, p, lo, hi
    if nt <= 1:
        _rows_part(fmt, simd, data, rs, scales, ss, x, xq, T, y, N, K, 0, N)
        return
    per = (N + nt - 1) // nt
    per = (per + 15) // 16 * 16
    with parallel(num_threads=nt):
        for p in prange(nt, schedule="static"):
            lo = p * per
            hi = min(N, lo + per)
            if lo < hi:
                _rows_part(fmt, simd, data, rs, scales, ss, x, xq, T, y, N, K, lo, hi)


cdef inline void _gemv(int fmt, int simd, const char *data, Py_ssize_t rs, const uint16_t *scales,
                       Py_ssize_t ss, const float *x, float *y, Py_ssize_t N, Py_ssize_t K, int nt) noexcept nogil:
    _rows(fmt, simd, data, rs, scales, ss, x, NULL, 1, y, N, K, nt)


def gemv(fmt, data, scales, x, out=None, n_threads=1, simd=True):
    """y = W @ x for one token. W: a matrix [N, K] in `fmt` (data, scales as in QMatrix);
    x: float32 [K]; out: float32 [N] or None. Returns out."""
    cdef int nt = check_threads(n_threads)
    cdef int code
    cdef Py_ssize_t N, K, rs, ss
    code, N, K, rs, ss = check_weight(fmt, data, scales)
    check_array(x, "x", (_F32,), 1, True)
    if x.shape[0] != K:
        raise invalid(f"x must have shape ({K},) to match a {N}x{K} matrix, got {x.shape}")
    out = check_out(out, "out", (N,))
    if N == 0:
        return out
    if data.nbytes < PARALLEL_MIN_BYTES:
        nt = 1
    _gemv(code, 1 if simd else 0, _ptr(data), rs, _sptr(scales), ss, <const float *>cnp.PyArray_DATA(x),
          <float *>cnp.PyArray_DATA(out), N, K, <int>min(nt, N))
    return out


# ---- dequantize rows ------------------------------------------------------------------------------
cdef void _dequant(int fmt, const char *data, Py_ssize_t rs, const uint16_t *scales, Py_ssize_t ss,
                   const int32_t *idx, Py_ssize_t base, float *out, Py_ssize_t R, Py_ssize_t K,
                   int nt) noexcept nogil:
    cdef Py_ssize_t per, p, lo, hi
    if nt <= 1:
        pp_dequant_rows(fmt, data, rs, scales, ss, idx, base, out, K, 0, R)
        return
    per = (R + nt - 1) // nt
    with parallel(num_threads=nt):
        for p in prange(nt, schedule="static"):
            lo = p * per
            hi = min(R, lo + per)
            if lo < hi:
                pp_dequant_rows(fmt, data, rs, scales, ss, idx, base, out, K, lo, hi)


def dequantize_rows(fmt, data, scales, idx=None, start=0, stop=None, out=None, n_threads=1):
    """Rows of W as float32, bit-identical to pipower.quant.dequantize.

    idx: int32 [R] row indices (any order, repeats allowed, each in [0, N)), or None for rows
    start..stop. out: float32 [R, K] or None. Returns out.
    """
    cdef int nt = check_threads(n_threads)
    cdef int code
    cdef Py_ssize_t N, K, R, rs, ss, base = 0
    code, N, K, rs, ss = check_weight(fmt, data, scales)
    cdef const int32_t *ip = NULL
    if idx is not None:
        check_array(idx, "idx", (np.dtype(np.int32),), 1, True)
        R = idx.shape[0]
        if R and (idx.min() < 0 or idx.max() >= N):
            raise invalid(f"idx values must lie in [0, {N}), got min {idx.min()} max {idx.max()}")
        ip = <const int32_t *>cnp.PyArray_DATA(idx)
    else:
        stop = N if stop is None else stop
        if not (0 <= start <= stop <= N):
            raise invalid(f"need 0 <= start <= stop <= {N}, got start={start} stop={stop}")
        base, R = start, stop - start
    out = check_out(out, "out", (R, K))
    if R == 0 or K == 0:
        return out
    if R * K * 4 < PARALLEL_MIN_BYTES:
        nt = 1
    _dequant(code, _ptr(data), rs, _sptr(scales), ss, ip, base, <float *>cnp.PyArray_DATA(out), R, K,
             <int>min(nt, R))
    return out


# ---- gemm -----------------------------------------------------------------------------------------
cdef class QuantizedActivations:
    """x [T, K] quantized per 32-block for the integer dots with weights in `fmt` (q4 or q8; the layout
    of _int8_impl.h), in C memory; panels=True lays q4's out for weight panels (_panel_impl.h)."""

    def __cinit__(self, x, fmt="q4", panels=False, simd=True, n_threads=1):
        cdef int nt = check_threads(n_threads)
        if fmt not in ("q4", "q8"):
            raise invalid(f"integer dot products are implemented for q4 and q8 weights, not {fmt}")
        cdef int kind = PP_XQ_Q8 if fmt == "q8" else (PP_XQ_Q4E if panels else PP_XQ_Q4)
        cdef int isa = check_simd(simd)   # which vector code quantizes (all write the same bytes)
        self.fmt, self.panels = fmt, panels
        check_array(x, "x", (_F32,), 2, True)
        self.T, self.K = x.shape[0], x.shape[1]
        if self.K % 32:
            raise invalid(f"the integer dot needs K a multiple of 32, got {self.K}")
        cdef Py_ssize_t nbytes = pp_xq_bytes(self.K), t
        self.buf = <char *>malloc(max(1, self.T * nbytes))
        self.rows = <pp_xq *>malloc(max(1, self.T) * sizeof(pp_xq))
        if self.buf == NULL or self.rows == NULL:
            raise MemoryError()
        cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
        # Rows are quantized apart (each by the same code, so the same bytes on any thread), on a team
        # from 16 K elements (an 8-token FFN's [8, 4864] h: 17.6 us on one thread, 10.8 on two; ~15 ns
        # per 32-block; a 512-token prompt quantizes ~2.9 M blocks: whole 64-token forwards 0.96).
        if self.T * self.K < 16384:
            nt = 1
        nt = <int>min(nt, self.T)
        with nogil:
            if nt <= 1:
                for t in range(self.T):
                    pp_xq_quantize(xp + t * self.K, self.K, self.buf + t * nbytes, kind, isa)
            else:
                with parallel(num_threads=nt):
                    for t in prange(self.T, schedule="static"):
                        pp_xq_quantize(xp + t * self.K, self.K, self.buf + t * nbytes, kind, isa)
            for t in range(self.T):
                self.rows[t] = pp_xq_at(self.buf, self.K, t)

    def __dealloc__(self):
        free(self.buf)
        free(self.rows)

    def arrays(self):
        """-> (q int8 [T, nbp*32] in the kernel's arrangement, d float32 [T, nbp], c int32 [T, nbp]) copies,
        for tests against pipower.intdot."""
        cdef Py_ssize_t nbytes = pp_xq_bytes(self.K), nbp = nbytes // 40
        raw = np.frombuffer((<char *>self.buf)[:self.T * nbytes], dtype=np.uint8).reshape(self.T, nbytes)
        return (raw[:, :nbp * 32].view(np.int8).copy(), raw[:, nbp * 32:nbp * 36].view(np.float32).copy(),
                raw[:, nbp * 36:].view(np.int32).copy())


def gemm_int8(fmt, data, scales, x, out=None, n_threads=1, simd=True):
    """Y = X @ W^T over int8-quantized activations (q4 or q8 weights): x float32 [T, K] is quantized per
    32-block (pipower.intdot), then exact 4/8-bit x int8 block dots; out float32 [T, N]. Any T; row t is
    bitwise the one-token result (batch invariance) for any n_threads, VNNI or portable kernel alike."""
    cdef int nt = check_threads(n_threads)
    cdef int code
    cdef Py_ssize_t N, K, T, rs, ss
    code, N, K, rs, ss = check_weight(fmt, data, scales)
    if fmt not in ("q4", "q8"):
        raise invalid(f"integer dot products are implemented for q4 and q8 weights, not {fmt}")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    check_array(x, "x", (_F32,), 2, True)
    T = x.shape[0]
    if x.shape[1] != K:
        raise invalid(f"x must have shape (T, {K}) to match a {N}x{K} matrix, got {x.shape}")
    out = check_out(out, "out", (T, N))
    if T == 0 or N == 0:
        return out
    cdef int isa = check_simd(simd)
    xq = QuantizedActivations(x, fmt, simd=simd)
    if data.nbytes < PARALLEL_MIN_BYTES:
        nt = 1
    _rows(code, isa, _ptr(data), rs, _sptr(scales), ss, NULL, (<QuantizedActivations>xq).rows, T,
          <float *>cnp.PyArray_DATA(out), N, K, <int>min(nt, N))
    return out


def gemm(fmt, data, scales, x, out=None, n_threads=1, simd=True, invariant=None):
    """Y = X @ W^T for T tokens. W: [N, K] in `fmt`; x: float32 [T, K]; out: float32 [T, N].

    invariant (default: T <= MAX_TOKENS): the batched row kernel on n_threads OpenMP threads, each
    weight row read once for all T tokens, row t of Y bitwise gemv(x[t]) (batch invariance). Otherwise
    (long prompts): f32 goes straight to NumPy's BLAS; compact formats are dequantized ~1 MiB of rows at
    a time into float32 scratch (exactly dequantize()'s values, on ONE thread so the OpenMP team and the
    BLAS pool never run at the same time) and each tile is multiplied by BLAS: Y[:, tile] = X @ tile^T;
    BLAS uses its own pool (pipower.threads.blas_threads) and its sums depend on T.
    """
    cdef int nt = check_threads(n_threads)
    cdef int code
    cdef Py_ssize_t N, K, T, n0, n1, R, rs, ss
    code, N, K, rs, ss = check_weight(fmt, data, scales)
    check_array(x, "x", (_F32,), 2, True)
    T = x.shape[0]
    if x.shape[1] != K:
        raise invalid(f"x must have shape (T, {K}) to match a {N}x{K} matrix, got {x.shape}")
    out = check_out(out, "out", (T, N))
    if T == 0 or N == 0:
        return out
    if invariant is None:
        invariant = T <= MAX_TOKENS
    if invariant:
        if data.nbytes < PARALLEL_MIN_BYTES:
            nt = 1
        _rows(code, 1 if simd else 0, _ptr(data), rs, _sptr(scales), ss, <const float *>cnp.PyArray_DATA(x),
              NULL, T, <float *>cnp.PyArray_DATA(out), N, K, <int>min(nt, N))
        return out
    if fmt == "f32":
        return np.matmul(x, data.T, out=out)
    R = max(16, GEMM_TILE_BYTES // (4 * max(K, 1)))
    if R >= N:
        tile = dequantize_rows(fmt, data, scales)
        return np.matmul(x, tile.T, out=out)
    tile = np.empty((R, K), dtype=np.float32)
    part = np.empty((T, R), dtype=np.float32)     # BLAS writes a contiguous block, then one strided copy
    cdef const char *dp = _ptr(data)
    cdef const uint16_t *sp = _sptr(scales)
    cdef float *tp = <float *>cnp.PyArray_DATA(tile)
    for n0 in range(0, N, R):
        n1 = min(N, n0 + R)
        t = tile[:n1 - n0]
        with nogil:
            pp_dequant_rows(code, dp, rs, sp, ss, NULL, n0, tp, K, 0, n1 - n0)
        if n1 - n0 == R:
            np.matmul(x, t.T, out=part)
            out[:, n0:n1] = part
        else:
            out[:, n0:n1] = x @ t.T
    return out


# ---- fused predictor (decode) ----------------------------------------------------------------------
def predict_active(fc1, fc2, b2, x, float tau, out_idx=None, n_threads=1):
    """The neurons a PowerInfer predictor lets through for one token, in one call:
        xn = x / sqrt(mean(x^2) + 1e-6);  h = relu(fc1 xn) [r];  logits = fc2 h + b2 [F]
        -> sorted int32 indices i with logits[i] >= tau (a new array, or the first n of out_idx).
    fc1, fc2: (fmt, data, scales) of [r, D] and [F, r] matrices; b2: float32 [F]; x: float32 [D].
    Same arithmetic as ops.linear row by row (pipower.sparse.predictor.PredictorSelector.logits), minus
    NumPy's call overheads: on SmolLM2 the predictor's two small GEMVs were dominated by them."""
    cdef int nt = check_threads(n_threads)
    cdef int c1, c2
    cdef Py_ssize_t R, D, F, R2, i, n = 0, d, rs1, ss1, rs2, ss2
    c1, R, D, rs1, ss1 = check_weight(fc1[0], fc1[1], fc1[2], "fc1")
    c2, F, R2, rs2, ss2 = check_weight(fc2[0], fc2[1], fc2[2], "fc2")
    if R2 != R:
        raise invalid(f"fc2 must be [F, {R}] to follow fc1 [{R}, {D}], got [{F}, {R2}]")
    check_array(x, "x", (_F32,), 1, True)
    check_array(b2, "b2", (_F32,), 1, True)
    if x.shape[0] != D or b2.shape[0] != F:
        raise invalid(f"x must be ({D},) and b2 ({F},), got {x.shape} and {b2.shape}")
    xn = np.empty(D, np.float32)
    hidden = np.empty(R, np.float32)
    logits = np.empty(F, np.float32)
    idx = np.empty(F, np.int32) if out_idx is None else check_out(out_idx, "out_idx", (F,))
    cdef float[::1] xv = x, xnv = xn, hv = hidden, lv = logits, bv = b2
    cdef int[::1] iv = idx
    cdef double ss = 0.0
    cdef float s
    cdef const char *w1 = _ptr(fc1[1])
    cdef const char *w2 = _ptr(fc2[1])
    cdef const uint16_t *s1 = _sptr(fc1[2])
    cdef const uint16_t *s2 = _sptr(fc2[2])
    cdef int nt1 = 1 if fc1[1].nbytes < PARALLEL_MIN_BYTES else <int>min(nt, R)
    cdef int nt2 = 1 if fc2[1].nbytes < PARALLEL_MIN_BYTES else <int>min(nt, F)
    with nogil:
        for d in range(D):                          # mean of squares in double, then float32 as NumPy
            ss = ss + <double>xv[d] * xv[d]
        s = sqrtf(<float>(ss / D) + <float>1e-6)
        for d in range(D):
            xnv[d] = xv[d] / s
        _gemv(c1, 1, w1, rs1, s1, ss1, &xnv[0], &hv[0], R, D, nt1)
        for i in range(R):
            if hv[i] < 0:
                hv[i] = 0
        _gemv(c2, 1, w2, rs2, s2, ss2, &hv[0], &lv[0], F, R, nt2)
        for i in range(F):
            if lv[i] + bv[i] >= tau:
                iv[n] = <int>i
                n = n + 1
    return idx[:n]
