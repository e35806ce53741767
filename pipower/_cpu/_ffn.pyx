# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused sparse FFN for one token (decode), PowerInfer's CPU operator, in one OpenMP region.

    ffn_sparse(fmt, x [D], gate, up, down_t, idx [n] | None, act, out [D], h_out [n], n_threads)

gate / up / down_t are (data, scales) pairs of [F, D] matrices in format `fmt` (pipower.quant layouts;
scales None for f32/f16), gate None for a plain MLP; rows contiguous, the three matrices row-strided alike
(C-contiguous, or the interleaved FFN bundles of pipower.arena, whose spans the kernel prefetches whole).
idx: int32, sorted, unique, in [0, F): the active neurons; None = all F neurons (the dense FFN through the
same code). Each neuron's three weight rows are read once; no per-neuron Python. x may also hold up to
MAX_TOKENS tokens [T, D] (batch-invariant: row t is bitwise the one-token result).

Thread invariance: neurons are cut into fixed chunks (the size depends only on n), each chunk sums into
its own partial row, and partials are added in chunk order, so `out` is bitwise the same for any
n_threads (see _ffn_impl.h). Accumulation is float32. Bad arguments raise InvalidArgumentError.
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, uint16_t

from ..ops import ACT_CODES, check_activation
from ._checks cimport check_array, check_out, check_threads, invalid
from ._linear import check_weight
from ._linear cimport QuantizedActivations, check_simd, pp_xq

cnp.import_array()

cdef extern from "_ffn_batch_impl.h" nogil:
    int PP_ACT_SILU, PP_ACT_GELU, PP_ACT_GELU_TANH, PP_ACT_RELU
    float pp_act(int kind, float v)
    ctypedef struct pp_ffn_args:
        int fmt, simd, act
        Py_ssize_t D, n, rs, ss
        const char *gate
        const char *up
        const char *down
        const uint16_t *gate_s
        const uint16_t *up_s
        const uint16_t *down_s
        const char *bundle
        const int32_t *idx
        const float *x
        Py_ssize_t T
        const pp_xq *xq
        Py_ssize_t chunk
        float *hbuf
        unsigned char *live
        const float *pre
        int pre_gate
        float *h_out
    int PP_FFN_MAX_T
    void pp_ffn_chunk(const pp_ffn_args *a, Py_ssize_t j0, Py_ssize_t j1, float *acc)
    void pp_ffn_chunk_batch(const pp_ffn_args *a, Py_ssize_t j0, Py_ssize_t j1, float *acc)
    const char *pp_ffn_bundle_start(const pp_ffn_args *a)
    void pp_sum_partials(const float *part, Py_ssize_t C, Py_ssize_t D, float *out, Py_ssize_t k0,
                         Py_ssize_t k1)
    void pp_barrier()
    void pp_ffn_gate_pass(const pp_ffn_args *a, float tau, Py_ssize_t i0, Py_ssize_t i1, float *pre,
                          unsigned char *on)
    void pp_ffn_select(const pp_ffn_args *a, float tau, Py_ssize_t F, const float *pre, unsigned char *on)

# HF activation name -> kernel code: pipower.ops' table, which must number the formulas as the C enum does.
ACTS = ACT_CODES
if [ACTS[n] for n in ("silu", "gelu", "gelu_new", "relu")] != [PP_ACT_SILU, PP_ACT_GELU, PP_ACT_GELU_TANH,
                                                              PP_ACT_RELU]:
    raise ImportError("pipower.ops.ACT_CODES disagrees with the PP_ACT_* codes of _ffn_impl.h")
# At most this many chunks (partial rows) per call, and at least this many neurons per chunk: enough
# chunks to balance a few threads, few enough that the partials stay small ([<=32, D] floats).
cdef Py_ssize_t MAX_CHUNKS = 32
cdef Py_ssize_t MIN_CHUNK = 16
cdef Py_ssize_t SUM_SLICE = 64     # floats per reduction slice (4 cache lines)
MAX_TOKENS = PP_FFN_MAX_T          # ffn_sparse takes x [T, D] for T up to this (batch-invariant kernel)


cdef int _check_idx(const int32_t *idx, Py_ssize_t n, Py_ssize_t F) noexcept nogil:
    """0 if idx is strictly increasing within [0, F); else 1 + position of the first offence."""
    cdef Py_ssize_t j
    for j in range(n):
        if idx[j] < 0 or idx[j] >= F or (j > 0 and idx[j] <= idx[j - 1]):
            return <int>(j + 1)
    return 0


cdef void _set_matrices(pp_ffn_args *a, gate, up, down_t):
    """Row and scale pointers of (data, scales) pairs already checked by check_weight."""
    a.up = <const char *>cnp.PyArray_DATA(up[0])
    a.down = <const char *>cnp.PyArray_DATA(down_t[0])
    a.gate = NULL if gate is None else <const char *>cnp.PyArray_DATA(gate[0])
    a.up_s = NULL if up[1] is None else <const uint16_t *>cnp.PyArray_DATA(up[1])
    a.down_s = NULL if down_t[1] is None else <const uint16_t *>cnp.PyArray_DATA(down_t[1])
    a.gate_s = NULL if gate is None or gate[1] is None else <const uint16_t *>cnp.PyArray_DATA(gate[1])


cdef inline void _chunk(const pp_ffn_args *a, Py_ssize_t j0, Py_ssize_t j1, float *acc) noexcept nogil:
    if a.T == 1:
        pp_ffn_chunk(a, j0, j1, acc)
    else:
        pp_ffn_chunk_batch(a, j0, j1, acc)


cdef void _run(pp_ffn_args *a, Py_ssize_t n, Py_ssize_t CH, Py_ssize_t C, float *part, float *out,
               int nt) noexcept nogil:
    # Phase 1: chunk c = neurons [c*CH, min(n, (c+1)*CH)) -> part[c] ([T, D], a row of TD floats).
    # Phase 2 (after an explicit barrier: Cython's prange is `omp for nowait`): out[k] = sum_c part[c][k],
    # in chunk order, slices of k shared over the team. Chunks depend on n only, never on T, so every
    # token's sums are those of a decode step.
    cdef Py_ssize_t c, s, TD = a.T * a.D, S = (TD + SUM_SLICE - 1) // SUM_SLICE
    if C == 1:                                   # one chunk: its partial is the answer
        _chunk(a, 0, n, out)
        return
    if nt <= 1:
        for c in range(C):
            _chunk(a, c * CH, min(n, (c + 1) * CH), part + c * TD)
        pp_sum_partials(part, C, TD, out, 0, TD)
        return
    with parallel(num_threads=nt):
        for c in prange(C, schedule="static"):
            _chunk(a, c * CH, min(n, (c + 1) * CH), part + c * TD)
        pp_barrier()
        for s in prange(S, schedule="static"):
            pp_sum_partials(part, C, TD, out, s * SUM_SLICE, min(TD, (s + 1) * SUM_SLICE))


cdef void _gate_pass(pp_ffn_args *a, float tau, Py_ssize_t F, float *pre, unsigned char *on,
                     int nt) noexcept nogil:
    # Static contiguous neuron ranges, multiples of 16: each thread streams its own part of the gate rows.
    cdef Py_ssize_t per = ((F + nt - 1) // nt + 15) // 16 * 16, p
    if nt <= 1:
        pp_ffn_gate_pass(a, tau, 0, F, pre, on)
        return
    with parallel(num_threads=nt):
        for p in prange(nt, schedule="static"):
            if p * per < F:
                pp_ffn_gate_pass(a, tau, p * per, min(F, (p + 1) * per), pre, on)


def ffn_threshold(fmt, x, gate, up, down_t, tau, act, out=None, n_threads=1, simd=True, int_dot=False,
                  gate_dots=None):
    """The fused threshold FFN for one token: the neurons with |act(gate[i] . x)| > tau (|act(up[i] . x)|
    for a plain MLP) are selected and computed in one call, the gate rows read once. -> (out [D],
    number of neurons computed). out is bitwise ffn_sparse over the same selection (same dots, same
    chunks); same arguments as ffn_sparse, x [D] only.
    gate_dots: float32 [F], a gated FFN's gate dots gate[i] . x computed elsewhere (weight panels: the
    integer dots are bitwise these kernels'): no gate pass; only the kept neurons' up and down rows are
    read. gate may then be None (still a gated FFN: up and down_t alone, e.g. bundled without gate rows,
    so that a kept neuron's bytes are one contiguous span) or its rows (bundles whose gate bytes are
    skipped)."""
    if gate_dots is not None:
        check_array(gate_dots, "gate_dots", (np.dtype(np.float32),), 1, True)
        if gate_dots.shape[0] != up[0].shape[0]:
            raise invalid(f"gate_dots must have shape ({up[0].shape[0]},) like up's rows, "
                          f"got {gate_dots.shape}")
    return _ffn(fmt, x, gate, up, down_t, None, act, out, None, n_threads, simd, int_dot, tau, gate_dots)


def ffn_sparse(fmt, x, gate, up, down_t, idx, act, out=None, h_out=None, n_threads=1, simd=True,
               int_dot=False):
    """out[D] = sum_{i in idx} h_i * down_t[i], h_i = act(gate[i] . x) * (up[i] . x) (or act(up[i] . x)
    when gate is None). h_out: float32 [n] or None, receives h_i in idx order. Returns out.

    fmt: "f32" | "f16" | "q8" | "q4"; gate, up, down_t: (data, scales) of [F, D] matrices; x: float32
    [D]; idx: int32 [n] sorted unique in [0, F), or None for all neurons; act: a key of ACTS.
    x may also be [T, D] with 1 <= T <= MAX_TOKENS (out then [T, D], h_out not allowed): each weight row
    is read once for all T tokens, and row t of out is bitwise ffn_sparse(x[t]) with the same idx.
    int_dot (q4, q8): gate and up dots over int8-quantized x (pipower.intdot); the down rows stay float.
    """
    return _ffn(fmt, x, gate, up, down_t, idx, act, out, h_out, n_threads, simd, int_dot, None, None)[0]


cdef tuple _ffn(fmt, x, gate, up, down_t, idx, act, out, h_out, n_threads, simd, int_dot, tau, gate_dots):
    """ffn_sparse, or with tau not None ffn_threshold (gate_dots: its gate's dots given). -> (out, neurons
    computed)."""
    cdef int nt = check_threads(n_threads)
    cdef pp_ffn_args a
    cdef Py_ssize_t N, D, F, n, CH, C, j, rs, ss
    cdef float ftau
    cdef float *pre_p
    cdef unsigned char *on_p
    check_activation(act)
    a.fmt, F, D, a.rs, a.ss = check_weight(fmt, up[0], up[1], "up")
    for name, m in (("gate", gate), ("down_t", down_t)):
        if m is None:
            if name == "down_t":
                raise invalid("down_t is required")
            continue
        _, N, j, rs, ss = check_weight(fmt, m[0], m[1], name)
        if N != F or j != D:
            raise invalid(f"{name} must be {F}x{D} like up, got {N}x{j}")
        if N > 1 and (rs != a.rs or ss != a.ss):
            raise invalid(f"{name} rows must be strided like up's ({a.rs} data bytes, {a.ss} scales), "
                             f"got {rs} and {ss}")
    if isinstance(x, np.ndarray) and x.ndim == 2:
        check_array(x, "x", (np.dtype(np.float32),), 2, True)
        a.T = x.shape[0]
        if not 1 <= a.T <= MAX_TOKENS or x.shape[1] != D:
            raise invalid(f"x must have shape (T, {D}) with 1 <= T <= {MAX_TOKENS} to match {F}x{D} "
                             f"FFN matrices, got {x.shape}")
        if h_out is not None:
            raise invalid("h_out is only returned for one token (x of shape (D,))")
        if tau is not None:
            raise invalid("the fused threshold FFN takes one token (x of shape (D,))")
    else:
        check_array(x, "x", (np.dtype(np.float32),), 1, True)
        a.T = 1
        if x.shape[0] != D:
            raise invalid(f"x must have shape ({D},) to match {F}x{D} FFN matrices, got {x.shape}")
    a.idx = NULL
    if idx is None:
        n = F
    else:
        check_array(idx, "idx", (np.dtype(np.int32),), 1, True)
        n = idx.shape[0]
        a.idx = <const int32_t *>cnp.PyArray_DATA(idx)
        with nogil:
            j = _check_idx(a.idx, n, F)
        if j:
            raise invalid(f"idx must be sorted, unique and within [0, {F}); idx[{j - 1}] = "
                             f"{idx[j - 1]}" + (f" after {idx[j - 2]}" if j > 1 else ""))
        if n == F:          # sorted, unique, in range and F of them: every neuron, i.e. the dense pass
            a.idx = NULL    # (same neurons in the same order; only the prefetch policy differs)
    out = check_out(out, "out", x.shape)
    a.h_out = NULL
    if h_out is not None:
        h_out = check_out(h_out, "h_out", (n,))
        a.h_out = <float *>cnp.PyArray_DATA(h_out)
    if n == 0 or D == 0:
        out[...] = 0
        return out, 0
    a.xq = NULL
    if int_dot:
        xq = QuantizedActivations(x if x.ndim == 2 else x.reshape(1, -1), fmt, simd=simd)
        a.xq = (<QuantizedActivations>xq).rows
    # the float kernels take any nonzero as "AVX-512 where compiled in"; the integer dots need the level
    a.simd = check_simd(simd) if int_dot else (1 if simd else 0)
    a.act = ACTS[act]
    a.D = D
    a.x = <const float *>cnp.PyArray_DATA(x)
    _set_matrices(&a, gate, up, down_t)
    a.n = n
    a.bundle = pp_ffn_bundle_start(&a) if F > 1 else NULL
    a.pre = NULL
    a.pre_gate = 0
    if tau is not None:                                    # select, then the sparse FFN over the selection
        on = np.empty(F, dtype=np.uint8)
        ftau = <float>tau
        on_p = <unsigned char *>cnp.PyArray_DATA(on)
        if gate_dots is None:
            pre = np.empty(F, dtype=np.float32)
            pre_p = <float *>cnp.PyArray_DATA(pre)
            with nogil:
                _gate_pass(&a, ftau, F, pre_p, on_p, <int>min(nt, F))
        else:
            pre = gate_dots
            pre_p = <float *>cnp.PyArray_DATA(pre)
            with nogil:
                pp_ffn_select(&a, ftau, F, pre_p, on_p)
        idx = np.flatnonzero(on).astype(np.int32)
        n = idx.shape[0]
        if n == 0:
            out[...] = 0
            return out, 0
        a.idx = NULL if n == F else <const int32_t *>cnp.PyArray_DATA(idx)
        a.n = n
        a.pre = <const float *>cnp.PyArray_DATA(pre)
        a.pre_gate = gate is None and gate_dots is not None
    CH = max(MIN_CHUNK, (n + MAX_CHUNKS - 1) // MAX_CHUNKS)
    C = (n + CH - 1) // CH
    part = np.empty(C * a.T * D if C > 1 else 0, dtype=np.float32)   # [C, T, D] partial rows
    hbuf = np.empty(C * CH * a.T if a.T > 1 else 0, dtype=np.float32)   # [C, CH, T] h of each chunk
    live = np.empty(C * CH if a.T > 1 else 0, dtype=np.uint8)
    a.chunk = CH
    a.hbuf = <float *>cnp.PyArray_DATA(hbuf)
    a.live = <unsigned char *>cnp.PyArray_DATA(live)
    cdef float *pp = <float *>cnp.PyArray_DATA(part)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    with nogil:
        _run(&a, n, CH, C, pp, op, <int>min(nt, C))
    return out, n


def activation(act, x):
    """act(x) elementwise with the FFN kernels' own formulas (pp_act): a new float32 array shaped like x.
    Selections made from it (oracle mode's |act| > tau) agree with the fused threshold FFN's exactly."""
    check_activation(act)
    src = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(src)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(src)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    cdef Py_ssize_t i, n = src.size
    cdef int kind = ACTS[act]
    with nogil:
        for i in range(n):
            op[i] = pp_act(kind, sp[i])
    return out


def layout(fmt, gate, up, down_t):
    """"bundled" if ffn_sparse sees these matrices as neuron bundles (each neuron's rows and scales in one
    span, which it prefetches whole), else "separate". Same arguments as ffn_sparse."""
    cdef pp_ffn_args a
    cdef Py_ssize_t F
    a.fmt, F, a.D, a.rs, a.ss = check_weight(fmt, up[0], up[1], "up")
    _set_matrices(&a, gate, up, down_t)
    return "bundled" if F > 1 and pp_ffn_bundle_start(&a) != NULL else "separate"
