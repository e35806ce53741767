/* Integer dot products for q4 weights: activations quantized per 32-block to int8 (as llama.cpp quantizes
 * them to Q8_0), then 4-bit x int8 block dots in exact integer arithmetic. The float path
 * (_linear_impl.h) converts every weight to float and spends three vector float operations per 32
 * weights and token; here a 32-block costs a quarter of a VNNI dot per token, which turns q4 decode from
 * compute-bound into memory-bound and makes a batch of tokens cheap.
 *
 * The arithmetic, defined exactly (pipower/intdot.py computes it bit for bit in NumPy):
 *   activations, per token and 32-block b of x [K]:
 *     amax = max |x_j|;  dx_b = amax / 127;  id = dx_b ? 1 / dx_b : 0;  q_j = nearbyint(x_j * id)  (int8,
 *     ties to even);  a block whose amax is not finite gets q = 0 and dx_b = amax, so NaN/inf propagate.
 *   one row of weights (w_j = nibble - 8 for q4, the int8 itself for q8; scales dw_b) against one token:
 *     isum_b = sum_j w_j q_j                                        exact int32
 *     lane l = b mod 16 of a float32 accumulator acc[16], blocks in increasing order:
 *     acc[l] = fma((float)isum_b, dw_b * dx_b, acc[l])              (dw_b * dx_b rounded to float32 first)
 *     result = ((acc[i] + acc[i+8]) for i<8 -> (+ i+4) for i<4 -> (+ i+2) for i<2 -> s[0] + s[1]).
 * The same result comes from the AVX-512 VNNI kernel and the portable C one, for any batch size and any
 * thread count (each (token, row) is one such computation).
 *
 * Layout of the quantized activations of one token (pp_xq): nb = K/32 blocks padded to nbp, a multiple
 * of 16 (zeros: padded blocks contribute nothing); for q4 arranged per 4 blocks as the nibbles are,
 *   q [nbp/4][2][4][16] int8: [lo halves (elements 0..15) of blocks 4r..4r+3 | hi halves (16..31)]
 * so one 64-byte load meets the low (or high) nibbles of four blocks; for q8 in element order;
 *   d [nbp] float32 (dx_b), c [nbp] int32: the correction of the unsigned operand of VNNI's u8 x s8 dot,
 *   8 * sum_j q_j for q4 (nibbles are w + 8), 128 * sum_j q_j for q8 (weights enter as w + 128).
 */
#ifndef PIPOWER_INT8_IMPL_H
#define PIPOWER_INT8_IMPL_H

#include <math.h>
#include <float.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "_batch_impl.h"   /* pp_h2f, PP_QB, PP_TB, PP_HAVE_AVX512, PP_NOINLINE */
#include "_isa_impl.h"     /* PP_ISA_*: which kernel a call runs */

#if PP_HAVE_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#  define PP_HAVE_VNNI512 1
#else
#  define PP_HAVE_VNNI512 0
#endif

static inline ptrdiff_t pp_xq_blocks(ptrdiff_t K) {   /* nbp: blocks padded to a multiple of 16 */
    return (K / PP_QB + 15) / 16 * 16;
}

/* Bytes of one token's quantized activations (q, then d, then c), 64-byte multiple. */
static inline ptrdiff_t pp_xq_bytes(ptrdiff_t K) {
    const ptrdiff_t nbp = pp_xq_blocks(K);
    return nbp * PP_QB + nbp * 4 + nbp * 4;
}

typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *c;
} pp_xq;

static inline pp_xq pp_xq_at(const char *buf, ptrdiff_t K, ptrdiff_t t) {
    const ptrdiff_t nbp = pp_xq_blocks(K);
    const char *base = buf + t * pp_xq_bytes(K);
    pp_xq v = {(const int8_t *)base, (const float *)(base + nbp * PP_QB),
                (const int32_t *)(base + nbp * PP_QB + nbp * 4)};
    return v;
}

/* The weight layout the activations are laid out for: row-major q4 (nibble order), row-major q8 or q8
 * panels (element order, c = 128 sum q), q4 panels (element order, c = 8 sum q: _panel_impl.h). */
enum { PP_XQ_Q4 = 0, PP_XQ_Q8 = 1, PP_XQ_Q4E = 2 };

/* Position in q of element j (0..31) of block b. */
static inline ptrdiff_t pp_xq_pos(int kind, ptrdiff_t b, int j) {
    if (kind != PP_XQ_Q4) return b * PP_QB + j;
    return (b / 4) * 128 + (j / 16) * 64 + (b % 4) * 16 + (j % 16);
}

#if PP_HAVE_AVX2I
static inline int pp_avx2_xq_block(const float *xb, int8_t *q_lo, int8_t *q_hi, float *d, int32_t *c,
                                   int32_t bias);   /* _int8_avx2_body.h */
#endif

#if PP_HAVE_AVX512
/* One 32-block of pp_xq_quantize on 16 lanes: the same operations (x * id rounds as the scalar product
 * does; roundscale is nearbyint's ties-to-even). -> 0, writing nothing, for a block with NaN / inf (the
 * scalar code's case). 10x faster than the scalar loop, which was ~10% of an 8-token forward
 * (Qwen2.5-0.5B, 48 quantizations of [8, 896..4864]). */
static inline int pp_xq_block512(const float *xb, int8_t *q_lo, int8_t *q_hi, float *d, int32_t *c,
                                 int32_t bias) {
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    if (_mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q)) return 0;
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    if (!(amax <= FLT_MAX)) return 0;
    const float db = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(x0, id), rnd), lim), nlim));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(
        _mm512_roundscale_ps(_mm512_mul_ps(x1, id), rnd), lim), nlim));
    _mm_storeu_si128((__m128i *)q_lo, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)q_hi, _mm512_cvtepi32_epi8(q1));
    *d = db;
    *c = bias * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    return 1;
}
#endif

#if PP_HAVE_AVX512
/* Lane i of the result = the max (MAX) or the int32 sum (!MAX) of v[i]'s 16 lanes: four rounds that pair
 * interleaved halves, ~45 operations for 16 reductions instead of ~8 each. Max is exact and the int32 sum
 * is exact in any order, so each lane is what its own horizontal reduction gives. */
static inline __m512i pp_lanes16(const int MAX, const __m512i *v) {
#define PP_L16_OP(a, b) (MAX ? _mm512_castps_si512(_mm512_max_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b))) \
                             : _mm512_add_epi32(a, b))
    __m512i b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = PP_L16_OP(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = PP_L16_OP(_mm512_unpacklo_epi64(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_epi64(b[2 * i], b[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        d[i] = PP_L16_OP(_mm512_shuffle_i32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_i32x4(c[2 * i], c[2 * i + 1], 0xDD));
    return PP_L16_OP(_mm512_shuffle_i32x4(d[0], d[1], 0x88), _mm512_shuffle_i32x4(d[0], d[1], 0xDD));
#undef PP_L16_OP
}

/* Sixteen consecutive 32-blocks b0 .. b0+15 of pp_xq_quantize at once: pp_xq_block512's operations, with
 * the per-block maxima, divisions and sums done for all sixteen in vectors (pp_lanes16; the divisions are
 * the same IEEE float32 divisions lane by lane), so every byte is the one-block code's. -> a mask of the
 * blocks holding NaN / inf, whose q / d / c are left wrong here for the caller to redo with the scalar
 * code (as pp_xq_block512 returns 0 for them). One block at a time cost ~15 ns (two horizontal reductions
 * and two scalar divisions, ~50 instructions); an 8-token Qwen2.5-0.5B forward quantizes ~45 K blocks. */
static inline unsigned pp_xq_blocks512x16(const float *x, int kind, ptrdiff_t b0, int8_t *q, float *d, int32_t *c,
                                         int32_t bias) {
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512i m[16];
    unsigned bad = 0;
    for (int i = 0; i < 16; i++) {
        const float *xb = x + (b0 + i) * PP_QB;
        const __m512 a0 = _mm512_abs_ps(_mm512_loadu_ps(xb)), a1 = _mm512_abs_ps(_mm512_loadu_ps(xb + 16));
        /* !(|x| <= FLT_MAX): inf, or NaN (unordered) */
        if (_mm512_cmp_ps_mask(a0, big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(a1, big, _CMP_NLE_UQ)) bad |= 1u << i;
        m[i] = _mm512_castps_si512(_mm512_max_ps(a0, a1));
    }
    const __m512 amax = _mm512_castsi512_ps(pp_lanes16(1, m));
    const __m512 db = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    const __mmask16 nonzero = _mm512_cmp_ps_mask(db, _mm512_setzero_ps(), _CMP_NEQ_OQ);
    float id[16];
    _mm512_storeu_ps(id, _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0f), db));
    _mm512_storeu_ps(d + b0, db);
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int i = 0; i < 16; i++) {
        const float *xb = x + (b0 + i) * PP_QB;
        const __m512 vi = _mm512_set1_ps(id[i]);
        /* clamped to +-127, then converted rounding to nearest even: for finite x * id the same integer
         * as rounding first and clamping after (what pp_xq_block512 does), one operation fewer */
        const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_max_ps(_mm512_min_ps(
            _mm512_mul_ps(_mm512_loadu_ps(xb), vi), lim), nlim), rnd);
        const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_max_ps(_mm512_min_ps(
            _mm512_mul_ps(_mm512_loadu_ps(xb + 16), vi), lim), nlim), rnd);
        _mm_storeu_si128((__m128i *)(q + pp_xq_pos(kind, b0 + i, 0)), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(q + pp_xq_pos(kind, b0 + i, 16)), _mm512_cvtepi32_epi8(q1));
        m[i] = _mm512_add_epi32(q0, q1);
    }
    _mm512_storeu_si512(c + b0, _mm512_mullo_epi32(pp_lanes16(0, m), _mm512_set1_epi32(bias)));
    return bad;
}

#endif

/* Quantize x [K] (K a multiple of 32) into one token's buffer (layout above) for weights of `kind`.
 * isa (PP_ISA_*): which vector code quantizes a block (AVX-512 for the AVX-512 VNNI level, AVX2 for the
 * 256-bit ones, scalar C); all write the same bytes. */
static inline void pp_xq_quantize(const float *x, ptrdiff_t K, char *buf, int kind, int isa) {
    const ptrdiff_t nb = K / PP_QB, nbp = pp_xq_blocks(K);
    int8_t *q = (int8_t *)buf;
    float *d = (float *)(buf + nbp * PP_QB);
    int32_t *c = (int32_t *)(buf + nbp * PP_QB + nbp * 4);
    const int32_t bias = kind == PP_XQ_Q8 ? 128 : 8;   /* of the unsigned weight operand (w + bias) */
    (void)isa;
    memset(buf, 0, (size_t)pp_xq_bytes(K));
#if PP_HAVE_AVX512
    unsigned redo = 0;                  /* blocks b16 .. b16 + 15 with NaN / inf, for the scalar code */
    ptrdiff_t b16 = -16;
#endif
    for (ptrdiff_t b = 0; b < nb; b++) {
        const float *xb = x + b * PP_QB;
        int8_t *q_lo = q + pp_xq_pos(kind, b, 0), *q_hi = q + pp_xq_pos(kind, b, 16);
#if PP_HAVE_AVX512
        if (isa == PP_ISA_AVX512VNNI && b % 16 == 0 && b + 16 <= nb) {
            b16 = b;
            redo = pp_xq_blocks512x16(x, kind, b, q, d, c, bias);
        }
        if (b < b16 + 16) {
            if (!(redo >> (b - b16) & 1)) continue;
            memset(q_lo, 0, 16);        /* the scalar code leaves a NaN / inf block's q and c at zero */
            memset(q_hi, 0, 16);
            c[b] = 0;
        } else if (isa == PP_ISA_AVX512VNNI && pp_xq_block512(xb, q_lo, q_hi, d + b, c + b, bias)) {
            continue;
        }
#endif
#if PP_HAVE_AVX2I
        if ((isa == PP_ISA_AVX2 || isa == PP_ISA_AVXVNNI) && pp_avx2_xq_block(xb, q_lo, q_hi, d + b, c + b, bias))
            continue;
#endif
        float amax = 0.0f;
        for (int j = 0; j < PP_QB; j++) {
            const float a = fabsf(xb[j]);
            amax = (a > amax || a != a) ? a : amax;     /* NaN wins, as in NumPy's max */
        }
        const float db = amax / 127.0f;
        d[b] = db;
        if (!(amax <= FLT_MAX)) continue;               /* inf / NaN: q = 0, dx = amax */
        const float id = db != 0.0f ? 1.0f / db : 0.0f;
        int32_t s = 0;
        for (int j = 0; j < PP_QB; j++) {
            float v = nearbyintf(xb[j] * id);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            const int8_t qj = (int8_t)v;
            q[pp_xq_pos(kind, b, j)] = qj;
            s += qj;
        }
        c[b] = bias * s;
    }
}

/* The fixed 16-lane reduction order of the result. */
static inline float pp_lane_tree(const float *acc) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = acc[i] + acc[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Portable: one q4 row (packed nibbles p, scales d) against one token. Out of line for the same reason
 * as pp_dot_row_c: one compiled body for every caller. */
static PP_NOINLINE float pp_dot_q4i_c(const uint8_t *p, const uint16_t *d, pp_xq x, ptrdiff_t K) {
    float acc[16] = {0};
    const ptrdiff_t nb = K / PP_QB;
    for (ptrdiff_t b = 0; b < nb; b++) {
        const uint8_t *pb = p + b * (PP_QB / 2);
        const int8_t *xlo = x.q + pp_xq_pos(PP_XQ_Q4, b, 0), *xhi = x.q + pp_xq_pos(PP_XQ_Q4, b, 16);
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += (int32_t)(pb[j] & 15) * xlo[j] + (int32_t)(pb[j] >> 4) * xhi[j];
        s -= x.c[b];
        const float scale = pp_h2f(d[b]) * x.d[b];
        acc[b % 16] = fmaf((float)s, scale, acc[b % 16]);
    }
    return pp_lane_tree(acc);
}

/* Portable: one q8 row (int8 q, scales d) against one token (activations in element order). */
static PP_NOINLINE float pp_dot_q8i_c(const int8_t *w, const uint16_t *d, pp_xq x, ptrdiff_t K) {
    float acc[16] = {0};
    const ptrdiff_t nb = K / PP_QB;
    for (ptrdiff_t b = 0; b < nb; b++) {
        const int8_t *wb = w + b * PP_QB, *xb = x.q + b * PP_QB;
        int32_t s = 0;
        for (int j = 0; j < PP_QB; j++) s += (int32_t)wb[j] * xb[j];
        const float scale = pp_h2f(d[b]) * x.d[b];
        acc[b % 16] = fmaf((float)s, scale, acc[b % 16]);
    }
    return pp_lane_tree(acc);
}

#if PP_HAVE_VNNI512
/* Lanes of the sum vector D (see below) -> natural block order: V[b] = D[4 (b % 4) + b / 4]. */
static inline __m512i pp_q4i_order(void) {
    return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

static inline float pp_tree512(__m512 acc) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));        /* [s4_0 + s4_2, s4_1 + s4_3, ..] */
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* y[t * ldy] = pp_dot_q4i_c(p, d, x[t], K) for t < NT, bitwise: 16 blocks at a time, their nibbles
 * unpacked once for all tokens. Per token: 8 VNNI dots (u8 nibbles x s8 activations) into four vectors
 * R_r holding blocks 4r..4r+3 (one per 128-bit lane), two rounds of interleaved adds give D with
 * D[4L + r] = block 4r + L, one permute gives block order, then the exact integer correction, one
 * conversion and one fma per 16 blocks. */
static inline __attribute__((always_inline)) void
pp_dotn_q4i_v(const uint8_t *p, const uint16_t *d, const pp_xq *x, ptrdiff_t K, const int NT, float *y,
              ptrdiff_t ldy) {
    __m512 acc[PP_TB];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    const ptrdiff_t nb = K / PP_QB;
    const __m512i low4 = _mm512_set1_epi8(15), order = pp_q4i_order();
    for (ptrdiff_t g = 0; g < nb; g += 16) {
        const ptrdiff_t n = nb - g < 16 ? nb - g : 16;             /* blocks in this group */
        __m512i lo[4], hi[4];
        for (int r = 0; r < 4; r++) {
            const ptrdiff_t m = n - 4 * r <= 0 ? 0 : (n - 4 * r >= 4 ? 4 : n - 4 * r);
            const __mmask64 k = m == 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * m)) - 1);
            const __m512i v = _mm512_maskz_loadu_epi8(k, p + (g + 4 * r) * (PP_QB / 2));
            lo[r] = _mm512_and_si512(v, low4);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        const __mmask16 kb = (__mmask16)(n == 16 ? 0xFFFF : ((1u << n) - 1));
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kb, d + g));
        for (int t = 0; t < NT; t++) {
            const int8_t *xq = x[t].q + g * PP_QB;
            __m512i R[4];
            for (int r = 0; r < 4; r++) {
                R[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], _mm512_loadu_si512(xq + 128 * r));
                R[r] = _mm512_dpbusd_epi32(R[r], hi[r], _mm512_loadu_si512(xq + 128 * r + 64));
            }
            const __m512i C0 = _mm512_add_epi32(_mm512_unpacklo_epi32(R[0], R[1]), _mm512_unpackhi_epi32(R[0], R[1]));
            const __m512i C1 = _mm512_add_epi32(_mm512_unpacklo_epi32(R[2], R[3]), _mm512_unpackhi_epi32(R[2], R[3]));
            const __m512i D = _mm512_add_epi32(_mm512_unpacklo_epi64(C0, C1), _mm512_unpackhi_epi64(C0, C1));
            const __m512i S = _mm512_sub_epi32(_mm512_permutexvar_epi32(order, D),
                                               _mm512_loadu_si512(x[t].c + g));
            const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(x[t].d + g));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), scale, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = pp_tree512(acc[t]);
}

/* The q8 kernel: weights enter VNNI's unsigned operand as w + 128 (xor 0x80, once for all tokens), so
 * the dot of a block is isum + 128 sum(q), and c holds 128 sum(q). Eight dots per 16 blocks and token
 * into R_r (blocks 2r and 2r+1, four 128-bit lanes each: 0-1 for block 2r, 2-3 for 2r+1); three rounds
 * of interleaved adds leave F[4 g + p] = block 2p (g = 0), 2p+1 (g = 1), 8+2p (g = 2), 9+2p (g = 3). */
static inline __attribute__((always_inline)) void
pp_dotn_q8i_v(const int8_t *w, const uint16_t *d, const pp_xq *x, ptrdiff_t K, const int NT, float *y,
              ptrdiff_t ldy) {
    __m512 acc[PP_TB];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    const ptrdiff_t nb = K / PP_QB;
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    const __m512i order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    for (ptrdiff_t g = 0; g < nb; g += 16) {
        const ptrdiff_t n = nb - g < 16 ? nb - g : 16;
        __m512i W[8];
        for (int r = 0; r < 8; r++) {
            const ptrdiff_t m = n - 2 * r <= 0 ? 0 : (n - 2 * r >= 2 ? 2 : 1);
            const __mmask64 k = m == 2 ? ~(__mmask64)0 : (((__mmask64)1 << (32 * m)) - 1);
            /* blocks past the row read as 0x80 = 0 + 128 against zero-padded activations: no effect */
            W[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, w + (g + 2 * r) * PP_QB), bias);
        }
        const __mmask16 kb = (__mmask16)(n == 16 ? 0xFFFF : ((1u << n) - 1));
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kb, d + g));
        for (int t = 0; t < NT; t++) {
            const int8_t *xq = x[t].q + g * PP_QB;
            __m512i R[8], C[4];
            for (int r = 0; r < 8; r++)
                R[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), W[r], _mm512_loadu_si512(xq + 64 * r));
            for (int k = 0; k < 4; k++)
                C[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(R[2 * k], R[2 * k + 1]),
                                        _mm512_unpackhi_epi32(R[2 * k], R[2 * k + 1]));
            const __m512i E0 = _mm512_add_epi32(_mm512_unpacklo_epi64(C[0], C[1]), _mm512_unpackhi_epi64(C[0], C[1]));
            const __m512i E1 = _mm512_add_epi32(_mm512_unpacklo_epi64(C[2], C[3]), _mm512_unpackhi_epi64(C[2], C[3]));
            const __m512i F = _mm512_add_epi32(_mm512_shuffle_i32x4(E0, E1, 0x88), _mm512_shuffle_i32x4(E0, E1, 0xDD));
            const __m512i S = _mm512_sub_epi32(_mm512_permutexvar_epi32(order, F), _mm512_loadu_si512(x[t].c + g));
            const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(x[t].d + g));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), scale, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = pp_tree512(acc[t]);
}
#endif /* PP_HAVE_VNNI512 */

#include "_int8_avx2_impl.h"   /* pp_avx2_*, pp_avxvnni_*: the 256-bit kernels */

/* y[t * ldy] for t < T: one q4 or q8 row (fmt) against T quantized tokens (x[t], laid out for fmt),
 * bitwise pp_dot_q4i_c / pp_dot_q8i_c each, on the kernel of level isa (PP_ISA_*; a level not compiled
 * in runs portable C: the Python wrappers only pass levels pp_isa_mask allows). */
static inline void pp_dotn_int(int fmt, int isa, const void *row, const uint16_t *d, const pp_xq *x, ptrdiff_t K,
                               ptrdiff_t T, float *y, ptrdiff_t ldy) {
#if PP_HAVE_VNNI512
    if (isa == PP_ISA_AVX512VNNI) {
        for (ptrdiff_t t0 = 0; t0 < T; t0 += PP_TB) {
            const int nt = (int)(T - t0 < PP_TB ? T - t0 : PP_TB);
            const pp_xq *xt = x + t0;
            float *yt = y + t0 * ldy;
            if (fmt == PP_Q8) {
#define PP_C(N) pp_dotn_q8i_v((const int8_t *)row, d, xt, K, N, yt, ldy)
                PP_CASES_TB(PP_C)
#undef PP_C
            } else {
#define PP_C(N) pp_dotn_q4i_v((const uint8_t *)row, d, xt, K, N, yt, ldy)
                PP_CASES_TB(PP_C)
#undef PP_C
            }
        }
        return;
    }
#endif
#if PP_HAVE_AVXVNNI
    if (isa == PP_ISA_AVXVNNI) { pp_avxvnni_dotn_int(fmt, row, d, x, K, T, y, ldy); return; }
#endif
#if PP_HAVE_AVX2I
    if (isa == PP_ISA_AVX2) { pp_avx2_dotn_int(fmt, row, d, x, K, T, y, ldy); return; }
#endif
    (void)isa;
    for (ptrdiff_t t = 0; t < T; t++)
        y[t * ldy] = fmt == PP_Q8 ? pp_dot_q8i_c((const int8_t *)row, d, x[t], K)
                                  : pp_dot_q4i_c((const uint8_t *)row, d, x[t], K);
}

/* Levels this process can run: compiled in and supported by the CPU (bit PP_ISA_* set). */
static inline int pp_isa_mask(void) {
    static int cpu = -1;   /* CPUID traps to the hypervisor in a VM: asked once */
    if (cpu < 0) cpu = pp_isa_cpu_mask();
    return pp_isa_compiled_mask(PP_HAVE_VNNI512) & cpu;
}

/* The level a call with simd=True runs: the best in pp_isa_mask, or PIPOWER_INT_ISA's (-1: invalid). */
static inline int pp_isa_default(void) { return pp_isa_pick(pp_isa_mask()); }

/* Y[t, n] for rows n in [n0, n1) of a q4 / q8 matrix (row stride rs bytes, scale stride ss halfs). */
static inline void pp_gemm_int_rows(int fmt, int isa, const char *data, ptrdiff_t rs, const uint16_t *scales,
                                    ptrdiff_t ss, const pp_xq *x, ptrdiff_t T, float *y, ptrdiff_t N,
                                    ptrdiff_t K, ptrdiff_t n0, ptrdiff_t n1) {
    for (ptrdiff_t n = n0; n < n1; n++)
        pp_dotn_int(fmt, isa, data + n * rs, scales + n * ss, x, K, T, y + n, N);
}

#endif /* PIPOWER_INT8_IMPL_H */
