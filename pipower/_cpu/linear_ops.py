"""Projections and the FFN over compact weights on the compiled kernels, for CythonOps: thin dispatch
onto _linear / _ffn.

    linear(x [T, K], W, bias [N] | None, n_threads) -> [T, N]
    ffn(x [T, D], gate, up, down_t, act, n_threads, idx=None) -> [T, D]     (the calls on_kernels() takes)

W / gate / up / down_t: a pipower.quant.QMatrix or a plain float32 ndarray [rows, K] (treated as f32).
T <= MAX_TOKENS runs the compiled kernels on n_threads OpenMP threads: gemv / the batched row kernel,
and the fused sparse FFN, each weight row read once for all T tokens. Their results are bitwise
independent of n_threads and of T: row t of a T-token call is bitwise what a one-token call computes for
x[t] (batch invariance). Longer projections (a long prompt's prefill) dequantize row tiles to float32
(exactly quant.dequantize's values) and multiply them with NumPy's BLAS, which uses its own thread pool
and whose sums depend on T; the FFN of such a prompt, or of several tokens under a per-token mask, is
NumpyOps' chunked FFN (CythonOps runs it over the compiled dequantizer).
Inputs must be float32 and C-contiguous (the graph's arrays are); the kernels raise InvalidArgumentError
otherwise.
"""
from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from ..errors import InvalidArgumentError
from ..ops import ACTIVATIONS, Threshold, multiply_by_activation
from ..panels import Panels
from ..quant import QMatrix
from . import _ffn, _kernels, _linear, _panel

log = logging.getLogger(__name__)

# Largest T on the batch-invariant kernels (the same bound for projections and the FFN).
MAX_TOKENS = min(_linear.MAX_TOKENS, _ffn.MAX_TOKENS)


def parts(W) -> tuple:
    """-> (fmt, data, scales) of a QMatrix or a float32 array."""
    if type(W) is QMatrix:
        return W.fmt, W.data, W.scales
    return "f32", W, None


def linear(x: np.ndarray, W, bias: np.ndarray | None = None, n_threads: int = 1,
           int_dot: bool = False) -> np.ndarray:
    """x: float32 [T, K]; W: [N, K] (QMatrix, float32 array or pipower.panels.Panels); bias: float32 [N] or
    None -> new float32 [T, N]. int_dot (q4 or q8 W, and always for Panels): int8-quantized activations,
    exact integer block sums, for any T (pipower.intdot)."""
    if type(W) is Panels:                       # q4 / q8 laid out for the integer dots (pipower.panels)
        if not int_dot:
            raise InvalidArgumentError("weight panels multiply with integer dots only (dot='int8')")
        y = _gemm(W, x, n_threads)
        if bias is not None:
            y += bias
        return y
    fmt, data, scales = parts(W)
    if fmt == "q4m":
        raise InvalidArgumentError("q4m weights multiply as weight panels (CythonOps.prepare packs them)")
    if int_dot:
        y = _linear.gemm_int8(fmt, data, scales, x, n_threads=n_threads)
    elif x.ndim == 2 and x.shape[0] == 1:
        y = _linear.gemv(fmt, data, scales, x.reshape(-1), n_threads=n_threads).reshape(1, -1)
    else:
        y = _linear.gemm(fmt, data, scales, x, n_threads=n_threads, invariant=x.shape[0] <= MAX_TOKENS)
    if bias is not None:
        y += bias
    return y


def on_kernels(T: int, idx, int_dot: bool = False) -> bool:
    """Whether ffn() takes a call of T tokens with this idx: one token, a Threshold, the integer dot, or
    up to MAX_TOKENS tokens sharing one neuron list."""
    if int_dot or T == 1 or isinstance(idx, Threshold):
        return True
    return T <= MAX_TOKENS and not (idx is not None and idx.dtype == np.bool_)


def ffn(x: np.ndarray, gate, up, down_t, act: str, n_threads: int = 1,
        idx: np.ndarray | None = None, int_dot: bool = False, gate_dots: np.ndarray | None = None) -> np.ndarray:
    """x: float32 [T, D]; gate (or None), up, down_t: [F, D]; idx: int32 [n] sorted unique active
    neurons, a bool [T, F] per-token mask, a pipower.ops.Threshold (T = 1: the fused threshold FFN), or
    None (all) -> new float32 [T, D]. Same math as NumpyOps.ffn, for the calls on_kernels() accepts.
    int_dot (q4, q8): gate/up dots over int8-quantized x, on the batch-invariant kernel for every T (token
    slices of MAX_TOKENS; a per-token mask runs each token's own neurons as its decode step would).
    gate_dots (with a Threshold, gated FFNs): float32 [F], the gate's dots already computed (weight
    panels); gate may then be None (bundles of up and down_t alone), or its rows, which are skipped."""
    fu, ud, us = parts(up)
    fd, dd, ds = parts(down_t)
    fg, gd, gs = parts(gate) if gate is not None else (fu, None, None)
    if not fu == fd == fg:
        raise InvalidArgumentError(f"gate/up/down_t must share one format, got {fg}/{fu}/{fd}")
    if not on_kernels(x.shape[0], idx, int_dot):
        raise InvalidArgumentError(f"no FFN kernel for {x.shape[0]} tokens with this idx: CythonOps.ffn runs "
                                   f"those through NumpyOps' chunked FFN")
    if isinstance(idx, Threshold):             # one token: select and compute in one call
        if x.shape[0] != 1:
            raise InvalidArgumentError(f"the fused threshold FFN takes one token, got {x.shape[0]}")
        out = np.empty((1, x.shape[1]), dtype=np.float32)
        _, n = _ffn.ffn_threshold(fu, x.reshape(-1), None if gd is None else (gd, gs), (ud, us), (dd, ds),
                                  idx.tau, act, out=out.reshape(-1), n_threads=n_threads, int_dot=int_dot,
                                  gate_dots=gate_dots)
        idx.count(n, up.shape[0])
        return out
    mask = None
    if idx is not None and idx.dtype == np.bool_:
        if idx.shape != (x.shape[0], up.shape[0]):
            raise InvalidArgumentError(f"neuron mask shape {idx.shape} != (T, F) = {(x.shape[0], up.shape[0])}")
        if x.shape[0] == 1:
            idx = np.flatnonzero(idx[0]).astype(np.int32)
        else:
            mask, idx = idx, None
    g = None if gd is None else (gd, gs)
    if x.shape[0] == 1:
        out = np.empty((1, x.shape[1]), dtype=np.float32)
        _ffn.ffn_sparse(fu, x.reshape(-1), g, (ud, us), (dd, ds), idx, act, out=out.reshape(-1),
                        n_threads=n_threads, int_dot=int_dot)
        return out
    if int_dot:
        out = np.empty_like(x)
        if mask is not None:
            for t in range(x.shape[0]):
                _ffn.ffn_sparse(fu, x[t], g, (ud, us), (dd, ds), np.flatnonzero(mask[t]).astype(np.int32), act,
                                out=out[t], n_threads=n_threads, int_dot=True)
            return out
        for t0 in range(0, x.shape[0], MAX_TOKENS):            # row slices: contiguous, written in place
            _ffn.ffn_sparse(fu, x[t0:t0 + MAX_TOKENS], g, (ud, us), (dd, ds), idx, act,
                            out=out[t0:t0 + MAX_TOKENS], n_threads=n_threads, int_dot=True)
        return out
    return _ffn.ffn_sparse(fu, x, g, (ud, us), (dd, ds), idx, act, n_threads=n_threads)


def ffn_panels(x: np.ndarray, gate, up, down, act: str, n_threads: int = 1) -> np.ndarray:
    """The dense FFN on integer dots over weight panels: x float32 [T, D]; gate (or None), up: Panels
    [F, D]; down: Panels [D, F] -> new float32 [T, D]. Bitwise NumpyOps' dense integer FFN
    (_ffn_int8_dense): h = act(x G^T) * (x U^T) with NumPy's activation formulas, then h quantized per 32
    neurons times down. Any T; row t is bitwise the one-token result."""
    xq = _panel.quantize(x, up.fmt, n_threads=n_threads)          # once for gate and up (if alike)
    T, F = x.shape[0], up.shape[0]
    if fused_silu(gate, up, act):                 # gate, up and the product in one pass, the same bits
        h = _panel.gemm_silu(panel_matrix(gate), panel_matrix(up), xq, _scratch("h", T, F), _scratch("g", T, F),
                             n_threads)
        return _gemm(down, h, n_threads)
    h = _gemm(up, xq, n_threads, _scratch("h", T, F))                                         # [T, F]
    if gate is not None:
        g = _gemm(gate, xq if _panel.quantize_alike(gate.fmt, up.fmt) else x, n_threads, _scratch("g", T, F))
        multiply_activation(h, g, act, n_threads)
    else:
        h = ACTIVATIONS[act](h)
    return _gemm(down, h, n_threads)


def fused_silu(gate, up, act: str) -> bool:
    """Whether ffn_panels computes gate, up and their SiLU product in one pass (_panel.gemm_silu: one
    OpenMP region instead of three, gate and up panel p as a pair of panels): a SiLU FFN on q4 or q8
    panels of one format, with NumPy's exp loop found (_kernels.SILU_UNAVAILABLE empty). q4m (its
    offsets) and other activations take the separate calls; the bits are the same either way."""
    return (gate is not None and act == "silu" and not _kernels.SILU_UNAVAILABLE and gate.fmt == up.fmt
            and up.fmt in ("q4", "q8"))


def multiply_activation(h: np.ndarray, g: np.ndarray, act: str, n_threads: int = 1) -> np.ndarray:
    """h *= act(g) in place, bitwise pipower.ops.multiply_by_activation; SiLU on the compiled pass over
    NumPy's own exp loop (_kernels.silu_multiply: at 8 tokens of Qwen2.5-0.5B's gate ~20 us on two
    threads against NumPy's ~46), unless the import-time check of that loop failed (then NumPy's
    formula, said once in the log and by `pipower info`)."""
    if act == "silu" and not _kernels.SILU_UNAVAILABLE:
        return _kernels.silu_multiply(h, g, n_threads)
    if act == "silu" and not _SILU_SAID:
        _SILU_SAID.append(True)
        log.warning("SiLU products run on NumPy's ufuncs (slower, same bits): %s", _kernels.SILU_UNAVAILABLE)
    return multiply_by_activation(h, g, act)


_SILU_SAID: list = []
_SCRATCH = threading.local()


def _scratch(name: str, T: int, F: int) -> np.ndarray:
    """A float32 [T, F] work array of this thread, kept between calls (a prompt's [512, 4864] products are
    10 MB each, and a fresh one is mapped page by page every layer). Only for values that die within
    the call that asked."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get(name)
    if buf is None or buf.size < T * F:
        buf = pool[name] = np.empty(T * F, dtype=np.float32)
    return buf[:T * F].reshape(T, F)


def _gemm(W: Panels, x, n_threads: int, out: np.ndarray | None = None) -> np.ndarray:
    return panel_matrix(W).gemm(x, out, n_threads)


# id(Panels) -> (a weak reference to it, its _panel.PanelMatrix): each weight matrix checked once, not at
# every call (~2 us a call; a decode step of Qwen2.5-0.5B makes ~120). An entry goes when its Panels does.
_MATRICES: dict = {}


def panel_matrix(W: Panels):
    """The kernel module's PanelMatrix of W, made on W's first use and kept while W lives (rebuilt if the
    module was swapped, as bench/ab_builds.py does)."""
    key = id(W)
    hit = _MATRICES.get(key)
    if hit is not None and hit[0]() is W and type(hit[1]) is _panel.PanelMatrix:
        return hit[1]
    m = _panel.PanelMatrix(W.fmt, W.data, W.scales, W.shape[0], W.offsets)
    _MATRICES[key] = (weakref.ref(W, lambda _, k=key: _MATRICES.pop(k, None)), m)
    return m


def ffn_layout(gate, up, down_t) -> str:
    """"bundled" if the fused FFN kernel reads these matrices as neuron bundles (pipower.arena), else
    "separate"."""
    fu, ud, us = parts(up)
    fd, dd, ds = parts(down_t)
    return _ffn.layout(fu, None if gate is None else parts(gate)[1:], (ud, us), (dd, ds))
