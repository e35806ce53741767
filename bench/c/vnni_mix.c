/* What a 512-bit operation beside the VNNI dots costs them on this CPU (docs/dev/PERF_NOTES.md section 15).
 *
 *     gcc -O2 -march=native bench/c/vnni_mix.c -o /tmp/vnni_mix && /tmp/vnni_mix
 *
 * Each loop keeps ten independent vpdpbusd zmm chains (registers only, inline asm so the compiler cannot
 * spill or reorder them) and, per two dots, one other instruction: the dots per ns that remain say what
 * that instruction costs the multiplier. A panel pass (pipower/_cpu/_panel_impl.h) issues per 16-row block
 * and token 8 dots, 8 shuffles (the activation dwords) and a float tail; this is the table to weigh them.
 * Wall-clock timing: run it on a quiet machine, twice. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define ITERS 20000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Ten dots, and OP1 / OP2 / OP1 / OP2 / OP1 after every second one (five per ten dots). Operands:
 * %0-%9 the accumulators, %10 %11 scalar registers, %12 %13 dot sources, %14 %15 the extra op's outputs. */
#define MIX(NAME, OP1, OP2)                                                                                    \
    {                                                                                                          \
        __m512i a0 = w, a1 = w, a2 = w, a3 = w, a4 = w, a5 = w, a6 = w, a7 = w, a8 = w, a9 = w, s = w, s2 = w; \
        long q1 = 0, q2 = 0;                                                                                   \
        const double t0 = now();                                                                               \
        for (long i = 0; i < ITERS; i++)                                                                       \
            __asm__ volatile("vpdpbusd %12,%13,%0\n vpdpbusd %12,%13,%1\n" OP1 "\n"                            \
                             "vpdpbusd %12,%13,%2\n vpdpbusd %12,%13,%3\n" OP2 "\n"                            \
                             "vpdpbusd %12,%13,%4\n vpdpbusd %12,%13,%5\n" OP1 "\n"                            \
                             "vpdpbusd %12,%13,%6\n vpdpbusd %12,%13,%7\n" OP2 "\n"                            \
                             "vpdpbusd %12,%13,%8\n vpdpbusd %12,%13,%9\n" OP1 "\n"                            \
                             : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),            \
                               "+v"(a7), "+v"(a8), "+v"(a9), "+r"(q1), "+r"(q2)                                \
                             : "v"(x), "v"(w), "v"(s), "v"(s2));                                               \
        printf("%-34s %5.2f dots per ns\n", NAME, 10.0 * ITERS / (now() - t0) / 1e9);                        \
    }

int main(void) {
    const __m512i w = _mm512_set1_epi32(0x01020304), x = _mm512_set1_epi32(0x05060708);
    MIX("dots alone (scalar add beside)", "add $1,%10", "add $1,%11")
    MIX("+ vmovdqa64 zmm (a copy)", "vmovdqa64 %12,%14", "vmovdqa64 %12,%15")
    MIX("+ vpshufd zmm", "vpshufd $0,%12,%14", "vpshufd $0,%12,%15")
    MIX("+ vcvtdq2ps zmm", "vcvtdq2ps %12,%14", "vcvtdq2ps %12,%15")
    MIX("+ vpaddd zmm", "vpaddd %12,%13,%14", "vpaddd %12,%13,%15")
    MIX("+ vpaddd ymm", "vpaddd %%ymm12,%%ymm13,%%ymm14", "vpaddd %%ymm12,%%ymm13,%%ymm15")
    MIX("+ vpbroadcastd zmm from memory", "vpbroadcastd (%%rsp),%14", "vpbroadcastd 4(%%rsp),%15")
    return 0;
}
