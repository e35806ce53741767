/* Probe for docs/dev/PERF_NOTES.md section 18: a helper thread that reads byte ranges (one load per
 * cache line) until the next range list or a cancel, to pull the next weight matrices into the caches
 * while a forward is outside its GEMMs. Driven by bench/c/stream_helper_probe.py:
 *
 *     gcc -O2 -Wall -shared -fPIC -pthread bench/c/stream_helper.c -o /tmp/libstream_helper.so
 *     python bench/c/stream_helper_probe.py 3 15            # MB queued after each GEMM, rounds
 *     STREAM_HELPER_IDLE=1 python bench/c/stream_helper_probe.py 1 10   # the helper at SCHED_IDLE
 *
 * st_ahead(ptrs, lens, k): replace the queue by k ranges and wake the helper; st_cancel(): stop it
 * within 4 KB of reading (each GEMM calls it on entry); st_lines(): cache lines read so far. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#define MAXR 64
static const char *rp[MAXR];
static size_t rn[MAXR];
static int nr, has_work, started;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_int gen;
static atomic_long lines_read;
static volatile uint64_t sink;
static pthread_t th;

static void *loop(void *arg) {
    (void)arg;
    if (getenv("STREAM_HELPER_IDLE")) { struct sched_param sp = {0}; pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp); }
    const char *p[MAXR]; size_t n[MAXR];
    for (;;) {
        pthread_mutex_lock(&mu);
        while (!has_work) pthread_cond_wait(&cv, &mu);
        int k = nr, g = atomic_load(&gen);
        for (int i = 0; i < k; i++) { p[i] = rp[i]; n[i] = rn[i]; }
        has_work = 0;
        pthread_mutex_unlock(&mu);
        uint64_t s = 0; long c = 0;
        for (int i = 0; i < k; i++) {
            for (size_t off = 0; off < n[i]; off += 64) {
                if ((off & 4095) == 0 && atomic_load_explicit(&gen, memory_order_relaxed) != g) goto done;
                s += (uint8_t)p[i][off]; c++;
            }
        }
    done:
        sink += s;
        atomic_fetch_add(&lines_read, c);
    }
    return NULL;
}

void st_ahead(const uintptr_t *ptrs, const size_t *lens, int k) {
    if (!started) { pthread_create(&th, NULL, loop, NULL); started = 1; }
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&gen, 1);
    nr = k > MAXR ? MAXR : k;
    for (int i = 0; i < nr; i++) { rp[i] = (const char *)ptrs[i]; rn[i] = lens[i]; }
    has_work = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}
void st_cancel(void) { atomic_fetch_add(&gen, 1); }
long st_lines(void) { return atomic_load(&lines_read); }
