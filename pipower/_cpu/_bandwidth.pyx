# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Memory read bandwidth, STREAM-style: how many GB/s this machine reads right now.

Decode is memory-bound, so a benchmark reports its achieved GB/s as a fraction of this number, measured
in the same run (the machine's bandwidth flips between ~45 and ~78 GB/s from minute to minute).

The kernel sums a float32 buffer: `n_chunks` contiguous chunks shared out statically over the OpenMP
team; each chunk is summed with 64 independent float lanes (4 AVX-512 or 8 AVX2 registers), so the adds
never wait on each other and the loop is bound by loads, not by the add latency. The sum is returned,
so the compiler cannot drop the loop. Use a buffer much larger than the last-level cache (>= 1 GiB)
and touch it once before timing (np.ones, not np.empty), so the pages are mapped.

    buf = np.ones(2**28, dtype=np.float32)             # 1 GiB
    read_bandwidth_gbs(buf, n_threads=2, repeats=5)    # -> median GB/s (1 GB = 1e9 bytes)
"""
import time

import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange

from ._checks cimport check_array, check_threads, invalid

cnp.import_array()

cdef extern from *:
    """
    #include <stddef.h>
    /* Sum of p[0:n] with 64 independent lanes: the inner loop is a plain element-wise add of 64
       floats, which -O3 vectorizes without -ffast-math (no reassociation inside a lane). */
    static double pp_bw_sum_f32(const float *p, ptrdiff_t n) {
        float acc[64];
        for (int j = 0; j < 64; j++) acc[j] = 0.0f;
        ptrdiff_t i = 0;
        for (; i + 64 <= n; i += 64) {
            for (int j = 0; j < 64; j++) acc[j] += p[i + j];
        }
        double s = 0.0;
        for (; i < n; i++) s += p[i];
        for (int j = 0; j < 64; j++) s += acc[j];
        return s;
    }
    """
    double pp_bw_sum_f32(const float *p, Py_ssize_t n) nogil


cdef double _sum(const float[::1] buf, int n_threads) except? -1:
    """One full read of `buf`, chunked over the team; -> the sum (float64 over per-chunk partials)."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t n_chunks = n_threads * 16 if n >= n_threads * 16 * 4096 else 1
    cdef Py_ssize_t step = (n + n_chunks - 1) // n_chunks
    step = (step + 63) // 64 * 64                     # whole 64-float (256 B, 4 cache lines) blocks
    cdef double[::1] part = np.zeros(n_chunks, dtype=np.float64)
    cdef Py_ssize_t c, lo, hi
    cdef const float *p = &buf[0]
    with nogil:
        if n_threads == 1 or n_chunks == 1:
            for c in range(n_chunks):
                lo = c * step
                hi = min(n, lo + step)
                if lo < hi:
                    part[c] = pp_bw_sum_f32(p + lo, hi - lo)
        else:
            for c in prange(n_chunks, num_threads=n_threads, schedule="static"):
                lo = c * step
                hi = min(n, lo + step)
                if lo < hi:
                    part[c] = pp_bw_sum_f32(p + lo, hi - lo)
    cdef double s = 0.0
    for c in range(n_chunks):
        s += part[c]
    return s


cdef int _check_args(buf, n_threads) except -1:
    """buf: a non-empty float32 [n] C-contiguous array -> the checked n_threads."""
    check_array(buf, "buf", (np.dtype(np.float32),), 1, True)
    if buf.shape[0] == 0:
        raise invalid("buf must not be empty")
    return check_threads(n_threads)


def read_sum(buf, n_threads=1):
    """The sum of float32 `buf` (as float64), computed by the bandwidth kernel on `n_threads` threads."""
    cdef int nt = _check_args(buf, n_threads)         # before buf becomes a typed memoryview
    return _sum(buf, nt)


def read_bandwidth_samples(buf, n_threads=1, repeats=5):
    """GB/s (1e9 bytes/s) of each of `repeats` timed full reads of `buf`, after one untimed warm-up read.

    -> (list of GB/s, the last sum) - the sum is returned so the reads are observable.
    """
    cdef int nt = _check_args(buf, n_threads)
    if not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise invalid(f"repeats must be an int >= 1, got {repeats!r}")
    cdef double s = _sum(buf, nt)                     # warm-up: page mapping, OpenMP team start
    rates = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        s = _sum(buf, nt)
        dt = time.perf_counter() - t0
        rates.append(buf.nbytes / dt / 1e9)
    return rates, s


def read_bandwidth_gbs(buf, n_threads=1, repeats=5):
    """Median read bandwidth in GB/s (1e9 bytes/s) over `repeats` full reads of float32 `buf`."""
    rates, _ = read_bandwidth_samples(buf, n_threads, repeats)
    return float(np.median(rates))
