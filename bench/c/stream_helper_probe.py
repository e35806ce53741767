"""A/B in one process: Qwen2.5-Coder-0.5B q4 forwards of 1 and 8 tokens with and without a helper thread
(bench/c/stream_helper.c, built to /tmp/libstream_helper.so) that reads the next matrices in forward
order (up to BUDGET MB, queued as each GEMM returns) while the forward is outside its GEMMs, cancelled as
each GEMM starts. Usage and results: the C file's header, docs/dev/PERF_NOTES.md section 18.

    python bench/c/stream_helper_probe.py [BUDGET_MB=3] [ROUNDS=15]
"""
import ctypes, statistics, sys, time
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import pipower
from batch import forward_ids

BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0   # MB enqueued after each GEMM
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 15
lib = ctypes.CDLL("/tmp/libstream_helper.so")
m = pipower.load("qwen2.5-coder-0.5b", weights="q4", threads=2, progress=False)
t = m.transformer; ops = t.ops

def arrs(p):
    return [a for a in (p.data, p.scales, p.offsets) if a is not None]

seq, index = [], {}          # seq[k]: arrays op k reads; index: id(weight) -> k
for L in t.layers:
    index[id(L.q)] = len(seq); seq.append(arrs(ops._join((L.q, L.k, L.v))))
    index[id(L.o)] = len(seq); seq.append(arrs(L.o))
    index[id(L.gate)] = len(seq); seq.append(arrs(L.gate) + arrs(L.up) + arrs(L.down))
index[id(t.lm_head)] = len(seq); seq.append(arrs(t.lm_head))

def enqueue(k):
    ptrs, lens, left = [], [], BUDGET * 2**20
    for j in range(k + 1, len(seq)):
        for a in seq[j]:
            n = min(a.nbytes, int(left))
            ptrs.append(a.ctypes.data); lens.append(n); left -= n
            if left <= 0: break
        if left <= 0: break
    if ptrs:
        P = (ctypes.c_size_t * len(ptrs))(*ptrs); N = (ctypes.c_size_t * len(lens))(*lens)
        lib.st_ahead(P, N, len(ptrs))

orig = {n: getattr(ops, n) for n in ("linear", "linear_many", "ffn")}
def wrapped(name, key):
    fn = orig[name]
    def w(*a, **kw):
        lib.st_cancel()
        r = fn(*a, **kw)
        k = index.get(id(key(a)))
        if k is not None: enqueue(k)
        return r
    return w
wrappers = {"linear": wrapped("linear", lambda a: a[1]), "linear_many": wrapped("linear_many", lambda a: a[1][0]),
            "ffn": wrapped("ffn", lambda a: a[1])}
def on():
    for n, f in wrappers.items(): setattr(ops, n, f)
def off():
    for n in wrappers:
        if n in vars(ops): delattr(ops, n)

prompt, new = forward_ids(m.config.vocab_size, 120, [8])
cache = t.new_cache(140); t.forward(prompt, cache); base = cache.length
def fwd(T):
    t0 = time.perf_counter(); t.forward(new[:T], cache, last_only=False); d = time.perf_counter() - t0
    cache.truncate(base); return d
res = {1: [], 8: []}
raw = {(T, s): [] for T in (1, 8) for s in (0, 1)}
for r in range(ROUNDS + 1):
    for T in (1, 8):
        a_ = []
        for s in (0, 1):
            (on if s else off)()
            ts = [fwd(T) for _ in range(3)]
            off(); lib.st_cancel()
            a_.append(statistics.median(ts))
            if r: raw[(T, s)].append(a_[-1])
        if r: res[T].append(a_[1] / a_[0])
for T in (1, 8):
    print(f"T={T}: off {statistics.median(raw[(T,0)])*1e3:.2f} ms, on {statistics.median(raw[(T,1)])*1e3:.2f} ms, "
          f"median ratio on/off {statistics.median(res[T]):.3f} (min {min(res[T]):.3f} max {max(res[T]):.3f})")
print("MB read by the helper:", lib.st_lines() * 64 / 2**20, "budget", BUDGET)
