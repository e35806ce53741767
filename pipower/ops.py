"""The ops interface: every numeric op the graph uses, and its reference implementation.

`NumpyOps` is the reference. Backends subclass it and override only their kernels, with the same
signatures (as thinc's Ops): `pipower._cpu.ops.CythonOps` (compiled CPU kernels) and
`pipower._gpu.ops.CupyOps` (CUDA kernels on CuPy arrays). The reference code is written against
`self.xp`, the array module of the backend's arrays (numpy here, cupy on the GPU), and reads weights only
through `self._rows`, so a backend that swaps in its own row dequantizer runs these same chunked paths
(long-prompt projections, the dense / prefill FFN, prefill attention) on its own memory.
tests/test_backend_ops.py runs every op of every backend against this class.

Shapes: T tokens in the call, S cached positions, D hidden, H / Hkv heads, hd head dim, F FFN neurons,
N x K a weight (HF layout: one output per row). Activations are float32. A weight is a float32 array
[N, K], a pipower.quant.QMatrix (f32 / f16 / q8 / q4: the reference dequantizes the rows it needs, or
with dot="int8" multiplies q4 / q8 through pipower.intdot), or what the backend's `place` made of one.
Bad arguments raise InvalidArgumentError (a PipowerError).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import intdot
from . import panels
from .errors import InvalidArgumentError
from .panels import Panels
from .quant import QMatrix, dequantize, take_rows

F32 = np.float32
DOTS = ("float", "int8")   # NumpyOps.dot


@dataclass(frozen=True)
class Threshold:
    """What ops.ffn takes as `idx` for the fused threshold FFN of one token: compute the neurons with
    |act(gate . h)| > tau (|act(up . h)| for a plain MLP), selecting them in the same pass that computes
    their gates; then call count(computed, total). sparse.oracle makes it for ops whose `fused_threshold`
    is True, and for several tokens (count called per token) where `fused_threshold_batch` is too."""
    tau: float
    count: Callable[[int, int], None]


# Activations. Elementwise NumPy ufuncs: they also run on CuPy arrays (which implement __array_ufunc__).
def _erf(x):
    """erf without SciPy: Abramowitz & Stegun 7.1.26 has 1.5e-7 absolute error, far inside fp32 GELU needs."""
    sign = np.sign(x)
    a = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(F32)


def silu(x):
    # x * sigmoid(x), written so large negative x does not overflow exp.
    return x / (F32(1) + np.exp(-x))


def gelu(x):
    return F32(0.5) * x * (F32(1) + _erf(x * F32(1 / np.sqrt(2))))


def gelu_tanh(x):
    c = F32(np.sqrt(2 / np.pi))
    return F32(0.5) * x * (F32(1) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def relu(x):
    return np.maximum(x, F32(0))


# HF hidden_act name -> reference formula: the one table of supported activations (config.py checks
# models against it, the kernels take the codes below).
ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "relu": relu}


def multiply_by_activation(h: np.ndarray, g: np.ndarray, act: str, rows: int = 16) -> np.ndarray:
    """h *= ACTIVATIONS[act](g) in place, bit for bit; h, g: float32 [T, F] host arrays (g is left as is).
    SiLU runs its formula's elementwise operations on blocks of `rows` rows through one scratch block
    instead of four whole-matrix temporaries: a 512-token prompt's [512, 4864] gate took 2.6 ms per
    Qwen2.5-0.5B layer, 1.7 ms this way (the temporaries left the cache and were mapped fresh)."""
    if act != "silu":
        h *= ACTIVATIONS[act](g)
        return h
    scratch = np.empty((min(rows, g.shape[0]), g.shape[1]), dtype=F32)
    for a in range(0, g.shape[0], rows):
        gb, t = g[a:a + rows], scratch[:min(rows, g.shape[0] - a)]
        np.negative(gb, out=t)                       # silu(x) = x / (1 + exp(-x)), operation by operation
        np.exp(t, out=t)
        np.add(t, F32(1), out=t)
        np.divide(gb, t, out=t)
        h[a:a + rows] *= t
    return h


# name -> the formula's number in the compiled kernels: enum PP_ACT_* of pipower/_cpu/_ffn_impl.h (checked
# when pipower._cpu._ffn imports) and apply_act of pipower/_gpu/ffn.cu.
ACT_CODES = {name: (silu, gelu, gelu_tanh, relu).index(f) for name, f in ACTIVATIONS.items()}


def check_activation(name: str) -> str:
    """name if it is a key of ACTIVATIONS, else InvalidArgumentError."""
    if name not in ACTIVATIONS:
        raise InvalidArgumentError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return name


# Shape checks of the ops, shared by the reference and the device backend (before its kernels launch).
def check_linear(x, weight, bias) -> None:
    """x [T, K], weight [N, K], bias [N] or None."""
    N, K = weight.shape
    if x.ndim != 2 or x.shape[1] != K:
        raise InvalidArgumentError(f"linear: x is {tuple(x.shape)}, weight is {tuple(weight.shape)} "
                                   f"(x must be [T, K])")
    if bias is not None and tuple(bias.shape) != (N,):
        raise InvalidArgumentError(f"linear: bias shape {tuple(bias.shape)} != ({N},)")


def check_rope(x, cos, sin) -> None:
    """x [T, nh, hd] with hd even, cos and sin [T, hd / 2]."""
    T, _, hd = x.shape
    if hd % 2 or tuple(cos.shape) != (T, hd // 2) or tuple(sin.shape) != (T, hd // 2):
        raise InvalidArgumentError(f"rope: x {tuple(x.shape)} needs an even head dim and cos / sin of "
                                   f"shape {(T, hd // 2)}, got {tuple(cos.shape)} / {tuple(sin.shape)}")


def check_attention(q, k, v, start_pos: int, window) -> None:
    """q [T, H, hd]; k, v [Hkv, S, hd] alike, H a multiple of Hkv, S >= 1; start_pos >= 0; window None
    or >= 1."""
    H, hd = q.shape[1:]
    Hkv, S, khd = k.shape
    if tuple(v.shape) != tuple(k.shape) or khd != hd or Hkv < 1 or H % Hkv:
        raise InvalidArgumentError(f"attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q "
                                   f"{tuple(q.shape)} (H a multiple of Hkv, one head dim)")
    if start_pos < 0 or S < 1 or (window is not None and window < 1):
        raise InvalidArgumentError(f"attention: start_pos {start_pos}, {S} cached positions, window {window}")


def _fmt(w) -> str:
    """The storage format of a weight: QMatrix / placed weights say it, a plain array is f32."""
    return getattr(w, "fmt", "f32")


class NumpyOps:
    """Reference implementation of every op. Subclasses override their kernels (see the module doc)."""

    name = "numpy"
    xp = np                 # the array module of this backend's arrays
    # weight formats this backend computes on directly; others work through dequantization (slowly)
    native_formats: tuple = ("f32",)
    # ffn() takes a Threshold as idx (the selection made inside the FFN for one token)
    fused_threshold: bool = True
    # ... and for a forward over several tokens too (each token keeps its own neurons, as its decode step
    # would); else sparse.oracle passes those the selection as a bool [T, F] mask
    fused_threshold_batch: bool = False
    # Row t of a forward over up to 64 tokens is bitwise what a one-token forward computes for it (what
    # speculative verification and batched serving need). BLAS rounds a batch its own way: not here.
    batch_invariant: bool = False
    # How the FFN matrices of a prepared model sit in memory: "separate" (three matrices) or "bundled"
    # (pipower.arena's neuron bundles, laid out by prepare(); hybrid engines bundle the cold rows too).
    ffn_layout: str = "separate"
    # Bytes of one float32 temporary of the chunked paths: a dequantized weight tile [rows, K] (the FFN
    # holds three) or a query chunk's attention scores [H, n, S]. Few big tiles beat many L2-sized ones on
    # the CPU: each tile costs an OpenMP -> BLAS hand-over, and with 128-neuron tiles those hand-overs
    # dominated (Qwen2.5-0.5B q8, T = 38..256: 7-23 tok/s with 128 neurons, 37-56 tok/s with whole matrices).
    temp_bytes: int = 32 << 20

    def __init__(self, n_threads: int = 1, dot: str = "float"):
        self.n_threads = n_threads
        self.dot = dot

    @property
    def dot(self) -> str:
        """How q4 / q8 projections multiply: "float" (weights converted to float32, x exact) or "int8" (x
        quantized per 32-block to int8, exact integer block sums: pipower.intdot). f32 and f16 weights
        always multiply in float."""
        return self._dot

    @dot.setter
    def dot(self, mode: str) -> None:
        if mode not in DOTS:
            raise InvalidArgumentError(f"dot must be one of {', '.join(DOTS)}, got {mode!r}")
        self._dot = mode

    def _int_dot(self, w) -> bool:
        """True when w's products take the integer path."""
        return self._dot == "int8" and isinstance(w, (QMatrix, Panels)) and w.fmt in intdot.FORMATS

    def forward_scope(self, n_tokens: int):
        """Context entered around one forward call of n_tokens tokens (thread-pool policy); none here."""
        return contextlib.nullcontext()

    # -- where data lives: one memory here. The hybrid engine (pipower.hybrid) overrides these to move
    # the residual stream between host and GPU and to keep each layer's KV cache where it runs.
    def enter_layer(self, layer: int, x):
        """The residual stream x [T, D], moved to where `layer` runs."""
        return x

    def enter_output(self, x):
        """The residual stream x [T, D], moved to where the final norm and LM head run."""
        return x

    def to_host(self, a) -> np.ndarray:
        """a as a host ndarray (logits leave the graph this way)."""
        return a

    def place(self, w):
        """A weight (float32 array or QMatrix) as this backend computes on it."""
        return w

    def prepare(self, transformer) -> None:
        """Called once when a Transformer is built on these ops: a backend may re-lay out weights."""

    def kv_buffer(self, layer: int, shape: tuple):
        """Zeroed float32 KV-cache storage for `layer`, where that layer's attention runs."""
        return self.xp.zeros(shape, F32)

    # -- weights: the one place the reference reads them ----------------------------------------------
    def _rows(self, w, rows=None):
        """Rows of weight w [N, K] as float32 [n, K]: all (None), a slice, or int indices. Arrays are
        indexed (a slice is a view), QMatrix rows dequantized; backends plug in their dequantizer."""
        if isinstance(w, Panels):              # CythonOps' layout for integer dots: back to rows first
            return dequantize(panels.rows(w, None if rows is None else np.arange(w.shape[0])[rows]))
        if isinstance(w, QMatrix):
            return dequantize(w, rows)
        return w if rows is None else w[rows]

    def _project(self, x, w, rows=None):
        """x [T, K] times rows of w (all when None) transposed -> [T, n]."""
        if self._int_dot(w):
            if isinstance(w, Panels):
                w = panels.unpack(w)
            if rows is not None:
                w = take_rows(w, np.arange(w.shape[0])[rows])
            return intdot.dot(w, x)
        return x @ self._rows(w, rows).T

    def _tile_rows(self, K: int) -> int:
        """Rows of a [rows, K] float32 tile of temp_bytes (at least 128)."""
        return max(128, self.temp_bytes // (4 * max(K, 1)))

    # -- elementwise / norms ------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps: float):
        """x: [..., D], weight: [D] -> [..., D]. Same order of operations as HF LlamaRMSNorm in fp32."""
        if tuple(weight.shape) != tuple(x.shape[-1:]):
            raise InvalidArgumentError(f"rms_norm: weight shape {weight.shape} != ({x.shape[-1]},)")
        xp = self.xp
        var = xp.mean(xp.square(x), axis=-1, keepdims=True)
        return (x * (F32(1) / xp.sqrt(var + F32(eps)))) * weight

    def activation(self, name: str, x):
        """act(x) elementwise by HF name (a key of ACTIVATIONS) -> x's shape."""
        return ACTIVATIONS[check_activation(name)](x)

    # -- projections -------------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        """x: [T, K], weight: [N, K], bias: [N] or None -> [T, N]. Compact weights are dequantized a tile
        of rows at a time (at most temp_bytes of float32), so a long prompt never holds a whole
        dequantized matrix (an LM head of 150k rows is 0.5 GB as float32)."""
        check_linear(x, weight, bias)
        N, K = weight.shape
        step = self._tile_rows(K)
        if step >= N or _fmt(weight) == "f32":
            y = self._project(x, weight)
        else:
            y = self.xp.empty((x.shape[0], N), F32)
            for n0 in range(0, N, step):
                y[:, n0:n0 + step] = self._project(x, weight, slice(n0, n0 + step))
        if bias is not None:
            y += bias
        return y

    def linear_many(self, x, weights, biases) -> list:
        """Several projections of one input (q, k, v): [linear(x, w, b) for each]. A backend may run them
        as one call where its weights allow it, with the same results."""
        return [self.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]

    def embed(self, table, ids):
        """table: [V, D], ids: int [T] -> float32 [T, D] (a copy: the graph adds into it)."""
        V = table.shape[0]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise InvalidArgumentError(f"embed: token ids must lie in [0, {V})")
        return self._rows(table, ids)

    # -- FFN ---------------------------------------------------------------------------------------
    def ffn(self, x, gate, up, down_t, act: str, idx=None, down=None):
        """x: [T, D]; gate/up: [F, D]; down_t: [F, D] (down stored transposed, PowerInfer's ffn_down_t,
        so one neuron's three weight rows are each contiguous) -> [T, D].

        idx selects the neurons to compute (the others count as zero):
          None                  all neurons (dense);
          int32 [n], sorted     the same neurons for all T rows;
          bool [T, F]           a per-token mask (oracle / predictor decisions during prefill);
          Threshold (T = 1)     the neurons with |act(gate x)| > tau (made by sparse.oracle).
        gate None = plain MLP: down(act(up x)).
        down: [D, F], HF's orientation, kept with integer dots (LayerWeights.down): the dense FFN (idx
        None) then takes integer dots throughout, h quantized per 32 neurons (_ffn_int8_dense).
        """
        check_activation(act)
        if down is not None and idx is None and self._int_dot(down):
            return self._ffn_int8_dense(x, gate, up, down, act)
        F = down_t.shape[0]
        if isinstance(idx, Threshold):
            xp = self.xp
            pre = self.linear(x, gate if gate is not None else up)                    # [1, F]
            sel = xp.flatnonzero(xp.abs(self.activation(act, pre[0])) > F32(idx.tau)).astype(np.int32)
            idx.count(int(sel.size), F)
            idx = sel
        mask = None
        if idx is not None and idx.dtype == np.bool_:
            if tuple(idx.shape) != (x.shape[0], F):
                raise InvalidArgumentError(f"neuron mask shape {tuple(idx.shape)} != (T, F) = {(x.shape[0], F)}")
            mask, idx = idx, None
        elif idx is not None:
            if idx.ndim != 1 or idx.dtype.kind not in "iu":
                raise InvalidArgumentError(f"idx must be a 1-D integer array, got {idx.dtype} {tuple(idx.shape)}")
            if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= F or bool((idx[1:] <= idx[:-1]).any())):
                raise InvalidArgumentError(f"idx must be sorted, unique and within [0, {F})")
        return self._ffn_chunked(x, gate, up, down_t, act, idx, mask)

    def _ffn_chunked(self, x, gate, up, down_t, act: str, idx, mask):
        """The FFN over tiles of the selected neurons (idx: int [n] or None for all; mask: bool [T, F] or
        None): per tile, h = act(x G^T) * (x U^T) [T, c] (act(x U^T) without a gate), times the tile's
        mask columns, out += h Dn -> [T, D]. Each weight row is dequantized once and BLAS / cuBLAS does
        the flops; at most three tiles of temp_bytes live at once. Every backend's dense / prefill FFN
        is this method, with its own _rows and _ffn_act."""
        T, D = x.shape
        n = down_t.shape[0] if idx is None else idx.shape[0]
        step = self._tile_rows(D)
        out = self.xp.zeros((T, D), F32)
        for j0 in range(0, n, step):
            rows = slice(j0, j0 + step) if idx is None else idx[j0:j0 + step]
            h = self._project(x, up, rows)                                             # [T, c]
            if gate is not None:
                h *= self._ffn_act(act, self._project(x, gate, rows))
            else:
                h = self._ffn_act(act, h)
            if mask is not None:
                h *= mask[:, j0:j0 + step]
            out += h @ self._rows(down_t, rows)
            h = None                # freed before the next tile allocates: one tile's temporaries at a time
        return out

    def _ffn_int8_dense(self, x, gate, up, down, act: str):
        """The dense FFN on integer dots (pipower.intdot) throughout: h = act(x G^T) * (x U^T) [T, F]
        (act(x U^T) without a gate), then h, itself quantized per 32-block, times down [D, F] -> [T, D].
        A per-block int8 rounding of h replaces the float down projection's exact h (llama.cpp quantizes
        the FFN's hidden activations the same way)."""
        h = self._project(x, up)                                                       # [T, F]
        if gate is not None:
            h *= self._ffn_act(act, self._project(x, gate))
        else:
            h = self._ffn_act(act, h)
        return self._project(h, down)                                                  # [T, D]

    def _ffn_act(self, name: str, h):
        """act(h) on the FFN's hidden pre-activations [T, c] in _ffn_chunked (h may be overwritten)."""
        return self.activation(name, h)

    # -- attention ---------------------------------------------------------------------------------
    def rope(self, x, cos, sin):
        """x: [T, nh, hd]; cos/sin: [T, hd/2]. HF layout: pairs are (i, i + hd/2) ("rotate_half")."""
        check_rope(x, cos, sin)
        half = x.shape[2] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return self.xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def attention(self, q, k, v, start_pos: int, window: int | None = None):
        """Causal GQA attention of T new queries at positions start_pos .. start_pos + T - 1 over S keys.

        q: [T, H, hd]; k, v: [Hkv, S, hd] (the cache's head-major views) -> [T, H * hd]. Query t at
        position p = start_pos + t sees keys 0 .. p, or only p - window < j <= p with a sliding window
        (Mistral). Heads are grouped so each KV head is read once for its G = H / Hkv queries; queries
        go in chunks whose scores [Hkv, G * n, S] stay within temp_bytes.
        """
        check_attention(q, k, v, start_pos, window)
        T, H, hd = q.shape
        Hkv, S, _ = k.shape
        xp = self.xp
        G = H // Hkv
        kt = k.transpose(0, 2, 1)                                               # [Hkv, hd, S]
        masked = T > 1 or (window is not None and S > window)
        out = xp.empty((T, H * hd), F32)
        step = max(1, self.temp_bytes // (4 * H * S))
        for t0 in range(0, T, step):
            n = min(step, T - t0)
            # [Hkv, G*n, hd]: head h = kv_head * G + g, as in HF's repeat_kv.
            qg = q[t0:t0 + n].reshape(n, Hkv, G, hd).transpose(1, 2, 0, 3).reshape(Hkv, G * n, hd)
            scores = qg @ kt                                                    # [Hkv, G*n, S]
            scores *= F32(1.0 / np.sqrt(hd))
            if masked:
                q_pos = xp.tile(xp.arange(start_pos + t0, start_pos + t0 + n), G)[:, None]   # [G*n, 1]
                k_pos = xp.arange(S)[None, :]                                              # [1, S]
                hidden = k_pos > q_pos
                if window is not None:
                    hidden |= k_pos <= q_pos - window
                scores = xp.where(hidden, F32(-np.inf), scores)
            scores -= scores.max(axis=-1, keepdims=True)
            xp.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            o = scores @ v                                                      # [Hkv, G*n, hd]
            out[t0:t0 + n] = o.reshape(Hkv, G, n, hd).transpose(2, 0, 1, 3).reshape(n, H * hd)
        return out
