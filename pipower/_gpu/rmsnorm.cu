// RMSNorm over rows, float32: y[t, :] = (x[t, :] * r) * w,  r = 1 / sqrt(mean(x[t, :]^2) + eps).
// x, y: [T, D] row-major; w: [D]. Launch: grid = (T), block = (B) with B a multiple of 32, <= 1024;
// dynamic shared memory = (B / 32) * sizeof(float). One block per row; y must not alias x (__restrict__).
// Same operation order as NumpyOps.rms_norm (the float32 sum differs only by summation order).

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ y, int D, float eps) {
    extern __shared__ float warp_sums[];            // [blockDim.x / 32]
    const float* xr = x + (size_t)blockIdx.x * D;
    float* yr = y + (size_t)blockIdx.x * D;

    // 1. each thread: strided partial sum of squares (coalesced reads)
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = xr[i];
        ss = fmaf(v, v, ss);
    }
    // 2. reduce within each warp, then the warp sums through shared memory in warp 0
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < n_warps ? warp_sums[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
        if (lane == 0) warp_sums[0] = ss;
    }
    __syncthreads();
    // 3. scale; 1/sqrtf (correctly rounded) rather than rsqrtf (approximate) to stay close to NumPy
    const float r = 1.0f / sqrtf(warp_sums[0] / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = (xr[i] * r) * w[i];
}
