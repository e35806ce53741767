// Device helpers shared by the kernel sources. `#include "common.cuh"` in a .cu file: nvcc finds it next
// to the file; for NVRTC (and the CPU emulator), pipower._gpu.kernels.source() inlines it, so each
// RawModule is still compiled from one self-contained string.

// float16 bits -> float32, exact (PTX conversion; no cuda_fp16.h needed, so NVRTC and nvcc agree)
__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float s) {
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}

// s + (4 q8 weights of one 32-block, scale d) . (4 activations), in the fixed order x, y, z, w
__device__ __forceinline__ float fma_q8x4(char4 q, float d, float4 xv, float s) {
    s = fmaf((float)q.x * d, xv.x, s);
    s = fmaf((float)q.y * d, xv.y, s);
    s = fmaf((float)q.z * d, xv.z, s);
    s = fmaf((float)q.w * d, xv.w, s);
    return s;
}

// Tokens one warp carries through a weight row at once (batched kernels): each row is read once per
// TOK_TILE tokens, every token with its own accumulator and the same fma chain as a single token, so a
// token's result never depends on the other tokens of the launch (batch invariance).
#define TOK_TILE 8
