# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Attention-side CPU kernels (Cython + OpenMP): decode and prefill attention over the KV cache, RoPE.

Loops live in _attention_impl.h; this file checks arguments (InvalidArgumentError naming the argument),
allocates outputs and scratch, and spreads independent rows over `n_threads` OpenMP threads. Every output
row is computed by the same code whatever the thread count, so results do not depend on n_threads.

Shapes: T query positions, S keys (cache length after the append), H query heads, Hkv KV heads
(GQA: query head h reads KV head h // (H // Hkv), as HF's repeat_kv), hd head dim.
k and v may be the KV cache's views cache._k[layer][:, :S]: only the last axis must be contiguous.
"""
import numpy as np

cimport cython
cimport numpy as cnp
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt

from ._checks cimport check_array, check_out, check_threads, invalid

cdef extern from "_attention_impl.h" nogil:
    float pp_exp_neg(float x)
    void pp_attn_row(const float *q, const float *k, Py_ssize_t ldk, const float *v, Py_ssize_t ldv,
                     Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t hd, float scale, float *s, float *out)
    int PP_ATTN_UNIT
    void pp_attn_unit(const float *q, Py_ssize_t H, Py_ssize_t hd, const float *k, Py_ssize_t ldk,
                      const float *v, Py_ssize_t ldv, Py_ssize_t G, Py_ssize_t g, Py_ssize_t r0, Py_ssize_t r1,
                      Py_ssize_t start, float scale, float *scratch, Py_ssize_t S, float *out)
    void pp_rope_head(const float *x, float *y, const float *c, const float *s, Py_ssize_t half)

cnp.import_array()

cdef tuple _F32S = (np.dtype(np.float32),)

# Below this many multiply-adds (H * keys * hd * 2) a call runs on one thread. Inside a forward the
# OpenMP team is warm (the kernels before this one ran on it, and idle workers spin ~0.4 ms before they
# sleep: pipower/threads.py), so a parallel region costs ~1 us, about what one thread does in 2^15
# multiply-adds (~2.7 ns per (head, key) at hd = 64). Was 2^19, set for a team woken from sleep (20-60
# us): Qwen2.5-0.5B, 2 threads, attention per forward T = 1 / 2 / 4 0.41 / 0.60 / 0.98 -> 0.29 / 0.39 /
# 0.62 ms (docs/dev/PERF_NOTES.md section 11).
DEFAULT_MIN_PARALLEL_WORK = 1 << 15
cdef Py_ssize_t _min_par_work = DEFAULT_MIN_PARALLEL_WORK


def set_min_parallel_work(n):
    """Set the work threshold (multiply-adds) under which calls stay on one thread; returns the old one.
    Tests set 0 to force the threaded path on small inputs."""
    global _min_par_work
    old = _min_par_work
    _min_par_work = int(n)
    return old


cdef tuple _check_kv(object q_heads, object k, object v, Py_ssize_t hd):
    """k, v: [Hkv, S, hd], last axis contiguous, same shape; H divisible by Hkv. -> (Hkv, S)."""
    check_array(k, "k", _F32S, 3, False)
    check_array(v, "v", _F32S, 3, False)
    ks, vs = k.strides, v.strides
    if ks[0] % 4 or ks[1] % 4 or vs[0] % 4 or vs[1] % 4:
        raise invalid("k and v strides must be whole float32 elements")
    if k.shape != v.shape:
        raise invalid(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    Hkv, S, khd = k.shape
    if khd != hd:
        raise invalid(f"k/v head dim {khd} does not match q head dim {hd}")
    if Hkv < 1 or q_heads % Hkv != 0:
        raise invalid(f"q heads ({q_heads}) must be a positive multiple of k/v heads ({Hkv})")
    return Hkv, S


cdef int _window(object window) except -1:
    if window is None:
        return 0
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 0:
        raise invalid(f"window must be an int >= 0 (0 = no window) or None, got {window!r}")
    return <int>min(window, 1 << 30)


# ---- attention core: T query positions x H heads, rows independent ------------------------------
cdef void _attend(const float *q, Py_ssize_t T, Py_ssize_t H, Py_ssize_t hd,
                  const float *k, Py_ssize_t k_head, Py_ssize_t k_row,
                  const float *v, Py_ssize_t v_head, Py_ssize_t v_row, Py_ssize_t Hkv,
                  float *out, float *scratch, Py_ssize_t ls, Py_ssize_t S, Py_ssize_t start, int w,
                  float scale, Py_ssize_t per_group, int nt) noexcept nogil:
    # q: [T, H, hd] contiguous; k, v: [Hkv, S, hd] with head / row strides in floats (the cache's views
    # stride over its capacity axis); out: [T, H*hd]; scratch: [nt, ls], ls = PP_ATTN_UNIT * (S + 2 hd);
    # per_group: units of up to PP_ATTN_UNIT rows per KV head.
    # Row i = (t, h): query head h at position p = start + t sees keys lo..p of KV head h // G.
    # Prefill rows grow with t, so they are dealt dynamically; which thread runs a row never changes it.
    cdef Py_ssize_t G = H // Hkv, i, t, h, p, lo, u, g, r0
    cdef Py_ssize_t units = Hkv * per_group
    if w == 0:
        # Units of up to PP_ATTN_UNIT rows of one KV head, K and V blocks shared inside a unit (same bits
        # per row as pp_attn_row).
        if nt <= 1:
            for u in range(units):
                g = u // per_group
                r0 = (u - g * per_group) * PP_ATTN_UNIT
                pp_attn_unit(q, H, hd, k + g * k_head, k_row, v + g * v_head, v_row, G, g, r0,
                             min(r0 + PP_ATTN_UNIT, T * G), start, scale, scratch, S, out)
        else:
            with parallel(num_threads=nt):
                for u in prange(units, schedule="dynamic", chunksize=1):
                    g = u // per_group
                    r0 = (u - g * per_group) * PP_ATTN_UNIT
                    pp_attn_unit(q, H, hd, k + g * k_head, k_row, v + g * v_head, v_row, G, g, r0,
                                 min(r0 + PP_ATTN_UNIT, T * G), start, scale, scratch + threadid() * ls, S, out)
        return
    if nt <= 1:
        for i in range(T * H):
            t = i // H
            h = i - t * H
            p = start + t
            lo = p + 1 - w if (w > 0 and p + 1 > w) else 0
            pp_attn_row(q + i * hd, k + (h // G) * k_head, k_row, v + (h // G) * v_head, v_row,
                        lo, p + 1, hd, scale, scratch, out + i * hd)
    else:
        with parallel(num_threads=nt):
            for i in prange(T * H, schedule="dynamic", chunksize=2):
                t = i // H
                h = i - t * H
                p = start + t
                lo = p + 1 - w if (w > 0 and p + 1 > w) else 0
                pp_attn_row(q + i * hd, k + (h // G) * k_head, k_row, v + (h // G) * v_head, v_row,
                            lo, p + 1, hd, scale, scratch + threadid() * ls, out + i * hd)


cdef object _run(object q, object k, object v, object out, Py_ssize_t T, Py_ssize_t H, Py_ssize_t hd,
                 Py_ssize_t Hkv, Py_ssize_t S, Py_ssize_t start, int w, int nt):
    """Checked arrays in, kernel over raw pointers (no memoryview set-up: ~1 us saved per array)."""
    if T == 0 or H == 0 or hd == 0:
        return out
    # multiply-adds actually done: full rows for decode, about half the T x S rectangle for prefill
    cdef Py_ssize_t keys = (S - start + S) // 2 if T > 1 else S
    if w > 0 and keys > w:
        keys = w
    if H * T * keys * hd * 2 < _min_par_work:
        nt = 1
    cdef Py_ssize_t per_group = (T * (H // Hkv) + PP_ATTN_UNIT - 1) // PP_ATTN_UNIT
    cdef Py_ssize_t ls = PP_ATTN_UNIT * (S + 2 * hd)
    nt = <int>min(nt, T * H if w > 0 else Hkv * per_group)
    scratch = np.empty((nt, ls), dtype=np.float32)
    cdef cnp.npy_intp *ks = cnp.PyArray_STRIDES(k)
    cdef cnp.npy_intp *vs = cnp.PyArray_STRIDES(v)
    cdef float scale = <float>(1.0 / sqrt(<double>hd))
    cdef const float *qp = <const float *>cnp.PyArray_DATA(q)
    cdef const float *kp = <const float *>cnp.PyArray_DATA(k)
    cdef const float *vp = <const float *>cnp.PyArray_DATA(v)
    cdef float *op = <float *>cnp.PyArray_DATA(out)
    cdef float *sp = <float *>cnp.PyArray_DATA(scratch)
    with nogil:
        _attend(qp, T, H, hd, kp, ks[0] // 4, ks[1] // 4, vp, vs[0] // 4, vs[1] // 4, Hkv,
                op, sp, ls, S, start, w, scale, per_group, nt)
    return out


def attention_decode(q, k, v, out=None, window=0, n_threads=1):
    """Attention of one new query (position S-1) over S cached keys, GQA, optional sliding window.

    q: float32 [H, hd] C-contiguous; k, v: float32 [Hkv, S, hd] (strided cache views welcome: only the
    last axis must be contiguous); out: float32 [H*hd] or None. window: 0/None = full causal, else keys
    j <= (S-1) - window are hidden (Mistral). Returns out = softmax(q k^T / sqrt(hd)) v per head.
    """
    cdef int nt = check_threads(n_threads)
    cdef int w = _window(window)
    check_array(q, "q", _F32S, 2, True)
    cdef Py_ssize_t H = q.shape[0], hd = q.shape[1]
    Hkv, S = _check_kv(H, k, v, hd)
    out = check_out(out, "out", (H * hd,))
    if S < 1:
        raise invalid("k/v must hold at least one position (the query's own)")
    return _run(q, k, v, out, 1, H, hd, Hkv, S, S - 1, w, nt)


def attention_prefill(q, k, v, start, out=None, window=0, n_threads=1):
    """Causal attention of T queries at positions start .. start+T-1 over S = start+T keys.

    q: float32 [T, H, hd] C-contiguous; k, v: float32 [Hkv, S, hd] (last axis contiguous);
    out: float32 [T, H*hd] or None. Query at position p sees keys 0..p, or p-window < j <= p with a
    window. Each (position, head) row is computed exactly as attention_decode computes its row.
    """
    cdef int nt = check_threads(n_threads)
    cdef int w = _window(window)
    check_array(q, "q", _F32S, 3, True)
    cdef Py_ssize_t T = q.shape[0], H = q.shape[1], hd = q.shape[2]
    Hkv, S = _check_kv(H, k, v, hd)
    if not isinstance(start, (int, np.integer)) or start < 0 or start + T != S:
        raise invalid(f"start must be an int with start + T == S (T={T}, S={S}), got {start!r}")
    out = check_out(out, "out", (T, H * hd))
    return _run(q, k, v, out, T, H, hd, Hkv, S, start, w, nt)


# ---- RoPE -----------------------------------------------------------------------------------------
cdef void _rope(const float *x, float *y, const float *c, const float *s, Py_ssize_t T, Py_ssize_t nh,
                Py_ssize_t hd, int nt) noexcept nogil:
    # x, y: [T, nh, hd] contiguous (may be the same array); c, s: [T, hd/2] contiguous.
    cdef Py_ssize_t half = hd // 2, i, t
    if nt <= 1:
        for i in range(T * nh):
            t = i // nh
            pp_rope_head(x + i * hd, y + i * hd, c + t * half, s + t * half, half)
    else:
        with parallel(num_threads=nt):
            for i in prange(T * nh, schedule="static"):
                t = i // nh
                pp_rope_head(x + i * hd, y + i * hd, c + t * half, s + t * half, half)


def rope(x, cos, sin, out=None, n_threads=1):
    """Rotary embedding, HF rotate-half layout: pairs (i, i + hd/2) of each head rotated by angle t, i.

    x: float32 [T, nh, hd] C-contiguous, hd even; cos, sin: float32 [T, hd/2]; out: float32 [T, nh, hd],
    None (allocated) or x itself (in place). Returns out.
    """
    cdef int nt = check_threads(n_threads)
    check_array(x, "x", _F32S, 3, True)
    check_array(cos, "cos", _F32S, 2, True)
    check_array(sin, "sin", _F32S, 2, True)
    T, nh, hd = x.shape
    if hd % 2:
        raise invalid(f"head dim must be even, got x shape {x.shape}")
    if cos.shape != (T, hd // 2) or sin.shape != (T, hd // 2):
        raise invalid(f"cos and sin must have shape {(T, hd // 2)}, got {cos.shape} and {sin.shape}")
    cdef bint fresh = out is None
    out = check_out(out, "out", (T, nh, hd))
    if T * nh * hd == 0:
        return out
    if not fresh and out is not x and np.may_share_memory(out, x):
        raise invalid("out must be x itself or not overlap it")
    if T * nh * hd * 2 < _min_par_work:
        nt = 1
    nt = <int>min(nt, T * nh)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
    cdef float *yp = <float *>cnp.PyArray_DATA(out)
    cdef const float *cp = <const float *>cnp.PyArray_DATA(cos)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(sin)
    cdef Py_ssize_t nT = T, nnh = nh, nhd = hd
    with nogil:
        _rope(xp, yp, cp, sp, nT, nnh, nhd, nt)
    return out


def exp_neg(x):
    """The kernels' exp for x <= 0, on a float32 array (for tests of its accuracy)."""
    check_array(x, "x", _F32S, 1, True)
    cdef const float[::1] xv = x
    y = np.empty_like(x)
    cdef float[::1] yv = y
    cdef Py_ssize_t i
    for i in range(xv.shape[0]):
        yv[i] = pp_exp_neg(xv[i])
    return y
