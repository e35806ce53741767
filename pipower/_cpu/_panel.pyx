# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Integer dots over weight panels (q4 / q8 matrices repacked 16 rows at a time; pipower/panels.py packs
them, _panel_impl.h says why and how):

    gemm_panels(fmt, data, scales, n_rows, x [T, K], out [T, N])   Y = X W^T, any T

Bit for bit pipower.intdot.dot of the same matrix (and so the row-major gemm_int8 of _linear): every
(token, row) is one dot in a fixed order, whatever T, the thread count or VNNI vs portable C.
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport parallel, prange
from libc.stdint cimport uint8_t, uint16_t

from ._checks cimport check_array, check_out, check_threads, invalid
from ._linear cimport QuantizedActivations, check_simd, pp_xq

from . import _kernels                       # NumPy's exp loop for gemm_silu's products

cnp.import_array()

cdef extern from "_panel_impl.h" nogil:
    int PP_Q8, PP_Q4
    ctypedef struct pp_panel_queue:
        pass
    int pp_queue_init(pp_panel_queue *q, Py_ssize_t panels, int threads)
    void pp_queue_free(pp_panel_queue *q)
    void pp_gemm_panels(int fmt, int isa, const uint8_t *data, const uint16_t *scales, const uint16_t *offsets,
                        Py_ssize_t nb, Py_ssize_t N, const pp_xq *x, Py_ssize_t T, float *y, Py_ssize_t p0,
                        Py_ssize_t p1, pp_panel_queue *queue, int thread)
    ctypedef void (*pp_unary_loop)(char **args, const Py_ssize_t *dims, const Py_ssize_t *steps, void *data)
    int pp_gemm_glu(int fmt, int isa, const uint8_t *G, const uint16_t *GS, const uint8_t *U, const uint16_t *US,
                    Py_ssize_t nb, Py_ssize_t N, const pp_xq *x, Py_ssize_t T, float *h, float *g,
                    pp_unary_loop exp_loop, void *exp_data, pp_panel_queue *queue, int thread)

PANEL = 16                                   # rows per panel
BLOCK_BYTES = {"q8": 512, "q4": 256, "q4m": 256}   # bytes of one 32-block of a panel's 16 rows


def _activation_format(fmt):
    """The weight format whose activation layout fmt's panels read: q4m runs q4's dots (then its offsets)."""
    return "q4" if fmt == "q4m" else fmt


def quantize_alike(fmt_a, fmt_b):
    """Whether panels of the two formats read the same quantized activations (one quantize() for both)."""
    return _activation_format(fmt_a) == _activation_format(fmt_b)


def quantize(x, fmt, simd=True, n_threads=1):
    """x float32 [T, K] -> its int8 blocks laid out for `fmt` panels, to pass to several gemm_panels.
    simd: as gemm_panels' (which vector code quantizes; the bytes are the same); n_threads: rows
    quantized apart on a team from 16 K elements (the same bytes)."""
    if fmt not in BLOCK_BYTES:
        raise invalid(f"weight panels hold q4, q8 or q4m weights, not {fmt}")
    return QuantizedActivations(x.reshape(1, -1) if x.ndim == 1 else x, _activation_format(fmt), panels=True,
                                simd=simd, n_threads=n_threads)


cdef tuple _U8 = (np.dtype(np.uint8),)
cdef tuple _F16 = (np.dtype(np.float16), np.dtype(np.uint16))
cdef tuple _F32 = (np.dtype(np.float32),)


cdef class PanelMatrix:
    """A panel-packed matrix whose arrays were checked once, for many gemm() calls: gemm_panels checks
    its data, scales and offsets on every call (~3 us of Python-level checks; a Qwen2.5-0.5B decode step
    makes ~120 calls). Holds the arrays it was given (they must not change shape). Arguments as
    gemm_panels'."""
    cdef readonly str fmt
    cdef readonly Py_ssize_t n_rows, n_cols
    cdef readonly object data, scales, offsets
    cdef str act_fmt
    cdef int code
    cdef Py_ssize_t P, nb

    def __cinit__(self, fmt, data, scales, Py_ssize_t n_rows, offsets=None):
        if fmt not in BLOCK_BYTES:
            raise invalid(f"weight panels hold q4, q8 or q4m weights, not {fmt}")
        if (offsets is None) != (fmt != "q4m"):
            raise invalid("q4m panels need their offsets" if offsets is None else f"{fmt} panels take no offsets")
        check_array(data, "panel data", _U8, 3, True)
        check_array(scales, "panel scales", _F16, 3, True)
        if offsets is not None:
            check_array(offsets, "panel offsets", _F16, 3, True)
            if offsets.shape != scales.shape:
                raise invalid(f"panel offsets must have the scales' shape {scales.shape}, got {offsets.shape}")
        cdef Py_ssize_t P = data.shape[0], nb = data.shape[1]
        if data.shape[2] != BLOCK_BYTES[fmt] or n_rows < 0 or P != (n_rows + PANEL - 1) // PANEL:
            raise invalid(f"{fmt} panels of {n_rows} rows must have shape ({(n_rows + PANEL - 1) // PANEL}, "
                          f"K/32, {BLOCK_BYTES[fmt]}), got {data.shape}")
        if scales.shape[0] != P or scales.shape[1] != nb or scales.shape[2] != PANEL:
            raise invalid(f"panel scales must have shape ({P}, {nb}, {PANEL}), got {scales.shape}")
        self.fmt, self.act_fmt = fmt, _activation_format(fmt)
        self.code = PP_Q8 if fmt == "q8" else PP_Q4
        self.data, self.scales, self.offsets = data, scales, offsets
        self.n_rows, self.n_cols, self.P, self.nb = n_rows, nb * 32, P, nb

    cdef tuple tokens(self, object x):
        """x float32 [T, K] (or [K]) or quantize(x, fmt), checked against this matrix -> (x, its
        QuantizedActivations or None when x is floats, T)."""
        cdef Py_ssize_t T, K
        if isinstance(x, QuantizedActivations):
            if (<QuantizedActivations>x).fmt != self.act_fmt or not (<QuantizedActivations>x).panels:
                raise invalid(f"activations quantized for {x.fmt} panels, not {self.fmt}")
            T, K = (<QuantizedActivations>x).T, (<QuantizedActivations>x).K
            xq = x
        else:
            if isinstance(x, np.ndarray) and x.ndim == 1:
                x = x.reshape(1, -1)
            check_array(x, "x", _F32, 2, True)
            T, K = x.shape[0], x.shape[1]
            xq = None
        if K != self.n_cols:
            raise invalid(f"x must have shape (T, {self.n_cols}) to match the panels, got {(T, K)}")
        return x, xq, T

    def gemm(self, x, out=None, n_threads=1, simd=True):
        """x float32 [T, K] (or quantize(x, fmt)) -> out float32 [T, n_rows]: gemm_panels."""
        cdef int nt = check_threads(n_threads)
        cdef Py_ssize_t T
        x, xq, T = self.tokens(x)
        out = check_out(out, "out", (T, self.n_rows))
        if T == 0 or self.n_rows == 0:
            return out
        cdef int sd = check_simd(simd)
        if xq is None:
            xq = QuantizedActivations(x, self.act_fmt, panels=True, simd=simd, n_threads=nt)
        cdef const uint8_t *dp = <const uint8_t *>cnp.PyArray_DATA(self.data)
        cdef const uint16_t *sp = <const uint16_t *>cnp.PyArray_DATA(self.scales)
        cdef const uint16_t *op = NULL if self.offsets is None else <const uint16_t *>cnp.PyArray_DATA(self.offsets)
        cdef const pp_xq *rows = (<QuantizedActivations>xq).rows
        cdef float *yp = <float *>cnp.PyArray_DATA(out)
        cdef Py_ssize_t p, P = self.P, nb = self.nb, n_rows = self.n_rows
        cdef int code = self.code
        cdef pp_panel_queue queue
        nt = <int>min(nt, P)
        if nt <= 1:
            with nogil:
                pp_gemm_panels(code, sd, dp, sp, op, nb, n_rows, rows, T, yp, 0, P, NULL, 0)
            return out
        # the team's threads claim runs of panels from one queue as they go (_panel_impl.h: pp_panel_queue);
        # each run writes its own 16-float spans of each token's output row
        if not pp_queue_init(&queue, P, nt):
            raise MemoryError("no memory for the threads' panel queue")
        try:
            with nogil, parallel(num_threads=nt):
                for p in prange(nt, schedule="static"):
                    pp_gemm_panels(code, sd, dp, sp, op, nb, n_rows, rows, T, yp, 0, 0, &queue, <int>p)
        finally:
            pp_queue_free(&queue)
        return out


def gemm_panels(fmt, data, scales, Py_ssize_t n_rows, x, out=None, n_threads=1, simd=True, offsets=None):
    """x float32 [T, K] (or quantize(x, fmt)) -> out float32 [T, n_rows]. data uint8 [P, K/32,
    BLOCK_BYTES[fmt]], scales float16 [P, K/32, 16] with P = ceil(n_rows / 16); offsets (q4m only, then
    required) float16 like scales. Threads claim runs of panels as they go (work stealing over
    n_threads OpenMP threads). simd: True (the best kernel this machine runs, or PIPOWER_INT_ISA's),
    False (portable C) or a kernel's name ("avx2", "avxvnni", "avx512vnni"); the bits are the same.
    Calls with one matrix many times: PanelMatrix (the matrix checked once)."""
    check_threads(n_threads)
    return PanelMatrix(fmt, data, scales, n_rows, offsets).gemm(x, out, n_threads, simd)


def gemm_silu(PanelMatrix gate, PanelMatrix up, x, out=None, gate_out=None, n_threads=1, simd=True):
    """out [T, N] = up(x) * silu(gate(x)) in one pass: gate and up panel p computed together (a pair of
    panels where T pairs), the product on NumPy's float32 exp loop as _kernels.silu_multiply computes it.
    Bitwise up.gemm(x), gate.gemm(x), then silu_multiply. gate, up: q4 or q8 PanelMatrix of one format and
    shape [N, K]; x float32 [T, K] or quantize(x, fmt); gate_out: float32 [T, N] scratch for the gate's
    dots (None: allocated; it holds gate(x) after the call). Returns out."""
    cdef int nt = check_threads(n_threads)
    if gate.fmt != up.fmt or gate.fmt not in ("q4", "q8"):
        raise invalid(f"gemm_silu takes q4 or q8 gate and up panels of one format, got {gate.fmt} / {up.fmt}")
    if gate.n_rows != up.n_rows or gate.n_cols != up.n_cols:
        raise invalid(f"gate and up must have one shape, got {(gate.n_rows, gate.n_cols)} and "
                      f"{(up.n_rows, up.n_cols)}")
    cdef Py_ssize_t T
    x, xq, T = up.tokens(x)
    out = check_out(out, "out", (T, up.n_rows))
    gate_out = check_out(gate_out, "gate_out", (T, up.n_rows))
    if np.shares_memory(out, gate_out):
        raise invalid("out and gate_out must not overlap (the gate's dots and the products are both kept)")
    if T == 0 or up.n_rows == 0:
        return out
    loop_addr, data_addr = _kernels.exp_loop_pointers()
    cdef size_t la = loop_addr, da = data_addr
    cdef pp_unary_loop loop = <pp_unary_loop>la
    cdef void *ldata = <void *>da
    cdef int sd = check_simd(simd)
    if xq is None:
        xq = QuantizedActivations(x, up.act_fmt, panels=True, simd=simd, n_threads=nt)
    cdef const uint8_t *gp = <const uint8_t *>cnp.PyArray_DATA(gate.data)
    cdef const uint16_t *gs = <const uint16_t *>cnp.PyArray_DATA(gate.scales)
    cdef const uint8_t *upp = <const uint8_t *>cnp.PyArray_DATA(up.data)
    cdef const uint16_t *us = <const uint16_t *>cnp.PyArray_DATA(up.scales)
    cdef const pp_xq *rows = (<QuantizedActivations>xq).rows
    cdef float *hp = <float *>cnp.PyArray_DATA(out)
    cdef float *g = <float *>cnp.PyArray_DATA(gate_out)
    cdef Py_ssize_t p, nb = up.nb, n_rows = up.n_rows
    cdef int code = up.code, ok = 1, failed = 0
    cdef pp_panel_queue queue
    nt = <int>min(nt, up.P)
    if nt <= 1:
        with nogil:
            ok = pp_gemm_glu(code, sd, gp, gs, upp, us, nb, n_rows, rows, T, hp, g, loop, ldata, NULL, 0)
        if not ok:
            raise MemoryError("no memory for gemm_silu's work tiles")
        return out
    if not pp_queue_init(&queue, up.P, nt):
        raise MemoryError("no memory for the threads' panel queue")
    try:
        with nogil, parallel(num_threads=nt):
            for p in prange(nt, schedule="static"):
                failed += 1 - pp_gemm_glu(code, sd, gp, gs, upp, us, nb, n_rows, rows, T, hp, g, loop, ldata, &queue,
                                          <int>p)
    finally:
        pp_queue_free(&queue)
    if failed:
        raise MemoryError("no memory for gemm_silu's work tiles")
    return out
