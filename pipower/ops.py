"""The ops interface: every numeric op the graph uses, with its NumPy reference.

`NumpyOps` is the reference and the fallback; `pipower._cpu.ops.CythonOps` and the device backends
override only the ops they accelerate, with the same signatures, and tests compare them to this class.
Shapes: T tokens in the call, S cached positions, D hidden, H / Hkv heads, hd head dim, F FFN neurons.
All activations are float32; weights are float32 arrays [out, in] or pipower.quant.QMatrix, which the
reference dequantizes (or, for q4 / q8 with dot="int8", multiplies through pipower.intdot).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import intdot
from .errors import InvalidArgumentError
from .quant import QMatrix, dequantize, take_rows

F32 = np.float32
DOTS = ("float", "int8")   # NumpyOps.dot


@dataclass(frozen=True)
class Threshold:
    """What ops.ffn takes as `idx` for the fused threshold FFN of one token: compute the neurons with
    |act(gate . h)| > tau (|act(up . h)| for a plain MLP), selecting them in the same pass that computes
    their gates; then call count(computed, total). Ops that fuse it say so with `fused_threshold`."""
    tau: float
    count: Callable[[int, int], None]


def as_f32(w) -> np.ndarray:
    """A weight matrix as float32 [N, K]: arrays pass through, QMatrix is dequantized."""
    return dequantize(w) if isinstance(w, QMatrix) else w


def _rows(w, idx) -> np.ndarray:
    """Rows idx (all when None) of a weight matrix as float32 [n, K]."""
    if idx is None:
        return as_f32(w)
    return dequantize(w, rows=idx) if isinstance(w, QMatrix) else w[idx]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf without SciPy: Abramowitz & Stegun 7.1.26 has 1.5e-7 absolute error, far inside fp32 GELU needs."""
    sign = np.sign(x)
    a = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (sign * (1.0 - poly * np.exp(-a * a))).astype(F32)


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), written so large negative x does not overflow exp.
    return x / (F32(1) + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    return F32(0.5) * x * (F32(1) + _erf(x * F32(1 / np.sqrt(2))))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = F32(np.sqrt(2 / np.pi))
    return F32(0.5) * x * (F32(1) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, F32(0))


ACTIVATIONS = {"silu": silu, "gelu": gelu, "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "relu": relu}


class NumpyOps:
    """Reference implementation of every op. Subclasses override what they make faster."""

    name = "numpy"
    # weight formats this backend computes on directly; others work through dequantization (slowly)
    native_formats: tuple = ("f32",)
    # ffn() takes a Threshold as idx (the selection made inside the FFN for one token)
    fused_threshold: bool = True
    # How the FFN matrices of a prepared model sit in memory: "separate" (three matrices) or "bundled"
    # (pipower.arena's neuron bundles, laid out by prepare(); hybrid engines bundle the cold rows too).
    ffn_layout: str = "separate"

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
        return self._dot == "int8" and isinstance(w, QMatrix) and w.fmt in intdot.FORMATS

    def forward_scope(self, n_tokens: int):
        """Context entered around one forward call of n_tokens tokens (thread-pool policy); none here."""
        return contextlib.nullcontext()

    # -- where data lives: one host memory here. The hybrid engine (pipower.hybrid) overrides these to
    # move the residual stream between host and GPU and to keep each layer's KV cache where it runs.
    def enter_layer(self, layer: int, x: np.ndarray) -> np.ndarray:
        """The residual stream x [T, D], moved to where `layer` runs."""
        return x

    def enter_output(self, x: np.ndarray) -> np.ndarray:
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

    def kv_buffer(self, layer: int, shape: tuple) -> np.ndarray:
        """Zeroed float32 KV-cache storage for `layer`, where that layer's attention runs."""
        return np.zeros(shape, np.float32)

    # -- elementwise / norms ------------------------------------------------------------------------
    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x: [T, D], weight: [D] -> [T, D]. Same order of operations as HF LlamaRMSNorm in fp32."""
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        return (x * (F32(1) / np.sqrt(var + F32(eps)))) * weight

    def activation(self, name: str, x: np.ndarray) -> np.ndarray:
        return ACTIVATIONS[name](x)

    # -- projections -------------------------------------------------------------------------------
    # Weights arrive as float32 arrays or as QMatrix (pipower.quant); the reference dequantizes the
    # rows it needs, which is slow but exactly the values the compiled kernels read.
    def linear(self, x: np.ndarray, weight, bias: np.ndarray | None = None) -> np.ndarray:
        """x: [T, K], weight: [N, K] (HF layout, array or QMatrix), bias: [N] -> [T, N]."""
        y = intdot.dot(weight, x) if self._int_dot(weight) else x @ as_f32(weight).T
        if bias is not None:
            y += bias
        return y

    def embed(self, table, ids: np.ndarray) -> np.ndarray:
        """table: [V, D] (array or QMatrix), ids: int [T] -> [T, D] (a copy: the graph adds into it)."""
        if isinstance(table, QMatrix):
            return dequantize(table, rows=ids)
        return np.take(table, ids, axis=0)

    # -- FFN ---------------------------------------------------------------------------------------
    def ffn(self, x: np.ndarray, gate, up, down_t, act: str, idx: np.ndarray | None = None) -> np.ndarray:
        """x: [T, D]; gate/up: [F, D]; down_t: [F, D] (down stored transposed, PowerInfer's ffn_down_t,
        so one neuron's three weight rows are each contiguous) -> [T, D].

        idx selects the neurons to compute (the others count as zero):
          None                 all neurons (dense);
          int32 [n], sorted    the same neurons for all T rows;
          bool [T, F]          a per-token mask (oracle / predictor decisions during prefill).
          Threshold (one token)  the neurons with |act(gate x)| > tau (made by sparse.oracle)
        gate None = plain MLP: down(act(up x)).
        """
        if isinstance(idx, Threshold):
            pre = self.linear(x, gate if gate is not None else up)                    # [1, F]
            sel = np.flatnonzero(np.abs(self.activation(act, pre[0])) > F32(idx.tau)).astype(np.int32)
            idx.count(len(sel), pre.shape[1])
            idx = sel
        if idx is not None and idx.dtype == np.bool_:
            if idx.shape != (x.shape[0], down_t.shape[0]):
                raise ValueError(f"neuron mask shape {idx.shape} != (T, F) = {(x.shape[0], down_t.shape[0])}")
            return (self._ffn_hidden(x, gate, up, act, None) * idx) @ as_f32(down_t)
        return self._ffn_hidden(x, gate, up, act, idx) @ _rows(down_t, idx)

    def _ffn_hidden(self, x, gate, up, act, idx) -> np.ndarray:
        """act(gate x) * (up x) over the neurons idx (all when None) -> [T, n]."""
        def project(w):
            if self._int_dot(w):
                return intdot.dot(w if idx is None else take_rows(w, idx), x)
            return x @ _rows(w, idx).T
        h = project(up)
        if gate is not None:
            h *= self.activation(act, project(gate))
        else:
            h = self.activation(act, h)
        return h

    # -- attention ---------------------------------------------------------------------------------
    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: [T, nh, hd]; cos/sin: [T, hd/2]. HF layout: pairs are (i, i + hd/2) ("rotate_half")."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                  window: int | None = None) -> np.ndarray:
        """Causal GQA attention of T new queries over S = start_pos + T cached keys.

        q: [T, H, hd]; k, v: [Hkv, S, hd] (the cache's head-major views) -> [T, H * hd]. Query t sits at position p = start_pos + t and
        sees keys 0 .. p, or only p - window < j <= p with a sliding window (Mistral).
        Heads are grouped so each KV head is read once for its G = H / Hkv queries.
        """
        T, H, hd = q.shape
        Hkv, S, _ = k.shape
        G = H // Hkv
        # [Hkv, G*T, hd]: head h = kv_head * G + g, as in HF's repeat_kv.
        qg = q.reshape(T, Hkv, G, hd).transpose(1, 2, 0, 3).reshape(Hkv, G * T, hd)
        scores = qg @ k.transpose(0, 2, 1)                      # [Hkv, G*T, S]
        scores *= F32(1.0 / np.sqrt(hd))
        if T > 1 or (window is not None and S > window):
            q_pos = np.tile(np.arange(start_pos, start_pos + T), G)[:, None]  # [G*T, 1]
            k_pos = np.arange(S)[None, :]                                    # [1, S]
            hidden = k_pos > q_pos
            if window is not None:
                hidden |= k_pos <= q_pos - window
            scores[:, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ v                                        # [Hkv, G*T, hd]
        return out.reshape(Hkv, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)
