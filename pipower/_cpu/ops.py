"""CythonOps: NumpyOps with the ops that pipower._cpu compiles, run on `n_threads` OpenMP threads.

Only what a kernel accelerates is overridden; everything else is the NumPy reference it inherits (with
the compiled row dequantizer as its `_rows`), and tests/test_backend_ops.py compares each op to that
reference.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import BackendError
from ..threads import blas_threads
from .. import panels
from ..ops import ACTIVATIONS, NumpyOps, Threshold
from ..panels import Panels
from ..quant import FORMATS, QMatrix, dequantize, quantize
from . import AVAILABLE, IMPORT_ERROR, kernels

log = logging.getLogger(__name__)

try:  # built with _kernels by the same setup.py; missing only in a half-built tree
    from . import _attention, _linear, linear_ops
except ImportError as exc:
    _attention, _ATTENTION_ERROR = None, f"{type(exc).__name__}: {exc}"
else:
    _ATTENTION_ERROR = None


class CythonOps(NumpyOps):
    name = "cython"
    batch_invariant = True      # docs/BATCHING.md "Batch invariance"; tests/test_cpu_batch.py
    fused_threshold_batch = True    # ffn(): _ffn_threshold

    def __init__(self, n_threads: int = 1, dot: str = "float"):
        if not AVAILABLE:
            raise BackendError(f"the Cython extension pipower._cpu is not built ({IMPORT_ERROR})")
        if _attention is None:
            raise BackendError(f"pipower._cpu kernel modules are not all built ({_ATTENTION_ERROR})")
        super().__init__(n_threads, dot)
        self._bundles: dict = {}      # (id(up Panels), gate left out) -> (up, bundles): _sparse_bundles
        self._joined: dict = {}       # ids of adjacent Panels -> (them, one Panels over all or None): _join

    def prepare(self, transformer) -> None:
        """Float dots: lay every layer's FFN out as neuron bundles in one huge-page arena (pipower.arena:
        a sparse FFN reads one contiguous, prefetched span per active neuron, on huge pages), layer by
        layer, so the originals are freed as the arena fills. Integer dots: weight panels instead
        (_pack_panels)."""
        from ..arena import bundle_layers
        if any(layer.down is not None for layer in transformer.layers):
            self._pack_panels(transformer)
            return
        for layer, ffn in zip(transformer.layers, bundle_layers(transformer.layers)):
            layer.gate, layer.up, layer.down_t = ffn

    def _pack_panels(self, transformer) -> None:
        """With integer dots (the model kept `down`, LayerWeights), every q4/q8 matrix a dense step reads
        becomes weight panels (pipower.panels: 16 rows interleaved, so VNNI dots need no horizontal sums):
        projections and the output head give bitwise the row-major integer kernel's results, ~1.2x faster
        at one token and more at several; the FFN runs gate, up and down on them (linear_ops.ffn_panels).
        down_t stays row-major: the sparse FFN's neuron bundles are built from it on first use
        (_sparse_bundles). A tied embedding shares the head's panels (embed() reads rows from them)."""
        from ..arena import release_free_memory
        def pack(w):
            return panels.pack(w) if self._int_dot(w) and isinstance(w, QMatrix) else w
        def pack_adjacent(ws):             # q, k, v back to back: see linear_many (gate and up measured
                                           # no faster as one call: their halves must be copied apart)
            if all(self._int_dot(w) and isinstance(w, QMatrix) for w in ws):
                return panels.pack_adjacent(ws)
            return [pack(w) for w in ws]
        for layer in transformer.layers:
            layer.q, layer.k, layer.v = pack_adjacent([layer.q, layer.k, layer.v])
            layer.o = pack(layer.o)
            if layer.down is not None:
                layer.gate, layer.up, layer.down = pack(layer.gate), pack(layer.up), pack(layer.down)
            release_free_memory()                  # the row-major originals just dropped (see there)
        head = pack(transformer.lm_head)
        if transformer.lm_head is transformer.embed_tokens:
            transformer.embed_tokens = head
        transformer.lm_head = head

    def predict_active(self, fc1, fc2, b2: np.ndarray, x: np.ndarray, tau: float) -> np.ndarray:
        """One token's predictor decision in one call (normalise, fc1, ReLU, fc2 + b2, >= tau) -> sorted
        int32 neuron indices. fc1 [r, D], fc2 [F, r]: float32 arrays or QMatrix; x: [1, D] or [D]."""
        def parts(w):
            return (w.fmt, w.data, w.scales) if isinstance(w, QMatrix) else ("f32", w, None)
        return _linear.predict_active(parts(fc1), parts(fc2), np.ascontiguousarray(b2, dtype=np.float32),
                                      np.ascontiguousarray(x, dtype=np.float32).reshape(-1), float(tau),
                                      n_threads=self.n_threads)

    def forward_scope(self, n_tokens: int):
        """BLAS runs on one thread inside a forward call. Our OpenMP kernels and OpenBLAS alternate within
        a call (prefill: BLAS GEMMs between OpenMP norms/attention/dequantization), and on 2 cores their
        idle-spinning workers starve each other. SmolLM2 q8 prefill, same process, 2 BLAS threads vs 1:
        16 tokens 4.8 vs 281 tok/s; 200 tokens 51-71 vs 305-362; 512 tokens 130-201 vs 309-327."""
        return blas_threads(1)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x: [..., D] (usually [T, D]), weight: [D] -> new float32 array shaped like x."""
        # No-ops (no copy) for the float32 C-contiguous arrays the graph passes.
        x = np.ascontiguousarray(x, dtype=np.float32)
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        x2 = x.reshape(-1, x.shape[-1])                         # [T, D]
        return kernels.rms_norm(x2, weight, eps, n_threads=self.n_threads).reshape(x.shape)

    def activation(self, name: str, x: np.ndarray) -> np.ndarray:
        """The FFN kernels' own activation formulas (libm), so selections made outside the kernels
        (oracle mode's |act(gate . h)| > tau) are the ones the fused threshold FFN makes."""
        from . import _ffn
        return _ffn.activation(name, x)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: [T, nh, hd]; cos/sin: [T, hd/2] -> new [T, nh, hd] (HF rotate-half pairs (i, i + hd/2))."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        cos = np.ascontiguousarray(cos, dtype=np.float32)
        sin = np.ascontiguousarray(sin, dtype=np.float32)
        return _attention.rope(x, cos, sin, n_threads=self.n_threads)

    def kv_buffer(self, layer: int, shape: tuple) -> np.ndarray:
        """Zeroed float32 KV-cache storage for `layer`, starting on a cache line. NumPy's allocator aligns
        to 16 bytes, so a head's key and value rows (hd floats, 256 bytes at hd 64) straddled cache lines
        and the attention kernels' 64-byte loads split: aligned, attention took 0.72-0.75 of the time at a
        1000-token context and 0.81 for 8 new tokens at 120 (docs/dev/PERF_NOTES.md section 14)."""
        from ..arena import aligned_bytes
        return aligned_bytes(int(np.prod(shape)) * 4, 64, zeroed=True).view(np.float32).reshape(shape)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                  window: int | None = None) -> np.ndarray:
        """q: [T, H, hd]; k, v: [Hkv, S, hd] (cache views, strided over the capacity axis) -> [T, H*hd].

        The kernel handles both decode (T == 1) and prefill; on this machine it beat the NumPy/BLAS
        reference at every measured size (docs/dev/PERF_NOTES.md). A call whose keys do not end at the last
        query (S != start_pos + T) is not something the graph makes; it goes to the reference.
        """
        T, H, hd = q.shape
        if k.shape[1] != start_pos + T:
            return super().attention(q, k, v, start_pos, window)
        q = np.ascontiguousarray(q, dtype=np.float32)
        w = window or 0
        if T == 1:
            out = _attention.attention_decode(q[0], k, v, window=w, n_threads=self.n_threads)  # [H*hd]
            return out.reshape(1, H * hd)
        return _attention.attention_prefill(q, k, v, start_pos, window=w, n_threads=self.n_threads)

    # -- compact-weight projections and the (sparse) FFN: pipower._cpu.linear_ops ---------------------
    native_formats = FORMATS
    ffn_layout = "bundled"

    def linear(self, x: np.ndarray, weight, bias: np.ndarray | None = None) -> np.ndarray:
        """x: [T, K], weight: [N, K] (float32 array or QMatrix), bias: [N] -> [T, N]."""
        return linear_ops.linear(np.ascontiguousarray(x, dtype=np.float32), weight, bias, self.n_threads,
                                 int_dot=self._int_dot(weight))

    def linear_many(self, x: np.ndarray, weights, biases) -> list:
        """Projections of one input. Weight panels packed back to back (_pack_panels: q, k, v) run as one
        kernel call over all their rows: the activations quantized once and one OpenMP region instead of
        three, each row's dot unchanged (the same bits as three linear calls)."""
        whole = self._join(weights)
        if whole is None:
            return super().linear_many(x, weights, biases)
        y = linear_ops.linear(np.ascontiguousarray(x, dtype=np.float32), whole, None, self.n_threads,
                              int_dot=True)                                       # [T, sum N]
        out, n0 = [], 0
        for w, b in zip(weights, biases):
            part = np.ascontiguousarray(y[:, n0:n0 + w.shape[0]])
            if b is not None:
                part += b
            out.append(part)
            n0 += w.shape[0]
        return out

    def _join(self, weights):
        """pipower.panels.joined(weights), looked up once per set of weights."""
        key = tuple(id(w) for w in weights)
        hit = self._joined.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], weights)):
            hit = self._joined[key] = (tuple(weights), panels.joined(list(weights)))
        return hit[1]

    def _rows(self, w, rows=None) -> np.ndarray:
        """The compiled row dequantizer: exactly quant.dequantize's values, for strided bundle rows too."""
        if isinstance(w, Panels) or getattr(w, "fmt", None) == "q4m":     # q4m: embedding rows only (dense
            return super()._rows(w, rows)                                   # use), NumPy's dequantizer
        fmt, data, scales = linear_ops.parts(w)
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(w.shape[0])
            return _linear.dequantize_rows(fmt, data, scales, start=start, stop=stop)
        idx = None if rows is None else np.ascontiguousarray(rows, dtype=np.int32)
        return _linear.dequantize_rows(fmt, data, scales, idx=idx)

    def ffn(self, x: np.ndarray, gate, up, down_t, act: str, idx=None, down=None) -> np.ndarray:
        """Same contract as NumpyOps.ffn. With integer dots and `down`, the dense FFN runs on weight
        panels (linear_ops.ffn_panels). Otherwise the fused kernels take one token, a Threshold, the
        integer dot and up to MAX_TOKENS tokens sharing one neuron list (linear_ops.on_kernels); a long
        prompt, or a per-token mask over several tokens, runs the reference's chunked FFN (BLAS over row
        tiles)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if isinstance(idx, Threshold) and (x.shape[0] > 1 or (type(up) is Panels and type(gate) is Panels)):
            return self._ffn_threshold(x, gate, up, down_t, act, idx)
        if down is not None and idx is None and self._int_dot(down):
            if type(up) is Panels and type(down) is Panels and (gate is None or type(gate) is Panels):
                return linear_ops.ffn_panels(x, gate, up, down, act, self.n_threads)
            return super().ffn(x, gate, up, down_t, act, idx, down)
        if type(up) is Panels:                     # a sparse call on a panel-packed layer
            gate, up, down_t = self._sparse_bundles(gate, up, down_t)
        int_dot = self._int_dot(up)
        if linear_ops.on_kernels(x.shape[0], idx, int_dot):
            return linear_ops.ffn(x, gate, up, down_t, act, self.n_threads, idx, int_dot=int_dot)
        return super().ffn(x, gate, up, down_t, act, idx)

    def _ffn_threshold(self, x: np.ndarray, gate, up, down_t, act: str, thr: Threshold) -> np.ndarray:
        """A Threshold on a panel-packed layer (any T), or over T > 1 tokens (a prompt in oracle mode):
        each token keeps the neurons with |act(gate . x_t)| > tau, exactly its decode step's selection,
        and its output is bitwise the masked sparse FFN's. x: [T, D] -> [T, D]. On a panel-packed layer
        every gate dot comes from one panel GEMM over the T tokens (bitwise the row kernels' integer
        dots) and each token runs the fused threshold FFN over bundles of up and down_t alone (their
        gate rows would never be read); otherwise (T > 1) the selection becomes a bool [T, F] mask for
        the per-token sparse FFN."""
        pre = self.linear(x, gate if gate is not None else up)                          # [T, F]
        if type(up) is Panels and type(gate) is Panels:
            _, bup, bdown = self._sparse_bundles(None, up, down_t)
            out = np.empty_like(x)
            for t in range(x.shape[0]):
                out[t] = linear_ops.ffn(x[t:t + 1], None, bup, bdown, act, self.n_threads, thr, int_dot=True,
                                        gate_dots=pre[t])[0]
            return out
        mask = np.abs(self.activation(act, pre)) > np.float32(thr.tau)                # bool [T, F]
        thr.count(int(mask.sum()), mask.size)
        return self.ffn(x, gate, up, down_t, act, mask)

    def _sparse_bundles(self, gate, up, down_t) -> tuple:
        """Neuron bundles (pipower.arena) of a panel-packed layer for the sparse FFN, built on its first
        sparse call and kept: gate/up rows come back exactly from the panels (q4m ones as q8, _sparse_rows),
        down_t is the layer's own. gate None: bundles of up and down_t alone (the threshold FFN, which
        takes the gate's dots from the panels: a third less memory, and each kept neuron one contiguous
        span). Dense-only use never pays their memory."""
        key = (id(up), gate is None)
        hit = self._bundles.get(key)
        if hit is None or hit[0] is not up:
            from ..arena import Arena, ffn_nbytes
            rows = (None if gate is None else _sparse_rows(gate), _sparse_rows(up), down_t)
            hit = self._bundles[key] = (up, Arena(ffn_nbytes(*rows)).bundle_ffn(*rows))
        return hit[1]

    def _ffn_act(self, name: str, h: np.ndarray) -> np.ndarray:
        # NumPy's formulas, not the kernels' (activation() above): the chunked FFN has always used them,
        # and long-prompt results stay bitwise what they were.
        return ACTIVATIONS[name](h)


def _sparse_rows(p: Panels) -> QMatrix:
    """A panel-packed gate / up matrix as the row-major rows the sparse FFN kernels read. Those kernels
    have no q4m code: q4m rows are requantized to q8 (error <= 1/254 of a block's largest weight, on top
    of the 4-bit grid), as down_t of a q4m / native model is q8 (pipower.model)."""
    m = panels.unpack(p)
    if m.fmt != "q4m":
        return m
    log.info("sparse FFN over q4m weights: building q8 copies of the layer's gate/up rows")
    return quantize(dequantize(m), "q8")
