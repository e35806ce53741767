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
//     Launch: block = (32 * W) threads (W warps, one neuron per warp), grid = (ceil(n / W),
//     ceil(T / TOK_TILE)). A warp reads its rows once for up to TOK_TILE tokens, consecutive lanes on
//     consecutive elements (coalesced), and reduces each token's sums with warp shuffles; lane 0 writes h.
//   ffn_down_{f16,q8}: part[p, t, d] = sum_{k in chunk p} h[t, k] * down_t[r_k, d]
//     chunk p = [p * chunk, min(n, (p + 1) * chunk)). Every thread owns 4 consecutive columns d and
//     walks the chunk's rows in order: parallel over d, no atomics, deterministic.
//     Launch: block = (B) threads, grid = (ceil(D / (4 * B)), P, ceil(T / TOK_TILE)), P = ceil(n / chunk).
//     With P == 1, part may be the output [T, D] itself; otherwise sum_partials_f32 adds the P slices.
//     A neuron whose h[t, k] == 0 (ReLU models: most of them) is skipped for that token, and its row is
//     not read when it is zero for every token of the tile.
//   Batch invariance: token t's values depend only on its own row of x (or h), whatever T and the tile
//   (one-token operation chains), and the caller picks chunk without looking at T.
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

// One warp, up to NT tokens (nt <= NT of them valid; x points at the first, rows D apart):
// gs[t] = g . x_t (when HAS_GATE) and us[t] = u . x_t for f16 rows g and u of length D, each row read
// once for all tokens. Every token's sums are the one-token chain (same lane split, fma order and
// shuffle reduction), so a token's result does not depend on its tile. Results valid in every lane.
template <bool HAS_GATE, int NT>
__device__ __forceinline__ void dots_f16(const unsigned short* __restrict__ g, const unsigned short* __restrict__ u,
                                         const float* __restrict__ x, int D, int nt, int lane, float* gs,
                                         float* us) {
    float sg[NT], su[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) sg[t] = su[t] = 0.0f;
    if ((D & 1) == 0) {     // pairs: 4-byte weight loads, 8-byte activation loads
        const ushort2* u2 = reinterpret_cast<const ushort2*>(u);
        const ushort2* g2 = reinterpret_cast<const ushort2*>(g);
        for (int i = lane; i < (D >> 1); i += 32) {
            const ushort2 uw = u2[i];
            const float u0 = h2f(uw.x), u1 = h2f(uw.y);
            float g0 = 0.0f, g1 = 0.0f;
            if (HAS_GATE) {
                const ushort2 gw = g2[i];
                g0 = h2f(gw.x);
                g1 = h2f(gw.y);
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t < nt) {
                    const float2 xv = reinterpret_cast<const float2*>(x + (size_t)t * D)[i];
                    su[t] = fmaf(u0, xv.x, su[t]);
                    su[t] = fmaf(u1, xv.y, su[t]);
                    if (HAS_GATE) {
                        sg[t] = fmaf(g0, xv.x, sg[t]);
                        sg[t] = fmaf(g1, xv.y, sg[t]);
                    }
                }
            }
        }
    } else {
        for (int i = lane; i < D; i += 32) {
            const float uv = h2f(u[i]);
            const float gv = HAS_GATE ? h2f(g[i]) : 0.0f;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t < nt) {
                    const float xv = x[(size_t)t * D + i];
                    su[t] = fmaf(uv, xv, su[t]);
                    if (HAS_GATE) sg[t] = fmaf(gv, xv, sg[t]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t < nt) {                                     // nt is uniform over the warp
            us[t] = warp_sum(su[t]);
            gs[t] = HAS_GATE ? warp_sum(sg[t]) : 0.0f;
        }
    }
}

// q8 rows: each lane takes 4 consecutive int8 (one 4-byte load) of one 32-block, a warp covers 128
// elements per step. w = q * d is exact in float32 (|q| <= 127, d a float16), i.e. the very values the
// reference dequantizes; only the summation order differs. Tokens as dots_f16.
template <bool HAS_GATE, int NT>
__device__ __forceinline__ void dots_q8(const signed char* __restrict__ gq, const unsigned short* __restrict__ gd,
                                        const signed char* __restrict__ uq, const unsigned short* __restrict__ ud,
                                        const float* __restrict__ x, int D, int nt, int lane, float* gs,
                                        float* us) {
    float sg[NT], su[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) sg[t] = su[t] = 0.0f;
    for (int i = 4 * lane; i < D; i += 128) {
        const char4 q = *reinterpret_cast<const char4*>(uq + i);
        const float d = h2f(ud[i >> 5]);
        char4 p = q;
        float e = 0.0f;
        if (HAS_GATE) {
            p = *reinterpret_cast<const char4*>(gq + i);
            e = h2f(gd[i >> 5]);
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t < nt) {
                const float4 xv = *reinterpret_cast<const float4*>(x + (size_t)t * D + i);
                su[t] = fma_q8x4(q, d, xv, su[t]);
                if (HAS_GATE) sg[t] = fma_q8x4(p, e, xv, sg[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t < nt) {
            us[t] = warp_sum(su[t]);
            gs[t] = HAS_GATE ? warp_sum(sg[t]) : 0.0f;
        }
    }
}

// h[t0 + t, j] for the tile's tokens from their dots (lane 0 writes).
template <int NT>
__device__ __forceinline__ void hidden_store(const float* gs, const float* us, float* __restrict__ h, int n, int j,
                                             int t0, int nt, int act, int has_gate, int lane) {
    if (lane != 0) return;
#pragma unroll
    for (int t = 0; t < NT; ++t)
        if (t < nt) h[(size_t)(t0 + t) * n + j] = has_gate ? apply_act(act, gs[t]) * us[t] : apply_act(act, us[t]);
}

template <int NT>
__device__ __forceinline__ void hidden_f16_tile(const float* __restrict__ x, const unsigned short* __restrict__ gate,
                                                const unsigned short* __restrict__ up, float* __restrict__ h,
                                                size_t r, int n, int j, int D, int act, int has_gate, int t0,
                                                int nt, int lane) {
    float gs[NT], us[NT];
    const float* xt = x + (size_t)t0 * D;
    if (has_gate) dots_f16<true, NT>(gate + r * D, up + r * D, xt, D, nt, lane, gs, us);
    else dots_f16<false, NT>(up, up + r * D, xt, D, nt, lane, gs, us);
    hidden_store<NT>(gs, us, h, n, j, t0, nt, act, has_gate, lane);
}

extern "C" __global__ void ffn_hidden_f16(const float* __restrict__ x, const unsigned short* __restrict__ gate,
                                          const unsigned short* __restrict__ up, const int* __restrict__ idx,
                                          float* __restrict__ h, int n, int D, int act, int has_gate,
                                          int has_idx, int T) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;                                   // the whole warp leaves together
    const int t0 = blockIdx.y * TOK_TILE, nt = min(TOK_TILE, T - t0);
    const size_t r = (size_t)(has_idx ? idx[j] : j);
    if (nt == 1) hidden_f16_tile<1>(x, gate, up, h, r, n, j, D, act, has_gate, t0, 1, lane);
    else hidden_f16_tile<TOK_TILE>(x, gate, up, h, r, n, j, D, act, has_gate, t0, nt, lane);
}

template <int NT>
__device__ __forceinline__ void hidden_q8_tile(const float* __restrict__ x, const signed char* __restrict__ gate_q,
                                               const unsigned short* __restrict__ gate_d,
                                               const signed char* __restrict__ up_q,
                                               const unsigned short* __restrict__ up_d, float* __restrict__ h,
                                               size_t r, int n, int j, int D, int act, int has_gate, int t0,
                                               int nt, int lane) {
    const size_t nb = (size_t)(D >> 5);                  // scales per row
    float gs[NT], us[NT];
    const float* xt = x + (size_t)t0 * D;
    if (has_gate)
        dots_q8<true, NT>(gate_q + r * D, gate_d + r * nb, up_q + r * D, up_d + r * nb, xt, D, nt, lane, gs, us);
    else
        dots_q8<false, NT>(up_q, up_d, up_q + r * D, up_d + r * nb, xt, D, nt, lane, gs, us);
    hidden_store<NT>(gs, us, h, n, j, t0, nt, act, has_gate, lane);
}

extern "C" __global__ void ffn_hidden_q8(const float* __restrict__ x, const signed char* __restrict__ gate_q,
                                         const unsigned short* __restrict__ gate_d,
                                         const signed char* __restrict__ up_q, const unsigned short* __restrict__ up_d,
                                         const int* __restrict__ idx, float* __restrict__ h, int n, int D, int act,
                                         int has_gate, int has_idx, int T) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= n) return;
    const int t0 = blockIdx.y * TOK_TILE, nt = min(TOK_TILE, T - t0);
    const size_t r = (size_t)(has_idx ? idx[j] : j);
    if (nt == 1) hidden_q8_tile<1>(x, gate_q, gate_d, up_q, up_d, h, r, n, j, D, act, has_gate, t0, 1, lane);
    else hidden_q8_tile<TOK_TILE>(x, gate_q, gate_d, up_q, up_d, h, r, n, j, D, act, has_gate, t0, nt, lane);
}

// ---- kernel A': the fused threshold selection (decode) ---------------------------------------------
// dots_*<false, 1>(.., row, ..) leaves row . x in `us[0]`, summed exactly as gemv_* sums it (same lane split,
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
    float unused[1], s[1];
    dots_f16<false, 1>(first, first, x, D, 1, lane, unused, s);  // every lane holds s: keep is uniform
    const float a = apply_act(act, s[0]);
    const bool keep = fabsf(a) > tau;
    float us[1] = {1.0f};                                 // a plain MLP's h is act(up . x) itself
    if (keep && has_gate) {
        const unsigned short* u = up + (size_t)j * D;
        dots_f16<false, 1>(u, u, x, D, 1, lane, unused, us);
    }
    const float v = keep ? (has_gate ? a * us[0] : a) : 0.0f;
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
    float unused[1], s[1];
    dots_q8<false, 1>(fq, fd, fq, fd, x, D, 1, lane, unused, s);
    const float a = apply_act(act, s[0]);
    const bool keep = fabsf(a) > tau;
    float us[1] = {1.0f};
    if (keep && has_gate) {
        const signed char* uq = up_q + (size_t)j * D;
        const unsigned short* ud = up_d + (size_t)j * nb;
        dots_q8<false, 1>(uq, ud, uq, ud, x, D, 1, lane, unused, us);
    }
    const float v = keep ? (has_gate ? a * us[0] : a) : 0.0f;
    threshold_store(lane, j, keep, v, h, sel);
}

// ---- kernel B: out = h @ down_t[idx], parallel over columns --------------------------------------
// A thread owns 4 columns d0..d0+3 of up to NT tokens and walks the chunk's rows in order; a row is
// read when some token of the tile has a nonzero h there, and each token adds only its nonzero terms,
// in row order: the one-token chain, whatever the tile.

template <int NT>
__device__ __forceinline__ void down_f16_tile(const float* __restrict__ h, const unsigned short* __restrict__ down,
                                              const int* __restrict__ idx, float* __restrict__ part, int n, int D,
                                              int k0, int k1, int p, int T, int t0, int nt, int d0, int has_idx) {
    const bool vec = (D & 3) == 0;                       // uniform: 8-byte loads of 4 halves
    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    for (int k = k0; k < k1; ++k) {
        float a[NT];                                     // the same values for the whole block
        bool any = false;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            a[t] = t < nt ? h[(size_t)(t0 + t) * n + k] : 0.0f;
            any |= a[t] != 0.0f;
        }
        if (!any) continue;
        const unsigned short* row = down + (size_t)(has_idx ? idx[k] : k) * D;
        float w0, w1 = 0.0f, w2 = 0.0f, w3 = 0.0f;
        if (vec) {
            const ushort4 w = *reinterpret_cast<const ushort4*>(row + d0);
            w0 = h2f(w.x);
            w1 = h2f(w.y);
            w2 = h2f(w.z);
            w3 = h2f(w.w);
        } else {
            w0 = h2f(row[d0]);
            if (d0 + 1 < D) w1 = h2f(row[d0 + 1]);
            if (d0 + 2 < D) w2 = h2f(row[d0 + 2]);
            if (d0 + 3 < D) w3 = h2f(row[d0 + 3]);
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (a[t] == 0.0f) continue;                  // skipped, as a lone token skips it
            acc[t][0] = fmaf(a[t], w0, acc[t][0]);
            acc[t][1] = fmaf(a[t], w1, acc[t][1]);
            acc[t][2] = fmaf(a[t], w2, acc[t][2]);
            acc[t][3] = fmaf(a[t], w3, acc[t][3]);
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t >= nt) continue;
        float* o = part + ((size_t)p * T + t0 + t) * D + d0;
        o[0] = acc[t][0];
        if (d0 + 1 < D) o[1] = acc[t][1];
        if (d0 + 2 < D) o[2] = acc[t][2];
        if (d0 + 3 < D) o[3] = acc[t][3];
    }
}

extern "C" __global__ void ffn_down_f16(const float* __restrict__ h, const unsigned short* __restrict__ down,
                                        const int* __restrict__ idx, float* __restrict__ part, int n, int D,
                                        int chunk, int T, int has_idx) {
    const int p = blockIdx.y;
    const int d0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (d0 >= D) return;
    const int k0 = p * chunk, k1 = min(n, k0 + chunk);
    const int t0 = blockIdx.z * TOK_TILE, nt = min(TOK_TILE, T - t0);
    if (nt == 1) down_f16_tile<1>(h, down, idx, part, n, D, k0, k1, p, T, t0, 1, d0, has_idx);
    else down_f16_tile<TOK_TILE>(h, down, idx, part, n, D, k0, k1, p, T, t0, nt, d0, has_idx);
}

// q8: a thread's 4 columns lie in one 32-block (D % 32 == 0, d0 % 4 == 0), so they share one scale.
template <int NT>
__device__ __forceinline__ void down_q8_tile(const float* __restrict__ h, const signed char* __restrict__ down_q,
                                             const unsigned short* __restrict__ down_d, const int* __restrict__ idx,
                                             float* __restrict__ part, int n, int D, int k0, int k1, int p, int T,
                                             int t0, int nt, int d0, int has_idx) {
    const size_t nb = (size_t)(D >> 5);
    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    for (int k = k0; k < k1; ++k) {
        float a[NT];
        bool any = false;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            a[t] = t < nt ? h[(size_t)(t0 + t) * n + k] : 0.0f;
            any |= a[t] != 0.0f;
        }
        if (!any) continue;
        const size_t r = (size_t)(has_idx ? idx[k] : k);
        const char4 q = *reinterpret_cast<const char4*>(down_q + r * D + d0);
        const float d = h2f(down_d[r * nb + (d0 >> 5)]);
        const float w0 = (float)q.x * d, w1 = (float)q.y * d, w2 = (float)q.z * d, w3 = (float)q.w * d;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (a[t] == 0.0f) continue;
            acc[t][0] = fmaf(a[t], w0, acc[t][0]);
            acc[t][1] = fmaf(a[t], w1, acc[t][1]);
            acc[t][2] = fmaf(a[t], w2, acc[t][2]);
            acc[t][3] = fmaf(a[t], w3, acc[t][3]);
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
        if (t < nt)
            *reinterpret_cast<float4*>(part + ((size_t)p * T + t0 + t) * D + d0) =
                make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
}

extern "C" __global__ void ffn_down_q8(const float* __restrict__ h, const signed char* __restrict__ down_q,
                                       const unsigned short* __restrict__ down_d, const int* __restrict__ idx,
                                       float* __restrict__ part, int n, int D, int chunk, int T, int has_idx) {
    const int p = blockIdx.y;
    const int d0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (d0 >= D) return;
    const int k0 = p * chunk, k1 = min(n, k0 + chunk);
    const int t0 = blockIdx.z * TOK_TILE, nt = min(TOK_TILE, T - t0);
    if (nt == 1) down_q8_tile<1>(h, down_q, down_d, idx, part, n, D, k0, k1, p, T, t0, 1, d0, has_idx);
    else down_q8_tile<TOK_TILE>(h, down_q, down_d, idx, part, n, D, k0, k1, p, T, t0, nt, d0, has_idx);
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
