/* Which instruction set the integer dot kernels (_int8_impl.h, _panel_impl.h) run on, chosen at run time.
 *
 * Levels, slowest to fastest; every level computes the same bits (exact int32 block sums, one float tail):
 *   PP_ISA_C           portable C
 *   PP_ISA_AVX2        AVX2 + FMA + F16C: u8 x s8 pairs with vpmaddubsw, widened with vpmaddwd
 *   PP_ISA_AVXVNNI     AVX-VNNI: the 256-bit VEX vpdpbusd (Alder Lake and later, Zen 5)
 *   PP_ISA_AVX512VNNI  AVX-512 VNNI: the 512-bit kernels
 * AVX2 and AVX-VNNI are compiled with target pragmas whatever -march says (a PIPOWER_PORTABLE build has
 * them too) and used only where CPUID says the CPU and the OS support them. The AVX-512 kernels need the
 * build's -march (they share helpers with the AVX-512 float kernels): compiled in or not.
 * Machines of this project's kind change between AVX-512 VNNI (Zen 5), AMX Xeons and AVX2-only ones, so
 * the choice is made here and not at install time.
 *
 * pp_isa_mask(): bit L set iff level L is compiled in and this CPU runs it. pp_isa_default(): the
 * highest such level, or the one PIPOWER_INT_ISA names (c, avx2, avxvnni, avx512vnni); -1 when that
 * variable names no level or one this machine lacks (the Python wrapper raises, naming the variable).
 */
#ifndef PIPOWER_ISA_IMPL_H
#define PIPOWER_ISA_IMPL_H

#include <stdlib.h>
#include <string.h>

enum { PP_ISA_C = 0, PP_ISA_AVX2 = 1, PP_ISA_AVXVNNI = 2, PP_ISA_AVX512VNNI = 3, PP_ISA_COUNT = 4 };

#if defined(__x86_64__) && defined(__GNUC__)   /* gcc and clang */
#  define PP_X86 1
#  include <cpuid.h>
#  include <immintrin.h>
#else
#  define PP_X86 0
#endif

/* AVX2 needs target pragmas (gcc >= 4.9, clang); the AVX-VNNI intrinsics came with gcc 11 / clang 12. */
#if PP_X86 && (defined(__clang__) || __GNUC__ >= 5)
#  define PP_HAVE_AVX2I 1
#else
#  define PP_HAVE_AVX2I 0
#endif
#if PP_X86 && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#  define PP_HAVE_AVXVNNI 1
#else
#  define PP_HAVE_AVXVNNI 0
#endif

#if PP_X86
static inline unsigned long long pp_xgetbv0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

/* Levels this CPU (and its OS: saved YMM / ZMM state) runs, whether compiled in or not. */
static inline int pp_isa_cpu_mask(void) {
    unsigned int a, b, c, d;
    int mask = 1 << PP_ISA_C;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, f16c = (c >> 29) & 1;
    if (!osxsave) return mask;
    const unsigned long long xcr0 = pp_xgetbv0();
    const int ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xE6) == 0xE6;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return mask;
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1,
              avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    const int base = ymm && avx2 && fma && f16c;
    if (base) mask |= 1 << PP_ISA_AVX2;
    if (base && zmm && avx512f && avx512dq && avx512bw && avx512vl && avx512vnni) mask |= 1 << PP_ISA_AVX512VNNI;
    if (base && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1)) mask |= 1 << PP_ISA_AVXVNNI;
    return mask;
}
#else
static inline int pp_isa_cpu_mask(void) { return 1 << PP_ISA_C; }
#endif

/* PP_HAVE_VNNI512 comes from _int8_impl.h (the build's -march); included before this is used. */
static inline int pp_isa_compiled_mask(int have_vnni512) {
    return (1 << PP_ISA_C) | (PP_HAVE_AVX2I << PP_ISA_AVX2) | (PP_HAVE_AVXVNNI << PP_ISA_AVXVNNI) |
           ((have_vnni512 ? 1 : 0) << PP_ISA_AVX512VNNI);
}

static const char *const pp_isa_names[PP_ISA_COUNT] = {"c", "avx2", "avxvnni", "avx512vnni"};

/* Highest set bit of the mask, or the level PIPOWER_INT_ISA names (-1 if unknown or not in mask).
 * Computed once per process and module (the answer cannot change while it runs). */
static inline int pp_isa_pick(int mask) {
    static int cached = -2;
    if (cached != -2) return cached;
    int pick = PP_ISA_C;
    for (int l = 0; l < PP_ISA_COUNT; l++)
        if (mask & (1 << l)) pick = l;
    const char *env = getenv("PIPOWER_INT_ISA");
    if (env && *env) {
        pick = -1;
        for (int l = 0; l < PP_ISA_COUNT; l++)
            if (strcmp(env, pp_isa_names[l]) == 0 && (mask & (1 << l))) pick = l;
    }
    cached = pick;
    return pick;
}

#endif /* PIPOWER_ISA_IMPL_H */
