/* Row kernels over pipower's weight formats (pipower/quant.py): dot products, axpy and dequantization
 * of ONE row [K] of a matrix [N, K]. Threading is done by the Cython callers (_linear.pyx, _ffn.pyx).
 *
 * Layouts (bit-exact with quant.py; a 32-block b covers elements 32b .. 32b+31 of the row):
 *   PP_F32  float32 [K]
 *   PP_F16  IEEE half bits [K]
 *   PP_Q8   int8 q [K],          scales half d [K/32]:  w = q * d
 *   PP_Q4   uint8 [K/2],         scales half d [K/32]:  byte j of block b holds element j (low nibble)
 *                                and element j + 16 (high nibble); w = (nibble - 8) * d
 *
 * Every kernel exists twice: a portable C version (`_c`; plain counted loops that -O3 vectorizes, with
 * `#pragma omp simd` allowing the float reduction to be reordered) and, when the compiler targets
 * AVX-512 (+F16C), an intrinsics version (`_v`). Both are compiled into the module and selected per call
 * by `simd`, so tests compare them on the same machine; without AVX-512, `simd` is ignored.
 *
 * Accumulation is float32. Quantized dots sum q * x over a 32-block first and scale the block sum by d
 * once (sum_j (q_j d) x_j == d * sum_j q_j x_j up to rounding): the same weights as dequantize(), no
 * activation quantization, only a different rounding order.
 */
#ifndef PIPOWER_LINEAR_IMPL_H
#define PIPOWER_LINEAR_IMPL_H

#include "_kernels_impl.h"   /* pp_f16_bits_to_f32_bits */

#if defined(__AVX512F__) && defined(__F16C__)
#  include <immintrin.h>
#  define PP_HAVE_AVX512 1
#else
#  define PP_HAVE_AVX512 0
#endif

enum { PP_F32 = 0, PP_F16 = 1, PP_Q8 = 2, PP_Q4 = 3 };
#define PP_QB 32   /* elements per quantization block */

static inline float pp_h2f(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = pp_f16_bits_to_f32_bits(h);
    return v.f;
}

/* Bytes of one row of K elements. */
static inline ptrdiff_t pp_row_bytes(int fmt, ptrdiff_t K) {
    switch (fmt) {
    case PP_F32: return 4 * K;
    case PP_F16: return 2 * K;
    case PP_Q8: return K;
    default: return K / 2;
    }
}

/* ================================ portable versions ================================================ */

static inline float pp_dot_f32_c(const float *w, const float *x, ptrdiff_t K) {
    float acc = 0.0f;
#pragma omp simd reduction(+:acc)
    for (ptrdiff_t k = 0; k < K; k++) acc += w[k] * x[k];
    return acc;
}

static inline float pp_dot_f16_c(const uint16_t *w, const float *x, ptrdiff_t K) {
    float acc = 0.0f;
#pragma omp simd reduction(+:acc)
    for (ptrdiff_t k = 0; k < K; k++) acc += pp_h2f(w[k]) * x[k];
    return acc;
}

static inline float pp_dot_q8_c(const int8_t *q, const uint16_t *d, const float *x, ptrdiff_t K) {
    float acc = 0.0f;
    for (ptrdiff_t b = 0; b < K / PP_QB; b++) {
        const int8_t *qb = q + b * PP_QB;
        const float *xb = x + b * PP_QB;
        float s = 0.0f;
#pragma omp simd reduction(+:s)
        for (int j = 0; j < PP_QB; j++) s += (float)qb[j] * xb[j];
        acc += s * pp_h2f(d[b]);
    }
    return acc;
}

static inline float pp_dot_q4_c(const uint8_t *p, const uint16_t *d, const float *x, ptrdiff_t K) {
    float acc = 0.0f;
    for (ptrdiff_t b = 0; b < K / PP_QB; b++) {
        const uint8_t *pb = p + b * (PP_QB / 2);
        const float *xb = x + b * PP_QB;
        float s = 0.0f;
#pragma omp simd reduction(+:s)
        for (int j = 0; j < PP_QB / 2; j++)
            s += (float)((int)(pb[j] & 15) - 8) * xb[j] + (float)((int)(pb[j] >> 4) - 8) * xb[j + 16];
        acc += s * pp_h2f(d[b]);
    }
    return acc;
}

/* acc[D] += h * row (dequantized). */
static inline void pp_axpy_f32_c(float h, const float *w, float *acc, ptrdiff_t D) {
#pragma omp simd
    for (ptrdiff_t k = 0; k < D; k++) acc[k] += h * w[k];
}

static inline void pp_axpy_f16_c(float h, const uint16_t *w, float *acc, ptrdiff_t D) {
#pragma omp simd
    for (ptrdiff_t k = 0; k < D; k++) acc[k] += h * pp_h2f(w[k]);
}

static inline void pp_axpy_q8_c(float h, const int8_t *q, const uint16_t *d, float *acc, ptrdiff_t D) {
    for (ptrdiff_t b = 0; b < D / PP_QB; b++) {
        const float hd = h * pp_h2f(d[b]);
        const int8_t *qb = q + b * PP_QB;
        float *ab = acc + b * PP_QB;
#pragma omp simd
        for (int j = 0; j < PP_QB; j++) ab[j] += hd * (float)qb[j];
    }
}

static inline void pp_axpy_q4_c(float h, const uint8_t *p, const uint16_t *d, float *acc, ptrdiff_t D) {
    for (ptrdiff_t b = 0; b < D / PP_QB; b++) {
        const float hd = h * pp_h2f(d[b]);
        const uint8_t *pb = p + b * (PP_QB / 2);
        float *ab = acc + b * PP_QB;
#pragma omp simd
        for (int j = 0; j < PP_QB / 2; j++) {
            ab[j] += hd * (float)((int)(pb[j] & 15) - 8);
            ab[j + 16] += hd * (float)((int)(pb[j] >> 4) - 8);
        }
    }
}

/* The portable kernels are called through these out-of-line functions from every caller, single-token
 * and batched (_batch_impl.h): inlined into different loops, `omp simd` reductions could be vectorized
 * differently and a token's result would depend on the batch it came in. */
#if defined(__GNUC__) || defined(__clang__)
#  define PP_NOINLINE __attribute__((noinline))
#else
#  define PP_NOINLINE
#endif
static PP_NOINLINE float pp_dot_row_c(int fmt, const void *row, const uint16_t *d, const float *x, ptrdiff_t K) {
    switch (fmt) {
    case PP_F32: return pp_dot_f32_c((const float *)row, x, K);
    case PP_F16: return pp_dot_f16_c((const uint16_t *)row, x, K);
    case PP_Q8: return pp_dot_q8_c((const int8_t *)row, d, x, K);
    default: return pp_dot_q4_c((const uint8_t *)row, d, x, K);
    }
}

static PP_NOINLINE void pp_axpy_row_c(int fmt, float h, const void *row, const uint16_t *d, float *acc,
                                      ptrdiff_t D) {
    switch (fmt) {
    case PP_F32: pp_axpy_f32_c(h, (const float *)row, acc, D); return;
    case PP_F16: pp_axpy_f16_c(h, (const uint16_t *)row, acc, D); return;
    case PP_Q8: pp_axpy_q8_c(h, (const int8_t *)row, d, acc, D); return;
    default: pp_axpy_q4_c(h, (const uint8_t *)row, d, acc, D); return;
    }
}

/* ================================ AVX-512 versions ================================================= */
#if PP_HAVE_AVX512

/* Two accumulators per row: consecutive FMAs into one register would wait on each other's latency. */
static inline float pp_dot_f32_v(const float *w, const float *x, ptrdiff_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    if (k + 16 <= K) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        k += 16;
    }
    if (k < K) {   /* masked tail: lanes past K read as zero */
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static inline __m512 pp_load_h16(const uint16_t *w) {   /* 16 halfs -> 16 floats (exact) */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w));
}

static inline float pp_dot_f16_v(const uint16_t *w, const float *x, ptrdiff_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(pp_load_h16(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(pp_load_h16(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    return acc + pp_dot_row_c(PP_F16, w + k, NULL, x + k, K - k);   /* < 32 leftover elements */
}

/* 16 int8 -> 16 floats; 16 packed bytes -> low and high nibbles minus 8 as floats. */
static inline __m512 pp_load_q8x16(const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}
static inline void pp_load_q4x32(const uint8_t *p, __m512 *lo, __m512 *hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i eight = _mm512_set1_epi32(8);
    *lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), eight));
    *hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
}

/* Scales of up to 16 blocks as floats in ds[16]: one vector conversion, so each block's FMA can take
 * its scale as a broadcast memory operand (a load, no shuffle or GPR->vector transfer per block). */
static inline ptrdiff_t pp_load_scales16(const uint16_t *d, ptrdiff_t nb, float *ds) {
    if (nb >= 16) {
        _mm512_storeu_ps(ds, pp_load_h16(d));
        return 16;
    }
    for (ptrdiff_t j = 0; j < nb; j++) ds[j] = _cvtsh_ss(d[j]);
    return nb;
}

/* Per block: s_b = q[0:16]*x[0:16] + q[16:32]*x[16:32] (16 lanes), then acc += d_b * s_b; blocks
 * alternate between two accumulators so the FMAs into acc do not wait on each other. */
static inline float pp_dot_q8_v(const int8_t *q, const uint16_t *d, const float *x, ptrdiff_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    float ds[16];
    const ptrdiff_t nsb = K / PP_QB;
    for (ptrdiff_t b0 = 0; b0 < nsb; b0 += 16) {
        const ptrdiff_t ng = pp_load_scales16(d + b0, nsb - b0, ds);
        for (ptrdiff_t j = 0; j < ng; j++) {
            const int8_t *qb = q + (b0 + j) * PP_QB;
            const float *xb = x + (b0 + j) * PP_QB;
            __m512 s = _mm512_mul_ps(pp_load_q8x16(qb), _mm512_loadu_ps(xb));
            s = _mm512_fmadd_ps(pp_load_q8x16(qb + 16), _mm512_loadu_ps(xb + 16), s);
            if (j & 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(ds[j]), s, a1);
            else a0 = _mm512_fmadd_ps(_mm512_set1_ps(ds[j]), s, a0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static inline float pp_dot_q4_v(const uint8_t *p, const uint16_t *d, const float *x, ptrdiff_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    float ds[16];
    const ptrdiff_t nsb = K / PP_QB;
    for (ptrdiff_t b0 = 0; b0 < nsb; b0 += 16) {
        const ptrdiff_t ng = pp_load_scales16(d + b0, nsb - b0, ds);
        for (ptrdiff_t j = 0; j < ng; j++) {
            const float *xb = x + (b0 + j) * PP_QB;
            __m512 lo, hi;
            pp_load_q4x32(p + (b0 + j) * (PP_QB / 2), &lo, &hi);
            __m512 s = _mm512_mul_ps(lo, _mm512_loadu_ps(xb));
            s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), s);
            if (j & 1) a1 = _mm512_fmadd_ps(_mm512_set1_ps(ds[j]), s, a1);
            else a0 = _mm512_fmadd_ps(_mm512_set1_ps(ds[j]), s, a0);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

static inline void pp_axpy_f32_v(float h, const float *w, float *acc, ptrdiff_t D) {
    const __m512 hv = _mm512_set1_ps(h);
    ptrdiff_t k = 0;
    for (; k + 16 <= D; k += 16)
        _mm512_storeu_ps(acc + k, _mm512_fmadd_ps(hv, _mm512_loadu_ps(w + k), _mm512_loadu_ps(acc + k)));
    pp_axpy_row_c(PP_F32, h, w + k, NULL, acc + k, D - k);
}

static inline void pp_axpy_f16_v(float h, const uint16_t *w, float *acc, ptrdiff_t D) {
    const __m512 hv = _mm512_set1_ps(h);
    ptrdiff_t k = 0;
    for (; k + 16 <= D; k += 16)
        _mm512_storeu_ps(acc + k, _mm512_fmadd_ps(hv, pp_load_h16(w + k), _mm512_loadu_ps(acc + k)));
    pp_axpy_row_c(PP_F16, h, w + k, NULL, acc + k, D - k);
}

static inline void pp_axpy_q8_v(float h, const int8_t *q, const uint16_t *d, float *acc, ptrdiff_t D) {
    for (ptrdiff_t b = 0; b < D / PP_QB; b++) {
        const __m512 hd = _mm512_set1_ps(h * _cvtsh_ss(d[b]));
        float *ab = acc + b * PP_QB;
        _mm512_storeu_ps(ab, _mm512_fmadd_ps(hd, pp_load_q8x16(q + b * PP_QB), _mm512_loadu_ps(ab)));
        _mm512_storeu_ps(ab + 16,
                         _mm512_fmadd_ps(hd, pp_load_q8x16(q + b * PP_QB + 16), _mm512_loadu_ps(ab + 16)));
    }
}

static inline void pp_axpy_q4_v(float h, const uint8_t *p, const uint16_t *d, float *acc, ptrdiff_t D) {
    for (ptrdiff_t b = 0; b < D / PP_QB; b++) {
        const __m512 hd = _mm512_set1_ps(h * _cvtsh_ss(d[b]));
        float *ab = acc + b * PP_QB;
        __m512 lo, hi;
        pp_load_q4x32(p + b * (PP_QB / 2), &lo, &hi);
        _mm512_storeu_ps(ab, _mm512_fmadd_ps(hd, lo, _mm512_loadu_ps(ab)));
        _mm512_storeu_ps(ab + 16, _mm512_fmadd_ps(hd, hi, _mm512_loadu_ps(ab + 16)));
    }
}
#endif /* PP_HAVE_AVX512 */

/* ================================ dispatch ========================================================= */
/* row: start of the row's data; d: the row's scales [K/32] (ignored for f32/f16). */
static inline float pp_dot(int fmt, int simd, const void *row, const uint16_t *d, const float *x,
                           ptrdiff_t K) {
#if PP_HAVE_AVX512
    if (simd) {
        switch (fmt) {
        case PP_F32: return pp_dot_f32_v((const float *)row, x, K);
        case PP_F16: return pp_dot_f16_v((const uint16_t *)row, x, K);
        case PP_Q8: return pp_dot_q8_v((const int8_t *)row, d, x, K);
        default: return pp_dot_q4_v((const uint8_t *)row, d, x, K);
        }
    }
#endif
    (void)simd;
    return pp_dot_row_c(fmt, row, d, x, K);
}

static inline void pp_axpy(int fmt, int simd, float h, const void *row, const uint16_t *d, float *acc,
                           ptrdiff_t D) {
#if PP_HAVE_AVX512
    if (simd) {
        switch (fmt) {
        case PP_F32: pp_axpy_f32_v(h, (const float *)row, acc, D); return;
        case PP_F16: pp_axpy_f16_v(h, (const uint16_t *)row, acc, D); return;
        case PP_Q8: pp_axpy_q8_v(h, (const int8_t *)row, d, acc, D); return;
        default: pp_axpy_q4_v(h, (const uint8_t *)row, d, acc, D); return;
        }
    }
#endif
    (void)simd;
    pp_axpy_row_c(fmt, h, row, d, acc, D);
}

/* Matrices are row-strided: row n's bytes start at data + n * rs (rs >= pp_row_bytes; rs > row bytes when
 * rows of several matrices are interleaved, see pipower/arena.py's FFN bundles) and its scales at
 * scales + n * ss (ss in uint16 elements, >= K/32). A C-contiguous matrix has rs = row bytes, ss = K/32. */

/* y[n] = dot(W[n], x) for rows n in [n0, n1). scales: NULL for f32/f16. */
static inline void pp_gemv_rows(int fmt, int simd, const char *data, ptrdiff_t rs, const uint16_t *scales,
                                ptrdiff_t ss, const float *x, float *y, ptrdiff_t K, ptrdiff_t n0,
                                ptrdiff_t n1) {
    for (ptrdiff_t n = n0; n < n1; n++)
        y[n] = pp_dot(fmt, simd, data + n * rs, scales ? scales + n * ss : NULL, x, K);
}

/* out[K] = the float32 row exactly as quant.dequantize computes it (one rounding: (float)q * d). */
static inline void pp_dequant_row(int fmt, const void *row, const uint16_t *d, float *out, ptrdiff_t K) {
    switch (fmt) {
    case PP_F32:
        memcpy(out, row, (size_t)K * sizeof(float));
        return;
    case PP_F16:
        pp_f16_to_f32((const uint16_t *)row, out, K);
        return;
    case PP_Q8: {
        const int8_t *q = (const int8_t *)row;
        for (ptrdiff_t b = 0; b < K / PP_QB; b++) {
            const float db = pp_h2f(d[b]);
#pragma omp simd
            for (int j = 0; j < PP_QB; j++) out[b * PP_QB + j] = (float)q[b * PP_QB + j] * db;
        }
        return;
    }
    default: {
        const uint8_t *p = (const uint8_t *)row;
        for (ptrdiff_t b = 0; b < K / PP_QB; b++) {
            const float db = pp_h2f(d[b]);
            const uint8_t *pb = p + b * (PP_QB / 2);
            float *ob = out + b * PP_QB;
#pragma omp simd
            for (int j = 0; j < PP_QB / 2; j++) {
                ob[j] = (float)((int)(pb[j] & 15) - 8) * db;
                ob[j + 16] = (float)((int)(pb[j] >> 4) - 8) * db;
            }
        }
        return;
    }
    }
}

/* out[r] = dequantized row idx[r] (or row base + r when idx is NULL), r in [r0, r1). out: [R, K]. */
static inline void pp_dequant_rows(int fmt, const char *data, ptrdiff_t rs, const uint16_t *scales,
                                   ptrdiff_t ss, const int32_t *idx, ptrdiff_t base, float *out, ptrdiff_t K,
                                   ptrdiff_t r0, ptrdiff_t r1) {
    for (ptrdiff_t r = r0; r < r1; r++) {
        const ptrdiff_t n = idx ? (ptrdiff_t)idx[r] : base + r;
        pp_dequant_row(fmt, data + n * rs, scales ? scales + n * ss : NULL, out + r * K, K);
    }
}

#endif /* PIPOWER_LINEAR_IMPL_H */
