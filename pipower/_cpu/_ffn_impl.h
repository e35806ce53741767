/* Sparse FFN, one token (pp_ffn_chunk; a few: _ffn_batch_impl.h, bitwise the same per token):
 * out[D] = sum over active neurons i of h_i * down_t[i],
 *   h_i = act(gate[i] . x) * (up[i] . x)      (gated, LLaMA/Qwen)   or   act(up[i] . x)   (plain MLP)
 * gate/up/down_t: [F, D] in one format (down stored transposed: neuron i's output row is contiguous),
 * row-strided alike: row i of each starts i * rs bytes after its row 0, its scales i * ss halfs after.
 * When one neuron's three rows and scales lie in one span of rs bytes (pipower/arena.py's FFN bundles),
 * `bundle` points at neuron 0's span and the kernel prefetches whole spans (see pp_ffn_chunk).
 *
 * Work is cut into fixed chunks of neurons (chunk size a function of the number of active neurons only);
 * each chunk sums into its own partial row part[c][D], and the partials are added in chunk order. The
 * floating-point operations and their order are therefore the same for any thread count: the result is
 * bitwise independent of n_threads. Threading is done by the Cython caller (_ffn.pyx).
 */
#ifndef PIPOWER_FFN_IMPL_H
#define PIPOWER_FFN_IMPL_H

#include "_int8_impl.h"   /* includes _batch_impl.h, _linear_impl.h */

enum { PP_ACT_SILU = 0, PP_ACT_GELU = 1, PP_ACT_GELU_TANH = 2, PP_ACT_RELU = 3 };

/* Same formulas as pipower/ops.py (GELU uses libm erff, which agrees with ops._erf to ~1.5e-7). */
static inline float pp_act(int kind, float v) {
    switch (kind) {
    case PP_ACT_SILU: return v / (1.0f + expf(-v));
    case PP_ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case PP_ACT_GELU_TANH:
        return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
    }
}

typedef struct {
    int fmt, simd, act;                     /* simd: 0 portable C; else AVX-512 float kernels where compiled in,
                                               and with xq the integer kernels of level simd (PP_ISA_*) */
    ptrdiff_t D, n;                         /* n: neurons in the whole call (idx's length, or F) */
    ptrdiff_t rs, ss;                       /* row strides: bytes (data), float16 elements (scales) */
    const char *gate, *up, *down;           /* gate NULL = plain MLP */
    const uint16_t *gate_s, *up_s, *down_s; /* scales [F, D/32] or NULL (f32/f16) */
    const char *bundle;                     /* neuron i's bytes lie in [bundle + i rs, + rs), or NULL */
    const int32_t *idx;                     /* [n] active neurons, or NULL: neuron j = j */
    const float *x;                         /* [T, D] */
    ptrdiff_t T;                            /* tokens: 1 = decode (pp_ffn_chunk), else pp_ffn_chunk_batch */
    const pp_xq *xq;                       /* [T] quantized x: gate/up dots on the integer path (q4/q8), or NULL */
    ptrdiff_t chunk;                        /* T > 1: neurons per chunk (chunk c starts at neuron c * chunk) */
    float *hbuf;                            /* T > 1: scratch [chunks, chunk, T] for h */
    unsigned char *live;                    /* T > 1: scratch [chunks, chunk] */
    const float *pre;                       /* [F] gate . x per neuron (up . x for a plain MLP) computed by
                                               the fused threshold pass, or NULL: computed here */
    int pre_gate;                           /* 1: pre holds a gated FFN's gate dots and its gate rows are
                                               not given (gate NULL; T == 1 only), else 0 */
    float *h_out;                           /* [n] or NULL (T == 1 only) */
} pp_ffn_args;

/* Ask for a row's cache lines ahead of use. Active rows are scattered (sorted but with gaps), so the
 * hardware prefetchers, which follow sequential streams, start late on every row: without this a 25%
 * subset costs about as much as the dense FFN (measured: latency, not bandwidth, bound). */
#if defined(__GNUC__) || defined(__clang__)
#  define PP_PREFETCH(p) __builtin_prefetch((p), 0, 3)      /* into L1 */
#  define PP_PREFETCH_L2(p) __builtin_prefetch((p), 0, 1)   /* into L2 (prefetcht2) */
#else
#  define PP_PREFETCH(p) ((void)(p))
#  define PP_PREFETCH_L2(p) ((void)(p))
#endif
static inline void pp_prefetch_row(const char *row, ptrdiff_t bytes) {
    for (ptrdiff_t o = 0; o < bytes; o += 64) PP_PREFETCH(row + o);
}
static inline void pp_prefetch_span_l2(const char *span, ptrdiff_t bytes) {
    for (ptrdiff_t o = 0; o < bytes; o += 64) PP_PREFETCH_L2(span + o);
}

/* Neurons ahead whose rows are prefetched while the current one is computed (-D to experiment).
 * Separate rows: into L1, 2 ahead. Bundles, index list, spans of at most PP_FFN_BURST_MAX_BYTES: into L2
 * ~12 KiB ahead (at least 2 spans) and into L1 BUNDLE_NEAR spans ahead, each span in one burst. Longer
 * spans: into L1 only, ~PP_FFN_SPREAD_NEAR_BYTES ahead (at least 1 span), in three parts issued before
 * the neuron's three row operations. A burst of more line prefetches than the core can keep in flight
 * (a few dozen L1 misses) stalls the neuron being computed until lines arrive; spread out, the misses
 * overlap the arithmetic: through bench/ffn.py the 25%-active FFN went from 0.45 to 0.34 of the dense FFN
 * on Qwen2.5-0.5B layers (2880 B spans) and from 0.36 to 0.26 on LLaMA-7B-shaped ones (13 KiB), while
 * SmolLM2's 1856 B spans stay fastest with the two-level burst (docs/dev/PERF_NOTES.md section 7). Bundles
 * are prefetched across chunk ends (a thread's chunks are consecutive). */
#ifndef PP_FFN_PREFETCH_AHEAD
#define PP_FFN_PREFETCH_AHEAD 2
#endif
#ifndef PP_FFN_BUNDLE_NEAR
#define PP_FFN_BUNDLE_NEAR 2
#endif
#ifndef PP_FFN_BUNDLE_FAR_BYTES   /* L2 distance in bytes: 6 spans of SmolLM2 (1856 B) */
#define PP_FFN_BUNDLE_FAR_BYTES 12288
#endif
#ifndef PP_FFN_BURST_MAX_BYTES    /* spans up to 32 cache lines are prefetched in one burst */
#define PP_FFN_BURST_MAX_BYTES 2048
#endif
#ifndef PP_FFN_SPREAD_NEAR_BYTES  /* L1 distance of spread prefetches: 4 Qwen2.5-0.5B spans, 1 of 7B */
#define PP_FFN_SPREAD_NEAR_BYTES 12288
#endif

/* The fused threshold FFN (gate dots given: a->pre) reads the kept neurons' up and down rows, 60-75% of
 * the neurons at the calibrated sparsities, and prefetches them spread out at any span length, ~8 KiB
 * ahead. On an Ice Lake Xeon VM (2 threads, 24 DRAM-resident layers, both builds in one process) that
 * made the sparse part 11-20% faster than the short spans' two-level burst on Qwen2.5-0.5B (1920-byte
 * up | down bundles) and 5-10% on SmolLM2; 4-12 KiB measured alike (docs/dev/PERF_NOTES.md section 13). */
#ifndef PP_FFN_THRESHOLD_NEAR_BYTES
#define PP_FFN_THRESHOLD_NEAR_BYTES 8192
#endif
/* ... and sends the first few lines of the span ~16 KiB ahead towards L2. Each software prefetch holds
 * one of the core's ~12 L1 fill buffers until its line arrives, which caps a scattered stream at roughly
 * 12 lines per memory latency (~13 GB/s on two Ice Lake cores, against ~16-18 for the dense panels that
 * the L2 streamer feeds). Touching a span's first lines early starts the L2 streamer on it: 4 lines
 * made the sparse part 6-7% faster on Qwen2.5-0.5B, 4-7% on SmolLM2, 0-3% on the 1.5B (same process);
 * 8 lines gave about as much, the whole span into L2 was 3-8% slower, 24 KiB ahead less than 16. */
#ifndef PP_FFN_THRESHOLD_L2_BYTES
#define PP_FFN_THRESHOLD_L2_BYTES 16384
#endif
#ifndef PP_FFN_THRESHOLD_L2_LINES
#define PP_FFN_THRESHOLD_L2_LINES 4
#endif

#ifndef PP_FFN_DENSE_NEAR      /* the dense FFN over bundles: L1 prefetch distance, L2 level on (1) / off */
#define PP_FFN_DENSE_NEAR 2
#endif
#ifndef PP_FFN_DENSE_L2
#define PP_FFN_DENSE_L2 0
#endif

static inline ptrdiff_t pp_ffn_neuron(const pp_ffn_args *a, ptrdiff_t j) {
    return a->idx ? (ptrdiff_t)a->idx[j] : j;
}

/* The start of neuron 0's span when each neuron's rows and scale rows all lie in one span of rs bytes
 * (an FFN bundle: the kernel then prefetches whole spans), else NULL. Rows must be set (a->rs, ->ss). */
static inline const char *pp_ffn_bundle_start(const pp_ffn_args *a) {
    const ptrdiff_t rb = pp_row_bytes(a->fmt, a->D), sb = (a->D / PP_QB) * 2;
    const char *part[6] = {a->gate, a->up, a->down, (const char *)a->gate_s, (const char *)a->up_s,
                           (const char *)a->down_s};
    const ptrdiff_t len[6] = {rb, rb, rb, sb, sb, sb};
    const char *lo = NULL;
    for (int k = 0; k < 6; k++)
        if (part[k] && (!lo || part[k] < lo)) lo = part[k];
    if (!lo || (a->up_s && a->ss * 2 != a->rs)) return NULL;   /* scale rows must advance with the span */
    for (int k = 0; k < 6; k++)
        if (part[k] && (part[k] + len[k] > lo + a->rs)) return NULL;
    return lo;
}

/* Lines [part/3, (part+1)/3) of a span's rb bytes into L1 (span NULL: nothing). */
static inline void pp_prefetch_span_part(const char *span, ptrdiff_t rb, int part) {
    if (!span) return;
    const ptrdiff_t lines = rb / 64, first = lines * part / 3, end = lines * (part + 1) / 3;
    pp_prefetch_row(span + 64 * first, 64 * (end - first));
}

/* y[t] = row . x[t] for the first T tokens: the integer path when x was quantized (a->xq), else float. */
static inline void pp_ffn_dots(const pp_ffn_args *a, const char *row, const uint16_t *d, ptrdiff_t T, float *y) {
    if (a->xq) pp_dotn_int(a->fmt, a->simd, row, d, a->xq, a->D, T, y, 1);
    else if (T == 1) y[0] = pp_dot(a->fmt, a->simd, row, d, a->x, a->D);   /* the tuned decode kernel */
    else pp_dotn(a->fmt, a->simd, row, d, a->x, a->D, a->D, T, y, 1);
}

/* Neurons j in [j0, j1) of the active list, summed into acc[D] (zeroed here). */
static inline void pp_ffn_chunk(const pp_ffn_args *a, ptrdiff_t j0, ptrdiff_t j1, float *acc) {
    const ptrdiff_t D = a->D, rb = a->rs, nsb = a->ss;
    const int q = a->up_s != NULL, gated = a->gate != NULL || a->pre_gate;
    /* Dense (idx NULL) spans follow each other: an L1 prefetch 2 ahead keeps the stream going; the L2
     * level only helps scattered spans (with it the dense FFN ran 5-10% slower). Scattered spans: a
     * burst per span when short, else spread over the neuron's work (see PP_FFN_BURST_MAX_BYTES); the
     * threshold FFN's always spread (PP_FFN_THRESHOLD_NEAR_BYTES). */
    const int spread = a->bundle && a->idx && (rb > PP_FFN_BURST_MAX_BYTES || a->pre);
    const ptrdiff_t far_sparse = rb > PP_FFN_BUNDLE_FAR_BYTES / 2 ? 2 : PP_FFN_BUNDLE_FAR_BYTES / rb;
    const ptrdiff_t far = a->idx ? far_sparse : PP_FFN_DENSE_L2 * far_sparse;   /* unused when spread */
    const ptrdiff_t near_bytes = a->pre ? PP_FFN_THRESHOLD_NEAR_BYTES : PP_FFN_SPREAD_NEAR_BYTES;
    const ptrdiff_t near = spread ? (rb >= near_bytes ? 1 : near_bytes / rb)
                         : a->idx ? PP_FFN_BUNDLE_NEAR : PP_FFN_DENSE_NEAR;
    /* Gate dots given (a->pre) in a bundle that still holds gate rows: prefetch each span from its up
     * row on, so the gate bytes are never read (the bundle stores gate | up | down, scales after). */
    const ptrdiff_t skip = (a->bundle && a->pre && a->gate && a->up > a->gate) ? a->up - a->bundle : 0;
    const ptrdiff_t span = rb - skip;
    const ptrdiff_t l2_ahead = rb >= PP_FFN_THRESHOLD_L2_BYTES ? 1 : PP_FFN_THRESHOLD_L2_BYTES / rb;
    memset(acc, 0, (size_t)D * sizeof(float));
    for (ptrdiff_t j = j0; j < j1; j++) {
        const ptrdiff_t i = pp_ffn_neuron(a, j);
        const char *later = NULL;          /* spread: the span whose parts are prefetched below */
        if (a->bundle) {   /* whole spans, dense or sparse: one contiguous stream per neuron */
            if (spread) {
                if (j + near < a->n) later = a->bundle + pp_ffn_neuron(a, j + near) * rb + skip;
                if (a->pre && j + l2_ahead < a->n) {
                    const char *head = a->bundle + pp_ffn_neuron(a, j + l2_ahead) * rb + skip;
                    for (int l = 0; l < PP_FFN_THRESHOLD_L2_LINES && 64 * l < span; l++) PP_PREFETCH_L2(head + 64 * l);
                }
            } else {
                if (far && j + far < a->n)
                    pp_prefetch_span_l2(a->bundle + pp_ffn_neuron(a, j + far) * rb + skip, span);
                if (j + near < a->n)
                    pp_prefetch_row(a->bundle + pp_ffn_neuron(a, j + near) * rb + skip, span);
            }
        } else if (a->idx && j + PP_FFN_PREFETCH_AHEAD < j1) {
            const ptrdiff_t ip = (ptrdiff_t)a->idx[j + PP_FFN_PREFETCH_AHEAD], len = pp_row_bytes(a->fmt, D);
            if (a->gate) pp_prefetch_row(a->gate + ip * rb, len);
            pp_prefetch_row(a->up + ip * rb, len);
            pp_prefetch_row(a->down + ip * rb, len);
            if (q) {   /* the scale rows live in separate arrays: one more scattered line each */
                if (a->gate) PP_PREFETCH(a->gate_s + ip * nsb);
                PP_PREFETCH(a->up_s + ip * nsb);
                PP_PREFETCH(a->down_s + ip * nsb);
            }
        }
        /* gate before up: a bundle stores gate | up | down, so the reads ascend through the span */
        pp_prefetch_span_part(later, span, 0);
        float g = 0.0f, u;
        if (gated) {
            if (a->pre) g = a->pre[i];
            else pp_ffn_dots(a, a->gate + i * rb, q ? a->gate_s + i * nsb : NULL, 1, &g);
        }
        pp_prefetch_span_part(later, span, 1);
        if (!gated && a->pre) u = a->pre[i];
        else pp_ffn_dots(a, a->up + i * rb, q ? a->up_s + i * nsb : NULL, 1, &u);
        const float h = gated ? pp_act(a->act, g) * u : pp_act(a->act, u);
        pp_prefetch_span_part(later, span, 2);
        if (a->h_out) a->h_out[j] = h;
        /* ReLU-family models give many exact zeros: skipping them saves the down row's read. */
        if (h != 0.0f)
            pp_axpy(a->fmt, a->simd, h, a->down + i * rb, q ? a->down_s + i * nsb : NULL, acc, D);
    }
}

/* The threshold test: a neuron whose gate dot (up dot for a plain MLP) is g is kept iff |act(g)| > tau. */
static inline unsigned char pp_ffn_keeps(const pp_ffn_args *a, float tau, float g) {
    return fabsf(pp_act(a->act, g)) > tau;
}

/* The fused threshold FFN's first pass (one token): for neurons [i0, i1), pre[i] = gate_i . x (up_i . x
 * for a plain MLP) and on[i] = |act(pre[i])| > tau: the gate rows stream at dense speed, and the chunks
 * then run over the neurons that are on, reading only their up and down rows (pp_ffn_chunk with a->pre).
 * The dots are pp_ffn_chunk's own, so the result is bitwise the sparse FFN over the same selection. */
static inline void pp_ffn_gate_pass(const pp_ffn_args *a, float tau, ptrdiff_t i0, ptrdiff_t i1, float *pre,
                                    unsigned char *on) {
    const char *w = a->gate ? a->gate : a->up;
    const uint16_t *ws = a->gate ? a->gate_s : a->up_s;
    const ptrdiff_t rb = pp_row_bytes(a->fmt, a->D);
    for (ptrdiff_t i = i0; i < i1; i++) {
        if (i + PP_FFN_PREFETCH_AHEAD < i1) {
            pp_prefetch_row(w + (i + PP_FFN_PREFETCH_AHEAD) * a->rs, rb);
            if (ws) PP_PREFETCH(ws + (i + PP_FFN_PREFETCH_AHEAD) * a->ss);
        }
        pp_ffn_dots(a, w + i * a->rs, ws ? ws + i * a->ss : NULL, 1, pre + i);
        on[i] = pp_ffn_keeps(a, tau, pre[i]);
    }
}

#if PP_HAVE_AVX512
/* on[i] = |silu(pre[i])| > tau for i < F, exactly pp_ffn_keeps' answer but 16 neurons at a time. A vector
 * silu (exp by range reduction and a degree-6 polynomial, then v / (1 + e)) is within ~2e-6 relative of
 * the libm formula's value (expf within an ulp, then two roundings); a neuron whose vector |silu| lies
 * outside tau (1 -+ 1e-4) is decided by it, the rest (|silu| within 1e-4 of tau, |v| >= 80 or <= 1e-30,
 * NaN, inf) by pp_ffn_keeps itself. The scalar test over every neuron cost 20 us per Qwen2.5-0.5B layer (4864
 * neurons, libm expf), 0.5 ms per token. */
static inline void pp_ffn_select_silu_v(const pp_ffn_args *a, float tau, ptrdiff_t F, const float *pre,
                                        unsigned char *on) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
                 ln2_lo = _mm512_set1_ps(-2.12194440e-4f), one = _mm512_set1_ps(1.0f),
                 lim = _mm512_set1_ps(80.0f), tiny = _mm512_set1_ps(1e-30f), hi = _mm512_set1_ps(tau * (1.0f + 1e-4f)),
                 lo = _mm512_set1_ps(tau * (1.0f - 1e-4f));
    /* exp(r) on |r| <= ln2 / 2: Taylor to r^6 (truncation < 2e-7 relative) */
    const __m512 c6 = _mm512_set1_ps(1.0f / 720), c5 = _mm512_set1_ps(1.0f / 120), c4 = _mm512_set1_ps(1.0f / 24),
                 c3 = _mm512_set1_ps(1.0f / 6), c2 = _mm512_set1_ps(0.5f);
    ptrdiff_t i = 0;
    for (; tau >= 0.0f && i + 16 <= F; i += 16) {    /* tau < 0 flips the margins: all scalar */
        const __m512 v = _mm512_loadu_ps(pre + i);
        const __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), v);                       /* exp(-v) */
        /* decided here: 1e-30 < |v| < 80 (finite, no subnormal quotient whose rounding the margin misses) */
        const __m512 av = _mm512_abs_ps(v);
        const __mmask16 ok = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(av, lim, _CMP_LT_OQ), av, tiny, _CMP_GT_OQ);
        const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
        r = _mm512_fnmadd_ps(n, ln2_lo, r);
        __m512 p = _mm512_fmadd_ps(c6, r, c5);
        p = _mm512_fmadd_ps(p, r, c4);
        p = _mm512_fmadd_ps(p, r, c3);
        p = _mm512_fmadd_ps(p, r, c2);
        p = _mm512_fmadd_ps(p, r, one);
        p = _mm512_fmadd_ps(p, r, one);
        const __m512 e = _mm512_scalef_ps(p, n);
        const __m512 act = _mm512_abs_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)));
        const __mmask16 yes = _mm512_mask_cmp_ps_mask(ok, act, hi, _CMP_GT_OQ);
        const __mmask16 no = _mm512_mask_cmp_ps_mask(ok, act, lo, _CMP_LT_OQ);
        _mm_storeu_si128((__m128i *)(on + i), _mm512_cvtepi32_epi8(_mm512_maskz_set1_epi32(yes, 1)));
        for (__mmask16 rest = (__mmask16)(~(yes | no)); rest; rest &= (__mmask16)(rest - 1)) {
            const int k = __builtin_ctz(rest);
            on[i + k] = pp_ffn_keeps(a, tau, pre[i + k]);
        }
    }
    for (; i < F; i++) on[i] = pp_ffn_keeps(a, tau, pre[i]);
}
#endif

/* The fused threshold FFN's selection when the gate's dots come from elsewhere (weight panels, whose
 * integer dots are bitwise these kernels'): on[i] = |act(pre[i])| > tau, pp_ffn_gate_pass's test. */
static inline void pp_ffn_select(const pp_ffn_args *a, float tau, ptrdiff_t F, const float *pre,
                                 unsigned char *on) {
#if PP_HAVE_AVX512
    if (a->simd && a->act == PP_ACT_SILU) {
        pp_ffn_select_silu_v(a, tau, F, pre, on);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < F; i++) on[i] = pp_ffn_keeps(a, tau, pre[i]);
}

/* out[k] = sum_{c < C} part[c][k] for k in [k0, k1), c in increasing order. part: [C, D]. */
static inline void pp_sum_partials(const float *part, ptrdiff_t C, ptrdiff_t D, float *out, ptrdiff_t k0,
                                   ptrdiff_t k1) {
    memcpy(out + k0, part + k0, (size_t)(k1 - k0) * sizeof(float));
    for (ptrdiff_t c = 1; c < C; c++) {
        const float *p = part + c * D;
#pragma omp simd
        for (ptrdiff_t k = k0; k < k1; k++) out[k] += p[k];
    }
}

/* Team barrier for use between two prange loops of one `parallel` block: Cython emits them as
 * `omp for nowait`, so without it a thread could start summing partials another thread still writes. */
static inline void pp_barrier(void) {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

#endif /* PIPOWER_FFN_IMPL_H */
