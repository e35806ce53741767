// Host shim for pipower's GPU emulator (pipower/_gpu/emulator.py), not CUDA: the CUDA built-ins, vector
// types and intrinsics the shipped .cu kernels use, defined for the host C++ compiler. The threads of a
// block are cooperative fibers (ucontext), so __syncthreads and the warp shuffles behave as on a device;
// blocks run one after another. emu_error bits: 1 misaligned vector access, 2 a barrier no thread of
// the block can reach, 4 a launch the device would refuse. The emulator prepends this file to each .cu
// source and compiles the two as one translation unit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <ucontext.h>
using std::max;
using std::min;

struct emu_uint3 { unsigned x, y, z; };
// Non-static so the compiler reloads threadIdx after every fiber switch.
extern "C" { emu_uint3 threadIdx, blockIdx, blockDim, gridDim; int emu_error; long emu_progress; }

struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

template <class P, class Q> static inline P emu_cast(Q* p) {      // reinterpret_cast + alignment check
    typedef typename std::remove_cv<typename std::remove_pointer<P>::type>::type T;
    if ((uintptr_t)p % alignof(T)) emu_error |= 1;
    return reinterpret_cast<P>(p);
}

static inline float emu_h2f(unsigned short h) {                    // IEEE half -> float, exact
    unsigned sign = (h >> 15) & 1u, e = (h >> 10) & 31u, m = h & 1023u;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 1024u), (int)e - 25);
    return sign ? -v : v;
}
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }

// ---- fibers ----
static const size_t EMU_STACK = 64 * 1024;
static ucontext_t emu_sched, emu_ctx[1024];
static bool emu_done[1024];
static int emu_cur;
static const std::function<void()>* emu_body;
alignas(256) static unsigned char emu_dyn_smem[48 * 1024];
static float emu_xchg[1024];
struct EmuBarrier { int n, arrived; long gen; };
static EmuBarrier emu_block_bar, emu_warp_bar[32];

static void emu_yield() { swapcontext(&emu_ctx[emu_cur], &emu_sched); }
static void emu_wait(EmuBarrier& b) {
    long g = b.gen;
    ++emu_progress;
    if (++b.arrived == b.n) { b.arrived = 0; ++b.gen; return; }
    while (b.gen == g) emu_yield();
}
static void __syncthreads() { emu_wait(emu_block_bar); }
static float __shfl_xor_sync(unsigned, float v, int off) {
    const int t = threadIdx.x, w = t >> 5;
    emu_xchg[t] = v;
    emu_wait(emu_warp_bar[w]);
    const float r = emu_xchg[(t & ~31) | ((t & 31) ^ off)];
    emu_wait(emu_warp_bar[w]);
    return r;
}
static void emu_trampoline() { (*emu_body)(); emu_done[emu_cur] = true; ++emu_progress; }

static void emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned long long smem,
                       const std::function<void()>& body) {
    if (bx == 0 || bx > 1024 || smem > sizeof(emu_dyn_smem) || !gx || !gy || !gz) { emu_error |= 4; return; }
    blockDim = emu_uint3{bx, 1, 1};
    gridDim = emu_uint3{gx, gy, gz};
    emu_body = &body;
    char* stacks = (char*)std::malloc(bx * EMU_STACK);
    for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = emu_uint3{x, y, z};
        emu_block_bar = EmuBarrier{(int)bx, 0, 0};
        for (unsigned w = 0; w * 32 < bx; ++w) emu_warp_bar[w] = EmuBarrier{(int)min(32u, bx - 32 * w), 0, 0};
        std::memset(emu_dyn_smem, 0xff, sizeof(emu_dyn_smem));
        for (unsigned t = 0; t < bx; ++t) {
            getcontext(&emu_ctx[t]);
            emu_ctx[t].uc_stack.ss_sp = stacks + t * EMU_STACK;
            emu_ctx[t].uc_stack.ss_size = EMU_STACK;
            emu_ctx[t].uc_link = &emu_sched;
            makecontext(&emu_ctx[t], emu_trampoline, 0);
            emu_done[t] = false;
        }
        for (;;) {
            long p0 = emu_progress;
            bool live = false;
            for (unsigned t = 0; t < bx; ++t) {
                if (emu_done[t]) continue;
                live = true;
                emu_cur = (int)t;
                threadIdx = emu_uint3{t, 0, 0};
                swapcontext(&emu_sched, &emu_ctx[t]);
            }
            if (!live) break;
            if (emu_progress == p0) { emu_error |= 2; std::free(stacks); return; }   // barrier never reached
        }
    }
    std::free(stacks);
}
