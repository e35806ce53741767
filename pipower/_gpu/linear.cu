// Projections with compact weights, float32 activations and accumulation: y [T, N] = x [T, K] @ W^T,
// W [N, K] row-major (HF layout, one row per output), dequantized on the fly.
//   f16: W = float16 bits [N, K]
//   q8 : W = int8 [N, K] and scales float16 [N, K / 32]; value = q * d; K a multiple of 32
//
//   gemv_f16 / gemv_q8: one warp per output row n and up to TOK_TILE tokens: lanes on consecutive
//     elements (coalesced), each weight element read once for the tile's tokens, one accumulator per
//     token, warp shuffle reduction, lane 0 writes y[t, n]. Every token gets exactly the operations of
//     a one-token launch (same lane split, same fma chain, same reduction): bitwise batch invariant.
//     Launch: block = (32 * W) threads, grid = (ceil(N / W), ceil(T / TOK_TILE)). The Python side uses
//     it up to 64 tokens (decode, verification, batched serving); a longer prefill dequantizes W in
//     row chunks with dequant_rows_* and multiplies with cuBLAS (faster there, not batch invariant).
//   dequant_rows_f16 / dequant_rows_q8: out [n, K] float32 = rows r_j of W (r_j = idx[j], or j when
//     has_idx == 0), exactly the reference's dequantize(). Used for the cuBLAS path and embeddings.
//     Launch: grid-stride over n * K elements, any 1-D grid/block.
// f16 rows are read two elements at a time when K is even, q8 rows four int8 at a time; callers pass
// allocations aligned to >= 16 bytes.

#include "common.cuh"

// y[t0 + t, n] for t < nt (nt <= NT) of one f16 row; NT is 1 for a lone token (no unused registers).
template <int NT>
__device__ __forceinline__ void gemv_f16_row(const float* __restrict__ x, const unsigned short* __restrict__ w,
                                             float* __restrict__ y, int N, int K, int n, int t0, int nt,
                                             int lane) {
    float s[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) s[t] = 0.0f;
    if ((K & 1) == 0) {
        const ushort2* w2 = reinterpret_cast<const ushort2*>(w);
        for (int i = lane; i < (K >> 1); i += 32) {
            const ushort2 wv = w2[i];
            const float a = h2f(wv.x), b = h2f(wv.y);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                if (t < nt) {
                    const float2 xv = reinterpret_cast<const float2*>(x + (size_t)(t0 + t) * K)[i];
                    s[t] = fmaf(a, xv.x, s[t]);
                    s[t] = fmaf(b, xv.y, s[t]);
                }
            }
        }
    } else {
        for (int i = lane; i < K; i += 32) {
            const float a = h2f(w[i]);
#pragma unroll
            for (int t = 0; t < NT; ++t)
                if (t < nt) s[t] = fmaf(a, x[(size_t)(t0 + t) * K + i], s[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t < nt) {                                     // nt is uniform over the warp
            const float r = warp_sum(s[t]);
            if (lane == 0) y[(size_t)(t0 + t) * N + n] = r;
        }
    }
}

extern "C" __global__ void gemv_f16(const float* __restrict__ x, const unsigned short* __restrict__ W,
                                    float* __restrict__ y, int N, int K, int T) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;                                   // the whole warp leaves together
    const int t0 = blockIdx.y * TOK_TILE, nt = min(TOK_TILE, T - t0);
    const unsigned short* w = W + (size_t)n * K;
    if (nt == 1) gemv_f16_row<1>(x, w, y, N, K, n, t0, 1, lane);
    else gemv_f16_row<TOK_TILE>(x, w, y, N, K, n, t0, nt, lane);
}

// w = q * d is exact in float32 (the reference's dequantized value); only summation order differs.
template <int NT>
__device__ __forceinline__ void gemv_q8_row(const float* __restrict__ x, const signed char* __restrict__ wq,
                                            const unsigned short* __restrict__ wd, float* __restrict__ y, int N,
                                            int K, int n, int t0, int nt, int lane) {
    float s[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) s[t] = 0.0f;
    for (int i = 4 * lane; i < K; i += 128) {            // 4 int8 of one 32-block per lane
        const char4 q = *reinterpret_cast<const char4*>(wq + i);
        const float d = h2f(wd[i >> 5]);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if (t < nt) {
                const float4 xv = *reinterpret_cast<const float4*>(x + (size_t)(t0 + t) * K + i);
                s[t] = fma_q8x4(q, d, xv, s[t]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        if (t < nt) {
            const float r = warp_sum(s[t]);
            if (lane == 0) y[(size_t)(t0 + t) * N + n] = r;
        }
    }
}

extern "C" __global__ void gemv_q8(const float* __restrict__ x, const signed char* __restrict__ Wq,
                                   const unsigned short* __restrict__ Wd, float* __restrict__ y, int N, int K,
                                   int T) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;
    const int t0 = blockIdx.y * TOK_TILE, nt = min(TOK_TILE, T - t0);
    const signed char* wq = Wq + (size_t)n * K;
    const unsigned short* wd = Wd + (size_t)n * (K >> 5);
    if (nt == 1) gemv_q8_row<1>(x, wq, wd, y, N, K, n, t0, 1, lane);
    else gemv_q8_row<TOK_TILE>(x, wq, wd, y, N, K, n, t0, nt, lane);
}

extern "C" __global__ void dequant_rows_f16(const unsigned short* __restrict__ W, const int* __restrict__ idx,
                                            float* __restrict__ out, int n, int K, int has_idx) {
    const long long total = (long long)n * K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long j = i / K, c = i - j * K;
        const size_t r = (size_t)(has_idx ? idx[j] : j);
        out[i] = h2f(W[r * K + c]);
    }
}

extern "C" __global__ void dequant_rows_q8(const signed char* __restrict__ Wq, const unsigned short* __restrict__ Wd,
                                           const int* __restrict__ idx, float* __restrict__ out, int n, int K,
                                           int has_idx) {
    const long long total = (long long)n * K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long j = i / K, c = i - j * K;
        const size_t r = (size_t)(has_idx ? idx[j] : j);
        out[i] = (float)Wq[r * K + c] * h2f(Wd[r * (K >> 5) + (c >> 5)]);
    }
}
