/* The fused (sparse) FFN over a few tokens at once: the chunk kernel of _ffn.pyx for T > 1.
 *
 * Per token, the same operations in the same order as pp_ffn_chunk (_ffn_impl.h) computes for that
 * token alone, so row t of the result is bitwise the decode step's (batch invariance):
 *   phase A, neuron by neuron: gate and up dots for all T tokens (_batch_impl.h / _int8_impl.h row
 *            kernels, each weight row read once), h[j][t] = act(g) * u;
 *   phase B, 32 output elements at a time: for each token, acc[k] = fma(h d, w_jk, acc[k]) over the
 *            chunk's neurons j in order, exactly the per-element sequence of the decode kernel's axpys,
 *            but with the accumulators of up to 8 tokens in registers. (Row by row, as decode does it,
 *            T tokens would load and store T accumulator rows per neuron: store-bound, ~5x a decode
 *            step at T = 8 on Qwen2.5-0.5B shapes.) The chunk's down rows come from L2 (phase A just
 *            streamed their spans).
 * Decode skips a neuron's axpy when h is exactly 0; adding 0 * w instead changes nothing, since an
 * accumulator that starts at +0 never becomes -0 under fma (IEEE: x + (+-0) = x unless x = -0), so
 * phase B skips only neurons whose h is 0 for every token (ReLU models), for speed.
 */
#ifndef PIPOWER_FFN_BATCH_IMPL_H
#define PIPOWER_FFN_BATCH_IMPL_H

#include "_ffn_impl.h"

#define PP_FFN_MAX_T 64   /* tokens per call (the Cython caller cuts longer inputs) */

#if PP_HAVE_AVX512
/* acc[t0 + t][k0 .. k0 + 16 (two ? 32 : 16)) for t < NT, from neurons j0 .. j1 of the chunk; H[j][t]
 * is h of neuron j0 + j for token t (row stride T). */
static inline __attribute__((always_inline)) void
pp_down_cols_v(const pp_ffn_args *a, ptrdiff_t j0, ptrdiff_t j1, const float *H, const unsigned char *live,
               ptrdiff_t t0, const int NT, ptrdiff_t k0, const int two, float *acc) {
    const ptrdiff_t D = a->D, T = a->T, rs = a->rs, nsb = a->ss, b = k0 / PP_QB;
    __m512 c0[PP_TB], c1[PP_TB];
    for (int t = 0; t < NT; t++) { c0[t] = _mm512_setzero_ps(); c1[t] = _mm512_setzero_ps(); }
    for (ptrdiff_t j = j0; j < j1; j++) {
        if (!live[j - j0]) continue;
        const ptrdiff_t i = pp_ffn_neuron(a, j);
        const char *row = a->down + i * rs;
        const float *h = H + (j - j0) * T + t0;
        __m512 w0, w1 = _mm512_setzero_ps();
        float db = 1.0f;
        switch (a->fmt) {
        case PP_F32:
            w0 = _mm512_loadu_ps((const float *)row + k0);
            if (two) w1 = _mm512_loadu_ps((const float *)row + k0 + 16);
            break;
        case PP_F16:
            w0 = pp_load_h16((const uint16_t *)row + k0);
            if (two) w1 = pp_load_h16((const uint16_t *)row + k0 + 16);
            break;
        case PP_Q8:
            w0 = pp_load_q8x16((const int8_t *)row + k0);
            w1 = pp_load_q8x16((const int8_t *)row + k0 + 16);
            db = _cvtsh_ss(a->down_s[i * nsb + b]);
            break;
        default:
            pp_load_q4x32((const uint8_t *)row + b * (PP_QB / 2), &w0, &w1);
            db = _cvtsh_ss(a->down_s[i * nsb + b]);
            break;
        }
        const int q = a->fmt == PP_Q8 || a->fmt == PP_Q4;
        for (int t = 0; t < NT; t++) {
            const __m512 hv = _mm512_set1_ps(q ? h[t] * db : h[t]);   /* as pp_axpy_*_v: h d, or h */
            c0[t] = _mm512_fmadd_ps(hv, w0, c0[t]);
            if (two) c1[t] = _mm512_fmadd_ps(hv, w1, c1[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        _mm512_storeu_ps(acc + (t0 + t) * D + k0, c0[t]);
        if (two) _mm512_storeu_ps(acc + (t0 + t) * D + k0 + 16, c1[t]);
    }
}

static inline void pp_down_cols(const pp_ffn_args *a, ptrdiff_t j0, ptrdiff_t j1, const float *H,
                                const unsigned char *live, ptrdiff_t t0, int nt, ptrdiff_t k0, int two,
                                float *acc) {
#define PP_C(N) (two ? pp_down_cols_v(a, j0, j1, H, live, t0, N, k0, 1, acc) \
                     : pp_down_cols_v(a, j0, j1, H, live, t0, N, k0, 0, acc))
    PP_CASES_TB(PP_C)
#undef PP_C
}
#endif /* PP_HAVE_AVX512 */

/* acc[T, D] (zeroed) += down rows of neurons j0 .. j1 weighted by H [j1 - j0, T]. */
static inline void pp_ffn_down_batch(const pp_ffn_args *a, ptrdiff_t j0, ptrdiff_t j1, const float *H,
                                     const unsigned char *live, float *acc) {
    const ptrdiff_t D = a->D, T = a->T, rs = a->rs, nsb = a->ss;
    const int q = a->down_s != NULL;
    ptrdiff_t k_end = 0;   /* elements [0, k_end) done in registers, the rest (< 16, f32/f16) row by row */
#if PP_HAVE_AVX512
    if (a->simd) {
        const ptrdiff_t unit = (a->fmt == PP_F32 || a->fmt == PP_F16) ? 16 : PP_QB;
        k_end = D / unit * unit;
        for (ptrdiff_t t0 = 0; t0 < T; t0 += PP_TB) {
            const int nt = (int)(T - t0 < PP_TB ? T - t0 : PP_TB);
            ptrdiff_t k0 = 0;
            for (; k0 + 32 <= k_end; k0 += 32) pp_down_cols(a, j0, j1, H, live, t0, nt, k0, 1, acc);
            if (k0 < k_end) pp_down_cols(a, j0, j1, H, live, t0, nt, k0, 0, acc);   /* one 16-float unit */
        }
        if (k_end == D) return;
    }
#endif
    /* the portable kernel (or the f32/f16 tail past k_end): decode's axpys, token by token */
    const ptrdiff_t esz = pp_row_bytes(a->fmt, 2) / 2;     /* bytes per element: 4 or 2 (f32/f16 only) */
    for (ptrdiff_t j = j0; j < j1; j++) {
        const ptrdiff_t i = pp_ffn_neuron(a, j);
        const char *row = a->down + i * rs;
        for (ptrdiff_t t = 0; t < T; t++) {
            const float h = H[(j - j0) * T + t];
            if (h == 0.0f) continue;
            if (k_end == 0)
                pp_axpy(a->fmt, 0, h, row, q ? a->down_s + i * nsb : NULL, acc + t * D, D);
            else
                pp_axpy_row_c(a->fmt, h, row + k_end * esz, NULL, acc + t * D + k_end, D - k_end);
        }
    }
}

/* Neurons j in [j0, j1) for T <= PP_FFN_MAX_T tokens, summed into acc[T, D] (zeroed here). */
static inline void pp_ffn_chunk_batch(const pp_ffn_args *a, ptrdiff_t j0, ptrdiff_t j1, float *acc) {
    const ptrdiff_t D = a->D, rb = a->rs, nsb = a->ss, T = a->T;
    const int q = a->up_s != NULL;
    /* Per neuron the arithmetic is T times a decode step's, so one span ahead (two when short) hides
     * the next neuron's memory latency. */
    const ptrdiff_t near = rb >= PP_FFN_SPREAD_NEAR_BYTES ? 1 : 2;
    float g[PP_FFN_MAX_T], u[PP_FFN_MAX_T];
    const ptrdiff_t c = j0 / a->chunk;                  /* this chunk's slice of the caller's scratch */
    float *H = a->hbuf + c * a->chunk * T;              /* [n, T] */
    unsigned char *live = a->live + c * a->chunk;       /* [n]: some h of the neuron is not 0 */
    memset(acc, 0, (size_t)(T * D) * sizeof(float));
    for (ptrdiff_t j = j0; j < j1; j++) {
        const ptrdiff_t i = pp_ffn_neuron(a, j);
        if (a->bundle && j + near < a->n) {
            pp_prefetch_row(a->bundle + pp_ffn_neuron(a, j + near) * rb, rb);
        } else if (!a->bundle && a->idx && j + PP_FFN_PREFETCH_AHEAD < j1) {
            const ptrdiff_t ip = (ptrdiff_t)a->idx[j + PP_FFN_PREFETCH_AHEAD], len = pp_row_bytes(a->fmt, D);
            if (a->gate) pp_prefetch_row(a->gate + ip * rb, len);
            pp_prefetch_row(a->up + ip * rb, len);
            pp_prefetch_row(a->down + ip * rb, len);
        }
        if (a->gate) pp_ffn_dots(a, a->gate + i * rb, q ? a->gate_s + i * nsb : NULL, T, g);
        pp_ffn_dots(a, a->up + i * rb, q ? a->up_s + i * nsb : NULL, T, u);
        float *h = H + (j - j0) * T;
        unsigned char any = 0;
        for (ptrdiff_t t = 0; t < T; t++) {
            h[t] = a->gate ? pp_act(a->act, g[t]) * u[t] : pp_act(a->act, u[t]);
            any |= h[t] != 0.0f;
        }
        live[j - j0] = any;
    }
    pp_ffn_down_batch(a, j0, j1, H, live, acc);
}

#endif /* PIPOWER_FFN_BATCH_IMPL_H */
