"""CupyOps: the GPU device backend, NumpyOps on CuPy arrays with the kernels of pipower/_gpu/*.cu.

As thinc's CupyOps: a NumpyOps subclass whose array module `xp` is cupy (set by DeviceMemory when the
object is built; CuPy is never imported with this module), overriding only what a kernel does. The
memory half of the device contract (pipower.hybrid.device.DeviceOps: placement, transfers, the budgeted
pool) is DeviceMemory (pipower/_gpu/memory.py). Kernels compile on first use.

What runs where (T = tokens in the call):
  rms_norm, activation, rope            kernels (rmsnorm.cu, ffn.cu, attention.cu), any T
  linear   f16/q8, T <= INVARIANT_T     gemv kernel: each weight row read once per 8 tokens, dequantized on
                                        the fly, every token summed as a lone token would be
           otherwise                    NumpyOps.linear: cuBLAS over float32 row tiles (dequant_rows kernel
                                        as _rows, <= temp_bytes at a time; f32 weights as they are)
  embed                                 dequant_rows kernel (as _rows)
  ffn      Threshold (T = 1), f16/q8    ffn_threshold_hidden (every neuron's gate, up only for the kept
                                        ones), the kept ids compacted, then ffn_down over them
           f16/q8, T <= INVARIANT_T     ffn_hidden (one warp per selected neuron, 8 tokens per row read) +
                                        ffn_down (parallel over D, split over neurons by their count only,
                                        deterministic partial sums); a bool [T, F] mask: all neurons'
                                        hidden values times the mask
           f16/q8 T > INVARIANT_T, f32  NumpyOps._ffn_chunked: row tiles, cuBLAS, act_f32
  attention T <= INVARIANT_T,           attn_decode kernels: each query row over its own prefix (online
           S == start_pos + T           softmax, split over keys by the row's key count only)
           otherwise (long prefill)     NumpyOps.attention: cupy matmuls + causal / window mask, in query
                                        chunks of temp_bytes of scores
cuBLAS runs in plain float32 (CuPy uses TF32 only when CUPY_TF32=1 is set; do not set it).

Batch invariance (`batch_invariant`, as the compiled CPU backend): up to INVARIANT_T tokens, row t of any
op is bitwise what a one-token call computes for that row (same operation chains, splits chosen without
looking at T), so a T-token forward gives bitwise the logits of T decode steps: what speculative
verification and batched serving rely on. Dense FFNs and index lists shared by all rows keep it; a
per-token bool mask sums over all neurons with the masked ones zero, and a prefill over more than
INVARIANT_T tokens takes cuBLAS: neither is what a decode step computes.

Checks happen before any launch: device arrays (InvalidArgumentError for host arrays), float32
activations (made C-contiguous when they are not), shapes, formats, activation names, and neuron indices
(integer, sorted, unique, in [0, F): one small device reduction and a sync; pass check_indices=False to
skip it in a hot loop that guarantees them).
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError
from ..ops import ACT_CODES, NumpyOps, Threshold, check_activation, check_attention, check_linear, check_rope
from . import kernels
from .memory import F32, DeviceMatrix, DeviceMemory, _cdiv

I32 = np.int32
I64 = np.int64

INVARIANT_T = 64          # up to this many tokens, the batch-invariant kernels (longer prefills: cuBLAS)
TOK_TILE = 8              # tokens per weight-row read in gemv / ffn kernels (TOK_TILE of common.cuh)
WARPS = 8                 # warps per block of the one-warp-per-row kernels (block = 256 threads)
DOWN_THREADS = 128        # block of ffn_down (4 columns per thread)
MIN_CHUNK = 32            # ffn_down: fewest neurons per split
ATT_MIN_KEYS = 64         # attention: fewest keys per split piece (ATT_MIN_KEYS of attention.cu)
TEMP_BYTES = 64 << 20     # bound on the temporaries of one cuBLAS-path call (pipower.hybrid reserves it)


class CupyOps(DeviceMemory, NumpyOps):
    """NumpyOps on one CUDA device (see the module doc); memory and transfers from DeviceMemory."""

    name = "cupy"
    fused_threshold = True           # ffn takes a Threshold (one token): ffn_threshold_hidden
    batch_invariant = True           # up to INVARIANT_T tokens (module doc)
    temp_bytes = TEMP_BYTES // 3     # the chunked FFN holds three weight tiles at once

    def __init__(self, limit_bytes: int | None = None, device: int = 0, check_indices: bool = True):
        DeviceMemory.__init__(self, limit_bytes, device)         # sets xp = cupy
        NumpyOps.__init__(self)
        self.check_indices = check_indices
        self._n_sm = int(self.xp.cuda.Device(self.device).attributes["MultiProcessorCount"])

    # -- argument checks -------------------------------------------------------------------------------
    def _arr(self, a, what: str, ndim: int | None = None):
        """A float32 device activation, C-contiguous and 16-byte aligned (copied only when it is not)."""
        cp = self.xp
        if not isinstance(a, cp.ndarray):
            raise InvalidArgumentError(f"device op got a host {type(a).__name__} {getattr(a, 'shape', '')} as "
                                       f"{what}: move it with to_device first")
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
        cp = self.xp
        if isinstance(w, DeviceMatrix):
            return w
        if isinstance(w, cp.ndarray) and w.ndim == 2 and w.dtype == F32:
            return DeviceMatrix("f32", w.shape, cp.ascontiguousarray(w))
        raise InvalidArgumentError(f"{what} must be a weight returned by place(), got {type(w).__name__}")

    def _index(self, idx, what: str, n_max: int, sorted_unique: bool):
        """Integer device indices -> int32 C-contiguous, checked in [0, n_max) (and sorted, unique)."""
        cp = self.xp
        if not isinstance(idx, cp.ndarray):
            raise InvalidArgumentError(f"{what} must be a device array (to_device), got {type(idx).__name__}")
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
        return ACT_CODES[check_activation(name)]

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
            y = self.xp.empty_like(x)
            rows = x.size // D if D else 0
            if rows:
                self._launch("rms_norm_f32", (rows,), (256,), (x, w, y, I32(D), F32(eps)),
                             shared_mem=(256 // 32) * 4)
            return y

    def activation(self, name: str, x):
        code = self._act_code(name)
        with self._on_device():
            x = self._arr(x, "x")
            y = self.xp.empty_like(x)
            if x.size:
                self._launch("act_f32", self._grid_1d(x.size), (256,), (x, y, I64(x.size), I32(code)))
            return y

    # -- projections -----------------------------------------------------------------------------------
    def _rows(self, W: DeviceMatrix, rows=None):
        """Rows of a placed weight as float32 [n, K]: all (None), a slice, or an int32 device array of
        indices. f32 rows are the stored array (a view for a slice); f16 / q8 rows are dequantized by
        the dequant_rows kernel into a new array, exactly the reference's dequantize()."""
        cp = self.xp
        N, K = W.shape
        if W.fmt == "f32":
            return W.data if rows is None else W.data[rows]
        if rows is None or isinstance(rows, slice):
            start, stop, _ = (rows or slice(0, N)).indices(N)
            data = W.data[start:stop]
            scales = None if W.scales is None else W.scales[start:stop]
            n, has_idx, ix = stop - start, 0, cp.empty(0, I32)   # NULL: not read when has_idx == 0
        else:
            data, scales, n, has_idx, ix = W.data, W.scales, int(rows.size), 1, rows
        out = cp.empty((n, K), F32)
        if n * K:
            grid = self._grid_1d(n * K)
            if W.fmt == "f16":
                self._launch("dequant_rows_f16", grid, (256,), (data, ix, out, I32(n), I32(K), I32(has_idx)))
            else:
                self._launch("dequant_rows_q8", grid, (256,),
                             (data, scales, ix, out, I32(n), I32(K), I32(has_idx)))
        return out

    def linear(self, x, weight, bias=None):
        """x: [T, K], weight: placed [N, K], bias: [N] or None -> [T, N]."""
        with self._on_device():
            x = self._arr(x, "x", 2)
            W = self._weight(weight, "weight")
            b = None if bias is None else self._arr(bias, "bias", 1)
            (N, K), T = W.shape, x.shape[0]
            if W.fmt == "f32" or not 0 < T <= INVARIANT_T or N == 0:
                return super().linear(x, W, b)                # cuBLAS over float32 row tiles
            check_linear(x, W, b)
            y = self.xp.empty((T, N), F32)
            grid, block = (_cdiv(N, WARPS), _cdiv(T, TOK_TILE)), (32 * WARPS,)
            if W.fmt == "f16":
                self._launch("gemv_f16", grid, block, (x, W.data, y, I32(N), I32(K), I32(T)))
            else:
                self._launch("gemv_q8", grid, block, (x, W.data, W.scales, y, I32(N), I32(K), I32(T)))
            if b is not None:
                y += b
            return y

    def embed(self, table, ids):
        """table: placed [V, D]; ids: device integer [T] -> float32 [T, D] (rows dequantized exactly)."""
        with self._on_device():
            W = self._weight(table, "table")
            return self._rows(W, self._index(ids, "ids", W.shape[0], sorted_unique=False))

    # -- FFN -------------------------------------------------------------------------------------------
    def ffn(self, x, gate, up, down_t, act: str, idx=None):
        """x: [T, D]; gate (or None) / up / down_t: placed [F, D] in one format -> [T, D].

        idx: None (all neurons), int32 [n] sorted unique neuron ids, bool [T, F] per-token mask, or a
        pipower.ops.Threshold (T = 1): the neurons with |act(gate x)| > tau, selected while the gate is
        computed; bitwise the unfused path (gemv, act, then these neurons' ids).
        """
        cp = self.xp
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
            if isinstance(idx, Threshold):
                if T != 1:
                    raise InvalidArgumentError(f"the fused threshold FFN takes one token, got {T}")
                if up.fmt != "f32" and D:
                    return self._ffn_threshold(x, gate, up, down, code, idx)
                pre = self.linear(x, gate if gate is not None else up)                 # f32: unfused
                keep = cp.abs(self.activation(act, pre[0])) > F32(idx.tau)
                idx_sel = cp.flatnonzero(keep).astype(I32)
                idx.count(int(idx_sel.size), F)
                idx = idx_sel
            if idx is not None:
                if not isinstance(idx, cp.ndarray):
                    raise InvalidArgumentError(f"ffn: idx must be a device array (to_device), got {type(idx).__name__}")
                if idx.dtype == np.bool_:
                    if idx.shape != (T, F):
                        raise InvalidArgumentError(f"neuron mask shape {idx.shape} != (T, F) = {(T, F)}")
                    mask, idx = idx, None
                else:
                    idx = self._index(idx, "idx", F, sorted_unique=True)
            n = F if idx is None else int(idx.size)
            if T == 0 or n == 0 or D == 0:
                return cp.zeros((T, D), F32)
            if up.fmt == "f32" or T > INVARIANT_T:
                return self._ffn_chunked(x, gate, up, down, act, idx, mask)
            h = cp.empty((T, n), F32)
            has_idx = idx is not None
            # absent operands are NULL (size-0 arrays of the right type); the kernels test the flags
            ix = idx if has_idx else cp.empty(0, I32)
            if gate is not None:
                g_data, g_scales = gate.data, gate.scales
            else:
                g_data, g_scales = cp.empty(0, up.data.dtype), cp.empty(0, np.float16)
            grid, block = (_cdiv(n, WARPS), _cdiv(T, TOK_TILE)), (32 * WARPS,)
            flags = (I32(n), I32(D), I32(code), I32(gate is not None), I32(has_idx), I32(T))
            if up.fmt == "f16":
                self._launch("ffn_hidden_f16", grid, block, (x, g_data, up.data, ix, h) + flags)
            else:
                self._launch("ffn_hidden_q8", grid, block, (x, g_data, g_scales, up.data, up.scales, ix, h) + flags)
            if mask is not None:
                h *= mask                                   # masked neurons: 0, skipped by ffn_down
            return self._ffn_down(h, down, ix, has_idx, n, T, D)

    def _ffn_threshold(self, x, gate, up: DeviceMatrix, down: DeviceMatrix, code: int, threshold: Threshold):
        """One token's fused threshold FFN: ffn_threshold_hidden over all F neurons (gate dots, selection,
        up dots of the kept ones), the kept ids compacted (one sync: their count), then ffn_down over
        them exactly as an index list would run it."""
        cp = self.xp
        F, D = up.shape
        h_all = cp.empty((1, F), F32)
        sel = cp.empty(F, np.int8)
        if gate is not None:
            g_data, g_scales = gate.data, gate.scales
        else:
            g_data, g_scales = cp.empty(0, up.data.dtype), cp.empty(0, np.float16)
        flags = (I32(F), I32(D), I32(code), I32(gate is not None), F32(threshold.tau))
        grid, block = (_cdiv(F, WARPS),), (32 * WARPS,)
        if up.fmt == "f16":
            self._launch("ffn_threshold_hidden_f16", grid, block, (x, g_data, up.data, h_all, sel) + flags)
        else:
            self._launch("ffn_threshold_hidden_q8", grid, block,
                         (x, g_data, g_scales, up.data, up.scales, h_all, sel) + flags)
        kept = cp.flatnonzero(sel).astype(I32)                                        # [n], sorted
        n = int(kept.size)
        threshold.count(n, F)
        if n == 0:
            return cp.zeros((1, D), F32)
        h = cp.ascontiguousarray(h_all[:, kept])                                       # [1, n]
        return self._ffn_down(h, down, kept, True, n, 1, D)

    def _ffn_down(self, h, down: DeviceMatrix, ix, has_idx: bool, n: int, T: int, D: int):
        """out [T, D] = h [T, n] @ down rows (idx or all), split over neurons into P deterministic partials.
        P depends on n and D, never on T: a token's sums are the same pieces in any batch."""
        cp = self.xp
        tiles = _cdiv(D, 4 * DOWN_THREADS)
        P = max(1, min(_cdiv(n, MIN_CHUNK), _cdiv(4 * self._n_sm, tiles)))
        chunk = _cdiv(n, P)
        P = _cdiv(n, chunk)
        out = cp.empty((T, D), F32)
        part = out if P == 1 else cp.empty((P, T, D), F32)
        args = (h, down.data) + ((down.scales,) if down.fmt == "q8" else ()) + \
               (ix, part, I32(n), I32(D), I32(chunk), I32(T), I32(has_idx))
        self._launch(f"ffn_down_{down.fmt}", (tiles, P, _cdiv(T, TOK_TILE)), (DOWN_THREADS,), args)
        if P > 1:
            self._launch("sum_partials_f32", self._grid_1d(T * D), (256,), (part, out, I32(P), I64(T * D)))
        return out

    # -- attention -------------------------------------------------------------------------------------
    def rope(self, x, cos, sin):
        """x: [T, nh, hd]; cos/sin: [T, hd/2] -> new [T, nh, hd] (HF rotate_half pairs (i, i + hd/2))."""
        with self._on_device():
            x, c, s = self._arr(x, "x", 3), self._arr(cos, "cos", 2), self._arr(sin, "sin", 2)
            check_rope(x, c, s)
            T, nh, hd = x.shape
            half = hd // 2
            y = self.xp.empty_like(x)
            total = T * nh * half
            if total:
                self._launch("rope_f32", self._grid_1d(total), (256,), (x, c, s, y, I32(nh), I32(half), I64(total)))
            return y

    def _kv(self, a, what: str):
        """A [Hkv, S, hd] cache view as (array, head stride in elements): rows must be contiguous (row
        stride hd, element stride 1) and 16-byte aligned; the head stride may be anything (the cache's
        capacity). Views that are not like that are copied contiguous."""
        cp = self.xp
        if not isinstance(a, cp.ndarray):
            raise InvalidArgumentError(f"attention: {what} must be a device array, got {type(a).__name__}")
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
            check_attention(q, k, v, start_pos, window)
            S = k.shape[1]
            if 0 < T <= INVARIANT_T and S == start_pos + T and 0 < hd <= 256 and H:
                return self._attention_decode(q, k, v, k_stride, v_stride, start_pos, window)
            return super().attention(q, k, v, start_pos, window)

    def _attention_decode(self, q, k, v, k_stride: int, v_stride: int, start_pos: int, window):
        """T query rows at positions start_pos + t, each over its own keys (attention.cu). The kernels split
        a row by its own key count (at most pcap pieces); PM here only sizes the partials for the longest."""
        cp = self.xp
        T, H, hd = q.shape
        Hkv = k.shape[0]
        pcap = _cdiv(4 * self._n_sm, H)
        longest = start_pos + T if window is None else min(start_pos + T, window)
        PM = max(1, min(_cdiv(longest, ATT_MIN_KEYS), pcap))               # >= every row's piece count
        pm, pl = cp.empty((T, H, PM), F32), cp.empty((T, H, PM), F32)
        po = cp.empty((T, H, PM, hd), F32)
        win = I32(0 if window is None else window)
        self._launch("attn_decode_partial", (H, PM, T), (128,),
                     (q, k, v, pm, pl, po, I32(H // Hkv), I32(hd), I64(k_stride), I64(v_stride), I32(start_pos),
                      win, I32(pcap), F32(1.0 / np.sqrt(hd))))
        out = cp.empty((T, H * hd), F32)
        self._launch("attn_decode_combine", (H, T), (min(256, _cdiv(hd, 32) * 32),),
                     (pm, pl, po, out, I32(PM), I32(hd), I32(start_pos), win, I32(pcap)))
        return out
