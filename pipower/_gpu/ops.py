"""CupyOps: the GPU device backend, NumpyOps semantics on CuPy arrays with the kernels of pipower/_gpu/*.cu.

It meets the device contract of pipower.hybrid.device (DeviceOps), the same as StandInDeviceOps: the
memory half (placement, transfers, the budgeted pool) is DeviceMemory (pipower/_gpu/memory.py), this
class adds the ops. CuPy is imported when a CupyOps is built, never when this module is imported; kernels
compile on first use.

What runs where (T = tokens in the call):
  rms_norm, activation, rope            kernels (rmsnorm.cu, ffn.cu, attention.cu), any T
  linear   f16/q8, T <= SMALL_T         gemv kernel, weights dequantized on the fly
           f16/q8, T >  SMALL_T         W dequantized to float32 in row chunks (dequant_rows kernel,
                                        <= TEMP_BYTES at a time), then cuBLAS (cupy matmul)
           f32                          cuBLAS
  ffn      f16/q8, T <= SMALL_T         ffn_hidden (one warp per selected neuron) + ffn_down (parallel
                                        over D, split over neurons, deterministic partial sums);
                                        a bool [T, F] mask: all neurons' hidden values times the mask
           f16/q8 T > SMALL_T, or f32   selected rows dequantized in chunks, cuBLAS, as NumpyOps
  attention T == 1, S == start_pos + 1  attn_decode kernels (online softmax, split over keys)
           otherwise (prefill)          cupy matmuls + causal / window mask, as NumpyOps, in query chunks
cuBLAS runs in plain float32 (CuPy uses TF32 only when CUPY_TF32=1 is set; do not set it).

Checks happen before any launch: float32 activations (made C-contiguous when they are not), shapes,
formats, activation names, and neuron indices (integer, sorted, unique, in [0, F): one small device
reduction and a sync; pass check_indices=False to skip it in a hot loop that guarantees them).
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import InvalidArgumentError
from . import kernels
from .memory import F32, DeviceMatrix, DeviceMemory, _cdiv

I32 = np.int32
I64 = np.int64

# activation name -> code of apply_act in ffn.cu (same names as pipower.ops.ACTIVATIONS)
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2, "relu": 3}

SMALL_T = 4               # up to this many tokens, weight-streaming kernels (weights re-read per token)
WARPS = 8                 # warps per block of the one-warp-per-row kernels (block = 256 threads)
DOWN_THREADS = 128        # block of ffn_down (4 columns per thread)
MIN_CHUNK = 32            # ffn_down: fewest neurons per split
ATT_MIN_KEYS = 64         # attention decode: fewest keys per split
TEMP_BYTES = 64 << 20     # bound on one dequantized-weight or score temporary of the cuBLAS paths


class CupyOps(DeviceMemory):
    """NumpyOps-compatible ops on one CUDA device (see the module doc); memory and transfers inherited."""

    name = "cupy"

    def __init__(self, limit_bytes: int | None = None, device: int = 0, check_indices: bool = True):
        super().__init__(limit_bytes, device)
        self.check_indices = check_indices
        self._n_sm = int(self._cp.cuda.Device(self.device).attributes["MultiProcessorCount"])

    def forward_scope(self, n_tokens: int):
        return contextlib.nullcontext()

    # -- argument checks -------------------------------------------------------------------------------
    def _arr(self, a, what: str, ndim: int | None = None):
        """A float32 device activation, C-contiguous and 16-byte aligned (copied only when it is not)."""
        cp = self._cp
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"device op got a host {type(a).__name__} {getattr(a, 'shape', '')} as {what}: "
                            f"move it with to_device first")
        if a.device.id != self.device:
            raise InvalidArgumentError(f"{what} is on device {a.device.id}, this backend runs on {self.device}")
        if a.dtype != F32:
            raise InvalidArgumentError(f"{what} must be float32, got {a.dtype}")
        if ndim is not None and a.ndim != ndim:
            raise InvalidArgumentError(f"{what} must be {ndim}-D, got shape {a.shape}")
        if not a.flags.c_contiguous or a.data.ptr % 16:
            a = a.copy()            # copy() is C-ordered, from the pool (256-byte aligned)
        return a

    def _weight(self, w, what: str) -> DeviceMatrix:
        cp = self._cp
        if isinstance(w, DeviceMatrix):
            return w
        if isinstance(w, cp.ndarray) and w.ndim == 2 and w.dtype == F32:
            return DeviceMatrix("f32", w.shape, cp.ascontiguousarray(w))
        raise TypeError(f"{what} must be a weight returned by place(), got {type(w).__name__}")

    def _index(self, idx, what: str, n_max: int, sorted_unique: bool):
        """Integer device indices -> int32 C-contiguous, checked in [0, n_max) (and sorted, unique)."""
        cp = self._cp
        if not isinstance(idx, cp.ndarray):
            raise TypeError(f"{what} must be a device array (to_device), got {type(idx).__name__}")
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise InvalidArgumentError(f"{what} must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = cp.ascontiguousarray(idx, dtype=I32) if idx.dtype != I32 else cp.ascontiguousarray(idx)
        if self.check_indices and idx.size:
            bad = (idx.min() < 0) | (idx.max() >= n_max)
            if sorted_unique and idx.size > 1:
                bad |= cp.any(idx[1:] <= idx[:-1])
            if bool(bad):
                order = "sorted, unique and " if sorted_unique else ""
                raise InvalidArgumentError(f"{what} must be {order}within [0, {n_max})")
        return idx

    @staticmethod
    def _act_code(name: str) -> int:
        try:
            return ACT_CODES[name]
        except KeyError:
            raise InvalidArgumentError(f"unknown activation {name!r}; choose one of "
                                       f"{', '.join(ACT_CODES)}") from None

    def _launch(self, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        kernels.get(name, self.device)(grid, block, args, shared_mem=shared_mem)

    @staticmethod
    def _grid_1d(total: int, block: int = 256) -> tuple:
        return (max(1, min(_cdiv(total, block), 1 << 20)),)        # the kernels are grid-stride loops

    # -- elementwise / norms ---------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps: float):
        """x: [..., D], weight: [D] -> new [..., D]."""
        with self._on_device():
            x = self._arr(x, "x")
            w = self._arr(weight, "weight", 1)
            D = x.shape[-1] if x.ndim else 0
            if w.shape != (D,):
                raise InvalidArgumentError(f"rms_norm weight shape {w.shape} != ({D},)")
            y = self._cp.empty_like(x)
            rows = x.size // D if D else 0
            if rows:
                self._launch("rms_norm_f32", (rows,), (256,), (x, w, y, I32(D), F32(eps)),
                             shared_mem=(256 // 32) * 4)
            return y

    def activation(self, name: str, x):
        code = self._act_code(name)
        with self._on_device():
            x = self._arr(x, "x")
            y = self._cp.empty_like(x)
            if x.size:
                self._launch("act_f32", self._grid_1d(x.size), (256,), (x, y, I64(x.size), I32(code)))
            return y

    # -- projections -----------------------------------------------------------------------------------
    def _rows_f32(self, W: DeviceMatrix, idx=None, start: int = 0, stop: int | None = None):
        """Rows idx (int32 device array), or start..stop, of W as a new float32 [n, K] array."""
        cp = self._cp
        N, K = W.shape
        if W.fmt == "f32":
            return W.data[idx] if idx is not None else W.data[start:stop].copy()
        stop = N if stop is None else stop
        if idx is not None:
            data, scales, n, has_idx, ix = W.data, W.scales, int(idx.size), 1, idx
        else:
            data = W.data[start:stop]
            scales = None if W.scales is None else W.scales[start:stop]
            n, has_idx, ix = stop - start, 0, cp.empty(0, I32)   # NULL: not read when has_idx == 0
        out = cp.empty((n, K), F32)
        if n * K:
            grid = self._grid_1d(n * K)
            if W.fmt == "f16":
                self._launch("dequant_rows_f16", grid, (256,), (data, ix, out, I32(n), I32(K), I32(has_idx)))
            else:
                self._launch("dequant_rows_q8", grid, (256,),
                             (data, scales, ix, out, I32(n), I32(K), I32(has_idx)))
        return out

    def _chunk_rows(self, K: int, n_mats: int = 1) -> int:
        return max(1, TEMP_BYTES // (4 * max(K, 1) * n_mats))

    def linear(self, x, weight, bias=None):
        """x: [T, K], weight: placed [N, K], bias: [N] or None -> [T, N]."""
        cp = self._cp
        with self._on_device():
            x = self._arr(x, "x", 2)
            W = self._weight(weight, "weight")
            N, K = W.shape
            T = x.shape[0]
            if x.shape[1] != K:
                raise InvalidArgumentError(f"linear: x is {x.shape}, weight is {W.shape} (K must match)")
            b = None
            if bias is not None:
                b = self._arr(bias, "bias", 1)
                if b.shape != (N,):
                    raise InvalidArgumentError(f"linear: bias shape {b.shape} != ({N},)")
            if T == 0 or N == 0:
                y = cp.zeros((T, N), F32)
            elif W.fmt == "f32":
                y = cp.matmul(x, W.data.T)
            elif T <= SMALL_T:
                y = cp.empty((T, N), F32)
                grid, block = (_cdiv(N, WARPS), T), (32 * WARPS,)
                if W.fmt == "f16":
                    self._launch("gemv_f16", grid, block, (x, W.data, y, I32(N), I32(K)))
                else:
                    self._launch("gemv_q8", grid, block, (x, W.data, W.scales, y, I32(N), I32(K)))
            else:   # prefill: dequantize W to float32 a row chunk at a time, multiply with cuBLAS
                y = cp.empty((T, N), F32)
                step = self._chunk_rows(K)
                for n0 in range(0, N, step):
                    n1 = min(N, n0 + step)
                    y[:, n0:n1] = cp.matmul(x, self._rows_f32(W, start=n0, stop=n1).T)
            if b is not None:
                y += b
            return y

    def embed(self, table, ids):
        """table: placed [V, D]; ids: device integer [T] -> float32 [T, D] (rows dequantized exactly)."""
        with self._on_device():
            W = self._weight(table, "table")
            ids = self._index(ids, "ids", W.shape[0], sorted_unique=False)
            return self._rows_f32(W, idx=ids)

    # -- FFN -------------------------------------------------------------------------------------------
    def ffn(self, x, gate, up, down_t, act: str, idx=None):
        """x: [T, D]; gate (or None) / up / down_t: placed [F, D] in one format -> [T, D].

        idx: None (all neurons), int32 [n] sorted unique neuron ids, or bool [T, F] per-token mask.
        """
        cp = self._cp
        code = self._act_code(act)
        with self._on_device():
            x = self._arr(x, "x", 2)
            T, D = x.shape
            up, down = self._weight(up, "up"), self._weight(down_t, "down_t")
            gate = None if gate is None else self._weight(gate, "gate")
            F = up.shape[0]
            for what, w in (("gate", gate), ("up", up), ("down_t", down)):
                if w is not None and w.shape != (F, D):
                    raise InvalidArgumentError(f"ffn: {what} is {w.shape}, expected (F, D) = {(F, D)}")
                if w is not None and w.fmt != up.fmt:
                    raise InvalidArgumentError(f"ffn: gate/up/down_t must share one format, "
                                               f"got {what} {w.fmt} and up {up.fmt}")
            mask = None
            if idx is not None:
                if not isinstance(idx, cp.ndarray):
                    raise TypeError(f"ffn: idx must be a device array (to_device), got {type(idx).__name__}")
                if idx.dtype == np.bool_:
                    if idx.shape != (T, F):
                        raise InvalidArgumentError(f"neuron mask shape {idx.shape} != (T, F) = {(T, F)}")
                    mask, idx = idx, None
                else:
                    idx = self._index(idx, "idx", F, sorted_unique=True)
            n = F if idx is None else int(idx.size)
            if T == 0 or n == 0 or D == 0:
                return cp.zeros((T, D), F32)
            if up.fmt == "f32" or T > SMALL_T:
                return self._ffn_dense(x, gate, up, down, code, idx, mask)
            h = cp.empty((T, n), F32)
            has_idx = idx is not None
            # absent operands are NULL (size-0 arrays of the right type); the kernels test the flags
            ix = idx if has_idx else cp.empty(0, I32)
            if gate is not None:
                g_data, g_scales = gate.data, gate.scales
            else:
                g_data, g_scales = cp.empty(0, up.data.dtype), cp.empty(0, np.float16)
            grid, block = (_cdiv(n, WARPS), T), (32 * WARPS,)
            flags = (I32(n), I32(D), I32(code), I32(gate is not None), I32(has_idx))
            if up.fmt == "f16":
                self._launch("ffn_hidden_f16", grid, block, (x, g_data, up.data, ix, h) + flags)
            else:
                self._launch("ffn_hidden_q8", grid, block, (x, g_data, g_scales, up.data, up.scales, ix, h) + flags)
            if mask is not None:
                h *= mask                                   # masked neurons: 0, skipped by ffn_down
            return self._ffn_down(h, down, ix, has_idx, n, T, D)

    def _ffn_down(self, h, down: DeviceMatrix, ix, has_idx: bool, n: int, T: int, D: int):
        """out [T, D] = h [T, n] @ down rows (idx or all), split over neurons into P deterministic partials."""
        cp = self._cp
        tiles = _cdiv(D, 4 * DOWN_THREADS)
        P = max(1, min(_cdiv(n, MIN_CHUNK), _cdiv(4 * self._n_sm, tiles * T)))
        chunk = _cdiv(n, P)
        P = _cdiv(n, chunk)
        out = cp.empty((T, D), F32)
        part = out if P == 1 else cp.empty((P, T, D), F32)
        args = (h, down.data) + ((down.scales,) if down.fmt == "q8" else ()) + \
               (ix, part, I32(n), I32(D), I32(chunk), I32(T), I32(has_idx))
        self._launch(f"ffn_down_{down.fmt}", (tiles, P, T), (DOWN_THREADS,), args)
        if P > 1:
            self._launch("sum_partials_f32", self._grid_1d(T * D), (256,), (part, out, I32(P), I64(T * D)))
        return out

    def _ffn_dense(self, x, gate, up, down, code: int, idx, mask):
        """As NumpyOps.ffn through cuBLAS, over chunks of neurons (float32 rows dequantized per chunk)."""
        cp = self._cp
        T, D = x.shape
        n = up.shape[0] if idx is None else int(idx.size)
        out = cp.zeros((T, D), F32)
        step = self._chunk_rows(D, 3)
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            sel = {"idx": idx[j0:j1]} if idx is not None else {"start": j0, "stop": j1}
            h = cp.matmul(x, self._rows_f32(up, **sel).T)                       # [T, c]
            if gate is not None:
                g = cp.matmul(x, self._rows_f32(gate, **sel).T)
                self._launch("act_f32", self._grid_1d(g.size), (256,), (g, g, I64(g.size), I32(code)))
                h *= g
            else:
                self._launch("act_f32", self._grid_1d(h.size), (256,), (h, h, I64(h.size), I32(code)))
            if mask is not None:
                h *= mask[:, j0:j1]
            out += cp.matmul(h, self._rows_f32(down, **sel))
            h = g = None                # before the next chunk allocates: one chunk of temporaries at a time
        return out

    # -- attention -------------------------------------------------------------------------------------
    def rope(self, x, cos, sin):
        """x: [T, nh, hd]; cos/sin: [T, hd/2] -> new [T, nh, hd] (HF rotate_half pairs (i, i + hd/2))."""
        with self._on_device():
            x = self._arr(x, "x", 3)
            T, nh, hd = x.shape
            if hd % 2:
                raise InvalidArgumentError(f"rope: head dim {hd} is odd")
            half = hd // 2
            c, s = self._arr(cos, "cos", 2), self._arr(sin, "sin", 2)
            if c.shape != (T, half) or s.shape != (T, half):
                raise InvalidArgumentError(f"rope: cos/sin are {c.shape}/{s.shape}, expected {(T, half)}")
            y = self._cp.empty_like(x)
            total = T * nh * half
            if total:
                self._launch("rope_f32", self._grid_1d(total), (256,), (x, c, s, y, I32(nh), I32(half), I64(total)))
            return y

    def _kv(self, a, what: str):
        """A [Hkv, S, hd] cache view as (array, head stride in elements): rows must be contiguous (row
        stride hd, element stride 1) and 16-byte aligned; the head stride may be anything (the cache's
        capacity). Views that are not like that are copied contiguous."""
        cp = self._cp
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"attention: {what} must be a device array, got {type(a).__name__}")
        if a.dtype != F32 or a.ndim != 3:
            raise InvalidArgumentError(f"attention: {what} must be float32 [Hkv, S, hd], got {a.dtype} {a.shape}")
        Hkv, S, hd = a.shape
        st = a.strides
        if not (st[2] == 4 and (S <= 1 or st[1] == 4 * hd) and st[0] >= 0 and st[0] % 4 == 0
                and a.data.ptr % 16 == 0):
            a = cp.ascontiguousarray(a)
            st = a.strides
        return a, (st[0] // 4 if Hkv > 1 else S * hd)

    def attention(self, q, k, v, start_pos: int, window: int | None = None):
        """q: [T, H, hd]; k, v: [Hkv, S, hd] cache views -> [T, H * hd]; same rules as NumpyOps.attention."""
        with self._on_device():
            q = self._arr(q, "q", 3)
            T, H, hd = q.shape
            k, k_stride = self._kv(k, "k")
            v, v_stride = self._kv(v, "v")
            Hkv, S, _ = k.shape
            if k.shape != v.shape or k.shape[2] != hd:
                raise InvalidArgumentError(f"attention: k {k.shape} / v {v.shape} do not match q {q.shape}")
            if Hkv == 0 or H % Hkv:
                raise InvalidArgumentError(f"attention: {H} query heads are not a multiple of {Hkv} kv heads")
            if start_pos < 0 or S == 0:
                raise InvalidArgumentError(f"attention: start_pos {start_pos}, {S} cached positions")
            if window is not None and window < 1:
                raise InvalidArgumentError(f"attention: window must be >= 1 or None, got {window}")
            if T == 1 and S == start_pos + 1 and 0 < hd <= 256:
                return self._attention_decode(q, k, v, k_stride, v_stride, window)
            return self._attention_dense(q, k, v, start_pos, window)

    def _attention_decode(self, q, k, v, k_stride: int, v_stride: int, window):
        cp = self._cp
        _, H, hd = q.shape
        Hkv, S, _ = k.shape
        lo = max(0, S - window) if window is not None else 0     # visible: j > p - window, p = S - 1
        n_keys = S - lo
        P = max(1, min(_cdiv(n_keys, ATT_MIN_KEYS), _cdiv(4 * self._n_sm, H)))
        chunk = _cdiv(n_keys, P)
        P = _cdiv(n_keys, chunk)
        pm, pl = cp.empty((H, P), F32), cp.empty((H, P), F32)
        po = cp.empty((H, P, hd), F32)
        self._launch("attn_decode_partial", (H, P), (128,),
                     (q, k, v, pm, pl, po, I32(H // Hkv), I32(hd), I64(k_stride), I64(v_stride), I32(lo),
                      I32(S), I32(chunk), F32(1.0 / np.sqrt(hd))))
        out = cp.empty((1, H * hd), F32)
        self._launch("attn_decode_combine", (H,), (min(256, _cdiv(hd, 32) * 32),), (pm, pl, po, out, I32(P), I32(hd)))
        return out

    def _attention_dense(self, q, k, v, start_pos: int, window):
        """NumpyOps.attention's computation with cupy matmuls, a chunk of queries at a time."""
        cp = self._cp
        T, H, hd = q.shape
        Hkv, S, _ = k.shape
        G = H // Hkv
        masked = T > 1 or (window is not None and S > window)
        kt = k.transpose(0, 2, 1)                                        # [Hkv, hd, S]
        out = cp.empty((T, H * hd), F32)
        step = max(1, TEMP_BYTES // (4 * H * S))
        neg_inf = F32(-np.inf)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            n = t1 - t0
            qg = q[t0:t1].reshape(n, Hkv, G, hd).transpose(1, 2, 0, 3).reshape(Hkv, G * n, hd)
            scores = cp.matmul(qg, kt)                                   # [Hkv, G*n, S]
            scores *= F32(1.0 / np.sqrt(hd))
            if masked:
                q_pos = cp.tile(cp.arange(start_pos + t0, start_pos + t1), G)[:, None]   # [G*n, 1]
                k_pos = cp.arange(S)[None, :]                                              # [1, S]
                hidden = k_pos > q_pos
                if window is not None:
                    hidden |= k_pos <= q_pos - window
                scores = cp.where(hidden[None], neg_inf, scores)
            scores -= scores.max(axis=-1, keepdims=True)
            cp.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            o = cp.matmul(scores, v)                                     # [Hkv, G*n, hd]
            out[t0:t1] = o.reshape(Hkv, G, n, hd).transpose(2, 0, 1, 3).reshape(n, H * hd)
        return out

