/* How well one core overlaps a DRAM stream with VNNI compute, with no kernel in the way
 * (docs/dev/PERF_NOTES.md section 17).
 *
 *     gcc -O2 -march=native -fopenmp bench/c/overlap.c -o /tmp/overlap && /tmp/overlap
 *
 * Each thread streams its own half of a 512 MB buffer in 512-byte chunks (8 cache lines, a q8 panel block
 * of 16 rows), the chunk DIST ahead prefetched into L1 (_MM_HINT_T0) as the panel kernels do, and per chunk
 * runs D dots on registers: 8 of them take the chunk's 8 vectors (a real use of the data, so its loads
 * wait for memory), the rest are register-only chains (compute the memory does not feed). Three timings
 * per D: the stream alone (D = 8), the compute alone (the same dots over one chunk kept in L1), both. If a
 * core overlapped perfectly, "both" would be the larger of the other two; the last column says how much
 * of the smaller one it adds instead (0 = perfect overlap, 1 = none). A panel GEMM at 8 tokens does ~64
 * dots per 512-byte q8 block (8 per token) and ~128 per 256-byte q4 block, pairs sharing the shuffles.
 * Wall-clock: medians of 5 runs; run it twice on a quiet machine. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (512L << 20)
#define CHUNK 512

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Chunks [c0, c1) of buf: per chunk, prefetch chunk c + dist, 8 dots on its vectors, extra register dots.
 * same_chunk: read chunk c0 every time (compute alone, from L1). Returns a value so nothing is dropped. */
static int64_t run(const uint8_t *buf, long c0, long c1, int dots, int dist, int same_chunk) {
    __m512i a[8], r[8];
    const __m512i x = _mm512_set1_epi32(0x01010101), y = _mm512_set1_epi32(0x02020202);
    for (int i = 0; i < 8; i++) { a[i] = _mm512_setzero_si512(); r[i] = _mm512_setzero_si512(); }
    const int extra = dots - 8;
    for (long c = c0; c < c1; c++) {
        const uint8_t *p = buf + (same_chunk ? c0 : c) * CHUNK;
        if (!same_chunk && c + dist < c1)
            for (int l = 0; l < CHUNK; l += 64) _mm_prefetch((const char *)(buf + (c + dist) * CHUNK + l), _MM_HINT_T0);
        for (int i = 0; i < 8; i++) a[i] = _mm512_dpbusd_epi32(a[i], _mm512_load_si512(p + 64 * i), x);
        for (int k = 0; k < extra; k += 8)
            for (int i = 0; i < 8; i++) {
                __asm__ volatile("vpdpbusd %2, %1, %0" : "+v"(r[i]) : "v"(y), "v"(x));
            }
    }
    int64_t s = 0;
    for (int i = 0; i < 8; i++) {
        a[i] = _mm512_add_epi32(a[i], r[i]);
        s += _mm512_reduce_add_epi32(a[i]);
    }
    return s;
}

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median seconds of 5 runs of every thread's share. */
static double timed(const uint8_t *buf, int threads, int dots, int dist, int same_chunk, int64_t *sink) {
    double t[5];
    const long chunks = BYTES / CHUNK;
    for (int k = 0; k < 5; k++) {
        const double t0 = now();
#pragma omp parallel num_threads(threads)
        {
            const int i = omp_get_thread_num();
            const long c0 = chunks * i / threads, c1 = chunks * (i + 1) / threads;
            const int64_t s = run(buf, c0, c1, dots, dist, same_chunk);
#pragma omp atomic
            *sink += s;
        }
        t[k] = now() - t0;
    }
    qsort(t, 5, sizeof(double), cmp);
    return t[2];
}

int main(int argc, char **argv) {
    const int dist = argc > 1 ? atoi(argv[1]) : 8;
    uint8_t *buf = aligned_alloc(64, BYTES);
    memset(buf, 1, BYTES);
    int64_t sink = 0;
    printf("| threads | dots per 512 B | stream ms | compute ms | both ms | both / max | added share of min |\n");
    printf("|---|---|---|---|---|---|---|\n");
    for (int threads = 1; threads <= 2; threads++) {
        const double stream = timed(buf, threads, 8, dist, 0, &sink);
        for (int dots = 16; dots <= 96; dots += 16) {
            const double compute = timed(buf, threads, dots, dist, 1, &sink);
            const double both = timed(buf, threads, dots, dist, 0, &sink);
            const double hi = stream > compute ? stream : compute, lo = stream > compute ? compute : stream;
            printf("| %d | %d | %.1f | %.1f | %.1f | %.2f | %.2f |\n", threads, dots, 1e3 * stream, 1e3 * compute,
                   1e3 * both, both / hi, (both - hi) / lo);
        }
    }
    fprintf(stderr, "(sink %lld, prefetch distance %d chunks)\n", (long long)sink, dist);
    free(buf);
    return 0;
}
