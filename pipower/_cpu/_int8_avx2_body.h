/* The 256-bit integer dot kernels, written once and compiled twice by _int8_avx2_impl.h (no include guard):
 *   PP_V_VNNI 0  AVX2: u8 x s8 products in pairs (vpmaddubsw, int16) widened to int32 (vpmaddwd with 1s);
 *   PP_V_VNNI 1  AVX-VNNI: vpdpbusd, four products straight into int32.
 * PP_V(name) gives each function its suffix. Every kernel computes the exact int32 block sums of
 * _int8_impl.h and then the same float operations in the same order as the portable C kernels
 * (pp_dot_q4i_c, pp_dot_q8i_c, pp_panel_tok_c): lane l = b % 16 of a row's 16 float accumulators takes
 * fma(float(isum_b), dw_b * dx_b, acc) in block order, and the fixed tree of pp_lane_tree ends it. Here
 * the 16 lanes are two 8-float vectors (lanes 0-7, 8-15), so bits equal the C and AVX-512 kernels'.
 *
 * vpmaddubsw saturates an int16 pair sum. q4: nibbles 0..15 x |q| <= 127 -> a pair <= 3810, and even 8
 * pairs summed in int16 stay below 32767. q8: weights are signed, so AVX2 takes |w| as the unsigned
 * operand and moves w's sign onto q (vpsignb): a pair <= 2 * 128 * 127 = 32512; that sum is the true
 * isum_b, so no correction term. AVX-VNNI has no int16 step: q8 enters as w + 128 (as in the AVX-512
 * kernel) and the activations' c = 128 sum(q) is subtracted. */

/* Four u8 x s8 products per int32 lane, added to acc. Only for operands whose int16 pair sums cannot
 * saturate (see above) on AVX2. */
static inline __attribute__((always_inline)) __m256i PP_V(dp4)(__m256i acc, __m256i u, __m256i s) {
#if PP_V_VNNI
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* [sum(v[0]), ..., sum(v[7])]: the 8 lanes of each of 8 int32 vectors summed (exact). */
static inline __attribute__((always_inline)) __m256i PP_V(hsum8)(const __m256i v[8]) {
    const __m256i h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                            _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

/* pp_lane_tree of the 16 lanes lo (0-7), hi (8-15). */
static inline __attribute__((always_inline)) float PP_V(tree)(__m256 lo, __m256 hi) {
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));        /* [s4_0 + s4_2, s4_1 + s4_3, ..] */
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

/* Eight float16 scales (n of them, the rest 0) as floats. */
static inline __attribute__((always_inline)) __m256 PP_V(scales8)(const uint16_t *d, ptrdiff_t n) {
    if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d));
    uint16_t tmp[8] = {0};
    for (ptrdiff_t i = 0; i < n; i++) tmp[i] = d[i];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

/* y[t * ldy] = pp_dot_q8i_c(w, d, x[t], K) for t < NT: 8 blocks at a time, their weights loaded once. */
static inline __attribute__((always_inline)) void
PP_V(dotn_q8i)(const int8_t *w, const uint16_t *d, const pp_xq *x, ptrdiff_t K, const int NT, float *y,
               ptrdiff_t ldy) {
    __m256 acc[PP_TB][2];
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const ptrdiff_t nb = K / PP_QB;
    for (ptrdiff_t g = 0; g < nb; g += 8) {
        const ptrdiff_t n = nb - g < 8 ? nb - g : 8;
        __m256i W[8];
        for (int j = 0; j < 8; j++)      /* blocks past the row: weight 0 against zero-padded activations */
            W[j] = j < n ? _mm256_loadu_si256((const __m256i *)(w + (g + j) * PP_QB)) : _mm256_setzero_si256();
#if PP_V_VNNI
        for (int j = 0; j < 8; j++) W[j] = _mm256_xor_si256(W[j], _mm256_set1_epi8((char)0x80));
#endif
        const __m256 dw = PP_V(scales8)(d + g, n);
        const int half = (int)((g / 8) & 1);
        for (int t = 0; t < NT; t++) {
            const int8_t *xq = x[t].q + g * PP_QB;
            __m256i R[8];
            for (int j = 0; j < 8; j++) {
                const __m256i q = _mm256_loadu_si256((const __m256i *)(xq + j * PP_QB));
#if PP_V_VNNI
                R[j] = PP_V(dp4)(_mm256_setzero_si256(), W[j], q);
#else
                R[j] = PP_V(dp4)(_mm256_setzero_si256(), _mm256_abs_epi8(W[j]), _mm256_sign_epi8(q, W[j]));
#endif
            }
            __m256i S = PP_V(hsum8)(R);
#if PP_V_VNNI
            S = _mm256_sub_epi32(S, _mm256_loadu_si256((const __m256i *)(x[t].c + g)));
#endif
            const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x[t].d + g));
            acc[t][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), scale, acc[t][half]);
        }
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = PP_V(tree)(acc[t][0], acc[t][1]);
}

/* y[t * ldy] = pp_dot_q4i_c(p, d, x[t], K) for t < NT. 32 bytes of nibbles = blocks b, b+1 (b even);
 * the activations' row layout (PP_XQ_Q4) puts their low halves, and 64 bytes on their high halves, next
 * to each other. One vector of sums per pair: lanes 0-3 block b, 4-7 block b+1. */
static inline __attribute__((always_inline)) void
PP_V(dotn_q4i)(const uint8_t *p, const uint16_t *d, const pp_xq *x, ptrdiff_t K, const int NT, float *y,
               ptrdiff_t ldy) {
    __m256 acc[PP_TB][2];
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const ptrdiff_t nb = K / PP_QB;
    const __m256i low4 = _mm256_set1_epi8(15), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (ptrdiff_t g = 0; g < nb; g += 8) {
        const ptrdiff_t n = nb - g < 8 ? nb - g : 8;
        __m256i lo[4], hi[4];
        for (int k = 0; k < 4; k++) {
            const uint8_t *pk = p + (g + 2 * k) * (PP_QB / 2);
            const __m256i v = 2 * k + 1 < n ? _mm256_loadu_si256((const __m256i *)pk)
                            : 2 * k < n ? _mm256_inserti128_si256(_mm256_setzero_si256(),
                                                                  _mm_loadu_si128((const __m128i *)pk), 0)
                                        : _mm256_setzero_si256();
            lo[k] = _mm256_and_si256(v, low4);
            hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
        const __m256 dw = PP_V(scales8)(d + g, n);
        const int half = (int)((g / 8) & 1);
        for (int t = 0; t < NT; t++) {
            __m256i U[4];
            for (int k = 0; k < 4; k++) {
                const int8_t *xq = x[t].q + pp_xq_pos(PP_XQ_Q4, g + 2 * k, 0);
#if PP_V_VNNI
                U[k] = PP_V(dp4)(PP_V(dp4)(_mm256_setzero_si256(), lo[k], _mm256_loadu_si256((const __m256i *)xq)),
                                 hi[k], _mm256_loadu_si256((const __m256i *)(xq + 64)));
#else   /* lo and hi products of a lane summed in int16 first: 4 x 15 x 127 fits */
                const __m256i s16 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo[k], _mm256_loadu_si256((const __m256i *)xq)),
                    _mm256_maddubs_epi16(hi[k], _mm256_loadu_si256((const __m256i *)(xq + 64))));
                U[k] = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
            }
            const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(U[0], U[1]), _mm256_hadd_epi32(U[2], U[3]));
            const __m256i S = _mm256_sub_epi32(_mm256_permutevar8x32_epi32(h, order),
                                               _mm256_loadu_si256((const __m256i *)(x[t].c + g)));
            const __m256 scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x[t].d + g));
            acc[t][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), scale, acc[t][half]);
        }
    }
    for (int t = 0; t < NT; t++) y[t * ldy] = PP_V(tree)(acc[t][0], acc[t][1]);
}

static inline void PP_V(dotn_int)(int fmt, const void *row, const uint16_t *d, const pp_xq *x, ptrdiff_t K,
                           ptrdiff_t T, float *y, ptrdiff_t ldy) {
    for (ptrdiff_t t0 = 0; t0 < T; t0 += PP_TB) {
        const int nt = (int)(T - t0 < PP_TB ? T - t0 : PP_TB);
        const pp_xq *xt = x + t0;
        float *yt = y + t0 * ldy;
        if (fmt == PP_Q8) {
#define PP_C(N) PP_V(dotn_q8i)((const int8_t *)row, d, xt, K, N, yt, ldy)
            PP_CASES_TB(PP_C)
#undef PP_C
        } else {
#define PP_C(N) PP_V(dotn_q4i)((const uint8_t *)row, d, xt, K, N, yt, ldy)
            PP_CASES_TB(PP_C)
#undef PP_C
        }
    }
}

/* ---- weight panels (layout in _panel_impl.h): rows 8h .. 8h+7 of a panel are bytes 32h .. 32h+31 of
 * each 64-byte vector, so a panel is two halves of 8 rows, each an int32 lane per row. */

static inline __attribute__((always_inline)) __m256i PP_V(bcst4)(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Exact sums of one block of 8 rows (half h of the block at wb) against the token block xb, less c
 * where the operand was biased. */
static inline __attribute__((always_inline)) __m256i
PP_V(panel_isum)(const int Q8, const uint8_t *wb, int h, const int8_t *xb, int32_t c) {
    if (Q8) {
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int k = 0; k < 8; k += 2) {
            const __m256i u0 = _mm256_loadu_si256((const __m256i *)(wb + 64 * k + 32 * h));
            const __m256i u1 = _mm256_loadu_si256((const __m256i *)(wb + 64 * (k + 1) + 32 * h));
#if PP_V_VNNI
            s0 = PP_V(dp4)(s0, u0, PP_V(bcst4)(xb + 4 * k));
            s1 = PP_V(dp4)(s1, u1, PP_V(bcst4)(xb + 4 * k + 4));
#else       /* stored as w + 128: back to signed, |w| unsigned and w's sign on the activations */
            const __m256i bias = _mm256_set1_epi8((char)0x80);
            const __m256i w0 = _mm256_xor_si256(u0, bias), w1 = _mm256_xor_si256(u1, bias);
            s0 = PP_V(dp4)(s0, _mm256_abs_epi8(w0), _mm256_sign_epi8(PP_V(bcst4)(xb + 4 * k), w0));
            s1 = PP_V(dp4)(s1, _mm256_abs_epi8(w1), _mm256_sign_epi8(PP_V(bcst4)(xb + 4 * k + 4), w1));
#endif
        }
#if PP_V_VNNI
        return _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_set1_epi32(c));
#else
        (void)c;
        return _mm256_add_epi32(s0, s1);
#endif
    }
    const __m256i low4 = _mm256_set1_epi8(15);
#if PP_V_VNNI
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int v = 0; v < 4; v++) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(wb + 64 * v + 32 * h));
        s0 = PP_V(dp4)(s0, _mm256_and_si256(u, low4), PP_V(bcst4)(xb + 4 * v));
        s1 = PP_V(dp4)(s1, _mm256_and_si256(_mm256_srli_epi16(u, 4), low4), PP_V(bcst4)(xb + 16 + 4 * v));
    }
    return _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_set1_epi32(c));
#else   /* all 8 pair sums of a lane in int16 (8 x 2 x 15 x 127 < 32767), one widening */
    __m256i s16 = _mm256_setzero_si256();
    for (int v = 0; v < 4; v++) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(wb + 64 * v + 32 * h));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(u, low4), PP_V(bcst4)(xb + 4 * v)));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), low4),
                                                          PP_V(bcst4)(xb + 16 + 4 * v)));
    }
    return _mm256_sub_epi32(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)), _mm256_set1_epi32(c));
#endif
}

/* Up to PP_TB tokens against one panel (rows r < m stored to y[t * ldy + r]); acc: [nt][16 lanes][16
 * rows] floats of scratch (the 32 accumulator vectors per token do not fit in 16 registers). next (or
 * NULL): the next panel, prefetched towards L2 block by block, as the AVX-512 kernel does. */
static inline __attribute__((always_inline)) void
PP_V(panel_multi)(const int Q8, const uint8_t *W, const uint16_t *S, const pp_xq *x, int nt, ptrdiff_t nb,
                  float *y, ptrdiff_t ldy, int m, const uint8_t *next, float *acc) {
    const ptrdiff_t bb = Q8 ? 512 : 256;
    memset(acc, 0, (size_t)nt * 256 * sizeof(float));
    for (ptrdiff_t b = 0; b < nb; b++) {
        const uint8_t *wb = W + b * bb;
        if (next)
            for (ptrdiff_t c = 0; c < bb; c += 64) _mm_prefetch((const char *)next + b * bb + c, _MM_HINT_T1);
        const int l = (int)(b % 16);
        for (int h = 0; h < 2; h++) {
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(S + b * 16 + 8 * h)));
            for (int t = 0; t < nt; t++) {
                const __m256i s = PP_V(panel_isum)(Q8, wb, h, x[t].q + b * PP_QB, x[t].c[b]);
                const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].d[b]));
                float *a = acc + t * 256 + l * 16 + 8 * h;
                _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, _mm256_loadu_ps(a)));
            }
        }
    }
    for (int t = 0; t < nt; t++) {   /* pp_lane_tree over lanes, 8 rows per vector */
        float out[16];
        for (int h = 0; h < 2; h++) {
            const float *a = acc + t * 256 + 8 * h;
            __m256 s8[8], s4[4];
            for (int i = 0; i < 8; i++) s8[i] = _mm256_add_ps(_mm256_loadu_ps(a + 16 * i), _mm256_loadu_ps(a + 16 * (i + 8)));
            for (int i = 0; i < 4; i++) s4[i] = _mm256_add_ps(s8[i], s8[i + 4]);
            _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(_mm256_add_ps(s4[0], s4[2]), _mm256_add_ps(s4[1], s4[3])));
        }
        for (int r = 0; r < m; r++) y[t * ldy + r] = out[r];
    }
}

static inline void PP_V(gemm_panel)(int fmt, const uint8_t *W, const uint16_t *S, const pp_xq *x, ptrdiff_t T,
                             ptrdiff_t nb, float *y, ptrdiff_t ldy, int m, const uint8_t *next) {
    float acc[PP_TB * 256] __attribute__((aligned(32)));
    for (ptrdiff_t t0 = 0; t0 < T; t0 += PP_TB) {
        const int nt = (int)(T - t0 < PP_TB ? T - t0 : PP_TB);
        const uint8_t *nx = t0 == 0 ? next : NULL;
        if (fmt == PP_Q8) PP_V(panel_multi)(1, W, S, x + t0, nt, nb, y + t0 * ldy, ldy, m, nx, acc);
        else PP_V(panel_multi)(0, W, S, x + t0, nt, nb, y + t0 * ldy, ldy, m, nx, acc);
    }
}

#if !PP_V_VNNI
/* One 32-block of the quantizer of _int8_impl.h (pp_xq_quantize), the same operations on 8 lanes:
 * q_j = nearbyint(x_j * id) clamped to +-127, d = amax / 127, c = bias * sum(q). -> 0 (nothing written)
 * for a block with NaN or inf, which the scalar code handles. */
static inline int PP_V(xq_block)(const float *xb, int8_t *q_lo, int8_t *q_hi, float *d, int32_t *c,
                                 int32_t bias) {
    __m256 v[4];
    int unord = 0;
    __m256 ax = _mm256_setzero_ps();
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        unord |= _mm256_movemask_ps(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
        ax = _mm256_max_ps(ax, _mm256_and_ps(v[i], absmask));
    }
    if (unord) return 0;
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(ax), _mm256_extractf128_ps(ax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    if (!(amax <= FLT_MAX)) return 0;
    const float db = amax / 127.0f;
    const __m256 id = _mm256_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
    const __m256 lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    __m256i qi[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        qi[i] = _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, lim), nlim));
        sum = _mm256_add_epi32(sum, qi[i]);
    }
    /* values fit int8, so the saturating packs are exact; they interleave 128-bit lanes, the permute
     * restores element order */
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm_storeu_si128((__m128i *)q_lo, _mm256_castsi256_si128(bytes));
    _mm_storeu_si128((__m128i *)q_hi, _mm256_extracti128_si256(bytes, 1));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    *d = db;
    *c = bias * _mm_cvtsi128_si32(s4);
    return 1;
}
#endif
