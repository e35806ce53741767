/* Integer dots over weight PANELS: q4 / q8 matrices repacked in groups of 16 rows so that one 64-byte
 * vector holds 4 consecutive weights of each of the 16 rows. A VNNI dot (vpdpbusd) of such a vector with
 * 4 activation bytes broadcast to every lane then sums into one int32 lane PER ROW: 16 rows advance
 * together and no horizontal reduction is ever needed. The row-major kernel (_int8_impl.h) sums each
 * 32-block across lanes with three rounds of shuffles per 16 blocks and token, ~34 vector operations per
 * 16 blocks of one row; a panel costs 12 per block of 16 rows (8 dots, the correction, the conversion,
 * the scale, one fma): ~2.8x less work per weight and token, which is what a forward over several
 * tokens pays for (speculative verification, several requests). One token runs pp_panel_tok_v (its 16
 * accumulators in registers); several run pp_panel_multi_v (each block's weights loaded once for up to 8
 * tokens). One Zen 5 core, q8 4864x896 from cache, 16 tokens: 144 GMAC/s token by token, 213 multi.
 *
 * The arithmetic is pipower.intdot's, bit for bit (the same as the row-major kernel's): exact int32 block
 * sums, lane b % 16 of a row's 16 float accumulators takes fma(float(isum_b), dw_b * dx_b, acc) in block
 * order, the fixed tree at the end. Here "lane l of row r" is vector acc[l], element r: the tree adds
 * whole vectors, so it is the same tree.
 *
 * Panel layout (pipower/panels.py packs it), panel p = rows 16p .. 16p + 15 (rows past N: zero weights,
 * zero scales), nb = K / 32 blocks:
 *   q8 data [P][nb][8][16][4] uint8: chunk c (weights 4c .. 4c+3 of the block) of row r = w + 128
 *      (VNNI's unsigned operand; the activations' c = 128 sum(q) corrects it)
 *   q4 data [P][nb][4][16][4] uint8: byte i of row r in vector v = nibble(4v + i) | nibble(16 + 4v + i) << 4
 *      (nibbles are w + 8, as stored in q4; the activations' c = 8 sum(q) corrects them)
 *   scales [P][nb][16] float16 (dw of each row's block)
 * Activations: pp_xq in element order (PP_XQ_Q8 for q8, PP_XQ_Q4E for q4).
 */
#ifndef PIPOWER_PANEL_IMPL_H
#define PIPOWER_PANEL_IMPL_H

#include <stdlib.h>

#include "_int8_impl.h"

#define PP_PANEL 16   /* rows per panel */
/* Tokens per pass over a panel from 16 tokens on (fewer: passes of up to PP_TB = 8, the last one
 * shorter): each block's weights are loaded (q4: unpacked) once for 16 tokens instead of 8, with 16 KiB of
 * accumulators in L1. Same operations per (token, row), so the same bits. Measured on an Ice Lake Xeon VM
 * (bench/ab_builds.py, both builds in one process, 7 rounds, Qwen2.5-Coder-0.5B, 2 threads): forwards of
 * T = 16 / 32 / 64 tokens 9 / 6 / 7% faster for q4, 6 / 16 / 13% for q8; 32-token passes gained nothing
 * more (T = 64 +-0%, one core at T = 512 2.5% slower than 16). */
#ifndef PP_PANEL_TILE
#define PP_PANEL_TILE 16
#endif

static inline ptrdiff_t pp_panel_block_bytes(int fmt) { return fmt == PP_Q8 ? 512 : 256; }   /* 16 rows x 32 */

/* A tile of nt tokens' activations laid out token-major within each block (pp_xtm_fill): q [nb][nt][32],
 * d [nb][nt], nc [nb][nt] = -c. One pointer reaches every token of a block at a constant offset (no
 * per-token pointer loads), and -c starts each block's first dot chain (no subtraction). */
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *nc;
} pp_xtm;

/* Where a pass prefetches what comes after its panels: nbb bytes per block from next, and as many from
 * next2 when it is not NULL (a gated FFN's pass: the next gate panel and the next up panel). */
typedef struct {
    const uint8_t *next, *next2;
    ptrdiff_t nbb;
} pp_ahead;

static inline ptrdiff_t pp_xtm_bytes(ptrdiff_t nb, int nt) { return nb * nt * (PP_QB + 8); }

static inline pp_xtm pp_xtm_fill(const pp_xq *x, int nt, ptrdiff_t nb, char *buf) {
    int8_t *q = (int8_t *)buf;
    float *d = (float *)(buf + nb * nt * PP_QB);
    int32_t *nc = (int32_t *)(d + nb * nt);
    for (ptrdiff_t b = 0; b < nb; b++)
        for (int t = 0; t < nt; t++) {
            memcpy(q + (b * nt + t) * PP_QB, x[t].q + b * PP_QB, PP_QB);
            d[b * nt + t] = x[t].d[b];
            nc[b * nt + t] = -x[t].c[b];     /* |c| <= 128 * 32 * 127: no overflow */
        }
    pp_xtm v = {q, d, nc};
    return v;
}

/* Portable: rows r < m of one panel against one token, y[r]. */
static PP_NOINLINE void pp_panel_tok_c(int fmt, const uint8_t *W, const uint16_t *S, pp_xq x, ptrdiff_t nb,
                                       float *y, int m) {
    const ptrdiff_t bb = pp_panel_block_bytes(fmt);
    for (int r = 0; r < m; r++) {
        float acc[16] = {0};
        for (ptrdiff_t b = 0; b < nb; b++) {
            const uint8_t *wb = W + b * bb;
            const int8_t *xb = x.q + b * PP_QB;
            int32_t s = 0;
            if (fmt == PP_Q8) {
                for (int c = 0; c < 8; c++)
                    for (int i = 0; i < 4; i++) s += (int32_t)wb[c * 64 + r * 4 + i] * xb[4 * c + i];
            } else {
                for (int v = 0; v < 4; v++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t u = wb[v * 64 + r * 4 + i];
                        s += (int32_t)(u & 15) * xb[4 * v + i] + (int32_t)(u >> 4) * xb[16 + 4 * v + i];
                    }
            }
            s -= x.c[b];
            const float scale = pp_h2f(S[b * PP_PANEL + r]) * x.d[b];
            acc[b % 16] = fmaf((float)s, scale, acc[b % 16]);
        }
        y[r] = pp_lane_tree(acc);
    }
}

#if PP_HAVE_VNNI512
/* One block of a panel as VNNI's unsigned operand: w[c] meets activation bytes 4c .. 4c+3 (q4: vector
 * v's low nibbles are elements 4v.., its high ones 16 + 4v..). */
static inline __attribute__((always_inline)) void pp_panel_load(const int Q8, const uint8_t *wb, __m512i w[8]) {
    if (Q8) {
        for (int c = 0; c < 8; c++) w[c] = _mm512_loadu_si512(wb + 64 * c);
        return;
    }
    const __m512i low4 = _mm512_set1_epi8(15);
    for (int v = 0; v < 4; v++) {
        const __m512i u = _mm512_loadu_si512(wb + 64 * v);
        w[v] = _mm512_and_si512(u, low4);
        w[4 + v] = _mm512_and_si512(_mm512_srli_epi16(u, 4), low4);
    }
}

static inline __m512i pp_bcst4(const int8_t *p) {   /* 4 activation bytes to every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Exact block sums of the 16 rows against one token's block xb, plus init (zero: still biased by c; -c:
 * the true sums, one vector operation and one zeroing copy fewer): 8 dots, two chains.
 * Dot c needs activation bytes 4c .. 4c+3 in every 32-bit lane. SHUF = 0: 8 broadcast loads. SHUF = 1:
 * each 16-byte half of xb loaded once into all four 128-bit lanes and vpshufd picks the dword, 2 loads
 * and 8 in-lane shuffles: with 4 or more tokens per block the broadcasts kept the load ports busy (q8
 * 4864x896 from L3, one Zen 5 core: 2.4 -> 2.1 ns per block and token at T = 8, 2.9 -> 2.6 at T = 4),
 * while with 1 or 2 tokens, streaming from DRAM, the shuffles' longer path to the first dot cost 5-14%
 * (at 3, within noise either way). */
static inline __attribute__((always_inline)) __m512i pp_panel_isum(const int SHUF, const __m512i w[8],
                                                                  const int8_t *xb, __m512i init) {
    __m512i s0, s1;
    if (!SHUF) {
        s0 = _mm512_dpbusd_epi32(init, w[0], pp_bcst4(xb));
        s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], pp_bcst4(xb + 4));
        for (int c = 2; c < 8; c += 2) {
            s0 = _mm512_dpbusd_epi32(s0, w[c], pp_bcst4(xb + 4 * c));
            s1 = _mm512_dpbusd_epi32(s1, w[c + 1], pp_bcst4(xb + 4 * c + 4));
        }
        return _mm512_add_epi32(s0, s1);
    }
    const __m512i lo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)xb));
    const __m512i hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 16)));
    s0 = _mm512_dpbusd_epi32(init, w[0], _mm512_shuffle_epi32(lo, _MM_PERM_AAAA));
    s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_shuffle_epi32(lo, _MM_PERM_BBBB));
    s0 = _mm512_dpbusd_epi32(s0, w[2], _mm512_shuffle_epi32(lo, _MM_PERM_CCCC));
    s1 = _mm512_dpbusd_epi32(s1, w[3], _mm512_shuffle_epi32(lo, _MM_PERM_DDDD));
    s0 = _mm512_dpbusd_epi32(s0, w[4], _mm512_shuffle_epi32(hi, _MM_PERM_AAAA));
    s1 = _mm512_dpbusd_epi32(s1, w[5], _mm512_shuffle_epi32(hi, _MM_PERM_BBBB));
    s0 = _mm512_dpbusd_epi32(s0, w[6], _mm512_shuffle_epi32(hi, _MM_PERM_CCCC));
    s1 = _mm512_dpbusd_epi32(s1, w[7], _mm512_shuffle_epi32(hi, _MM_PERM_DDDD));
    return _mm512_add_epi32(s0, s1);
}

/* The block at byte `at` of the next panel (none when next is NULL) into L1, while this one computes. T0,
 * not T1 (L2 only, until session 20): in-process A/B on the Ice Lake VM, 2 threads, one-token forwards
 * 0.931 (0.5B q4), 0.974 (0.5B q8), 0.951 (1.5B q4), 0.997 (SmolLM2 q4), 8-token ones 0.998-1.02; the
 * panel after this one fits in L1 beside its own (7-39 KB). NTA measured 1.55x slower. */
static inline __attribute__((always_inline)) void pp_panel_prefetch(const uint8_t *next, ptrdiff_t at,
                                                                   ptrdiff_t bytes) {
    if (next)
        for (ptrdiff_t c = 0; c < bytes; c += 64) _mm_prefetch((const char *)next + at + c, _MM_HINT_T0);
}

/* y[r] for rows r < m: the fixed lane tree over the 16 accumulator vectors (acc[l] = lane l of 16 rows). */
static inline __attribute__((always_inline)) void pp_panel_tree_store(const __m512 acc[16], float *y, int m) {
    __m512 s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = _mm512_add_ps(acc[i], acc[i + 8]);
    for (int i = 0; i < 4; i++) s4[i] = _mm512_add_ps(s8[i], s8[i + 4]);
    const __m512 r = _mm512_add_ps(_mm512_add_ps(s4[0], s4[2]), _mm512_add_ps(s4[1], s4[3]));
    _mm512_mask_storeu_ps(y, (__mmask16)(m >= 16 ? 0xFFFF : ((1u << m) - 1)), r);
}

/* Rows r < m of one panel against one token: y[r]. Q8 is a compile-time constant after inlining.
 * next (or NULL): the next panel's data, prefetched block by block (see pp_panel_multi_v). */
static inline __attribute__((always_inline)) void
pp_panel_tok_v(const int Q8, const uint8_t *W, const uint16_t *S, pp_xq x, ptrdiff_t nb, float *y, int m,
               const uint8_t *next) {
    const ptrdiff_t bb = pp_panel_block_bytes(Q8 ? PP_Q8 : PP_Q4);
    __m512 acc[16];
    for (int l = 0; l < 16; l++) acc[l] = _mm512_setzero_ps();
    for (ptrdiff_t g = 0; g < nb; g += 16) {
        const int n = nb - g < 16 ? (int)(nb - g) : 16;
#pragma GCC unroll 16
        for (int l = 0; l < 16; l++) {
            if (l < n) {
                const ptrdiff_t b = g + l;
                pp_panel_prefetch(next, b * bb, bb);
                __m512i w[8];
                pp_panel_load(Q8, W + b * bb, w);
                const __m512i s = _mm512_sub_epi32(pp_panel_isum(0, w, x.q + b * PP_QB, _mm512_setzero_si512()),
                                                    _mm512_set1_epi32(x.c[b]));
                const __m512 scale = _mm512_mul_ps(
                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S + b * PP_PANEL))), _mm512_set1_ps(x.d[b]));
                acc[l] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[l]);
            }
        }
    }
    pp_panel_tree_store(acc, y, m);
}
/* The float tail of one (block, token): the lane a (16 rows) += float(s) * (dw * dx). FIRST (a constant):
 * the lane's first block, whose accumulator is +0.0 (a register, not a load of zeroed memory: the same
 * fma, the same bits), so the lanes need no zeroing beforehand. */
static inline __attribute__((always_inline)) void pp_panel_tail(const int FIRST, __m512i s, __m512 dw, float dx,
                                                                float *a) {
    const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
    const __m512 prev = FIRST ? _mm512_setzero_ps() : _mm512_load_ps(a);
    _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, prev));
}

/* Block b of one panel (weights w, scales dw) against token t, added to its lane (token 0's lane + 256 t). */
static inline __attribute__((always_inline)) void
pp_panel_multi_tok(const __m512i w[8], __m512 dw, const pp_xq *x, int t, ptrdiff_t b, float *lane) {
    const __m512i s = _mm512_sub_epi32(pp_panel_isum(0, w, x[t].q + b * PP_QB, _mm512_setzero_si512()),
                                       _mm512_set1_epi32(x[t].c[b]));
    pp_panel_tail(0, s, dw, x[t].d[b], lane + t * 256);
}

/* Block b of one panel against nt tokens, added to lane b % 16 of each token's accumulators (lane =
 * acc + (b % 16) * 16). FAST: nt is a constant and the token loop unrolls; otherwise the loop stays
 * rolled (GCC peeled it into 1..3 copies with branches once it knew nt <= 3: 10-15% slower at T = 2, 3). */
static inline __attribute__((always_inline)) void
pp_panel_multi_block(const int Q8, const int FAST, const int FIRST, const int nt, const uint8_t *W, const uint16_t *S,
                     const pp_xq *x, const pp_xtm *xt, ptrdiff_t b, float *lane, const uint8_t *next) {
    const ptrdiff_t bb = pp_panel_block_bytes(Q8 ? PP_Q8 : PP_Q4);
    pp_panel_prefetch(next, b * bb, bb);
    __m512i w[8];
    pp_panel_load(Q8, W + b * bb, w);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S + b * PP_PANEL)));
    if (FAST) {
        const int8_t *xb = xt->q + b * nt * PP_QB;
        const float *db = xt->d + b * nt;
        const int32_t *cb = xt->nc + b * nt;
        for (int t = 0; t < nt; t++)
            pp_panel_tail(FIRST, pp_panel_isum(1, w, xb + t * PP_QB, _mm512_set1_epi32(cb[t])), dw, db[t], lane + t * 256);
    } else {
#pragma GCC unroll 1
        for (int t = 0; t < nt; t++) pp_panel_multi_tok(w, dw, x, t, b, lane);
    }
}

/* Up to PP_PANEL_TILE tokens against one panel, the weights of each block loaded (and q4 unpacked) once
 * for all of them: 16 accumulators per token do not fit in registers for several tokens, so they live in
 * acc (L1, [nt][16 lanes][16 rows]) and each block adds to its lane there. Same operations per (token,
 * row) as pp_panel_tok_v, so the same bits. Per block and token: 8 dots, 5 other vector operations
 * and one accumulator load/store, against 8 weight loads (and for q4 12 unpacking operations) more per
 * token in pp_panel_tok_v.
 * next (or NULL): the next panel's data, prefetched (pp_panel_prefetch) block by block while this one
 * computes. With several tokens a panel is compute-bound (~0.5 ms per 70 M multiply-adds per core) and
 * the hardware prefetcher alone did not keep DRAM busy meanwhile: a T = 8 FFN cost the sum of its
 * compute and memory times, not the larger of the two.
 * FAST (a constant): 4 .. 8 or PP_PANEL_TILE tokens, nt a compile-time constant too (pp_panel_multi_nt):
 * the block loop rolled, the token loop unrolled, activations by shuffles (pp_panel_isum), 20% faster at
 * T = 4 and 8 from DRAM; the activations come token-major (xt, pp_xtm), which took another 5-10% off a
 * block and token on an Ice Lake core (docs/dev/PERF_NOTES.md section 14). Otherwise (1 .. 3 tokens,
 * counted at run time): the block loop unrolled 16 times (lane constant) and broadcast loads, 14% faster
 * at T = 2 than the FAST code (one thread from DRAM; at T = 3 the two measured within +-8%, either way
 * depending on the measure). */
static inline __attribute__((always_inline)) void
pp_panel_multi_v(const int Q8, const int FAST, const int nt, const uint8_t *W, const uint16_t *S, const pp_xq *x,
                 const pp_xtm *xt, ptrdiff_t nb, float *y, ptrdiff_t ldy, int m, const uint8_t *next, float *acc) {
    if (!FAST) {
        memset(acc, 0, (size_t)nt * 256 * sizeof(float));
        for (ptrdiff_t g = 0; g < nb; g += 16) {
            const int n = nb - g < 16 ? (int)(nb - g) : 16;
#pragma GCC unroll 16
            for (int l = 0; l < 16; l++)
                if (l < n) pp_panel_multi_block(Q8, 0, 0, nt, W, S, x, NULL, g + l, acc + l * 16, next);
        }
    } else {
        /* blocks 0 .. 15 start their lanes (pp_panel_tail's FIRST); lanes no block reaches are zeroed */
        if (nb < 16) memset(acc, 0, (size_t)nt * 256 * sizeof(float));
        const ptrdiff_t nb0 = nb < 16 ? nb : 16;
        for (ptrdiff_t b = 0; b < nb0; b++)
            pp_panel_multi_block(Q8, 1, 1, nt, W, S, NULL, xt, b, acc + b * 16, next);
        for (ptrdiff_t b = nb0; b < nb; b++)
            pp_panel_multi_block(Q8, 1, 0, nt, W, S, NULL, xt, b, acc + (b % 16) * 16, next);
    }
    for (int t = 0; t < nt; t++) {
        __m512 a[16];
        for (int l = 0; l < 16; l++) a[l] = _mm512_load_ps(acc + t * 256 + l * 16);
        pp_panel_tree_store(a, y + t * ldy, m);
    }
}

/* pp_panel_multi_v for nt = 4 .. PP_TB and PP_PANEL_TILE with nt and Q8 as constants, one unrolled copy
 * per token count (independent dot chains of several tokens interleave; 5% at T = 4 and 8). Fewer
 * tokens run inline in pp_gemm_panels on pp_panel_multi_v's run-time-count code (FAST = 0). */
#define PP_MULTI_CASE(Q8, NT) case NT: pp_panel_multi_v(Q8, 1, NT, W, S, NULL, xt, nb, y, ldy, m, next, acc); break;
#define PP_MULTI_SWITCH(Q8) switch (nt) { PP_MULTI_CASE(Q8, 4) PP_MULTI_CASE(Q8, 5) PP_MULTI_CASE(Q8, 6) \
    PP_MULTI_CASE(Q8, 7) PP_MULTI_CASE(Q8, 8) \
    default: pp_panel_multi_v(Q8, 1, PP_PANEL_TILE, W, S, NULL, xt, nb, y, ldy, m, next, acc); }
static PP_NOINLINE void pp_panel_multi_nt(int fmt, int nt, const uint8_t *W, const uint16_t *S, const pp_xtm *xt,
                                          ptrdiff_t nb, float *y, ptrdiff_t ldy, int m, const uint8_t *next,
                                          float *acc) {
    if (fmt == PP_Q8) { PP_MULTI_SWITCH(1) } else { PP_MULTI_SWITCH(0) }
}
#undef PP_MULTI_SWITCH
#undef PP_MULTI_CASE

/* Passes over PAIRS of panels: each activation dword, broadcast once, feeds both panels' dots. On the Ice
 * Lake VM every 512-bit operation beside the dots costs them ~0.5-1 cycle (docs/dev/PERF_NOTES.md section
 * 15), and with 4-bit weights the eight shuffles per block and token were the largest share of them:
 * sharing them over two panels took q4 4864x896 GEMMs from DRAM, 2 threads, 5-15% faster at 5-8 tokens
 * and 15-28% at 16 (C harness, same bits); q8 gained only at 16 tokens, and lost 2-8% at 5-6. In the
 * model (bench/ab_builds.py, both builds in one process, Qwen2.5-Coder-0.5B, 2 threads, medians of
 * per-round ratios): q4 forwards of T = 8 / 16 0.87 / 0.87 of the time (0.83 / 0.90 with the split of
 * pp_panel_pair_isum), T = 5 1.00; q8 T = 64 0.86, T = 16 1.00. q4 pairs from 4 tokens since session 21
 * (after the lanes stopped being zeroed): 4864x896 one thread 0.87, 0.5B forwards 0.97-0.985, SmolLM2
 * 1.00. The 16 weight vectors stay in registers
 * (a session-18 version with one panel's weights as memory operands was 13-16% slower). A pass of nt
 * tokens runs on a pair when pp_panel_pairs(fmt, nt); every count from PP_PAIR_MIN_* on has a compiled
 * case below. */
#ifndef PP_PAIR_MIN_Q4
#define PP_PAIR_MIN_Q4 4
#endif
#ifndef PP_PAIR_MIN_Q8
#define PP_PAIR_MIN_Q8 PP_PANEL_TILE
#endif
static inline int pp_panel_pairs(int fmt, int nt) {
    return nt >= (fmt == PP_Q8 ? PP_PAIR_MIN_Q8 : PP_PAIR_MIN_Q4);
}

/* pp_panel_isum for two panels' weights w and v at once: *sw, *sv. Activation dwords 0-3 come as
 * broadcast loads, 4-7 by shuffles of the second half: on the Ice Lake VM a broadcast load beside every
 * second dot cost the dots nothing, where one per dot or a shuffle per dot did (the load ports, and the
 * shuffle port's share; bench/c/vnni_mix.c). Against shuffles for all eight, q4 4864x896 GEMMs from DRAM
 * (2 threads, C harness, same bits): 0.80-0.93 of the time at 8 tokens, 0.87-0.90 at 16. With one panel
 * per pass (a broadcast per dot) the same split measured 0.98-1.14. */
static inline __attribute__((always_inline)) void pp_panel_pair_isum(const __m512i w[8], const __m512i v[8],
                                                                    const int8_t *xb, __m512i init,
                                                                    __m512i *sw, __m512i *sv) {
    const __m512i hi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + 16)));
    const __m512i a[8] = {pp_bcst4(xb), pp_bcst4(xb + 4), pp_bcst4(xb + 8), pp_bcst4(xb + 12),
                          _mm512_shuffle_epi32(hi, _MM_PERM_AAAA), _mm512_shuffle_epi32(hi, _MM_PERM_BBBB),
                          _mm512_shuffle_epi32(hi, _MM_PERM_CCCC), _mm512_shuffle_epi32(hi, _MM_PERM_DDDD)};
    __m512i s0 = init, u0 = init, s1 = _mm512_setzero_si512(), u1 = _mm512_setzero_si512();
    for (int c = 0; c < 8; c += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[c], a[c]);
        u0 = _mm512_dpbusd_epi32(u0, v[c], a[c]);
        s1 = _mm512_dpbusd_epi32(s1, w[c + 1], a[c + 1]);
        u1 = _mm512_dpbusd_epi32(u1, v[c + 1], a[c + 1]);
    }
    *sw = _mm512_add_epi32(s0, s1);
    *sv = _mm512_add_epi32(u0, u1);
}

/* Block b of the panel pair (pp_panel_pair_v) against nt tokens: each token's two lanes (acc, acc2) take
 * the block's tails; FIRST (a constant): blocks 0 .. 15, which start their lanes. */
static inline __attribute__((always_inline)) void
pp_panel_pair_block(const int Q8, const int FIRST, const int nt, const uint8_t *W, const uint16_t *S,
                    const uint8_t *W2, const uint16_t *S2, const pp_xtm *xt, ptrdiff_t b, pp_ahead ahead, float *acc,
                    float *acc2) {
    const ptrdiff_t bb = pp_panel_block_bytes(Q8 ? PP_Q8 : PP_Q4);
    pp_panel_prefetch(ahead.next, b * ahead.nbb, ahead.nbb);
    pp_panel_prefetch(ahead.next2, b * ahead.nbb, ahead.nbb);
    __m512i w[8], v[8];
    pp_panel_load(Q8, W + b * bb, w);
    pp_panel_load(Q8, W2 + b * bb, v);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S + b * PP_PANEL)));
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S2 + b * PP_PANEL)));
    const int8_t *xb = xt->q + b * nt * PP_QB;
    const float *db = xt->d + b * nt;
    const int32_t *cb = xt->nc + b * nt;
    const ptrdiff_t lane = (b % 16) * 16;
    for (int t = 0; t < nt; t++) {
        __m512i sw, sv;
        pp_panel_pair_isum(w, v, xb + t * PP_QB, _mm512_set1_epi32(cb[t]), &sw, &sv);
        pp_panel_tail(FIRST, sw, dw, db[t], acc + lane + t * 256);
        pp_panel_tail(FIRST, sv, dv, db[t], acc2 + lane + t * 256);
    }
}

/* Panels W (16 rows) and W2 (rows r < m2; scales S and S2) against nt tokens (a constant after
 * inlining), activations token-major (xt): pp_panel_multi_v's FAST code for both at once, so each (row,
 * token) gets the same operations and bits. acc: [2][nt][16 lanes][16 rows] floats. next (or NULL):
 * what follows the pair, nbb bytes of it prefetched per block (nb blocks cover it). */
static inline __attribute__((always_inline)) void
pp_panel_pair_v(const int Q8, const int nt, const uint8_t *W, const uint16_t *S, const uint8_t *W2,
                const uint16_t *S2, const pp_xtm *xt, ptrdiff_t nb, float *y, ptrdiff_t ldy, int m2, pp_ahead ahead,
                float *acc) {
    float *acc2 = acc + nt * 256;
    /* blocks 0 .. 15 start their lanes (pp_panel_tail's FIRST); lanes no block reaches are zeroed */
    if (nb < 16) memset(acc, 0, (size_t)nt * 512 * sizeof(float));
    const ptrdiff_t nb0 = nb < 16 ? nb : 16;
    for (ptrdiff_t b = 0; b < nb0; b++)
        pp_panel_pair_block(Q8, 1, nt, W, S, W2, S2, xt, b, ahead, acc, acc2);
    for (ptrdiff_t b = nb0; b < nb; b++)
        pp_panel_pair_block(Q8, 0, nt, W, S, W2, S2, xt, b, ahead, acc, acc2);
    for (int t = 0; t < nt; t++) {
        __m512 a[16];
        for (int l = 0; l < 16; l++) a[l] = _mm512_load_ps(acc + t * 256 + l * 16);
        pp_panel_tree_store(a, y + t * ldy, PP_PANEL);
        for (int l = 0; l < 16; l++) a[l] = _mm512_load_ps(acc2 + t * 256 + l * 16);
        pp_panel_tree_store(a, y + t * ldy + PP_PANEL, m2);
    }
}
#define PP_PAIR_CASE(Q8, NT) case NT: pp_panel_pair_v(Q8, NT, W, S, W2, S2, xt, nb, y, ldy, m2, ahead, acc); break;
static PP_NOINLINE void pp_panel_pair_nt(int fmt, int nt, const uint8_t *W, const uint16_t *S, const uint8_t *W2,
                                         const uint16_t *S2, const pp_xtm *xt, ptrdiff_t nb, float *y, ptrdiff_t ldy,
                                         int m2, pp_ahead ahead, float *acc) {
    if (fmt == PP_Q8) {
        switch (nt) { PP_PAIR_CASE(1, 5) PP_PAIR_CASE(1, 6) PP_PAIR_CASE(1, 7) PP_PAIR_CASE(1, 8)
                      default: pp_panel_pair_v(1, PP_PANEL_TILE, W, S, W2, S2, xt, nb, y, ldy, m2, ahead, acc); }
    } else {
        switch (nt) { PP_PAIR_CASE(0, 4) PP_PAIR_CASE(0, 5) PP_PAIR_CASE(0, 6) PP_PAIR_CASE(0, 7) PP_PAIR_CASE(0, 8)
                      default: pp_panel_pair_v(0, PP_PANEL_TILE, W, S, W2, S2, xt, nb, y, ldy, m2, ahead, acc); }
    }
}
#undef PP_PAIR_CASE
#endif /* PP_HAVE_VNNI512 */

/* q4m's offset term (pipower.quant: w = (nibble - 8) d + o per block), after a panel's dots: for rows
 * r < m of one panel against one token, y[r] += off_r with off_r = fma(o_rb, xs_b, off_r) over the blocks
 * in order from 0 and xs_b = (float)(sum of the block's q) * dx_b (c = 8 sum q for q4 activations). A
 * 1/32 of the dots' multiply-adds, kept out of their kernels: one pass for every instruction level, the
 * same per-row fma chain in each of its three codes (16-wide, two 8-wide halves, scalar), so the same
 * bits. pipower.intdot.dot is the reference. */
static inline float pp_panel_xs(pp_xq x, ptrdiff_t b) { return (float)(x.c[b] / 8) * x.d[b]; }

static PP_NOINLINE void pp_panel_offsets_c(const uint16_t *O, pp_xq x, ptrdiff_t nb, float *y, int m) {
    float off[PP_PANEL] = {0};
    for (ptrdiff_t b = 0; b < nb; b++) {
        const float xs = pp_panel_xs(x, b);
        for (int r = 0; r < PP_PANEL; r++) off[r] = fmaf(pp_h2f(O[b * PP_PANEL + r]), xs, off[r]);
    }
    for (int r = 0; r < m; r++) y[r] = y[r] + off[r];
}

#if PP_HAVE_AVX512
static inline void pp_panel_offsets_512(const uint16_t *O, pp_xq x, ptrdiff_t nb, float *y, int m) {
    __m512 off = _mm512_setzero_ps();
    for (ptrdiff_t b = 0; b < nb; b++)
        off = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(O + b * PP_PANEL))),
                              _mm512_set1_ps(pp_panel_xs(x, b)), off);
    const __mmask16 k = (__mmask16)(m >= 16 ? 0xFFFF : ((1u << m) - 1));
    _mm512_mask_storeu_ps(y, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, y), off));
}
#endif

#if PP_HAVE_AVX2I
__attribute__((target("avx2,fma,f16c"))) static void
pp_panel_offsets_256(const uint16_t *O, pp_xq x, ptrdiff_t nb, float *y, int m) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (ptrdiff_t b = 0; b < nb; b++) {
        const __m256 xs = _mm256_set1_ps(pp_panel_xs(x, b));
        lo = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(O + b * PP_PANEL))), xs, lo);
        hi = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(O + b * PP_PANEL + 8))), xs, hi);
    }
    float off[PP_PANEL];
    _mm256_storeu_ps(off, lo);
    _mm256_storeu_ps(off + 8, hi);
    for (int r = 0; r < m; r++) y[r] = y[r] + off[r];
}
#endif

static inline void pp_panel_offsets(int isa, const uint16_t *O, pp_xq x, ptrdiff_t nb, float *y, int m) {
#if PP_HAVE_AVX512
    if (isa == PP_ISA_AVX512VNNI) { pp_panel_offsets_512(O, x, nb, y, m); return; }
#endif
#if PP_HAVE_AVX2I
    if (isa == PP_ISA_AVX2 || isa == PP_ISA_AVXVNNI) { pp_panel_offsets_256(O, x, nb, y, m); return; }
#endif
    (void)isa;
    pp_panel_offsets_c(O, x, nb, y, m);
}

/* Rows of panel p of a matrix of N rows (16, or fewer in the last panel). */
static inline int pp_panel_rows(ptrdiff_t N, ptrdiff_t p) {
    return N - p * PP_PANEL < PP_PANEL ? (int)(N - p * PP_PANEL) : PP_PANEL;
}

/* Tokens in the pass over a panel that starts at token t0 of T (AVX-512 VNNI multi-token code). */
static inline int pp_panel_pass_tokens(ptrdiff_t t0, ptrdiff_t T) {
    return T - t0 >= PP_PANEL_TILE ? PP_PANEL_TILE : T - t0 < PP_TB ? (int)(T - t0) : PP_TB;
}

#if PP_HAVE_VNNI512
/* One pass of nt tokens from t0 (activations xtk, pass k's token-major copy, or NULL) over panel p (rows
 * r < m) on AVX-512 VNNI: Y[t0 + t, p*16 + r]. nx: what to prefetch meanwhile, or NULL. */
static inline void pp_panel_pass_v(int fmt, const uint8_t *W, const uint16_t *S, ptrdiff_t nb, ptrdiff_t N,
                                   const pp_xq *x, const pp_xtm *xtk, ptrdiff_t t0, int nt, float *y, ptrdiff_t p,
                                   int m, const uint8_t *nx, float *acc) {
    float *yt = y + t0 * N + p * PP_PANEL;
    if (nt >= 4 && xtk) pp_panel_multi_nt(fmt, nt, W, S, xtk, nb, yt, N, m, nx, acc);
    else if (fmt == PP_Q8) pp_panel_multi_v(1, 0, nt, W, S, x + t0, NULL, nb, yt, N, m, nx, acc);
    else pp_panel_multi_v(0, 0, nt, W, S, x + t0, NULL, nb, yt, N, m, nx, acc);
}

/* Panels p (16 rows) and p + 1 (rows r < m2) against T tokens on AVX-512 VNNI with the token-major
 * activations xt: passes that pp_panel_pairs take both panels at once, the others each panel in turn.
 * next (or NULL): what follows the pair, nbb bytes per block of it prefetched in the first pass (the
 * largest, so a paired one whenever T pairs at all). */
static inline void pp_gemm_panel_pair(int fmt, const uint8_t *W, const uint16_t *S, const uint8_t *W2,
                                      const uint16_t *S2, ptrdiff_t nb, ptrdiff_t N, const pp_xq *x, const pp_xtm *xt,
                                      ptrdiff_t T, float *y, ptrdiff_t p, int m2, pp_ahead ahead) {
    float acc[2 * PP_PANEL_TILE * 256] __attribute__((aligned(64)));
    const pp_ahead none = {NULL, NULL, 0};
    int nt;
    for (ptrdiff_t t0 = 0, k = 0; t0 < T; t0 += nt, k++) {
        nt = pp_panel_pass_tokens(t0, T);
        if (pp_panel_pairs(fmt, nt)) {
            pp_panel_pair_nt(fmt, nt, W, S, W2, S2, xt + k, nb, y + t0 * N + p * PP_PANEL, N, m2, t0 == 0 ? ahead : none,
                             acc);
        } else {
            /* (xt[k] is laid out only for passes of 4 or more tokens; pp_panel_pass_v reads it only then) */
            pp_panel_pass_v(fmt, W, S, nb, N, x, xt + k, t0, nt, y, p, PP_PANEL, NULL, acc);
            pp_panel_pass_v(fmt, W2, S2, nb, N, x, xt + k, t0, nt, y, p + 1, m2, NULL, acc);
        }
    }
}
#endif

/* Y[t, p*16 + r] for panel p (weights W, scales S, rows r < m) against T tokens (Y [T, N] row stride N),
 * on the kernels of level isa (PP_ISA_*; _isa_impl.h). next: the next panel's data to prefetch, or NULL.
 * xt (AVX-512 VNNI, T > 1, or NULL): pass k's activations token-major (pp_xtm), for its passes of 4 or
 * more tokens; NULL runs those passes on the run-time-count code (the same bits, slower). */
static inline void pp_gemm_panel(int fmt, int isa, const uint8_t *W, const uint16_t *S, ptrdiff_t nb, ptrdiff_t N,
                                 const pp_xq *x, const pp_xtm *xt, ptrdiff_t T, float *y, ptrdiff_t p, int m,
                                 const uint8_t *next) {
#if PP_HAVE_VNNI512
    if (isa == PP_ISA_AVX512VNNI && T > 1) {
        float acc[PP_PANEL_TILE * 256] __attribute__((aligned(64)));
        int nt;
        for (ptrdiff_t t0 = 0, k = 0; t0 < T; t0 += nt, k++) {
            nt = pp_panel_pass_tokens(t0, T);
            pp_panel_pass_v(fmt, W, S, nb, N, x, xt ? xt + k : NULL, t0, nt, y, p, m, t0 == 0 ? next : NULL, acc);
        }
        return;
    }
    if (isa == PP_ISA_AVX512VNNI) {
        if (fmt == PP_Q8) pp_panel_tok_v(1, W, S, x[0], nb, y + p * PP_PANEL, m, next);
        else pp_panel_tok_v(0, W, S, x[0], nb, y + p * PP_PANEL, m, next);
        return;
    }
#endif
#if PP_HAVE_AVXVNNI
    if (isa == PP_ISA_AVXVNNI) {
        pp_avxvnni_gemm_panel(fmt, W, S, x, T, nb, y + p * PP_PANEL, N, m, next);
        return;
    }
#endif
#if PP_HAVE_AVX2I
    if (isa == PP_ISA_AVX2) {
        pp_avx2_gemm_panel(fmt, W, S, x, T, nb, y + p * PP_PANEL, N, m, next);
        return;
    }
#endif
    (void)isa;
    (void)next;
    (void)xt;
    for (ptrdiff_t t = 0; t < T; t++) pp_panel_tok_c(fmt, W, S, x[t], nb, y + t * N + p * PP_PANEL, m);
}

/* Panels shared out to a team of threads as they go, not in fixed parts: on the VMs this runs on, each
 * core flips between full speed and ~1.55x slower within tens of milliseconds (a neighbour on its host
 * sibling; bench/core_speed.py, bench/results/threads_session20_icelake.md), and with fixed parts every
 * call waited for the slower core. Work stealing: thread i starts owning an equal, even part of the
 * panels and takes runs from its front, a quarter of what it has left at a time (at least a pair); a
 * thread with none left steals the back half of the largest part still unclaimed and owns that. Each
 * part is one 64-bit word [lo | hi << 32] in its own cache line, changed by compare-and-swap: the owner's
 * claims stay in its own cache, and lines move between cores only when a thread steals, near the end.
 * Threads claim their next run before computing the current one, so that its last panels prefetch the
 * next run's first ones (a run would otherwise start cold). Which thread computes a panel never
 * changes its bits. */
typedef struct {
    uint64_t range;                  /* [lo, hi) of the panels this part still holds: lo | hi << 32 */
    char pad[56];
} pp_queue_part;

typedef struct {
    pp_queue_part *part;             /* [threads], 64-byte aligned */
    int threads;
} pp_panel_queue;

static inline uint64_t pp_range(ptrdiff_t lo, ptrdiff_t hi) { return (uint64_t)lo | (uint64_t)hi << 32; }
static inline ptrdiff_t pp_range_lo(uint64_t r) { return (ptrdiff_t)(r & 0xFFFFFFFFu); }
static inline ptrdiff_t pp_range_hi(uint64_t r) { return (ptrdiff_t)(r >> 32); }

/* Parts of `panels` (< 2^31) for `threads` threads: 1, or 0 when out of memory. */
static inline int pp_queue_init(pp_panel_queue *q, ptrdiff_t panels, int threads) {
    q->threads = threads < 1 ? 1 : threads;
    q->part = (pp_queue_part *)aligned_alloc(64, (size_t)q->threads * sizeof(pp_queue_part));
    if (!q->part) return 0;
    for (int i = 0; i < q->threads; i++) {
        const ptrdiff_t lo = panels * i / q->threads & ~(ptrdiff_t)1;
        const ptrdiff_t hi = i + 1 == q->threads ? panels : panels * (i + 1) / q->threads & ~(ptrdiff_t)1;
        q->part[i].range = pp_range(lo, hi);
    }
    return 1;
}

static inline void pp_queue_free(pp_panel_queue *q) {
    free(q->part);
    q->part = NULL;
}

/* Thread i's next run [*lo, *hi), from its own part or stolen: 1, or 0 when no panel is left. */
static inline int pp_queue_claim(pp_panel_queue *q, int i, ptrdiff_t *lo, ptrdiff_t *hi) {
    uint64_t *own = &q->part[i].range;
    uint64_t r = __atomic_load_n(own, __ATOMIC_RELAXED);
    for (;;) {
        const ptrdiff_t a = pp_range_lo(r), z = pp_range_hi(r);
        if (a < z) {
            ptrdiff_t c = (z - a) / 4;
            c = c < 2 ? 2 : c + (c & 1);
            if (c > z - a) c = z - a;
            if (__atomic_compare_exchange_n(own, &r, pp_range(a + c, z), 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                *lo = a;
                *hi = a + c;
                return 1;
            }
            continue;                                       /* a thief moved hi: r holds the new range */
        }
        /* none left here: steal the back half of the largest part (its owner keeps the front) */
        int v = -1;
        ptrdiff_t most = 0;
        uint64_t rv = 0;
        for (int j = 0; j < q->threads; j++) {
            const uint64_t x = __atomic_load_n(&q->part[j].range, __ATOMIC_RELAXED);
            if (j != i && pp_range_hi(x) - pp_range_lo(x) > most) {
                most = pp_range_hi(x) - pp_range_lo(x);
                v = j;
                rv = x;
            }
        }
        if (v < 0) return 0;
        const ptrdiff_t a2 = pp_range_lo(rv), z2 = pp_range_hi(rv);
        ptrdiff_t take = most < 2 ? most : (most / 2 + 1) & ~(ptrdiff_t)1;    /* about half, even */
        if (__atomic_compare_exchange_n(&q->part[v].range, &rv, pp_range(a2, z2 - take), 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
            r = pp_range(z2 - take, z2);                    /* now this thread's part; claim from it */
            __atomic_store_n(own, r, __ATOMIC_RELAXED);
        } else {
            r = __atomic_load_n(own, __ATOMIC_RELAXED);     /* lost the race: look again */
        }
    }
}

/* Panels [lo, hi) of pp_gemm_panels' matrix; [nlo, nhi): the run this thread computes next (nlo < 0:
 * none), whose first panels are prefetched while the last ones of this run compute. */
static inline void pp_gemm_run(int fmt, int isa, const uint8_t *data, const uint16_t *scales,
                               const uint16_t *offsets, ptrdiff_t nb, ptrdiff_t N, const pp_xq *x,
                               const pp_xtm *xt, ptrdiff_t T, float *y, ptrdiff_t lo, ptrdiff_t hi,
                               ptrdiff_t nlo, ptrdiff_t nhi) {
    const ptrdiff_t pb = nb * pp_panel_block_bytes(fmt), ps = nb * PP_PANEL;
    for (ptrdiff_t p = lo; p < hi;) {
        const uint8_t *W = data + p * pb;
        const int m = pp_panel_rows(N, p);
        int done = 1;                                                   /* panels this step computed */
        (void)xt;
#if PP_HAVE_VNNI512
        if (xt && p + 1 < hi && pp_panel_pairs(fmt, pp_panel_pass_tokens(0, T))) {
            /* the (up to) two panels after the pair, in this run or at the start of the next */
            ptrdiff_t at = p + 2, after = hi - at;
            if (after <= 0 && nlo >= 0) {
                at = nlo;
                after = nhi - nlo;
            }
            after = after < 0 ? 0 : after > 2 ? 2 : after;
            const pp_ahead ahead = {after > 0 ? data + at * pb : NULL, NULL, after * pp_panel_block_bytes(fmt)};
            pp_gemm_panel_pair(fmt, W, scales + p * ps, W + pb, scales + (p + 1) * ps, nb, N, x, xt, T, y, p,
                               pp_panel_rows(N, p + 1), ahead);
            done = 2;
        }
#endif
        if (done == 1) {
            const uint8_t *next = p + 1 < hi ? W + pb : nlo >= 0 ? data + nlo * pb : NULL;
            pp_gemm_panel(fmt, isa, W, scales + p * ps, nb, N, x, xt, T, y, p, m, next);
        }
        if (offsets)
            for (ptrdiff_t q = p; q < p + done; q++)
                for (ptrdiff_t t = 0; t < T; t++)
                    pp_panel_offsets(isa, offsets + q * ps, x[t], nb, y + t * N + q * PP_PANEL, pp_panel_rows(N, q));
        p += done;
    }
}

/* Several tokens on AVX-512 VNNI: each pass's activations token-major (pp_xtm), laid out once per call and
 * thread (T x 40 bytes per block; at T = 8 ~1 us, some 5% of a 16-panel call and under 1% of the FFN's
 * 152 panels per thread) -> the passes' tiles (free it and *buf after), or NULL: one token, another
 * instruction level, or no memory (the run-time-count code then runs those passes, the same bits). */
static inline pp_xtm *pp_xtm_passes(int isa, const pp_xq *x, ptrdiff_t T, ptrdiff_t nb, char **buf) {
    *buf = NULL;
#if PP_HAVE_VNNI512
    if (isa == PP_ISA_AVX512VNNI && T > 1) {
        const ptrdiff_t passes = (T + 3) / 4 + 1;
        char *b = (char *)malloc((size_t)(T * nb * (PP_QB + 8)));
        pp_xtm *xt = (pp_xtm *)malloc((size_t)passes * sizeof(pp_xtm));
        if (b && xt) {
            char *at = b;
            int nt;
            for (ptrdiff_t t0 = 0, k = 0; t0 < T; t0 += nt, k++) {
                nt = pp_panel_pass_tokens(t0, T);
                if (nt >= 4) xt[k] = pp_xtm_fill(x + t0, nt, nb, at);
                at += pp_xtm_bytes(nb, nt);
            }
            *buf = b;
            return xt;
        }
        free(b);
        free(xt);
    }
#else
    (void)isa; (void)x; (void)T; (void)nb;
#endif
    return NULL;
}

/* Y[t, n] for the panels of a matrix of N rows against T tokens (Y [T, N] row stride N), on the kernels
 * of level isa: panels [p0, p1) when queue is NULL, else runs claimed from queue by thread `thread` of
 * its team until none is left (one call per thread). offsets: q4m's (pp_panel_offsets; the scales'
 * layout), NULL for q4 / q8: a q4m panel is a q4 panel's dots, then each token's offset term. */
static inline void pp_gemm_panels(int fmt, int isa, const uint8_t *data, const uint16_t *scales,
                                  const uint16_t *offsets, ptrdiff_t nb, ptrdiff_t N, const pp_xq *x,
                                  ptrdiff_t T, float *y, ptrdiff_t p0, ptrdiff_t p1, pp_panel_queue *queue,
                                  int thread) {
    ptrdiff_t lo = p0, hi = p1, nlo = -1, nhi = -1;
    int have = queue ? pp_queue_claim(queue, thread, &lo, &hi) : lo < hi;
    if (!have) return;
    char *buf = NULL;
    pp_xtm *xt = pp_xtm_passes(isa, x, T, nb, &buf);
    while (have) {
        const int more = queue ? pp_queue_claim(queue, thread, &nlo, &nhi) : 0;     /* claimed ahead */
        if (!more) nlo = nhi = -1;
        pp_gemm_run(fmt, isa, data, scales, offsets, nb, N, x, xt, T, y, lo, hi, nlo, nhi);
        lo = nlo;
        hi = nhi;
        have = more;
    }
    free(xt);
    free(buf);
}


/* ---- The gated FFN's first half in one pass: H = up(x) * silu(gate(x)) ------------------------------
 * Gate panel p and up panel p are computed together (one pair of panels on AVX-512 VNNI whenever T
 * pairs, sharing each activation load and shuffle; otherwise one after the other) into a [T][32] tile,
 * copied out to G [T, N] (gate) and H [T, N] (up), and after each run of panels H's columns of that run
 * become up * silu(gate) by pp_silu_multiply on NumPy's exp loop (exp_loop, exp_data). Every dot is the
 * one pp_gemm_panels computes for that row, and the product is _kernels.silu_multiply's, operation by
 * operation: H is bitwise gemm(up), gemm(gate), then silu_multiply. Why: one OpenMP region instead of
 * three (two GEMMs, the product), and the product reads values its thread just wrote. q4 / q8 only
 * (q4m's offsets are added after a panel's dots: its FFNs take the separate calls). */
static inline void pp_glu_panel(int fmt, int isa, const uint8_t *G, const uint16_t *GS, const uint8_t *U,
                                const uint16_t *US, ptrdiff_t nb, const pp_xq *x, const pp_xtm *xt, ptrdiff_t T,
                                float *tile, int m, pp_ahead ahead) {
#if PP_HAVE_VNNI512
    if (xt && isa == PP_ISA_AVX512VNNI && pp_panel_pairs(fmt, pp_panel_pass_tokens(0, T))) {
        pp_gemm_panel_pair(fmt, G, GS, U, US, nb, 2 * PP_PANEL, x, xt, T, tile, 0, m, ahead);
        return;
    }
#endif
    pp_gemm_panel(fmt, isa, G, GS, nb, 2 * PP_PANEL, x, xt, T, tile, 0, m, U);
    pp_gemm_panel(fmt, isa, U, US, nb, 2 * PP_PANEL, x, xt, T, tile + PP_PANEL, 0, m, ahead.next);
}

/* H[t, n] = up * silu(gate) for the N rows of the gate and up panels (G, GS / U, US, each nb blocks per
 * panel), threads claiming runs from queue as pp_gemm_panels does (one call per thread). g: [T, N]
 * scratch for the gate's dots. 1, or 0 when out of memory. */
static inline int pp_gemm_glu(int fmt, int isa, const uint8_t *G, const uint16_t *GS, const uint8_t *U,
                              const uint16_t *US, ptrdiff_t nb, ptrdiff_t N, const pp_xq *x, ptrdiff_t T, float *h,
                              float *g, pp_unary_loop exp_loop, void *exp_data, pp_panel_queue *queue, int thread) {
    const ptrdiff_t pb = nb * pp_panel_block_bytes(fmt), ps = nb * PP_PANEL, P = (N + PP_PANEL - 1) / PP_PANEL;
    ptrdiff_t lo = 0, hi = P, nlo = -1, nhi = -1;
    int have = queue ? pp_queue_claim(queue, thread, &lo, &hi) : lo < hi;
    if (!have) return 1;
    float *tile = (float *)aligned_alloc(64, (size_t)T * 2 * PP_PANEL * sizeof(float));
    if (!tile) return 0;
    char *buf = NULL;
    pp_xtm *xt = pp_xtm_passes(isa, x, T, nb, &buf);
    while (have) {
        const int more = queue ? pp_queue_claim(queue, thread, &nlo, &nhi) : 0;
        if (!more) nlo = nhi = -1;
        for (ptrdiff_t p = lo; p < hi; p++) {
            const ptrdiff_t q = p + 1 < hi ? p + 1 : nlo;            /* the panel after this one, or -1 */
            const pp_ahead ahead = {q >= 0 ? G + q * pb : NULL, q >= 0 ? U + q * pb : NULL,
                                    pp_panel_block_bytes(fmt)};
            const int m = pp_panel_rows(N, p);
            pp_glu_panel(fmt, isa, G + p * pb, GS + p * ps, U + p * pb, US + p * ps, nb, x, xt, T, tile, m, ahead);
            for (ptrdiff_t t = 0; t < T; t++) {
                memcpy(g + t * N + p * PP_PANEL, tile + t * 2 * PP_PANEL, (size_t)m * sizeof(float));
                memcpy(h + t * N + p * PP_PANEL, tile + t * 2 * PP_PANEL + PP_PANEL, (size_t)m * sizeof(float));
            }
        }
        const ptrdiff_t c0 = lo * PP_PANEL, c1 = hi * PP_PANEL < N ? hi * PP_PANEL : N;
        for (ptrdiff_t t = 0; t < T; t++) pp_silu_multiply(h + t * N + c0, g + t * N + c0, c1 - c0, exp_loop, exp_data);
        lo = nlo;
        hi = nhi;
        have = more;
    }
    free(xt);
    free(buf);
    free(tile);
    return 1;
}

#endif /* PIPOWER_PANEL_IMPL_H */
