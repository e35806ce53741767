/* Inner loops of pipower's CPU kernels, as plain C so the compiler sees simple counted loops it can
 * vectorize (`#pragma omp simd` lets it reorder the float reduction; it needs -fopenmp or -fopenmp-simd
 * and is ignored otherwise). Threading is done by the Cython caller (prange); every function here works
 * on one thread's slice and never allocates.
 *
 * Build facts: setup.py writes pipower_build_config.h (flags, compiler, Cython version) into the build
 * folder; when it is missing (someone cythonized by hand) the fallbacks below say "unknown".
 */
#ifndef PIPOWER_KERNELS_IMPL_H
#define PIPOWER_KERNELS_IMPL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>

#if defined(__has_include)
#  if __has_include("pipower_build_config.h")
#    include "pipower_build_config.h"
#  endif
#endif
#ifndef PIPOWER_BUILD_CFLAGS
#  define PIPOWER_BUILD_CFLAGS "unknown"
#  define PIPOWER_BUILD_LDFLAGS "unknown"
#  define PIPOWER_BUILD_COMPILER "unknown"
#  define PIPOWER_BUILD_CYTHON "unknown"
#  define PIPOWER_BUILD_PORTABLE 0
#endif

/* OpenMP is compiled in iff the compiler defined _OPENMP (i.e. -fopenmp reached the compile line);
 * that, not what setup.py intended, is what we report. */
#ifdef _OPENMP
#  include <omp.h>
#  define PIPOWER_OPENMP_VERSION _OPENMP
static int pp_omp_max_threads(void) { return omp_get_max_threads(); }
#else
#  define PIPOWER_OPENMP_VERSION 0
static int pp_omp_max_threads(void) { return 1; }
#endif

/* The SIMD level the compiler targeted (from -march), space separated, for `pipower info`. */
#define PP_SIMD_STR_(name) name " "
static const char *pp_simd_level(void) {
    return ""
#ifdef __AVX512F__
        PP_SIMD_STR_("avx512f")
#endif
#ifdef __AVX512BF16__
        PP_SIMD_STR_("avx512bf16")
#endif
#ifdef __AVX2__
        PP_SIMD_STR_("avx2")
#endif
#ifdef __FMA__
        PP_SIMD_STR_("fma")
#endif
#ifdef __F16C__
        PP_SIMD_STR_("f16c")
#endif
#ifdef __SSE4_2__
        PP_SIMD_STR_("sse4.2")
#endif
#ifdef __SSE2__
        PP_SIMD_STR_("sse2")
#endif
#ifdef __ARM_NEON
        PP_SIMD_STR_("neon")
#endif
        ;
}

/* ---------------------------------------------------------------------------------------------------
 * RMSNorm of one row: y[i] = (x[i] * r) * w[i],  r = 1 / sqrt(mean(x^2) + eps).
 * x, y: [D]; w: [D]. y may alias x (each x[i] is read before y[i] is written, and the sum is done first).
 * The sum of squares is accumulated in double: it is then exact to ~1e-16 relative for any D we meet,
 * so the result differs from NumPy's float32 pairwise mean only by that mean's own rounding (<~1e-6
 * relative), well inside the rtol 1e-5 the tests ask. r is computed in double and rounded once; the
 * final two products are float32 in the same order as HF LlamaRMSNorm and NumpyOps.rms_norm.
 */
static inline void pp_rms_norm_row(const float *x, const float *w, float *y, ptrdiff_t D, float eps) {
    double ss = 0.0;
#pragma omp simd reduction(+:ss)
    for (ptrdiff_t i = 0; i < D; i++) {
        double v = (double)x[i];
        ss += v * v;
    }
    const float r = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
#pragma omp simd
    for (ptrdiff_t i = 0; i < D; i++) {
        y[i] = (x[i] * r) * w[i];
    }
}

/* ---------------------------------------------------------------------------------------------------
 * IEEE half (binary16) -> float32, bit exact for all 65536 inputs, NaN payloads and signalling bit kept
 * (NumPy's astype keeps them too; hardware vcvtph2ps would quiet sNaNs, so we do not use it).
 * Written branch-free on integers so gcc/clang vectorize it (AVX-512: 16 lanes per instruction);
 * the loop is memory bound at that point.
 *   normal     (exp 1..30):  rebias exponent 15 -> 127, shift mantissa 10 -> 23 bits.
 *   inf / NaN  (exp 31):     exponent all ones, mantissa (payload) shifted as is.
 *   zero / subnormal (exp 0): value = mant * 2^-24; (float)mant is exact (mant < 2^10) and the product
 *                            with the power of two is exact, so the float unit does the normalisation.
 */
static inline uint32_t pp_f16_bits_to_f32_bits(uint16_t h) {
    const uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    const uint32_t em = (uint32_t)h & 0x7fffu;            /* exponent and mantissa */
    const uint32_t normal = (em << 13) + ((uint32_t)(127 - 15) << 23);
    const uint32_t infnan = (em << 13) | 0x7f800000u;
    union { float f; uint32_t u; } sub;
    sub.f = (float)(int32_t)em * 5.9604644775390625e-08f;   /* 2^-24; only used when em < 0x400 */
    /* all-ones masks instead of ?: so the compiler emits blends, not branches */
    const uint32_t m_infnan = 0u - (uint32_t)(em >= 0x7c00u);
    const uint32_t m_sub = 0u - (uint32_t)(em < 0x0400u);
    const uint32_t m_norm = ~(m_infnan | m_sub);
    return sign | (infnan & m_infnan) | (sub.u & m_sub) | (normal & m_norm);
}

/* src: [n] binary16 bits; dst: [n] float32. */
static inline void pp_f16_to_f32(const uint16_t *src, float *dst, ptrdiff_t n) {
    uint32_t *d = (uint32_t *)dst;   /* float and uint32 share size; stores go through the bits */
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; i++) {
        d[i] = pp_f16_bits_to_f32_bits(src[i]);
    }
}


/* ---- SiLU product --------------------------------------------------------------------------------
 * h[i] *= silu(g[i]) with NumPy's formula operation by operation (pipower.ops.multiply_by_activation:
 * t = -g; t = exp(t); t = t + 1; t = g / t; h = h * t), each a correctly rounded float32 operation,
 * and exp by NumPy's own float32 loop (the function its ufunc calls, handed in by the caller), so the
 * bits are the reference's while the passes stay in L1 and threads can share the work (NumPy runs
 * five whole-array passes on one thread: ~57 us for an 8-token Qwen2.5-0.5B gate, [8, 4864]). */
typedef void (*pp_unary_loop)(char **args, const ptrdiff_t *dims, const ptrdiff_t *steps, void *data);

#define PP_SILU_CHUNK 512   /* floats per pass: t, g and h's chunks stay in L1 */

static inline void pp_silu_multiply(float *h, const float *g, ptrdiff_t n, pp_unary_loop exp_loop, void *exp_data) {
    float t[PP_SILU_CHUNK];
    for (ptrdiff_t a = 0; a < n; a += PP_SILU_CHUNK) {
        const ptrdiff_t m = n - a < PP_SILU_CHUNK ? n - a : PP_SILU_CHUNK;
        for (ptrdiff_t j = 0; j < m; j++) t[j] = -g[a + j];
        char *args[2] = {(char *)t, (char *)t};
        const ptrdiff_t dims[1] = {m}, steps[2] = {sizeof(float), sizeof(float)};
        exp_loop(args, dims, steps, exp_data);
        for (ptrdiff_t j = 0; j < m; j++) {
            const float e = t[j] + 1.0f;
            h[a + j] = h[a + j] * (g[a + j] / e);
        }
    }
}

#endif /* PIPOWER_KERNELS_IMPL_H */
