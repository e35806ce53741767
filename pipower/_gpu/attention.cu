// Decode attention over the KV cache (GQA) and rotary embedding, float32.
//
// attn_decode_partial + attn_decode_combine: T query tokens at positions p_t = start_pos + t, each over
// its own keys [lo_t, p_t] of the cache (lo_t = p_t - window + 1 with a sliding window, else 0), split
// over keys ("flash decoding") so long contexts use the whole GPU:
//   q [T, H, hd] contiguous; k, v: the cache's [Hkv, S, hd] head-major views (S >= start_pos + T): rows
//   of one head contiguous (row stride hd), heads k_stride / v_stride elements apart (capacity * hd: may
//   exceed S * hd). Query head h reads KV head h / G (G = H / Hkv, HF repeat_kv order).
//   scale = 1 / sqrt(hd). hd <= 256 (8 elements per lane).
//   Row t's split depends on its own key count n_t only (key_split: P_t pieces of chunk_t keys, at most
//   pcap), so a token's attention is bitwise the same whether it is decoded alone (T = 1) or verified /
//   served among others: batch invariant.
//   partial: block (h, p, t) takes keys [lo_t + p * chunk_t, min(p_t + 1, lo_t + (p + 1) * chunk_t));
//     blocks with p >= P_t return at once. Its 4 warps take every 4th key, one key per warp step: lanes
//     on consecutive dims (coalesced row reads), score by warp shuffle, running max / sum / weighted V
//     (online softmax, max-subtracted: no overflow). The warps are merged through shared memory; the
//     block writes part_m [T, H, PM] (max score), part_l [T, H, PM] (sum exp(s - m)),
//     part_o [T, H, PM, hd] (sum exp(s - m) v), PM = gridDim.y >= every P_t.
//     Launch: grid = (H, PM, T), block = (128) exactly.
//   combine: out [T, H * hd]: row t, head h = sum_p e_p part_o[t, h, p] / sum_p e_p part_l[t, h, p],
//     e_p = exp(m_p - max m), p < P_t.  Launch: grid = (H, T), block = (B) any multiple of 32.
//
// rope_f32: HF rotate_half layout, pairs (i, i + hd/2):
//   y[t, h, i] = x1 c - x2 s,  y[t, h, i + hd/2] = x2 c + x1 s,  x1 = x[t, h, i], x2 = x[t, h, i + hd/2],
//   c = cos[t, i], s = sin[t, i].  x, y [T, nh, hd] contiguous (y may alias x); cos, sin [T, hd/2].
//   Rounded multiplies and adds (no fma contraction): bit-identical to the NumPy reference.
//   Launch: grid-stride over T * nh * hd/2 threads, any 1-D grid/block.

#include "common.cuh"

#define ATT_WARPS 4
#define HD_SLOTS 8          // MAX head dim 256 = 8 * 32
#define ATT_MIN_KEYS 64     // fewest keys per piece of a split

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Keys [lo, hi) of query row t: its position p = start_pos + t sees lo..p (window > 0: the last window).
__device__ __forceinline__ void row_keys(int start_pos, int t, int window, int& lo, int& hi) {
    hi = start_pos + t + 1;
    lo = window > 0 ? max(0, hi - window) : 0;
}

// A row of n keys in P pieces of chunk keys: P = min(ceil(n / ATT_MIN_KEYS), pcap) at most, no piece
// empty. Depends on n and pcap only (never on T).
__device__ __forceinline__ void key_split(int n, int pcap, int& chunk, int& P) {
    P = max(1, min((n + ATT_MIN_KEYS - 1) / ATT_MIN_KEYS, pcap));
    chunk = (n + P - 1) / P;
    P = (n + chunk - 1) / chunk;
}

extern "C" __global__ void attn_decode_partial(const float* __restrict__ q, const float* __restrict__ k,
                                               const float* __restrict__ v, float* __restrict__ part_m,
                                               float* __restrict__ part_l, float* __restrict__ part_o, int G,
                                               int hd, long long k_stride, long long v_stride, int start_pos,
                                               int window, int pcap, float scale) {
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
    __shared__ float sm_o[ATT_WARPS][HD_SLOTS * 32];
    const int h = blockIdx.x, p = blockIdx.y, PM = gridDim.y, t = blockIdx.z, H = gridDim.x;
    int lo, hi, chunk, P;
    row_keys(start_pos, t, window, lo, hi);
    key_split(hi - lo, pcap, chunk, P);
    if (p >= P) return;                                  // the whole block: before any barrier
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* qh = q + ((size_t)t * H + h) * hd;
    const float* kh = k + (size_t)(h / G) * k_stride;
    const float* vh = v + (size_t)(h / G) * v_stride;

    float qr[HD_SLOTS], acc[HD_SLOTS];
#pragma unroll
    for (int e = 0; e < HD_SLOTS; ++e) {
        const int dd = lane + 32 * e;
        qr[e] = dd < hd ? qh[dd] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = neg_inf(), l = 0.0f;
    const int j0 = lo + p * chunk, j1 = min(hi, j0 + chunk);
    for (int j = j0 + warp; j < j1; j += ATT_WARPS) {
        const float* kr = kh + (size_t)j * hd;
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < HD_SLOTS; ++e) {
            const int dd = lane + 32 * e;
            if (dd < hd) s = fmaf(qr[e], kr[dd], s);
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);              // 0 on the first key (m = -inf)
        const float w = expf(s - m_new);
        l = fmaf(l, corr, w);
        const float* vr = vh + (size_t)j * hd;
#pragma unroll
        for (int e = 0; e < HD_SLOTS; ++e) {
            const int dd = lane + 32 * e;
            if (dd < hd) acc[e] = fmaf(w, vr[dd], acc[e] * corr);
        }
        m = m_new;
    }

    // merge the warps of this block
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < HD_SLOTS; ++e) {
        const int dd = lane + 32 * e;
        if (dd < hd) sm_o[warp][dd] = acc[e];
    }
    __syncthreads();
    float M = neg_inf();
    for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, sm_m[w]);
    float ew[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; ++w) ew[w] = sm_m[w] == neg_inf() ? 0.0f : expf(sm_m[w] - M);
    const size_t slot = ((size_t)t * H + h) * PM + p;
    for (int dd = threadIdx.x; dd < hd; dd += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) o = fmaf(sm_o[w][dd], ew[w], o);
        part_o[slot * hd + dd] = o;
    }
    if (threadIdx.x == 0) {
        float L = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) L = fmaf(sm_l[w], ew[w], L);
        part_m[slot] = M;
        part_l[slot] = L;
    }
}

extern "C" __global__ void attn_decode_combine(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                               const float* __restrict__ part_o, float* __restrict__ out, int PM,
                                               int hd, int start_pos, int window, int pcap) {
    const int h = blockIdx.x, t = blockIdx.y, H = gridDim.x;
    int lo, hi, chunk, P;
    row_keys(start_pos, t, window, lo, hi);
    key_split(hi - lo, pcap, chunk, P);
    const size_t base = ((size_t)t * H + h) * PM;
    const float* pm = part_m + base;
    const float* pl = part_l + base;
    float M = neg_inf();
    for (int p = 0; p < P; ++p) M = fmaxf(M, pm[p]);
    float L = 0.0f;
    for (int p = 0; p < P; ++p)
        if (pm[p] != neg_inf()) L = fmaf(pl[p], expf(pm[p] - M), L);
    const float inv = 1.0f / L;
    float* o_row = out + ((size_t)t * H + h) * hd;
    for (int dd = threadIdx.x; dd < hd; dd += blockDim.x) {
        float o = 0.0f;
        for (int p = 0; p < P; ++p)
            if (pm[p] != neg_inf()) o = fmaf(part_o[(base + p) * hd + dd], expf(pm[p] - M), o);
        o_row[dd] = o * inv;
    }
}

extern "C" __global__ void rope_f32(const float* x, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, float* y, int nh, int half,
                                    long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long th = i / half;                   // t * nh + head
        const int c = (int)(i - th * half);
        const long long t = th / nh;
        const size_t base = (size_t)th * 2 * half;
        const float x1 = x[base + c], x2 = x[base + c + half];
        const float co = cos_t[t * half + c], si = sin_t[t * half + c];
        y[base + c] = __fsub_rn(__fmul_rn(x1, co), __fmul_rn(x2, si));
        y[base + c + half] = __fadd_rn(__fmul_rn(x2, co), __fmul_rn(x1, si));
    }
}
