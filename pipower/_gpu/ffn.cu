// Sparse FFN (PowerInfer's hot-neuron path) over f16 or q8 weights, float32 activations and accumulation.
//
// Weights are row-major with one row per FFN neuron, all three [F, D] (down stored transposed, "down_t"):
//   f16: data = float16 bits [F, D]                       (read as unsigned short, converted exactly)
//   q8 : data = int8 [F, D], scales = float16 [F, D / 32]  value = q * d, D a multiple of 32
// A neuron list idx (int32 [n], sorted, unique, in [0, F)) selects the rows; has_idx = 0 means all rows
// (n = F, row j = neuron j). Absent pointers (gate, idx) are flagged by an int and never dereferenced.
//
//   ffn_hidden_{f16,q8}: h[t, j] = act(gate_r . x_t) * (up_r . x_t)   (has_gate = 1)
//                        h[t, j] = act(up_r . x_t)                      (has_gate = 0, plain MLP)
//                        with r = idx[j].  x [T, D], h [T, n].
//     Launch: block = (32 * W) threads (W warps, one neuron per warp), grid = (ceil(n / W), T).
//     A warp reads a row with consecutive lanes on consecutive elements (coalesced) and reduces
//     with warp shuffles; lane 0 writes h.
//   ffn_down_{f16,q8}: part[p, t, d] = sum_{k in chunk p} h[t, k] * down_t[r_k, d]
//     chunk p = [p * chunk, min(n, (p + 1) * chunk)). Every thread owns 4 consecutive columns d and
//     walks the chunk's rows in order: parallel over d, no atomics, deterministic.
//     Launch: block = (B) threads, grid = (ceil(D / (4 * B)), P, T), P = ceil(n / chunk).
//     With P == 1, part may be the output [T, D] itself; otherwise sum_partials_f32 adds the P slices.
//     A neuron whose h[t, k] == 0 (ReLU models: most of them) is skipped: its row is not read.
//   ffn_threshold_hidden_{f16,q8}: the fused threshold FFN's first half, one token, every neuron j < F:
//                        a = act(gate_j . x) (act(up_j . x) without a gate); keep = |a| > tau;
//                        h[j] = keep ? a * (up_j . x) : 0 (a without a gate); sel[j] = keep.
//     The up row of a neuron not kept is never read: the gate streams at dense speed and up / down are
//     read for the kept neurons only. The gate dot sums in gemv_*'s order and h in ffn_hidden_*'s, so
//     the selection and the kept values are bitwise those of gemv + act_f32 + ffn_hidden over the kept
//     ids (the unfused oracle path). x [D], h [F], sel int8 [F].
//     Launch: block = (32 * W) threads (one neuron per warp), grid = (ceil(F / W)).
//   sum_partials_f32: out[i] = sum_{p < P} part[p, i] in order p = 0 .. P-1 (deterministic).
//     Launch: grid-stride, any 1-D grid/block. part [P, M], out [M].
//   act_f32: y[i] = act(x[i]) over n elements (the same activation code as the FFN kernels).
//     Launch: grid-stride, any 1-D grid/block. y may alias x.
//
// act codes: 0 silu, 1 gelu (erf), 2 gelu_tanh ("gelu_pytorch_tanh" / "gelu_new"), 3 relu, -1 identity.
// Rows of f16 data are read two elements at a time when D is even (4-byte loads), q8 rows four int8
// at a time (D % 32 == 0 always): the callers pass allocations aligned to >= 16 bytes.

#include "common.cuh"

#define ACT_IDENTITY -1
#define ACT_SILU 0
#define ACT_GELU 1
#define ACT_GELU_TANH 2
#define ACT_RELU 3

// Same formulas as pipower.ops (NumPy reference); erff is the exact erf, the reference's A&S erf is
// within 1.5e-7 of it.
__device__ __forceinline__ float apply_act(int act, float v) {
    switch (act) {
    case ACT_SILU: return v / (1.0f + expf(-v));
    case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: {
        const float c = 0.79788456080286536f;   // sqrt(2 / pi)
        return 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
    case ACT_RELU: return v > 0.0f ? v : 0.0f;
    default: return v;
    }
}

// ---- kernel A: per-neuron dot products ------------------------------------------------------------

// One warp: (g . x, u . x) for f16 rows g (when HAS_GATE) and u of length D. Result valid in every lane.
template <bool HAS_GATE>
__device__ __forceinline__ void dots_f16(const unsigned short* __restrict__ g, const unsigned short* __restrict__ u,
                                         const float* __restrict__ x, int D, int lane, float& gs, float& us) {
    float sg = 0.0f, su = 0.0f;
    if ((D & 1) == 0) {     // pairs: 4-byte weight loads, 8-byte activation loads
        const ushort2* u2 = reinterpret_cast<const ushort2*>(u);
        const ushort2* g2 = reinterpret_cast<const ushort2*>(g);
        const float2* x2 = reinterpret_cast<const float2*>(x);
        for (int i = lane; i < (D >> 1); i += 32) {
            const float2 xv = x2[i];
            const ushort2 uw = u2[i];
            su = fmaf(h2f(uw.x), xv.x, su);
            su = fmaf(h2f(uw.y), xv.y, su);
            if (HAS_GATE) {
                const ushort2 gw = g2[i];
                sg = fmaf(h2f(gw.x), xv.x, sg);
                sg = fmaf(h2f(gw.y), xv.y, sg);
            }
        }
    } else {
        for (int i = lane; i < D; i += 32) {
            const float xv = x[i];
            su = fmaf(h2f(u[i]), xv, su);
            if (HAS_GATE) sg = fmaf(h2f(g[i]), xv, sg);
        }
    }
    us = warp_sum(su);
    gs = HAS_GATE ? warp_sum(sg) : 0.0f;
}

// q8 rows: each lane takes 4 consecutive int8 (one 4-byte load) of one 32-block, a warp covers 128
// elements per step. w = q * d is exact in float32 (|q| <= 127, d a float16), i.e. the very values the
// reference dequantizes; only the summation order differs.
template <bool HAS_GATE>
__device__ __forceinline__ void dots_q8(const signed char* __restrict__ gq, const unsigned short* __restrict__ gd,
                                        const signed char* __restrict__ uq, const unsigned short* __restrict__ ud,
                                        const float* __restrict__ x, int D, int lane, float& gs, float& us) {
    float sg = 0.0f, su = 0.0f;
    for (int i = 4 * lane; i < D; i += 128) {
        const float4 xv = *reinterpret_cast<const float4*>(x + i);
        const char4 q = *reinterpret_cast<const char4*>(uq + i);
        const float d = h2f(ud[i >> 5]);
        su = fma_q8x4(q, d, xv, su);
        if (HAS_GATE) {
            const char4 p = *reinterpret_cast<const char4*>(gq + i);
            const float e = h2f(gd[i >> 5]);
            sg = fma_q8x4(p, e, xv, sg);
        }
    }
    us = warp_sum(su);
    gs = HAS_GATE ? warp_sum(sg) : 0.0f;
}

extern "C" __global__ void ffn_hidden_f16(const float* __restrict__ x, const unsigned short* __restrict__ gate,
                                          const unsigned short* __restrict__ up, const int* __restrict__ idx,
                                          float* __restrict__ h, int n, int D, int act, int has_gate,
                                          int has_idx) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;                                   // the whole warp leaves together
    const int t = blockIdx.y;
    const size_t r = (size_t)(has_idx ? idx[j] : j);
    const float* xt = x + (size_t)t * D;
    float gs, us;
    if (has_gate) dots_f16<true>(gate + r * D, up + r * D, xt, D, lane, gs, us);
    else dots_f16<false>(up, up + r * D, xt, D, lane, gs, us);
    if (lane == 0) h[(size_t)t * n + j] = has_gate ? apply_act(act, gs) * us : apply_act(act, us);
}

extern "C" __global__ void ffn_hidden_q8(const float* __restrict__ x, const signed char* __restrict__ gate_q,
                                         const unsigned short* __restrict__ gate_d,
                                         const signed char* __restrict__ up_q, const unsigned short* __restrict__ up_d,
                                         const int* __restrict__ idx, float* __restrict__ h, int n, int D, int act,
                                         int has_gate, int has_idx) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    const int t = blockIdx.y;
    const size_t r = (size_t)(has_idx ? idx[j] : j);
    const size_t nb = (size_t)(D >> 5);                  // scales per row
    const float* xt = x + (size_t)t * D;
    float gs, us;
    if (has_gate) dots_q8<true>(gate_q + r * D, gate_d + r * nb, up_q + r * D, up_d + r * nb, xt, D, lane, gs, us);
    else dots_q8<false>(up_q, up_d, up_q + r * D, up_d + r * nb, xt, D, lane, gs, us);
    if (lane == 0) h[(size_t)t * n + j] = has_gate ? apply_act(act, gs) * us : apply_act(act, us);
}

// ---- kernel A': the fused threshold selection (decode) ---------------------------------------------
// dots_*<false>(.., row, ..) leaves row . x in `us`, summed exactly as gemv_* sums it (same lane split,
// same fma chain), which is what makes the selection bitwise the unfused path's.

// h[j] and sel[j] of a threshold kernel, written once per warp (every lane holds the same values).
__device__ __forceinline__ void threshold_store(int lane, int j, bool keep, float v, float* h, signed char* sel) {
    if (lane == 0) {
        h[j] = v;
        sel[j] = keep ? 1 : 0;
    }
}

extern "C" __global__ void ffn_threshold_hidden_f16(const float* __restrict__ x,
                                                    const unsigned short* __restrict__ gate,
                                                    const unsigned short* __restrict__ up, float* __restrict__ h,
                                                    signed char* __restrict__ sel, int F, int D, int act,
                                                    int has_gate, float tau) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= F) return;                                   // the whole warp leaves together
    const unsigned short* first = (has_gate ? gate : up) + (size_t)j * D;
    float unused, s;
    dots_f16<false>(first, first, x, D, lane, unused, s);  // warp_sum: every lane holds s, keep is uniform
    const float a = apply_act(act, s);
    const bool keep = fabsf(a) > tau;
    float us = 1.0f;                                      // a plain MLP's h is act(up . x) itself
    if (keep && has_gate) {
        const unsigned short* u = up + (size_t)j * D;
        dots_f16<false>(u, u, x, D, lane, unused, us);
    }
    const float v = keep ? (has_gate ? a * us : a) : 0.0f;
    threshold_store(lane, j, keep, v, h, sel);
}

extern "C" __global__ void ffn_threshold_hidden_q8(const float* __restrict__ x, const signed char* __restrict__ gate_q,
                                                   const unsigned short* __restrict__ gate_d,
                                                   const signed char* __restrict__ up_q,
                                                   const unsigned short* __restrict__ up_d, float* __restrict__ h,
                                                   signed char* __restrict__ sel, int F, int D, int act,
                                                   int has_gate, float tau) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= F) return;
    const size_t nb = (size_t)(D >> 5);                  // scales per row
    const signed char* fq = (has_gate ? gate_q : up_q) + (size_t)j * D;
    const unsigned short* fd = (has_gate ? gate_d : up_d) + (size_t)j * nb;
    float unused, s;
    dots_q8<false>(fq, fd, fq, fd, x, D, lane, unused, s);
    const float a = apply_act(act, s);
    const bool keep = fabsf(a) > tau;
    float us = 1.0f;
    if (keep && has_gate) {
        const signed char* uq = up_q + (size_t)j * D;
        const unsigned short* ud = up_d + (size_t)j * nb;
        dots_q8<false>(uq, ud, uq, ud, x, D, lane, unused, us);
    }
    const float v = keep ? (has_gate ? a * us : a) : 0.0f;
    threshold_store(lane, j, keep, v, h, sel);
}

// ---- kernel B: out = h @ down_t[idx], parallel over columns --------------------------------------

extern "C" __global__ void ffn_down_f16(const float* __restrict__ h, const unsigned short* __restrict__ down,
                                        const int* __restrict__ idx, float* __restrict__ part, int n, int D,
                                        int chunk, int T, int has_idx) {
    const int t = blockIdx.z, p = blockIdx.y;
    const int d0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (d0 >= D) return;
    const int k0 = p * chunk, k1 = min(n, k0 + chunk);
    const bool vec = (D & 3) == 0;                       // uniform: 8-byte loads of 4 halves
    const float* ht = h + (size_t)t * n;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int k = k0; k < k1; ++k) {
        const float a = ht[k];                           // same value for the whole block
        if (a == 0.0f) continue;
        const unsigned short* row = down + (size_t)(has_idx ? idx[k] : k) * D;
        if (vec) {
            const ushort4 w = *reinterpret_cast<const ushort4*>(row + d0);
            a0 = fmaf(a, h2f(w.x), a0);
            a1 = fmaf(a, h2f(w.y), a1);
            a2 = fmaf(a, h2f(w.z), a2);
            a3 = fmaf(a, h2f(w.w), a3);
        } else {
            a0 = fmaf(a, h2f(row[d0]), a0);
            if (d0 + 1 < D) a1 = fmaf(a, h2f(row[d0 + 1]), a1);
            if (d0 + 2 < D) a2 = fmaf(a, h2f(row[d0 + 2]), a2);
            if (d0 + 3 < D) a3 = fmaf(a, h2f(row[d0 + 3]), a3);
        }
    }
    float* o = part + ((size_t)p * T + t) * D + d0;
    o[0] = a0;
    if (d0 + 1 < D) o[1] = a1;
    if (d0 + 2 < D) o[2] = a2;
    if (d0 + 3 < D) o[3] = a3;
}

// q8: a thread's 4 columns lie in one 32-block (D % 32 == 0, d0 % 4 == 0), so they share one scale.
extern "C" __global__ void ffn_down_q8(const float* __restrict__ h, const signed char* __restrict__ down_q,
                                       const unsigned short* __restrict__ down_d, const int* __restrict__ idx,
                                       float* __restrict__ part, int n, int D, int chunk, int T, int has_idx) {
    const int t = blockIdx.z, p = blockIdx.y;
    const int d0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (d0 >= D) return;
    const int k0 = p * chunk, k1 = min(n, k0 + chunk);
    const size_t nb = (size_t)(D >> 5);
    const float* ht = h + (size_t)t * n;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    for (int k = k0; k < k1; ++k) {
        const float a = ht[k];
        if (a == 0.0f) continue;
        const size_t r = (size_t)(has_idx ? idx[k] : k);
        const char4 q = *reinterpret_cast<const char4*>(down_q + r * D + d0);
        const float d = h2f(down_d[r * nb + (d0 >> 5)]);
        a0 = fmaf(a, (float)q.x * d, a0);
        a1 = fmaf(a, (float)q.y * d, a1);
        a2 = fmaf(a, (float)q.z * d, a2);
        a3 = fmaf(a, (float)q.w * d, a3);
    }
    float4* o = reinterpret_cast<float4*>(part + ((size_t)p * T + t) * D + d0);
    *o = make_float4(a0, a1, a2, a3);
}

extern "C" __global__ void sum_partials_f32(const float* __restrict__ part, float* __restrict__ out, int P,
                                            long long M) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < M;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int p = 0; p < P; ++p) s += part[(size_t)p * M + i];
        out[i] = s;
    }
}

extern "C" __global__ void act_f32(const float* x, float* y, long long n, int act) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = apply_act(act, x[i]);
}
