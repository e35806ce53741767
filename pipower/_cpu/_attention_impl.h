/* Inner loops of the attention kernels (pipower/_cpu/_attention.pyx threads them; nothing here
 * allocates or starts threads). All float32; `#pragma omp simd` lets the compiler reorder the float
 * reductions into vector lanes, as any BLAS does. With AVX-512 (-march=native on this machine) the
 * scores and the weighted sum of V use intrinsics for hd % 16 == 0; other builds and head dims take the
 * portable loops (tested with hd=24).
 *
 * Shapes: hd head dim, S keys. One call of pp_attn_row computes the output of ONE query head at ONE
 * position, so the result of a row never depends on how rows are spread over threads.
 */
#ifndef PIPOWER_ATTENTION_IMPL_H
#define PIPOWER_ATTENTION_IMPL_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>

/* exp(x) for x <= 0 (softmax after the max is subtracted), branch-free so `omp simd` loops vectorize it;
 * libm's expf is a scalar call (~15 cycles) unless -ffast-math, which we do not use.
 * Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n put into the exponent bits.
 * Max error ~1-2 ulp against a correctly rounded exp (test_cpu_attention checks it against np.exp).
 * Inputs below -87 are clamped (result ~1.6e-38 instead of smaller; the softmax sum is >= 1, so the
 * difference is far below float resolution); NaN stays NaN through the polynomial. */
static inline float pp_exp_neg(float x) {
    const float big = 12582912.0f;                 /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f + big;      /* n = round(x / ln2), held in t's low mantissa bits */
    float n = t - big;
    float r = x - n * 0.693359375f;                /* ln2 split in two so r keeps its low bits */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } tb, s;
    tb.f = t;
    s.i = (tb.i - 0x4B400000 + 127) << 23;          /* bits of t minus bits of `big` = n; n in [-126, 0] */
    return p * s.f;
}

/* Softmax numerator of s[0:n] in place (max subtracted first, so exp never overflows); returns 1 / sum
 * so callers scale the weighted sum once at the end. s holds scaled scores. */
static inline float pp_softmax_unnorm(float *s, ptrdiff_t n) {
    float m = -INFINITY;
#pragma omp simd reduction(max:m)
    for (ptrdiff_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+:sum)
    for (ptrdiff_t j = 0; j < n; j++) {
        float e = pp_exp_neg(s[j] - m);
        s[j] = e;
        sum += e;
    }
    return 1.0f / sum;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define PP_ATTN_AVX512 1
/* a[0..15] -> one vector whose lane i = sum of a[i]'s 16 lanes. Four rounds of pairwise adds of
 * interleaved halves (15 adds for 16 keys, instead of one ~8-instruction horizontal sum per key). */
static inline __m512 pp_hsum16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) {
        const __m512 x = a[2 * i], y = a[2 * i + 1];
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
    }
    for (int i = 0; i < 4; i++) {
        const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++) {
        const __m512 x = c[2 * i], y = c[2 * i + 1];
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* PV over keys [j, end) of a row with n keys: NC = hd / 16 chunks (a compile-time constant after inlining),
 * two keys per step into two accumulator sets so 2*NC FMA chains overlap; the sets live in st[2][NC][16]
 * between calls (a store and a load change no bits), so a row may be done in chunks of an even length. */
static inline __attribute__((always_inline)) void
pp_pv_chunk(const float *p, const float *v, ptrdiff_t ldv, ptrdiff_t j, ptrdiff_t end, ptrdiff_t n, const int NC,
            float *st) {
    __m512 a0[8], a1[8];
    for (int c = 0; c < NC; c++) { a0[c] = _mm512_loadu_ps(st + 16 * c); a1[c] = _mm512_loadu_ps(st + 16 * (NC + c)); }
    for (; j + 2 <= end; j += 2) {
        const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
        const float *v0 = v + j * ldv, *v1 = v0 + ldv;
        for (int c = 0; c < NC; c++) {
            a0[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * c), a0[c]);
            a1[c] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * c), a1[c]);
        }
    }
    if (end == n && j < n) {
        const __m512 p0 = _mm512_set1_ps(p[j]);
        for (int c = 0; c < NC; c++) a0[c] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + j * ldv + 16 * c), a0[c]);
    }
    for (int c = 0; c < NC; c++) { _mm512_storeu_ps(st + 16 * c, a0[c]); _mm512_storeu_ps(st + 16 * (NC + c), a1[c]); }
}

/* pp_pv_chunk for two rows of one length n at once (p, q their weights; st, su their accumulator sets):
 * each V vector is loaded once for both rows' FMAs. One row's chunk does 4 V loads and a broadcast per
 * key against 4 FMAs, and the loads bound it (~5 cycles per key at hd = 64); two rows share the loads
 * (~2.5 per row and key). Each row's FMAs are pp_pv_chunk's, in its order: the same bits. */
static inline __attribute__((always_inline)) void
pp_pv_chunk2(const float *p, const float *q, const float *v, ptrdiff_t ldv, ptrdiff_t j, ptrdiff_t end, ptrdiff_t n,
             const int NC, float *st, float *su) {
    __m512 a0[4], a1[4], b0[4], b1[4];       /* NC <= 4: two rows' sets fill 16 registers */
    for (int c = 0; c < NC; c++) {
        a0[c] = _mm512_loadu_ps(st + 16 * c); a1[c] = _mm512_loadu_ps(st + 16 * (NC + c));
        b0[c] = _mm512_loadu_ps(su + 16 * c); b1[c] = _mm512_loadu_ps(su + 16 * (NC + c));
    }
    for (; j + 2 <= end; j += 2) {
        const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
        const __m512 q0 = _mm512_set1_ps(q[j]), q1 = _mm512_set1_ps(q[j + 1]);
        const float *v0 = v + j * ldv, *v1 = v0 + ldv;
        for (int c = 0; c < NC; c++) {
            const __m512 x0 = _mm512_loadu_ps(v0 + 16 * c), x1 = _mm512_loadu_ps(v1 + 16 * c);
            a0[c] = _mm512_fmadd_ps(p0, x0, a0[c]);
            a1[c] = _mm512_fmadd_ps(p1, x1, a1[c]);
            b0[c] = _mm512_fmadd_ps(q0, x0, b0[c]);
            b1[c] = _mm512_fmadd_ps(q1, x1, b1[c]);
        }
    }
    if (end == n && j < n) {
        const __m512 p0 = _mm512_set1_ps(p[j]), q0 = _mm512_set1_ps(q[j]);
        for (int c = 0; c < NC; c++) {
            const __m512 x0 = _mm512_loadu_ps(v + j * ldv + 16 * c);
            a0[c] = _mm512_fmadd_ps(p0, x0, a0[c]);
            b0[c] = _mm512_fmadd_ps(q0, x0, b0[c]);
        }
    }
    for (int c = 0; c < NC; c++) {
        _mm512_storeu_ps(st + 16 * c, a0[c]); _mm512_storeu_ps(st + 16 * (NC + c), a1[c]);
        _mm512_storeu_ps(su + 16 * c, b0[c]); _mm512_storeu_ps(su + 16 * (NC + c), b1[c]);
    }
}

/* out[0:16 NC] = inv * (a0 + a1) from pp_pv_chunk's accumulator sets st[2][NC][16]. */
static inline void pp_pv_finish(const float *st, const int NC, float inv, float *out) {
    const __m512 vi = _mm512_set1_ps(inv);
    for (int c = 0; c < NC; c++)
        _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(st + 16 * c),
                                                                   _mm512_loadu_ps(st + 16 * (NC + c))), vi));
}

/* s[0:16] = scale * dot(q, k[i*ldk + 0:hd]) for 16 keys (hd % 16 == 0; vs = scale in every lane). */
static inline __attribute__((always_inline)) void
pp_scores_block16(const float *q, const float *k, ptrdiff_t ldk, ptrdiff_t hd, __m512 vs, float *s) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) {
        const float *kr = k + i * ldk;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kr));
        for (ptrdiff_t c = 16; c < hd; c += 16)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(kr + c), a);
        acc[i] = a;
    }
    _mm512_storeu_ps(s, _mm512_mul_ps(pp_hsum16(acc), vs));
}

/* out[0:hd] = inv * sum_j p[j] v[j] over all n keys in one pp_pv_chunk. */
static inline __attribute__((always_inline)) void
pp_pv_avx512(const float *p, const float *v, ptrdiff_t ldv, ptrdiff_t n, const int NC, float inv, float *out) {
    float st[2 * 8 * 16] = {0};
    pp_pv_chunk(p, v, ldv, 0, n, n, NC, st);
    pp_pv_finish(st, NC, inv, out);
}
#endif

/* s[j] for keys j in [j0, n): the portable loops (four keys per pass share q's loads, then singles). */
static inline void pp_scores_tail(const float *q, const float *k, ptrdiff_t ldk, ptrdiff_t j, ptrdiff_t n,
                                  ptrdiff_t hd, float scale, float *s) {
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+:a0, a1, a2, a3)
        for (ptrdiff_t d = 0; d < hd; d++) {
            a0 += q[d] * k0[d];
            a1 += q[d] * k1[d];
            a2 += q[d] * k2[d];
            a3 += q[d] * k3[d];
        }
        s[j] = a0 * scale; s[j + 1] = a1 * scale; s[j + 2] = a2 * scale; s[j + 3] = a3 * scale;
    }
    for (; j < n; j++) {
        const float *kr = k + j * ldk;
        float a = 0.0f;
#pragma omp simd reduction(+:a)
        for (ptrdiff_t d = 0; d < hd; d++) a += q[d] * kr[d];
        s[j] = a * scale;
    }
}

/* s[j] = scale * dot(q, k[j*ldk + 0:hd]) for j in [0, n). k: n rows, row stride ldk. */
static inline void pp_scores(const float *q, const float *k, ptrdiff_t ldk, ptrdiff_t n, ptrdiff_t hd,
                             float scale, float *s) {
    ptrdiff_t j = 0;
#ifdef PP_ATTN_AVX512
    if (hd % 16 == 0) {
        const __m512 vs = _mm512_set1_ps(scale);
        /* the common head dims as constants: each key's dot chain unrolled and keys interleaved */
        switch (hd) {
            case 32: for (; j + 16 <= n; j += 16) pp_scores_block16(q, k + j * ldk, ldk, 32, vs, s + j); break;
            case 64: for (; j + 16 <= n; j += 16) pp_scores_block16(q, k + j * ldk, ldk, 64, vs, s + j); break;
            case 128: for (; j + 16 <= n; j += 16) pp_scores_block16(q, k + j * ldk, ldk, 128, vs, s + j); break;
            default: for (; j + 16 <= n; j += 16) pp_scores_block16(q, k + j * ldk, ldk, hd, vs, s + j); break;
        }
    }
#endif
    pp_scores_tail(q, k, ldk, j, n, hd, scale, s);
}

/* out[0:hd] = inv * sum_j p[j] * v[j*ldv + 0:hd] over j in [0, n). v: n rows of hd floats, row stride ldv. */
static inline void pp_weighted_rows(const float *p, const float *v, ptrdiff_t ldv, ptrdiff_t n,
                                    ptrdiff_t hd, float inv, float *out) {
#ifdef PP_ATTN_AVX512
    switch (hd) {   /* the common head dims get their accumulators in registers */
        case 32: pp_pv_avx512(p, v, ldv, n, 2, inv, out); return;
        case 64: pp_pv_avx512(p, v, ldv, n, 4, inv, out); return;
        case 128: pp_pv_avx512(p, v, ldv, n, 8, inv, out); return;
        default: break;
    }
#endif
    for (ptrdiff_t d = 0; d < hd; d++) out[d] = 0.0f;
    for (ptrdiff_t j = 0; j < n; j++) {
        const float pj = p[j];
        const float *vr = v + j * ldv;
#pragma omp simd
        for (ptrdiff_t d = 0; d < hd; d++) out[d] += pj * vr[d];
    }
#pragma omp simd
    for (ptrdiff_t d = 0; d < hd; d++) out[d] *= inv;
}

/* ---------------------------------------------------------------------------------------------------
 * One query head at one position: out = softmax(scale * q k^T) v over keys lo..hi-1.
 * q: [hd]; k, v: [S, hd] with row strides ldk / ldv (pointers at row 0, the KV cache's own layout);
 * s: scratch [hi - lo]; out: [hd]. Used by decode (one row per head) and prefill (one per head and
 * position); the arithmetic of a row depends only on its inputs, never on the thread running it.
 */
static inline void pp_attn_row(const float *q, const float *k, ptrdiff_t ldk, const float *v, ptrdiff_t ldv,
                               ptrdiff_t lo, ptrdiff_t hi, ptrdiff_t hd, float scale, float *s, float *out) {
    const ptrdiff_t n = hi - lo;
    pp_scores(q, k + lo * ldk, ldk, n, hd, scale, s);
    const float inv = pp_softmax_unnorm(s, n);
    pp_weighted_rows(s, v + lo * ldv, ldv, n, hd, inv, out);
}

/* ---------------------------------------------------------------------------------------------------
 * Rows [r0, r1) of one KV head's query rows at once (GQA group g of G heads, T positions from `start`;
 * row r = token r / G, head g * G + r % G, keys 0 .. start + r / G; no sliding window). Each row's
 * arithmetic is pp_attn_row's, operation for operation, so the outputs are bitwise the same; only the
 * loop order changes: every 16-key block of K and every PP_PV_CHUNK keys of V are loaded once for all
 * rows of the unit (from L1) instead of once per row (from L2: K and V of one head at S = 128, hd = 64
 * are 64 KB). q: [T, H, hd]; out: [T, H*hd]; k, v: KV head g's rows, strides ldk / ldv;
 * scratch: PP_ATTN_UNIT * (S + 2 * hd) floats. At most PP_ATTN_UNIT rows per call. */
#define PP_ATTN_UNIT 16
#define PP_PV_CHUNK 64   /* even: a chunk ends between two key pairs, as pp_pv_avx512 pairs them */


#ifdef PP_ATTN_AVX512
/* pp_attn_unit's AVX-512 code for hd = 16 NC (NC a compile-time constant after inlining): rows r < R with
 * queries qr[r], outputs orow[r], n[r] keys each (nmax the most). */
static inline __attribute__((always_inline)) void
pp_attn_unit_v(const float *const *qr, float *const *orow, const ptrdiff_t *n, ptrdiff_t nmax, int R,
               const float *k, ptrdiff_t ldk, const float *v, ptrdiff_t ldv, float scale, float *scratch,
               ptrdiff_t S, const int NC) {
    const ptrdiff_t hd = 16 * NC;
    float *st = scratch + PP_ATTN_UNIT * S;          /* [R][2][NC][16] */
    float inv[PP_ATTN_UNIT];
    const __m512 vs = _mm512_set1_ps(scale);
    for (ptrdiff_t j = 0; j + 16 <= nmax; j += 16)   /* pp_scores' 16-key blocks, K block shared */
        for (int r = 0; r < R; r++) {
            if (j + 16 <= n[r]) pp_scores_block16(qr[r], k + j * ldk, ldk, hd, vs, scratch + r * S + j);
        }
    for (int r = 0; r < R; r++) {
        float *s = scratch + r * S;
        pp_scores_tail(qr[r], k, ldk, n[r] / 16 * 16, n[r], hd, scale, s);
        inv[r] = pp_softmax_unnorm(s, n[r]);
    }
    memset(st, 0, sizeof(float) * 2 * (size_t)hd * (size_t)R);
    for (ptrdiff_t c0 = 0; c0 < nmax; c0 += PP_PV_CHUNK)   /* V chunk shared by the rows */
        for (int r = 0; r < R;) {
            if (c0 >= n[r]) { r++; continue; }
            const ptrdiff_t end = n[r] < c0 + PP_PV_CHUNK ? n[r] : c0 + PP_PV_CHUNK;
            float *sr = st + r * 2 * hd;
            if (NC <= 4 && r + 1 < R && n[r + 1] == n[r]) {   /* two rows of one length: V loads shared */
                if (NC == 2) pp_pv_chunk2(scratch + r * S, scratch + (r + 1) * S, v, ldv, c0, end, n[r], 2, sr, sr + 2 * hd);
                else pp_pv_chunk2(scratch + r * S, scratch + (r + 1) * S, v, ldv, c0, end, n[r], 4, sr, sr + 2 * hd);
                r += 2;
                continue;
            }
            pp_pv_chunk(scratch + r * S, v, ldv, c0, end, n[r], NC, sr);
            r++;
        }
    for (int r = 0; r < R; r++) pp_pv_finish(st + r * 2 * hd, NC, inv[r], orow[r]);
}
#endif

static inline void pp_attn_unit(const float *q, ptrdiff_t H, ptrdiff_t hd, const float *k, ptrdiff_t ldk,
                                const float *v, ptrdiff_t ldv, ptrdiff_t G, ptrdiff_t g, ptrdiff_t r0, ptrdiff_t r1,
                                ptrdiff_t start, float scale, float *scratch, ptrdiff_t S, float *out) {
    const float *qr[PP_ATTN_UNIT];
    float *orow[PP_ATTN_UNIT];
    ptrdiff_t n[PP_ATTN_UNIT], nmax = 0;
    const int R = (int)(r1 - r0);
    for (int r = 0; r < R; r++) {
        const ptrdiff_t t = (r0 + r) / G, h = g * G + (r0 + r) % G;
        qr[r] = q + (t * H + h) * hd;
        orow[r] = out + (t * H + h) * hd;
        n[r] = start + t + 1;
        nmax = n[r] > nmax ? n[r] : nmax;
    }
#ifdef PP_ATTN_AVX512
    switch (hd) {   /* head dim a compile-time constant: score chains unrolled (a run-time hd left each key's
                     * fmas a rolled dependent loop: Qwen2.5-0.5B's attention 1.3-1.5x slower in the module) */
        case 32: pp_attn_unit_v(qr, orow, n, nmax, R, k, ldk, v, ldv, scale, scratch, S, 2); return;
        case 64: pp_attn_unit_v(qr, orow, n, nmax, R, k, ldk, v, ldv, scale, scratch, S, 4); return;
        case 128: pp_attn_unit_v(qr, orow, n, nmax, R, k, ldk, v, ldv, scale, scratch, S, 8); return;
        default: break;
    }
#endif
    for (int r = 0; r < R; r++) pp_attn_row(qr[r], k, ldk, v, ldv, 0, n[r], hd, scale, scratch, orow[r]);
}

/* ---------------------------------------------------------------------------------------------------
 * Rotary embedding, HF rotate-half layout, of one head vector: pairs (i, i + half).
 * x, y: [2*half] (y may alias x); c, s: [half].
 *   y[i]        = x[i] * c[i] - x[i+half] * s[i]
 *   y[i + half] = x[i+half] * c[i] + x[i] * s[i]
 * Same products as NumpyOps.rope; with -march=native the compiler may fuse a product and the add into
 * one FMA (one rounding fewer), so results agree to ~1 ulp rather than bit for bit.
 */
static inline void pp_rope_head(const float *x, float *y, const float *c, const float *s, ptrdiff_t half) {
#pragma omp simd
    for (ptrdiff_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        y[i] = x1 * c[i] - x2 * s[i];
        y[i + half] = x2 * c[i] + x1 * s[i];
    }
}

#endif /* PIPOWER_ATTENTION_IMPL_H */
