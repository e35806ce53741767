"""A/B in one process: Qwen2.5-Coder-0.5B q4 forwards of 1 and 8 tokens with and without a helper thread
(bench/c/stream_helper.c, built to /tmp/libstream_helper.so) that reads the next matrices in forward
order (up to BUDGET MB, queued as each GEMM returns) while the forward is outside its GEMMs, cancelled as
each GEMM starts. Usage and results: the C file's header, docs/dev/PERF_NOTES.md section 18.

    python bench/c/stream_helper_probe.py [BUDGET_MB=3] [ROUNDS=15]
"""
import ctypes
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # bench/: batch.forward_ids
import pipower  # noqa: E402
from batch import forward_ids  # noqa: E402

BUDGET_MB = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0          # queued after each GEMM
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 15
GEMMS = ("linear", "linear_many", "ffn")

lib = ctypes.CDLL("/tmp/libstream_helper.so")
lib.st_lines.restype = ctypes.c_long
model = pipower.load("qwen2.5-coder-0.5b", weights="q4", threads=2, progress=False)
t, ops = model.transformer, model.transformer.ops


def arrays(p) -> list:
    return [a for a in (p.data, p.scales, p.offsets) if a is not None]


# reads[k]: the arrays GEMM k of a forward reads, in forward order; order: id(its first weight) -> k
reads, order = [], {}
for layer in t.layers:
    order[id(layer.q)] = len(reads)
    reads.append(arrays(ops._join((layer.q, layer.k, layer.v))))
    order[id(layer.o)] = len(reads)
    reads.append(arrays(layer.o))
    order[id(layer.gate)] = len(reads)
    reads.append(arrays(layer.gate) + arrays(layer.up) + arrays(layer.down))
order[id(t.lm_head)] = len(reads)
reads.append(arrays(t.lm_head))


def queue_after(k: int) -> None:
    """Hand the helper the first BUDGET_MB of what the GEMMs after GEMM k read."""
    ptrs, lens, left = [], [], int(BUDGET_MB * 2**20)
    for arrs in reads[k + 1:]:
        for a in arrs:
            if left <= 0:
                break
            n = min(a.nbytes, left)
            ptrs.append(a.ctypes.data)
            lens.append(n)
            left -= n
    if ptrs:
        lib.st_ahead((ctypes.c_size_t * len(ptrs))(*ptrs), (ctypes.c_size_t * len(lens))(*lens), len(ptrs))


def streaming(name: str, first_weight):
    fn = getattr(ops, name)

    def gemm(*args, **kw):
        lib.st_cancel()
        out = fn(*args, **kw)
        k = order.get(id(first_weight(args)))
        if k is not None:
            queue_after(k)
        return out
    return gemm


wrappers = {"linear": streaming("linear", lambda a: a[1]),
            "linear_many": streaming("linear_many", lambda a: a[1][0]),
            "ffn": streaming("ffn", lambda a: a[1])}


def helper(on: bool) -> None:
    for name in GEMMS:
        if on:
            setattr(ops, name, wrappers[name])
        elif name in vars(ops):
            delattr(ops, name)


prompt, new = forward_ids(model.config.vocab_size, 120, [8])
cache = t.new_cache(140)
t.forward(prompt, cache)
base = cache.length


def forward_seconds(T: int) -> float:
    t0 = time.perf_counter()
    t.forward(new[:T], cache, last_only=False)
    seconds = time.perf_counter() - t0
    cache.truncate(base)
    return seconds


ratios = {1: [], 8: []}
medians = {(T, on): [] for T in (1, 8) for on in (False, True)}
for r in range(ROUNDS + 1):                                             # round 0 warms up
    for T in (1, 8):
        for on in (False, True):
            helper(on)
            m = statistics.median(forward_seconds(T) for _ in range(3))
            helper(False)
            lib.st_cancel()
            if r:
                medians[(T, on)].append(m)
        if r:
            ratios[T].append(medians[(T, True)][-1] / medians[(T, False)][-1])
for T in (1, 8):
    print(f"T={T}: off {statistics.median(medians[(T, False)]) * 1e3:.2f} ms, on "
          f"{statistics.median(medians[(T, True)]) * 1e3:.2f} ms, median ratio on/off "
          f"{statistics.median(ratios[T]):.3f} (min {min(ratios[T]):.3f} max {max(ratios[T]):.3f})")
print(f"MB read by the helper: {lib.st_lines() * 64 / 2**20:.0f} (budget {BUDGET_MB} MB per GEMM)")
