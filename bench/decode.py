"""Decode / prefill throughput of pipower vs llama.cpp on the same GGUF files, in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/decode.py \
        --models qwen2.5-coder-0.5b,smollm2-135m --threads 2 --repeats 5 --tokens 64 \
        --out bench/results/decode.json

Prints a markdown table and writes JSON (and the table as .md next to it). bench/README.md explains
every column. Timing discipline: one warm-up run before each measurement, medians of `--repeats`,
time.perf_counter, everything compared in this one process, memory bandwidth measured at the start, the
end and right before every row (the machine's bandwidth flips between ~45 and ~78 GB/s).

What is timed:
  decode    N single-token steps of `transformer.forward` after a fixed prompt (greedy argmax feeds the
            next token; only the forward call is timed, no tokenizer, sampling or streaming);
  e2e       `model.generate` on the same prompt, tokens/s from `model.last_stats`;
  prefill   one forward call over a 512-token (and a 150-token) prompt from an empty cache;
  llama.cpp the same three through its C API (llama_decode on batches), with its own llama_perf timings
            recorded as a cross-check.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# pipower first: its _cpu package sets the OpenMP wait policy before libgomp loads (llama.cpp's ggml
# loads the same libgomp later and inherits it).
import pipower  # noqa: E402
from pipower import _cpu  # noqa: E402

NA = "n/a (not implemented)"
HUMANEVAL = dict(problems=164, prompt_tokens=150, new_tokens=150)
PIPOWER_FORMATS = ("f32", "f16", "q8", "q4")
LLAMA_FOR = {"f32": "F32", "f16": "F16", "q8": "Q8_0", "q4": "Q4_0"}     # pipower format -> GGUF type
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}                  # llama_ftype values


def default_requant_dir() -> Path:
    """$PIPOWER_HOME/bench: the GGUFs requantized for the llama.cpp baseline."""
    return Path(os.environ.get("PIPOWER_HOME") or Path.home() / ".cache" / "pipower") / "bench"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def median(xs):
    return float(statistics.median(xs)) if xs else None


# ---- bandwidth ------------------------------------------------------------------------------------
class Bandwidth:
    """The read-bandwidth kernel over one buffer kept for the whole run."""

    def __init__(self, gib: float, threads: int):
        from pipower._cpu import _bandwidth
        self.kernel = _bandwidth
        self.buf = np.ones(int(gib * 2**30) // 4, dtype=np.float32)    # np.ones: pages mapped now
        self.threads = threads

    def measure(self, repeats: int, threads: int | None = None) -> dict:
        rates, _ = self.kernel.read_bandwidth_samples(self.buf, threads or self.threads, repeats)
        return {"gbs": median(rates), "samples": rates, "threads": threads or self.threads,
                "bytes": self.buf.nbytes, "time": time.time()}


# ---- pipower --------------------------------------------------------------------------------------
def pipower_bytes(tr) -> dict:
    """Weight bytes one decode step reads: the attention / FFN matrices of every layer and the output
    head, as stored (weights="native" mixes formats). (The embedding row, norms and biases are
    negligible.)"""
    def nbytes(m):
        return 0 if m is None else int(m.nbytes)
    attn = sum(nbytes(getattr(lw, n)) for lw in tr.layers for n in ("q", "k", "v", "o"))
    ffn = sum(nbytes(lw.gate) + nbytes(lw.up) + nbytes(lw.down if lw.down is not None else lw.down_t)
              for lw in tr.layers)
    head = int(tr.lm_head.nbytes)
    return {"attn": attn, "ffn": ffn, "head": head, "total": attn + ffn + head}


class RandomNeurons:
    """An FFN neuron selector (Transformer.ffn_neurons): a random `frac` of each layer's neurons.

    A pool of `pool` sorted int32 subsets per layer is drawn up front and cycled token by token, so the
    selection costs nothing per call and no fixed small subset can sit in the cache between tokens.
    """

    def __init__(self, n_layers: int, n_ff: int, frac: float, seed: int = 0, pool: int = 16):
        rng = np.random.default_rng(seed)
        k = max(1, int(round(frac * n_ff)))
        self.sets = [[np.sort(rng.choice(n_ff, k, replace=False)).astype(np.int32) for _ in range(pool)]
                     for _ in range(n_layers)]
        self.pool, self.step = pool, 0

    def __call__(self, i: int, *inputs):          # (layer, [x,] h): the hook's inputs are not used
        if i == 0:
            self.step += 1
        return self.sets[i][self.step % self.pool]


def set_active_fraction(tr, frac: float, seed: int) -> str:
    """Make the FFN compute a random `frac` of its neurons; -> how (recorded in the row)."""
    tr.ffn_neurons = RandomNeurons(tr.config.num_hidden_layers, tr.config.intermediate_size, frac, seed)
    return "Transformer.ffn_neurons = RandomNeurons"


def clear_active_fraction(tr) -> None:
    tr.ffn_neurons = None


def load_pipower(path: str, backend: str, fmt: str, threads: int):
    """fmt: a weight format, optionally with the dot mode: "q8", "q8-int8", "q4-float"."""
    params = inspect.signature(pipower.load).parameters
    if "weights" not in params:
        raise NotImplementedError("pipower.load has no weights= argument")
    kw = {"progress": False} if "progress" in params else {}
    weights, _, dot = fmt.partition("-")
    if dot:
        kw["dot"] = dot
    return pipower.load(path, backend=backend, threads=threads, weights=weights, **kw)


class TooSlow(Exception):
    pass


def pipower_decode(tr, prompt, n_tokens: int, budget_s: float | None = None) -> float:
    """tokens/s of n_tokens single-token forward steps after `prompt` (only forward is timed).
    Raises TooSlow once the steps have taken more than budget_s seconds."""
    cache = tr.new_cache(max_len=len(prompt) + n_tokens + 8)
    logits = tr.forward(prompt, cache, last_only=True)
    tok = int(np.argmax(logits[-1]))
    step = np.zeros(1, dtype=np.int64)
    total = 0.0
    for i in range(n_tokens):
        step[0] = tok
        t0 = time.perf_counter()
        logits = tr.forward(step, cache, last_only=True)
        total += time.perf_counter() - t0
        tok = int(np.argmax(logits[-1]))
        if budget_s is not None and total > budget_s:
            raise TooSlow(f"{i + 1} decode steps took {total:.0f} s ({(i + 1) / total:.2f} tok/s) "
                          f"> --max-run-seconds {budget_s:g}")
    return n_tokens / total


def pipower_prefill(tr, ids) -> float:
    cache = tr.new_cache(max_len=len(ids) + 8)
    t0 = time.perf_counter()
    tr.forward(ids, cache, last_only=True)
    return len(ids) / (time.perf_counter() - t0)


def pipower_e2e(model, prompt, n_tokens: int) -> dict:
    model.generate([int(t) for t in prompt], max_tokens=n_tokens)
    s = model.last_stats
    return {"decode_tps": s.decode_tokens_per_second, "prefill_tps": s.prefill_tokens_per_second,
            "new_tokens": s.new_tokens, "stop_reason": s.stop_reason}


def repeat(fn, repeats: int):
    fn()                                   # warm-up
    return [fn() for _ in range(repeats)]


# ---- llama.cpp ------------------------------------------------------------------------------------
class LlamaCpp:
    """Thin timing wrapper over llama-cpp-python's C API (no Python sampling/streaming in the timed path)."""

    _log_cb = None

    def __init__(self):
        import llama_cpp
        self.L = llama_cpp
        L = llama_cpp
        if LlamaCpp._log_cb is None:        # silence llama.cpp's load chatter (kept referenced: a C callback)
            LlamaCpp._log_cb = L.llama_log_callback(lambda level, text, user: None)
            L.llama_log_set(LlamaCpp._log_cb, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.version = getattr(L, "__version__", "?")
        self.system_info = L.llama_print_system_info().decode(errors="replace").strip()

    def quantize(self, src: str, dst: str, gguf_type: str, threads: int) -> None:
        L = self.L
        p = L.llama_model_quantize_default_params()
        p.ftype = LLAMA_FTYPES[gguf_type]
        p.nthread = threads
        p.allow_requantize = True
        p.pure = True                      # every matrix (output/embedding too) in the one type
        tmp = dst + ".part"
        rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {gguf_type}) returned {rc}")
        os.replace(tmp, dst)

    def requantized(self, src: str, requant_dir: Path, model_name: str, gguf_type: str, threads: int) -> str:
        """requant_dir/<model>.<type>.gguf, made from src by llama_model_quantize if it is not there yet."""
        dst = requant_dir / f"{model_name}.{gguf_type}.gguf"
        if not dst.exists():
            requant_dir.mkdir(parents=True, exist_ok=True)
            log(f"[{model_name}] llama_model_quantize -> {dst}")
            t0 = time.perf_counter()
            self.quantize(src, str(dst), gguf_type, threads)
            log(f"    {time.perf_counter() - t0:.1f} s")
        return str(dst)

    def open(self, path: str, threads: int, n_ctx: int):
        return LlamaSession(self.L, path, threads, n_ctx)


class LlamaSession:
    def __init__(self, L, path: str, threads: int, n_ctx: int):
        self.L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.flash_attn_type = int(getattr(cp, "flash_attn_type", -99))

    def close(self):
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def _decode(self, ids) -> None:
        arr = (self.L.llama_token * len(ids))(*[int(t) for t in ids])
        rc = self.L.llama_decode(self.ctx, self.L.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self) -> int:
        p = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(p, shape=(self.n_vocab,))))

    def decode(self, prompt, n_tokens: int) -> dict:
        L = self.L
        L.llama_memory_clear(self.mem, True)
        self._decode(prompt)
        tok = self._argmax()
        L.llama_perf_context_reset(self.ctx)
        total = 0.0
        for _ in range(n_tokens):
            arr = (L.llama_token * 1)(tok)
            batch = L.llama_batch_get_one(arr, 1)
            t0 = time.perf_counter()
            rc = L.llama_decode(self.ctx, batch)
            total += time.perf_counter() - t0
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            tok = self._argmax()
        perf = L.llama_perf_context(self.ctx)
        return {"tps": n_tokens / total,
                "perf_tps": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms > 0 else None}

    def prefill(self, ids) -> float:
        self.L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        self._decode(ids)
        return len(ids) / (time.perf_counter() - t0)


def gguf_bytes(path: str) -> dict:
    """Bytes of the matrices llama.cpp reads per decoded token, from the GGUF tensor table."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    attn = ffn = 0
    types = {}
    for name, x in t.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
            kind = parts[2]
            if kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
                attn += int(x.n_bytes)
            elif kind in ("ffn_gate", "ffn_up", "ffn_down"):
                ffn += int(x.n_bytes)
            else:
                continue
            types[kind] = x.tensor_type.name
    head_t = t.get("output.weight") or t["token_embd.weight"]          # tied: the embedding is the head
    types["head"] = f"{head_t.tensor_type.name} ({head_t.name})"
    head = int(head_t.n_bytes)
    return {"attn": attn, "ffn": ffn, "head": head, "total": attn + ffn + head, "types": types}


# ---- the run --------------------------------------------------------------------------------------
def environment(args) -> dict:
    from threadpoolctl import threadpool_info
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    env_keys = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PIPOWER_HOME")
    try:
        pinfo = pipower.info()
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        pinfo = {"error": repr(e)}
    return {
        "cpu": cpu, "cpus_available": len(os.sched_getaffinity(0)), "threads": args.threads,
        "python": sys.version.split()[0], "numpy": np.__version__, "platform": platform.platform(),
        "env": {k: os.environ.get(k) for k in env_keys},
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "threadpoolctl": threadpool_info(),
        "pipower_info": pinfo, "git_commit": commit, "git_dirty": dirty,
        "command": " ".join([sys.executable] + sys.argv),
        "loadavg_at_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def humaneval_minutes(pp150, decode):
    if not pp150 or not decode:
        return None
    h = HUMANEVAL
    return h["problems"] * (h["prompt_tokens"] / pp150 + h["new_tokens"] / decode) / 60


def finish_row(row: dict, bw: dict) -> dict:
    row["bw_near_gbs"] = bw["gbs"]
    row["loadavg_1min_after"] = os.getloadavg()[0]       # > threads: something else shared the cores
    if row.get("decode_tps") and row.get("bytes_per_token"):
        row["achieved_gbs"] = row["bytes_per_token"] * row["decode_tps"] / 1e9
        row["bw_fraction"] = row["achieved_gbs"] / bw["gbs"]
    row["humaneval_min"] = humaneval_minutes(row.get("prefill150_tps"), row.get("decode_tps"))
    return row


def bench_pipower(model_name, path, args, ids512, ids150, prompt, bandwidth, rows):
    configs = ([] if args.no_reference else [("numpy", "f32")]) + [("cython", f) for f in args.formats]
    for backend, fmt in configs:
        base = {"model": model_name, "engine": f"pipower-{backend}", "weights": fmt, "ffn_active": 1.0,
                "threads": args.threads, "status": "ok"}
        bw = bandwidth.measure(3)
        log(f"[{model_name}] pipower {backend} {fmt} (bandwidth now {bw['gbs']:.1f} GB/s)")
        try:
            from pipower.backend import make_ops
            native = getattr(make_ops(backend, args.threads), "native_formats", ("f32",))
        except Exception as e:  # noqa: BLE001
            rows.append(finish_row({**base, "status": f"error: {type(e).__name__}: {e}"}, bw))
            continue
        # native: q8 and q4m matrices (per the file's types), both compiled where q4m is
        if (fmt.partition("-")[0] if fmt != "native" else "q4m") not in native and not args.allow_reference_path:
            rows.append(finish_row({**base, "status": NA, "detail": f"the {backend} backend has no compiled "
                                    f"kernel for {fmt} (native_formats={native}); its NumPy reference path "
                                    f"would dequantize on every call"}, bw))
            log("    n/a:", rows[-1]["detail"])
            continue
        try:
            t0 = time.perf_counter()
            model = load_pipower(path, backend, fmt, args.threads)
            base["load_s"] = time.perf_counter() - t0
        except NotImplementedError as e:
            rows.append(finish_row({**base, "status": NA, "detail": str(e)}, bw))
            continue
        except Exception as e:  # noqa: BLE001
            rows.append(finish_row({**base, "status": f"error: {type(e).__name__}: {e}"}, bw))
            log(traceback.format_exc())
            continue
        tr = model.transformer
        nb = pipower_bytes(tr)
        row = dict(base, bytes_per_token=nb["total"], bytes=nb, backend_reported=model.backend,
                   weights_reported=getattr(model, "weights", None))
        try:
            d = repeat(lambda: pipower_decode(tr, prompt, args.tokens, args.max_run_seconds), args.repeats)
            row.update(decode_tps=median(d), decode_samples=d)
            if not args.no_prefill:
                p = repeat(lambda: pipower_prefill(tr, ids512), args.repeats)
                q = repeat(lambda: pipower_prefill(tr, ids150), args.repeats)
                row.update(prefill512_tps=median(p), prefill512_samples=p,
                           prefill150_tps=median(q), prefill150_samples=q)
            e = repeat(lambda: pipower_e2e(model, prompt, args.tokens), args.repeats)
            row.update(e2e_decode_tps=median([x["decode_tps"] for x in e]),
                       e2e_prefill_tps=median([x["prefill_tps"] for x in e]), e2e_runs=e)
        except TooSlow as ex:
            row["status"] = f"too slow: {ex}"
        except Exception as ex:  # noqa: BLE001
            row["status"] = f"error: {type(ex).__name__}: {ex}"
            log(traceback.format_exc())
        rows.append(finish_row(row, bw))
        log("   ", fmt_row_short(row))

        if backend == "cython" and fmt == args.sparse_format and args.fractions:
            for frac in args.fractions:
                srow = {**base, "engine": "pipower-cython sparse", "ffn_active": frac}
                bw = bandwidth.measure(3)
                srow["hook"] = set_active_fraction(tr, frac, args.seed)
                srow["bytes_per_token"] = int(nb["attn"] + frac * nb["ffn"] + nb["head"])
                try:
                    d = repeat(lambda: pipower_decode(tr, prompt, args.tokens, args.max_run_seconds),
                               args.repeats)
                    srow.update(decode_tps=median(d), decode_samples=d)
                except TooSlow as ex:
                    srow["status"] = f"too slow: {ex}"
                except Exception as ex:  # noqa: BLE001
                    srow["status"] = f"error: {type(ex).__name__}: {ex}"
                    log(traceback.format_exc())
                finally:
                    clear_active_fraction(tr)
                rows.append(finish_row(srow, bw))
                log("   ", fmt_row_short(srow))
        model = tr = None        # free the weights before the next load
        gc.collect()


def bench_llama(llama, model_name, path, args, ids512, ids150, prompt, bandwidth, rows, requant_dir):
    files = [("orig", path)]
    for fmt in args.llama_formats:
        files.append((fmt, llama.requantized(path, requant_dir, model_name, fmt, args.threads)))
    for label, fpath in files:
        nb = gguf_bytes(fpath)
        weights = label if label != "orig" else f"orig {Path(fpath).name.rsplit('.', 2)[-2]}"
        for threads in args.llama_threads:
            bw = bandwidth.measure(3)
            row = {"model": model_name, "engine": "llama.cpp", "weights": weights, "gguf": fpath,
                   "ffn_active": 1.0, "threads": threads, "status": "ok", "bytes_per_token": nb["total"],
                   "bytes": nb, "tensor_types": nb["types"]}
            log(f"[{model_name}] llama.cpp {weights} t={threads} (bandwidth now {bw['gbs']:.1f} GB/s)")
            try:
                s = llama.open(fpath, threads, n_ctx=1024)
                try:
                    d = repeat(lambda: s.decode(prompt, args.tokens), args.repeats)
                    row.update(decode_tps=median([x["tps"] for x in d]),
                               decode_samples=[x["tps"] for x in d],
                               decode_tps_llama_perf=median([x["perf_tps"] for x in d if x["perf_tps"]]),
                               flash_attn_type=s.flash_attn_type)
                    if not args.no_prefill:
                        p = repeat(lambda: s.prefill(ids512), args.repeats)
                        q = repeat(lambda: s.prefill(ids150), args.repeats)
                        row.update(prefill512_tps=median(p), prefill512_samples=p,
                                   prefill150_tps=median(q), prefill150_samples=q)
                finally:
                    s.close()
            except Exception as ex:  # noqa: BLE001
                row["status"] = f"error: {type(ex).__name__}: {ex}"
                log(traceback.format_exc())
            rows.append(finish_row(row, bw))
            log("   ", fmt_row_short(row))


def add_ratios(rows):
    """pipower rows get decode / prefill ratios vs llama.cpp on the same format, same model and threads."""
    llama = {(r["model"], r["weights"], r["threads"]): r for r in rows if r["engine"] == "llama.cpp"}
    for r in rows:
        if not r["engine"].startswith("pipower") or r.get("status") != "ok":
            continue
        ref = llama.get((r["model"], LLAMA_FOR.get(r["weights"].partition("-")[0]), r["threads"]))
        if ref is None or ref.get("status") != "ok":
            continue
        r["vs_llama"] = ref["weights"]
        for k in ("decode_tps", "prefill512_tps"):
            if r.get(k) and ref.get(k):
                r[f"ratio_{k}"] = r[k] / ref[k]


# ---- output ---------------------------------------------------------------------------------------
def _f(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def fmt_row_short(r):
    if r.get("status") != "ok":
        return r.get("status")
    return (f"decode {_f(r.get('decode_tps'))} tok/s, {_f(r.get('achieved_gbs'))} GB/s; "
            f"prefill512 {_f(r.get('prefill512_tps'))} tok/s")


COLUMNS = ["model", "engine", "weights", "FFN active", "thr", "decode tok/s", "e2e tok/s", "MB/token",
           "GB/s", "% of BW", "prefill512 tok/s", "prefill150 tok/s", "vs llama.cpp (decode / prefill)",
           "HumanEval est. (min)", "load"]


def markdown(result) -> str:
    b0, b1 = result["bandwidth"]["start"], result["bandwidth"]["end"]
    env = result["environment"]
    blas = [p for p in env["threadpoolctl"] if p.get("user_api") == "blas"]
    blas_s = ", ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
                       f"({p.get('num_threads')} threads)" for p in blas)
    lines = [
        f"# pipower decode benchmark ({env['started']})", "",
        f"- CPU: {env['cpu']}, {env['cpus_available']} cores available; threads = {env['threads']}",
        f"- read bandwidth ({env['threads']} threads, 1 GiB, median): start {b0['gbs']:.1f} GB/s, "
        f"end {b1['gbs']:.1f} GB/s" + (f"; 1 thread {result['bandwidth']['start_1t']['gbs']:.1f} GB/s"
                                       if result["bandwidth"].get("start_1t") else ""),
        f"- BLAS: {blas_s or 'none found'}; OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}",
        f"- llama.cpp: {result.get('llama_cpp', {}).get('version', 'not installed')}; "
        f"repeats = {result['args']['repeats']} (medians), decode = {result['args']['tokens']} tokens after a "
        f"{result['prompt_tokens']}-token prompt",
        f"- pipower commit {env['git_commit'] and env['git_commit'][:10]}{' (dirty tree)' if env['git_dirty'] else ''}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in result["rows"]:
        if r.get("status") != "ok":
            cells = [r["model"], r["engine"], r["weights"], f"{r['ffn_active']:.0%}", str(r["threads"]),
                     r["status"]] + [""] * (len(COLUMNS) - 7) + [_f(r.get("loadavg_1min_after"))]
        else:
            ratio = ""
            if r.get("ratio_decode_tps"):
                ratio = f"{r['ratio_decode_tps']:.2f} / {_f(r.get('ratio_prefill512_tps'), 2) or '-'} ({r['vs_llama']})"
            frac = f"{r['bw_fraction']:.0%}" if r.get("bw_fraction") else ""
            cells = [r["model"], r["engine"], r["weights"], f"{r['ffn_active']:.0%}", str(r["threads"]),
                     _f(r.get("decode_tps")), _f(r.get("e2e_decode_tps")),
                     _f(r["bytes_per_token"] / 1e6) if r.get("bytes_per_token") else "",
                     _f(r.get("achieved_gbs")), frac, _f(r.get("prefill512_tps")), _f(r.get("prefill150_tps")),
                     ratio, _f(r.get("humaneval_min")), _f(r.get("loadavg_1min_after"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"% of BW: achieved GB/s over the read bandwidth measured just before that row "
                  f"(bw_near_gbs in the JSON). HumanEval est.: {HUMANEVAL['problems']} x "
                  f"({HUMANEVAL['prompt_tokens']} prompt tokens at the prefill150 rate + "
                  f"{HUMANEVAL['new_tokens']} new tokens at the decode rate). load: 1-minute load average "
                  f"after the row; above the thread count ({env['threads']}) means other processes shared "
                  f"the cores and the row is pessimistic (the JSON has every sample). See bench/README.md."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m",
                   help="comma-separated known model names or GGUF paths")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64, help="decode steps per repeat")
    p.add_argument("--formats", default=",".join(PIPOWER_FORMATS),
                   help="pipower cython weight formats, each optionally with its dot mode (q8-int8, q4-float)")
    p.add_argument("--sparse-format", default="q8", help="weight format of the sparse-FFN rows")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="sparse FFN active fractions ('' = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-formats", default="F32,F16,Q8_0,Q4_0",
                   help="GGUF types to requantize the file to for llama.cpp ('' = original file only)")
    p.add_argument("--llama-threads", default=None, help="thread counts for llama.cpp (default: THREADS,1)")
    p.add_argument("--max-run-seconds", type=float, default=120.0,
                   help="abandon a pipower decode row whose single run exceeds this (reported 'too slow')")
    p.add_argument("--allow-reference-path", action="store_true",
                   help="also time formats the backend only runs by dequantizing (very slow)")
    p.add_argument("--no-pipower", action="store_true")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference row (f32 weights)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0)
    p.add_argument("--requant-dir", default=None, help="default $PIPOWER_HOME/bench")
    p.add_argument("--render", metavar="JSON", help="only re-render the table of a stored result (.md beside it)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode.json"))
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.formats = [f for f in a.formats.split(",") if f]
    a.fractions = [float(x) for x in a.fractions.split(",") if x]
    a.llama_formats = [f for f in a.llama_formats.split(",") if f]
    lt = a.llama_threads.split(",") if a.llama_threads else [a.threads, 1]
    a.llama_threads = list(dict.fromkeys(int(t) for t in lt))
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.render:                      # re-print a stored result's table (e.g. after editing this file)
        result = json.loads(Path(args.render).read_text())
        table = markdown(result)
        print(table)
        Path(args.render).with_suffix(".md").write_text(table)
        return
    from threadpoolctl import threadpool_limits
    if not _cpu.AVAILABLE:
        log(f"warning: pipower._cpu is not built ({_cpu.IMPORT_ERROR}); cython rows will fail")
    blas_limit = threadpool_limits(limits=args.threads, user_api="blas")     # for the whole run
    env = environment(args)
    bandwidth = Bandwidth(args.bandwidth_gib, args.threads)
    bw_start = bandwidth.measure(args.repeats)
    bw_start_1t = bandwidth.measure(args.repeats, threads=1) if args.threads != 1 else None
    log(f"read bandwidth at start: {bw_start['gbs']:.1f} GB/s ({args.threads} threads)")

    llama = None
    llama_info = {}
    if not args.no_llama:
        try:
            llama = LlamaCpp()
            llama_info = {"version": llama.version, "system_info": llama.system_info}
        except ImportError as e:
            llama_info = {"version": f"not installed ({e})"}
    requant_dir = Path(args.requant_dir) if args.requant_dir else default_requant_dir()

    rows = []
    prompt_len = None
    for name in args.models:
        path = pipower.fetch(name) if name in pipower.KNOWN_MODELS else name
        tok_model = pipower.load(path, backend="numpy", **({"weights": "f32"} if "weights" in
                                                            inspect.signature(pipower.load).parameters else {}))
        tok = tok_model.tokenizer
        V = tok_model.config.vocab_size
        del tok_model
        gc.collect()
        prompt = np.asarray(tok.encode(PROMPT), dtype=np.int64)         # a HumanEval-like code prompt
        prompt_len = len(prompt)
        g = np.random.default_rng(args.seed)
        ids512 = g.integers(100, min(V, 30000), 512).astype(np.int64)     # content does not change the cost
        ids150 = ids512[:150].copy()
        if not args.no_pipower:
            bench_pipower(name, path, args, ids512, ids150, prompt, bandwidth, rows)
        if llama is not None:
            bench_llama(llama, name, path, args, ids512, ids150, prompt, bandwidth, rows, requant_dir)
        partial = Path(args.out).with_suffix(".partial.json")      # survives an interrupted run
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"environment": env, "args": vars(args), "bandwidth_start": bw_start,
                                       "rows": rows}, indent=1, default=str) + "\n")

    bw_end = bandwidth.measure(args.repeats)
    env["loadavg_at_end"] = os.getloadavg()
    log(f"read bandwidth at end: {bw_end['gbs']:.1f} GB/s")
    blas_limit.restore_original_limits()
    add_ratios(rows)
    result = {"environment": env, "args": vars(args), "llama_cpp": llama_info, "prompt_tokens": prompt_len,
              "humaneval_assumptions": HUMANEVAL,
              "bandwidth": {"start": bw_start, "start_1t": bw_start_1t, "end": bw_end}, "rows": rows}
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    log(f"wrote {out} and {out.with_suffix('.md')}")


PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''

if __name__ == "__main__":
    main()
