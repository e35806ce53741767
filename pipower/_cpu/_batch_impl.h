/* Row kernels over a small batch of tokens: ONE weight row [K] against T token rows x [T, K] (dot
 * products) or T accumulator rows (axpy), the weight row read from memory once for all of them.
 *
 * Batch invariance (the reason this file exists): token t's result is computed by exactly the
 * floating-point operations, in exactly the order, that the single-token kernels of _linear_impl.h
 * (pp_dot / pp_axpy) perform for that token alone, so a T-token forward gives bitwise the results of T
 * decode steps, and a token's result never depends on what else is in the batch (speculative
 * verification, several requests served together). Tests check it bitwise for every format, both
 * SIMD settings, T = 1..33 and 1 or 2 threads (tests/test_cpu_batch.py).
 *   - AVX-512: each weight block is converted to float once and used for up to PP_TB tokens, every
 *     token keeping the accumulators pp_dot_*_v keeps (two per token) and the same block order.
 *   - portable: the single-token kernel per token through one out-of-line function (pp_dot_row_c),
 *     the same one the single-token path calls, so the compiler cannot vectorize the two differently;
 *     the weight row stays in L1 between tokens.
 */
#ifndef PIPOWER_BATCH_IMPL_H
#define PIPOWER_BATCH_IMPL_H

#include "_linear_impl.h"

#define PP_TB 8   /* tokens per register tile: 2 accumulators each, 16 of the 32 zmm registers */

/* NT as a compile-time constant (1..PP_TB) so the token loops unroll and accumulators stay in registers. */
#define PP_CASES_TB(CALL) \
    switch (nt) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; \
                  case 4: CALL(4); break; case 5: CALL(5); break; case 6: CALL(6); break; \
                  case 7: CALL(7); break; default: CALL(8); break; }

#if PP_HAVE_AVX512
#define PP_INLINE static inline __attribute__((always_inline))

/* y[t * ldy] = pp_dot_f32_v(w, x + t * ldx, K) for t < NT. */
PP_INLINE void pp_dotn_f32_v(const float *w, const float *x, ptrdiff_t ldx, ptrdiff_t K, const int NT,
                             float *y, ptrdiff_t ldy) {
    __m512 a0[PP_TB], a1[PP_TB];
    for (int t = 0; t < NT; t++) { a0[t] = _mm512_setzero_ps(); a1[t] = _mm512_setzero_ps(); }
    ptrdiff_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
        for (int t = 0; t < NT; t++) {
            a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx + k), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * ldx + k + 16), a1[t]);
        }
    }
    if (k + 16 <= K) {
        const __m512 w0 = _mm512_loadu_ps(w + k);
        for (int t = 0; t < NT; t++) a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx + k), a0[t]);
        k += 16;
    }
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        const __m512 w0 = _mm512_maskz_loadu_ps(m, w + k);
        for (int t = 0; t < NT; t++)
            a1[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + t * ldx + k), a1[t]);
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

PP_INLINE void pp_dotn_f16_v(const uint16_t *w, const float *x, ptrdiff_t ldx, ptrdiff_t K, const int NT,
                             float *y, ptrdiff_t ldy) {
    __m512 a0[PP_TB], a1[PP_TB];
    for (int t = 0; t < NT; t++) { a0[t] = _mm512_setzero_ps(); a1[t] = _mm512_setzero_ps(); }
    ptrdiff_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = pp_load_h16(w + k), w1 = pp_load_h16(w + k + 16);
        for (int t = 0; t < NT; t++) {
            a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * ldx + k), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * ldx + k + 16), a1[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        const float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
        y[t * ldy] = acc + pp_dot_row_c(PP_F16, w + k, NULL, x + t * ldx + k, K - k);
    }
}

/* Quantized rows: per 32-block b, s = w[0:16] x[0:16] + w[16:32] x[16:32], acc_(b&1) += d_b s (blocks
 * taken in pairs so even blocks go to a0 and odd ones to a1 without a branch, as pp_dot_*_v alternates). */
PP_INLINE void pp_dotn_q8_v(const int8_t *q, const uint16_t *d, const float *x, ptrdiff_t ldx, ptrdiff_t K,
                            const int NT, float *y, ptrdiff_t ldy) {
    __m512 a0[PP_TB], a1[PP_TB];
    for (int t = 0; t < NT; t++) { a0[t] = _mm512_setzero_ps(); a1[t] = _mm512_setzero_ps(); }
    const ptrdiff_t nsb = K / PP_QB;
    ptrdiff_t b = 0;
    for (; b + 2 <= nsb; b += 2) {
        const int8_t *qb = q + b * PP_QB;
        const __m512 w00 = pp_load_q8x16(qb), w01 = pp_load_q8x16(qb + 16);
        const __m512 w10 = pp_load_q8x16(qb + 32), w11 = pp_load_q8x16(qb + 48);
        const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(d[b])), d1 = _mm512_set1_ps(_cvtsh_ss(d[b + 1]));
        const float *xb = x + b * PP_QB;
        for (int t = 0; t < NT; t++) {
            __m512 s0 = _mm512_mul_ps(w00, _mm512_loadu_ps(xb + t * ldx));
            s0 = _mm512_fmadd_ps(w01, _mm512_loadu_ps(xb + t * ldx + 16), s0);
            a0[t] = _mm512_fmadd_ps(d0, s0, a0[t]);
            __m512 s1 = _mm512_mul_ps(w10, _mm512_loadu_ps(xb + t * ldx + 32));
            s1 = _mm512_fmadd_ps(w11, _mm512_loadu_ps(xb + t * ldx + 48), s1);
            a1[t] = _mm512_fmadd_ps(d1, s1, a1[t]);
        }
    }
    if (b < nsb) {   /* an odd last block: even index, so a0 */
        const int8_t *qb = q + b * PP_QB;
        const __m512 w00 = pp_load_q8x16(qb), w01 = pp_load_q8x16(qb + 16);
        const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(d[b]));
        const float *xb = x + b * PP_QB;
        for (int t = 0; t < NT; t++) {
            __m512 s0 = _mm512_mul_ps(w00, _mm512_loadu_ps(xb + t * ldx));
            s0 = _mm512_fmadd_ps(w01, _mm512_loadu_ps(xb + t * ldx + 16), s0);
            a0[t] = _mm512_fmadd_ps(d0, s0, a0[t]);
        }
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

PP_INLINE void pp_dotn_q4_v(const uint8_t *p, const uint16_t *d, const float *x, ptrdiff_t ldx, ptrdiff_t K,
                            const int NT, float *y, ptrdiff_t ldy) {
    __m512 a0[PP_TB], a1[PP_TB];
    for (int t = 0; t < NT; t++) { a0[t] = _mm512_setzero_ps(); a1[t] = _mm512_setzero_ps(); }
    const ptrdiff_t nsb = K / PP_QB;
    ptrdiff_t b = 0;
    for (; b + 2 <= nsb; b += 2) {
        __m512 lo0, hi0, lo1, hi1;
        pp_load_q4x32(p + b * (PP_QB / 2), &lo0, &hi0);
        pp_load_q4x32(p + (b + 1) * (PP_QB / 2), &lo1, &hi1);
        const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(d[b])), d1 = _mm512_set1_ps(_cvtsh_ss(d[b + 1]));
        const float *xb = x + b * PP_QB;
        for (int t = 0; t < NT; t++) {
            __m512 s0 = _mm512_mul_ps(lo0, _mm512_loadu_ps(xb + t * ldx));
            s0 = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xb + t * ldx + 16), s0);
            a0[t] = _mm512_fmadd_ps(d0, s0, a0[t]);
            __m512 s1 = _mm512_mul_ps(lo1, _mm512_loadu_ps(xb + t * ldx + 32));
            s1 = _mm512_fmadd_ps(hi1, _mm512_loadu_ps(xb + t * ldx + 48), s1);
            a1[t] = _mm512_fmadd_ps(d1, s1, a1[t]);
        }
    }
    if (b < nsb) {
        __m512 lo0, hi0;
        pp_load_q4x32(p + b * (PP_QB / 2), &lo0, &hi0);
        const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(d[b]));
        const float *xb = x + b * PP_QB;
        for (int t = 0; t < NT; t++) {
            __m512 s0 = _mm512_mul_ps(lo0, _mm512_loadu_ps(xb + t * ldx));
            s0 = _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xb + t * ldx + 16), s0);
            a0[t] = _mm512_fmadd_ps(d0, s0, a0[t]);
        }
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

/* acc[t] += h[t] * row for t < NT (acc[t]: pointer to token t's [D] accumulator), the operations of
 * pp_axpy_*_v per token. */
PP_INLINE void pp_axpyn_f32_v(const float *h, const float *w, float *const *acc, ptrdiff_t D, const int NT) {
    ptrdiff_t k = 0;
    for (; k + 16 <= D; k += 16) {
        const __m512 wv = _mm512_loadu_ps(w + k);
        for (int t = 0; t < NT; t++)
            _mm512_storeu_ps(acc[t] + k, _mm512_fmadd_ps(_mm512_set1_ps(h[t]), wv, _mm512_loadu_ps(acc[t] + k)));
    }
    for (int t = 0; t < NT; t++) pp_axpy_row_c(PP_F32, h[t], w + k, NULL, acc[t] + k, D - k);
}

PP_INLINE void pp_axpyn_f16_v(const float *h, const uint16_t *w, float *const *acc, ptrdiff_t D, const int NT) {
    ptrdiff_t k = 0;
    for (; k + 16 <= D; k += 16) {
        const __m512 wv = pp_load_h16(w + k);
        for (int t = 0; t < NT; t++)
            _mm512_storeu_ps(acc[t] + k, _mm512_fmadd_ps(_mm512_set1_ps(h[t]), wv, _mm512_loadu_ps(acc[t] + k)));
    }
    for (int t = 0; t < NT; t++) pp_axpy_row_c(PP_F16, h[t], w + k, NULL, acc[t] + k, D - k);
}

PP_INLINE void pp_axpyn_q8_v(const float *h, const int8_t *q, const uint16_t *d, float *const *acc, ptrdiff_t D,
                             const int NT) {
    for (ptrdiff_t b = 0; b < D / PP_QB; b++) {
        const float db = _cvtsh_ss(d[b]);
        const __m512 w0 = pp_load_q8x16(q + b * PP_QB), w1 = pp_load_q8x16(q + b * PP_QB + 16);
        for (int t = 0; t < NT; t++) {
            const __m512 hd = _mm512_set1_ps(h[t] * db);
            float *ab = acc[t] + b * PP_QB;
            _mm512_storeu_ps(ab, _mm512_fmadd_ps(hd, w0, _mm512_loadu_ps(ab)));
            _mm512_storeu_ps(ab + 16, _mm512_fmadd_ps(hd, w1, _mm512_loadu_ps(ab + 16)));
        }
    }
}

PP_INLINE void pp_axpyn_q4_v(const float *h, const uint8_t *p, const uint16_t *d, float *const *acc, ptrdiff_t D,
                             const int NT) {
    for (ptrdiff_t b = 0; b < D / PP_QB; b++) {
        const float db = _cvtsh_ss(d[b]);
        __m512 lo, hi;
        pp_load_q4x32(p + b * (PP_QB / 2), &lo, &hi);
        for (int t = 0; t < NT; t++) {
            const __m512 hd = _mm512_set1_ps(h[t] * db);
            float *ab = acc[t] + b * PP_QB;
            _mm512_storeu_ps(ab, _mm512_fmadd_ps(hd, lo, _mm512_loadu_ps(ab)));
            _mm512_storeu_ps(ab + 16, _mm512_fmadd_ps(hd, hi, _mm512_loadu_ps(ab + 16)));
        }
    }
}

static inline void pp_dotn_v(int fmt, const void *row, const uint16_t *d, const float *x, ptrdiff_t ldx,
                             ptrdiff_t K, int nt, float *y, ptrdiff_t ldy) {
    switch (fmt) {
    case PP_F32:
#define PP_C(N) pp_dotn_f32_v((const float *)row, x, ldx, K, N, y, ldy)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    case PP_F16:
#define PP_C(N) pp_dotn_f16_v((const uint16_t *)row, x, ldx, K, N, y, ldy)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    case PP_Q8:
#define PP_C(N) pp_dotn_q8_v((const int8_t *)row, d, x, ldx, K, N, y, ldy)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    default:
#define PP_C(N) pp_dotn_q4_v((const uint8_t *)row, d, x, ldx, K, N, y, ldy)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    }
}

static inline void pp_axpyn_v(int fmt, const float *h, const void *row, const uint16_t *d, float *const *acc,
                              ptrdiff_t D, int nt) {
    switch (fmt) {
    case PP_F32:
#define PP_C(N) pp_axpyn_f32_v(h, (const float *)row, acc, D, N)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    case PP_F16:
#define PP_C(N) pp_axpyn_f16_v(h, (const uint16_t *)row, acc, D, N)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    case PP_Q8:
#define PP_C(N) pp_axpyn_q8_v(h, (const int8_t *)row, d, acc, D, N)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    default:
#define PP_C(N) pp_axpyn_q4_v(h, (const uint8_t *)row, d, acc, D, N)
        PP_CASES_TB(PP_C) return;
#undef PP_C
    }
}
#undef PP_INLINE
#endif /* PP_HAVE_AVX512 */

/* y[t * ldy] = pp_dot(fmt, simd, row, d, x + t * ldx, K) for t < T, bitwise. */
static inline void pp_dotn(int fmt, int simd, const void *row, const uint16_t *d, const float *x, ptrdiff_t ldx,
                           ptrdiff_t K, ptrdiff_t T, float *y, ptrdiff_t ldy) {
#if PP_HAVE_AVX512
    if (simd) {
        for (ptrdiff_t t0 = 0; t0 < T; t0 += PP_TB) {
            const int nt = (int)(T - t0 < PP_TB ? T - t0 : PP_TB);
            pp_dotn_v(fmt, row, d, x + t0 * ldx, ldx, K, nt, y + t0 * ldy, ldy);
        }
        return;
    }
#endif
    for (ptrdiff_t t = 0; t < T; t++) y[t * ldy] = pp_dot(fmt, 0, row, d, x + t * ldx, K);
}

/* acc[t] += h[t] * row for t < T, bitwise pp_axpy per token. */
static inline void pp_axpyn(int fmt, int simd, const float *h, const void *row, const uint16_t *d,
                            float *const *acc, ptrdiff_t D, ptrdiff_t T) {
#if PP_HAVE_AVX512
    if (simd) {
        for (ptrdiff_t t0 = 0; t0 < T; t0 += PP_TB) {
            const int nt = (int)(T - t0 < PP_TB ? T - t0 : PP_TB);
            pp_axpyn_v(fmt, h + t0, row, d, acc + t0, D, nt);
        }
        return;
    }
#endif
    for (ptrdiff_t t = 0; t < T; t++) pp_axpy(fmt, 0, h[t], row, d, acc[t], D);
}

/* Y[t, n] = dot(W[n], X[t]) for all t < T and rows n in [n0, n1): X [T, K] contiguous, Y [T, N]. Rows
 * outer, tokens inner: a weight row is read from memory once, the token rows stay in cache. */
static inline void pp_gemm_rows(int fmt, int simd, const char *data, ptrdiff_t rs, const uint16_t *scales,
                                ptrdiff_t ss, const float *x, ptrdiff_t T, float *y, ptrdiff_t N, ptrdiff_t K,
                                ptrdiff_t n0, ptrdiff_t n1) {
    for (ptrdiff_t n = n0; n < n1; n++)
        pp_dotn(fmt, simd, data + n * rs, scales ? scales + n * ss : NULL, x, K, K, T, y + n, N);
}

#endif /* PIPOWER_BATCH_IMPL_H */
