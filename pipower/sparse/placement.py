"""Hot/cold neuron placement: which FFN neurons live on the GPU under a VRAM budget (PowerInfer's solver).

Model (docs/PLACEMENT.md has the full argument):
- Each layer's neurons are sorted by activation frequency (ties by index) and cut into batches of
  `granularity` neurons. A layer's hot set is always a prefix of that order: for a fixed count k the
  k most frequent neurons maximise the layer's hot frequency, and they all cost the same bytes.
- The first ceil(M / granularity) batches of a layer are merged into one item, so "a layer gets 0 or
  >= M hot neurons" becomes "item 0 is taken or not"; prefix constraints x[l, j] <= x[l, j - 1] keep
  the rest in order. One capacity row: sum(bytes of taken items) <= budget - fixed bytes.
- Objective: maximise the summed frequency of hot neurons (= expected activations computed on the GPU).
- Solvers: "all-fit" (everything fits, nothing to solve); "greedy" (top-K items by value: provably
  optimal when every item costs the same, i.e. no minimum above one batch); "dp" (exact dynamic
  program over layers x capacity units, the default otherwise: < 1 s on 80 x 28672 at granularity 64);
  "milp" (HiGHS via scipy.optimize.milp with a time limit: PowerInfer's ILP, for instances the DP
  table would be too large for; HiGHS stalls on the biggest ones, see PLACEMENT.md).

The result is a `Placement`: per layer sorted int32 hot indices, saved as safetensors
(`layer.{i}.hot`) with JSON metadata.

Byte accounting (`layer_weight_bytes`, `ffn_neuron_bytes`) is the one formula for what a layer's weights
cost in a format; the placement budget, layer offload (hybrid/plan.py) and bench/decode.py use it.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelFileError, PipowerError

# Bytes per weight of pipower's formats (pipower/quant.py table), exact: q8 = 32 int8 + one f16 scale
# per 32 weights = 34/32, q4 = 16 bytes + one f16 scale per 32 = 18/32.
BYTES_PER_WEIGHT = {"f32": Fraction(4), "f16": Fraction(2), "bf16": Fraction(2),
                    "q8": Fraction(34, 32), "q4": Fraction(18, 32), "q4m": Fraction(20, 32)}
DEFAULT_GRANULARITY = 256        # PowerInfer's batch size: one ILP variable per 256 neurons
DEFAULT_MIN_NEURONS = 0          # PowerInfer's `--threshold` default (its engine never passes another)
DEFAULT_TIME_LIMIT_S = 10.0      # PowerInfer gives GLPK 30 s; HiGHS overruns its limit a little (PLACEMENT.md)
FORMAT_VERSION = 1
_META_KEY = "pipower.placement"


class PlacementError(PipowerError, ValueError):
    """The VRAM budget cannot hold what must go to the GPU, or a placement is inconsistent."""


# ----------------------------------------------------------------------------------------------------
# Byte accounting


def _bpw(fmt: str | float | Fraction) -> Fraction:
    """A weight format name or a number -> exact bytes per weight."""
    if isinstance(fmt, str):
        if fmt not in BYTES_PER_WEIGHT:
            raise InvalidArgumentError(f"unknown weight format {fmt!r}; choose one of "
                                       f"{', '.join(BYTES_PER_WEIGHT)} or give bytes per weight as a number")
        return BYTES_PER_WEIGHT[fmt]
    if not (isinstance(fmt, (int, float, Fraction)) and fmt > 0):
        raise InvalidArgumentError(f"bytes per weight must be a positive number, got {fmt!r}")
    return Fraction(fmt).limit_denominator(1 << 20)


def _tensor_bytes(n_weights: int, bpw: Fraction) -> int:
    return math.ceil(n_weights * bpw)


def ffn_neuron_bytes(config, weights: str | float = "f16") -> int:
    """Bytes of one FFN neuron: its gate row, up row and down_t row ([D] each; 2 rows without a gate)."""
    D = config.hidden_size
    rows = 3 if getattr(config, "mlp_gated", True) else 2
    return rows * _tensor_bytes(D, _bpw(weights))


def layer_weight_bytes(config, weights: str | float = "f16", norm_weights: str | float = "f32") -> dict[str, int]:
    """Bytes of one decoder layer's weights, part by part (config: a pipower ModelConfig):
      attention  q [H*hd, D], k and v [Hkv*hd, D], o [D, H*hd] in `weights`;
      biases     the f32 q/k/v biases (qkv_bias) and o bias (o_bias) where the architecture has them;
      ffn        n_ff neurons of `ffn_neuron_bytes` (gate, up and down_t rows; no gate in a plain MLP);
      norms      the attention and FFN norms, [D] each, in `norm_weights`.
    """
    c = config
    D, F = c.hidden_size, c.intermediate_size
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads, \
        c.head_dim or c.hidden_size // c.num_attention_heads
    bw = _bpw(weights)
    bias = 4 * (H * hd + 2 * Hkv * hd) if getattr(c, "qkv_bias", False) else 0
    if getattr(c, "o_bias", False):
        bias += 4 * D
    return {"attention": _tensor_bytes(H * hd * D, bw) + 2 * _tensor_bytes(Hkv * hd * D, bw)
            + _tensor_bytes(D * H * hd, bw),
            "biases": bias,
            "ffn": F * ffn_neuron_bytes(c, weights),
            "norms": 2 * _tensor_bytes(D, _bpw(norm_weights))}


def gpu_bytes_breakdown(config, weights: str | float = "f16", *,
                        predictor_hidden: int | Sequence[int] | None = None,
                        predictor_weights: str | float = "f16",
                        output_weights: str | float | None = None,
                        norm_weights: str | float = "f32",
                        include_embeddings: bool = False,
                        context_length: int = 0,
                        kv_weights: str | float = "f16",
                        reserve_bytes: int = 0) -> dict[str, int]:
    """The bytes that go to the GPU before any FFN neuron, term by term, in PowerInfer's fill order.

    config: a pipower ModelConfig (D, H, Hkv, hd, L, V, n_ff). Terms (bytes):
      attention   L * (q [H*hd, D] + k, v [Hkv*hd, D] + o [D, H*hd]) in `weights`, plus f32 q/k/v
                  (and o) biases where the architecture has them.
      predictors  L * (fc1 [h_l, D] + fc2 [n_ff, h_l]) in `predictor_weights`; h_l = predictor_hidden
                  (an int for all layers or one per layer; None = no predictors, e.g. oracle sparsity).
      norms       (2 L + 1) * D in `norm_weights` (GGUF keeps norms in f32).
      output      the head [V, D] in `output_weights` (default `weights`); counted even when tied to
                  the embeddings: the GPU needs its own copy.
      embeddings  [V, D] only if `include_embeddings` (llama.cpp keeps token_embd on the host: one row
                  gather per token is not worth VRAM).
      kv_cache    2 * L * context_length * Hkv * hd in `kv_weights` (f16 by default); 0 when no context.
      reserve     `reserve_bytes`: scratch/compute buffers, CUDA context; pipower does not guess them.
    """
    c = config
    L, D, V, F = c.num_hidden_layers, c.hidden_size, c.vocab_size, c.intermediate_size
    Hkv, hd = c.num_key_value_heads or c.num_attention_heads, c.head_dim or c.hidden_size // c.num_attention_heads
    bw = _bpw(weights)
    layer = layer_weight_bytes(c, weights)
    attn = layer["attention"] + layer["biases"]
    if predictor_hidden is None:
        pred = 0
    else:
        hs = [predictor_hidden] * L if isinstance(predictor_hidden, (int, np.integer)) else list(predictor_hidden)
        if len(hs) != L or any(h < 0 for h in hs):
            raise InvalidArgumentError(f"predictor_hidden needs one non-negative size per layer ({L}), got {len(hs)}")
        pw = _bpw(predictor_weights)
        pred = sum(_tensor_bytes(h * D, pw) + _tensor_bytes(F * h, pw) for h in hs)
    if context_length < 0 or reserve_bytes < 0:
        raise InvalidArgumentError("context_length and reserve_bytes must be >= 0")
    out = _tensor_bytes(V * D, _bpw(output_weights if output_weights is not None else weights))
    return {
        "attention": L * attn,
        "predictors": pred,
        "norms": _tensor_bytes((2 * L + 1) * D, _bpw(norm_weights)),
        "output": out,
        "embeddings": _tensor_bytes(V * D, bw) if include_embeddings else 0,
        "kv_cache": _tensor_bytes(2 * L * context_length * Hkv * hd, _bpw(kv_weights)),
        "reserve": int(reserve_bytes),
    }


def fixed_gpu_bytes(config, weights: str | float = "f16", **kwargs) -> int:
    """Sum of `gpu_bytes_breakdown` (same arguments): the budget the FFN split cannot use."""
    return sum(gpu_bytes_breakdown(config, weights, **kwargs).values())


# ----------------------------------------------------------------------------------------------------
# Inputs


_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def _layer_number(key) -> int:
    """0, "0", "blk.10", "activation_10.pt" -> the layer number (the last integer in a name)."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    m = _LAST_INT.search(str(Path(str(key)).name))
    if m is None:
        raise InvalidArgumentError(f"cannot read a layer number from key {key!r}")
    return int(m.group(1))


def order_layers(freqs: Sequence | Mapping) -> list[np.ndarray]:
    """A list (index = layer) or a mapping keyed by layer number / name -> list in *numeric* layer order.

    Sorting names as strings puts "10" before "2" and gives layers each other's masks (a PowerInfer bug).
    """
    if isinstance(freqs, Mapping):
        numbered = {}
        for k, v in freqs.items():
            n = _layer_number(k)
            if n in numbered:
                raise InvalidArgumentError(f"two entries for layer {n} (key {k!r})")
            numbered[n] = v
        if sorted(numbered) != list(range(len(numbered))):
            raise InvalidArgumentError(f"layer numbers must be 0..{len(numbered) - 1}, got {sorted(numbered)}")
        freqs = [numbered[i] for i in range(len(numbered))]
    out = []
    for i, f in enumerate(freqs):
        a = np.asarray(f, dtype=np.float64).reshape(-1)          # (n_ff,)
        if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
            raise InvalidArgumentError(f"layer {i}: frequencies must be a non-empty array of finite values >= 0")
        out.append(a)
    if not out:
        raise InvalidArgumentError("no layers")
    return out


def hot_order(freq: np.ndarray) -> np.ndarray:
    """Neuron indices by descending frequency, ties by ascending index (deterministic). int64 [n_ff]."""
    return np.argsort(-freq, kind="stable")


# ----------------------------------------------------------------------------------------------------
# Items: per layer, item 0 = the first ceil(M / g) batches (the minimum), then one item per batch.


@dataclass
class _Items:
    layer: np.ndarray        # int64 [n_items]   layer of the item
    pos: np.ndarray          # int64 [n_items]   position of the item in its layer's chain (0 = minimum)
    end: np.ndarray          # int64 [n_items]   hot count of the layer when this item is its last one
    cost: np.ndarray         # int64 [n_items]   bytes
    value: np.ndarray        # float64 [n_items] summed frequency


def _build_items(sorted_freqs: list[np.ndarray], neuron_bytes: list[int], g: int, M: int) -> _Items:
    layer, pos, end, cost, value = [], [], [], [], []
    for l, f in enumerate(sorted_freqs):
        n = f.size
        m = min(max(M, 1), n)                                   # a whole layer is always allowed
        first = min(n, -(-m // g) * g)                          # the minimum, rounded up to whole batches
        ends = np.concatenate([[first], np.arange(first + g, n + g, g)]).clip(max=n)
        ends = np.unique(ends)                                  # (k,) hot count after each item
        starts = np.concatenate([[0], ends[:-1]])
        csum = np.concatenate([[0.0], np.cumsum(f)])
        layer.append(np.full(ends.size, l))
        pos.append(np.arange(ends.size))
        end.append(ends)
        cost.append((ends - starts) * neuron_bytes[l])
        value.append(csum[ends] - csum[starts])
    cat = np.concatenate
    return _Items(cat(layer), cat(pos), cat(end), cat(cost).astype(np.int64), cat(value))


def _counts_from_taken(items: _Items, taken: np.ndarray, n_layers: int) -> np.ndarray:
    """Boolean [n_items] (a prefix per layer) -> hot count per layer, int64 [n_layers]."""
    counts = np.zeros(n_layers, dtype=np.int64)
    np.maximum.at(counts, items.layer[taken], items.end[taken])
    return counts


def _greedy(items: _Items, cap: int) -> np.ndarray:
    """Take items by descending value per byte if they fit; a layer closes at its first skipped item.

    Densities fall along each layer's chain (its neurons are sorted), so this order respects the
    prefix rule; a running minimum per layer makes that hold under float rounding too (equal
    frequencies can give a later batch a density 1 ulp higher). Optimal when all items cost the same
    (top-K by value); a heuristic otherwise.
    """
    density = items.value / items.cost                           # float64 [n_items]
    for l in np.unique(items.layer):                             # items of a layer are contiguous
        idx = np.flatnonzero(items.layer == l)
        density[idx] = np.minimum.accumulate(density[idx])
    order = np.lexsort((items.pos, items.layer, -density))
    taken = np.zeros(items.cost.size, dtype=bool)
    closed = set()
    left = cap
    for i in order:                                              # <= a few 10k items, solver time only
        l = int(items.layer[i])
        if l in closed:
            continue
        if items.cost[i] <= left:
            taken[i] = True
            left -= int(items.cost[i])
        else:
            closed.add(l)
    return taken


DP_MAX_WORK = 3_000_000_000     # cells x choices the exact DP may touch (~1 ns each: a few seconds)
DP_MAX_BYTES = 512 * 2 ** 20     # its table, float64 [n_layers + 1, capacity units + 1]


def _chains(items: _Items, n_layers: int, unit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: cumulative cost (in `unit`s) and cumulative value of taking its first t + 1 items."""
    out = []
    for l in range(n_layers):
        idx = np.flatnonzero(items.layer == l)                  # in chain order (built that way)
        out.append((np.cumsum(items.cost[idx] // unit), np.cumsum(items.value[idx])))
    return out


def _dp_size(items: _Items, cap: int, n_layers: int) -> tuple[int, int, int]:
    """(unit bytes, capacity in units, work) of the exact DP."""
    unit = int(np.gcd.reduce(items.cost))
    C = cap // unit
    work = sum(int(np.count_nonzero(np.cumsum(items.cost[items.layer == l]) // unit <= C)) for l in range(n_layers))
    return unit, C, work * (C + 1)


def _dp(items: _Items, cap: int, n_layers: int) -> tuple[np.ndarray, dict]:
    """Exact: best[l + 1][c] = max(best[l][c], max_t best[l][c - cost_l(t)] + value_l(t)).

    best[l][c] = the largest hot frequency of layers < l within c capacity units (unit = gcd of item
    costs, so nothing is rounded); t runs over the layer's prefixes (0 = layer cold). Then walk back
    from best[L][C] to read each layer's prefix.
    """
    t0 = time.perf_counter()
    unit, C, work = _dp_size(items, cap, n_layers)
    chains = _chains(items, n_layers, unit)
    best = np.empty((n_layers + 1, C + 1))                      # float64 [L + 1, C + 1]
    best[0] = 0.0
    buf = np.empty(C + 1)
    for l, (cc, cv) in enumerate(chains):
        prev, new = best[l], best[l + 1]
        new[:] = prev
        for ct, v in zip(cc.tolist(), cv.tolist()):             # <= n_ff / granularity shifts per layer
            if ct > C:
                break
            k = C + 1 - ct
            np.add(prev[:k], v, out=buf[:k])
            np.maximum(new[ct:], buf[:k], out=new[ct:])
    taken = np.zeros(items.cost.size, dtype=bool)
    c = C
    for l in reversed(range(n_layers)):
        cc, cv = chains[l]
        ok = np.flatnonzero(cc <= c)
        cand = best[l][c - cc[ok]] + cv[ok]                     # the same float ops as the forward pass
        hit = np.flatnonzero(cand == best[l + 1][c])
        if hit.size:                                            # ties: the longer prefix (more on the GPU)
            t = int(ok[hit[-1]])
            taken[np.flatnonzero(items.layer == l)[:t + 1]] = True
            c -= int(cc[t])
    return taken, {"status": "optimal", "time_s": time.perf_counter() - t0, "dp_unit_bytes": unit,
                   "dp_capacity_units": int(C), "dp_work": int(work)}


def _milp(items: _Items, cap: int, time_limit: float, mip_rel_gap: float):
    """max value.x  s.t.  cost.x <= cap,  x[l, j] <= x[l, j - 1],  x binary.  -> (taken, info)."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # lazy: keeps `import pipower` light
    from scipy.sparse import coo_matrix

    n = items.cost.size
    # scale: costs by their gcd (exact integers, smaller numbers for HiGHS), values by their max
    gcd = int(np.gcd.reduce(items.cost))
    cost = items.cost // gcd
    vscale = float(items.value.max()) or 1.0
    chain = np.flatnonzero(items.pos > 0)                        # rows: x[i] - x[i - 1] <= 0
    r = np.arange(chain.size)
    A_prefix = coo_matrix((np.concatenate([np.ones(chain.size), -np.ones(chain.size)]),
                           (np.concatenate([r, r]), np.concatenate([chain, chain - 1]))), shape=(chain.size, n))
    constraints = [LinearConstraint(cost.astype(np.float64)[None, :], -np.inf, cap // gcd)]
    if chain.size:
        constraints.append(LinearConstraint(A_prefix.tocsr(), -np.inf, 0.0))
    t0 = time.perf_counter()
    res = milp(-items.value / vscale, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
               options={"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap), "disp": False})
    dt = time.perf_counter() - t0
    status = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded"}.get(res.status, "error")
    info = {"status": status, "message": str(res.message), "time_s": dt, "n_vars": int(n),
            "n_rows": int(1 + chain.size), "mip_gap": None if getattr(res, "mip_gap", None) is None
            else float(res.mip_gap)}
    if res.x is None:
        return None, info
    taken = res.x > 0.5
    # enforce the prefix rule exactly (the solver works in floating point): a layer keeps its items up
    # to its first untaken one
    for l in np.unique(items.layer):
        idx = np.flatnonzero(items.layer == l)
        gaps = np.flatnonzero(~taken[idx])
        if gaps.size:
            taken[idx[gaps[0]:]] = False
    # and the budget, in exact integers: drop the least dense last item until it holds
    while int(items.cost[taken].sum()) > cap:
        last = [np.flatnonzero(taken & (items.layer == l))[-1] for l in np.unique(items.layer[taken])]
        taken[min(last, key=lambda i: items.value[i] / items.cost[i])] = False
        info["repaired"] = True
    return taken, info


# ----------------------------------------------------------------------------------------------------
# The result


@dataclass
class Placement:
    """Which FFN neurons are hot (GPU-resident), per layer, and what the solver said."""
    hot: list[np.ndarray]                 # per layer: sorted unique int32 neuron indices on the GPU
    n_ff: list[int]                       # per layer: number of FFN neurons
    layer_freq: list[float]               # per layer: summed frequency of all neurons
    layer_hot_freq: list[float]           # per layer: summed frequency of the hot neurons
    budget_bytes: int
    fixed_bytes: int                      # attention, predictors, norms, output (...) on the GPU
    neuron_bytes: list[int]               # per layer: bytes of one neuron (gate + up + down_t rows)
    granularity: int = DEFAULT_GRANULARITY
    min_neurons: int = DEFAULT_MIN_NEURONS
    solver: str = "dp"                    # "all-fit" | "greedy" | "dp" | "milp"
    status: str = "optimal"               # "optimal" | "time_limit" | "heuristic" | ...
    solve_time_s: float = 0.0
    fingerprint: str = ""                 # the model this was solved for (checked on load)
    info: dict = field(default_factory=dict)  # solver details: n_vars, mip_gap, greedy_value, ...

    @property
    def n_layers(self) -> int:
        return len(self.hot)

    @property
    def ffn_bytes(self) -> int:
        return int(sum(h.size * b for h, b in zip(self.hot, self.neuron_bytes)))

    @property
    def bytes_used(self) -> int:
        return self.fixed_bytes + self.ffn_bytes

    @property
    def n_hot(self) -> int:
        return int(sum(h.size for h in self.hot))

    @property
    def hot_freq_share(self) -> float:
        """Expected share of activations computed on the GPU: sum of hot freq / sum of all freq."""
        total = sum(self.layer_freq)
        return float(sum(self.layer_hot_freq) / total) if total > 0 else 0.0

    def summary(self) -> str:
        """A table: per layer hot count, hot %, hot frequency share; then totals and the solver."""
        lines = [f"{'layer':>5} {'hot':>8} {'n_ff':>8} {'hot %':>7} {'freq share':>10}"]
        for i, (h, n, f, hf) in enumerate(zip(self.hot, self.n_ff, self.layer_freq, self.layer_hot_freq)):
            lines.append(f"{i:>5} {h.size:>8} {n:>8} {100 * h.size / n:>6.1f}% {(hf / f if f > 0 else 0):>10.3f}")
        N = sum(self.n_ff)
        lines.append(f"{'total':>5} {self.n_hot:>8} {N:>8} {100 * self.n_hot / N:>6.1f}% {self.hot_freq_share:>10.3f}")
        mib = 2 ** 20
        lines.append(f"bytes: {self.bytes_used / mib:.1f} MiB used of {self.budget_bytes / mib:.1f} MiB "
                     f"(fixed {self.fixed_bytes / mib:.1f} + FFN {self.ffn_bytes / mib:.1f}); "
                     f"granularity {self.granularity}, min neurons {self.min_neurons}; "
                     f"solver {self.solver} ({self.status}, {self.solve_time_s:.2f} s)")
        return "\n".join(lines)

    # -- files ------------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {"version": FORMAT_VERSION, "n_layers": self.n_layers, "n_ff": self.n_ff,
                "layer_freq": self.layer_freq, "layer_hot_freq": self.layer_hot_freq,
                "budget_bytes": self.budget_bytes, "fixed_bytes": self.fixed_bytes,
                "ffn_bytes": self.ffn_bytes, "bytes_used": self.bytes_used, "neuron_bytes": self.neuron_bytes,
                "granularity": self.granularity, "min_neurons": self.min_neurons, "solver": self.solver,
                "status": self.status, "solve_time_s": self.solve_time_s, "fingerprint": self.fingerprint,
                "hot_freq_share": self.hot_freq_share, "info": self.info}

    def save(self, path: str | Path) -> None:
        """safetensors: `layer.{i}.hot` int32 [n_hot_i]; JSON metadata under `pipower.placement`."""
        from safetensors.numpy import save_file
        tensors = {f"layer.{i}.hot": np.ascontiguousarray(h, dtype=np.int32) for i, h in enumerate(self.hot)}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self._metadata())})

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> Placement:
        """Read a saved placement; layers by numeric key; indices checked (sorted, unique, < n_ff)."""
        from safetensors import safe_open
        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception as e:                                   # OSError, SafetensorError, KeyError, JSON
            raise ModelFileError(f"{path}: not a pipower placement file ({e})") from e
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            raise ModelFileError(f"{path}: not a version-{FORMAT_VERSION} pipower placement file")
        missing = {"n_layers", "n_ff", "layer_freq", "layer_hot_freq", "budget_bytes", "fixed_bytes",
                   "neuron_bytes", "granularity", "min_neurons", "solver", "status", "solve_time_s",
                   "fingerprint"} - set(meta)
        if missing:
            raise ModelFileError(f"{path}: placement metadata lacks {sorted(missing)}")
        L = int(meta["n_layers"])
        by_layer = {}
        for k, v in tensors.items():
            m = re.fullmatch(r"layer\.(\d+)\.hot", k)
            if m is None:
                raise ModelFileError(f"{path}: unexpected tensor {k!r}")
            by_layer[int(m.group(1))] = v
        if sorted(by_layer) != list(range(L)):
            raise ModelFileError(f"{path}: layers {sorted(by_layer)} do not match n_layers={L}")
        hot = []
        for i in range(L):                                       # numeric order, never string order
            h = by_layer[i]
            n = meta["n_ff"][i]
            if h.dtype != np.int32 or h.ndim != 1 or (h.size and (h[0] < 0 or h[-1] >= n or np.any(np.diff(h) <= 0))):
                raise ModelFileError(f"{path}: layer {i} hot indices are not sorted unique int32 in [0, {n})")
            hot.append(h)
        if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
            raise PlacementError(f"{path} was solved for model {meta['fingerprint'][:16]!r}, not "
                                 f"{expect_fingerprint[:16]!r}; solve again")
        return cls(hot=hot, n_ff=list(meta["n_ff"]), layer_freq=list(meta["layer_freq"]),
                   layer_hot_freq=list(meta["layer_hot_freq"]), budget_bytes=int(meta["budget_bytes"]),
                   fixed_bytes=int(meta["fixed_bytes"]), neuron_bytes=list(meta["neuron_bytes"]),
                   granularity=int(meta["granularity"]), min_neurons=int(meta["min_neurons"]),
                   solver=meta["solver"], status=meta["status"], solve_time_s=float(meta["solve_time_s"]),
                   fingerprint=meta["fingerprint"], info=dict(meta.get("info") or {}))


# ----------------------------------------------------------------------------------------------------
# The solver


def solve_placement(freqs: Sequence | Mapping, neuron_bytes: int | Sequence[int], budget_bytes: int,
                    fixed_bytes: int | Mapping[str, int] = 0, *,
                    min_neurons_per_layer: int = DEFAULT_MIN_NEURONS,
                    granularity: int = DEFAULT_GRANULARITY,
                    solver: str = "auto",
                    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                    mip_rel_gap: float = 1e-6,
                    fingerprint: str = "") -> Placement:
    """Choose the hot (GPU) neurons of every layer under a VRAM budget.

    freqs: per layer float [n_ff] activation frequencies (counts or rates), a list (index = layer) or a
        mapping keyed by layer number/name (ordered numerically).
    neuron_bytes: bytes of one FFN neuron (gate + up + down_t rows), for all layers or one per layer.
    budget_bytes: VRAM budget. fixed_bytes: what goes to the GPU first (an int, or the dict from
        `gpu_bytes_breakdown`, which makes the error message itemised).
    min_neurons_per_layer: M; a layer gets 0 or >= M hot neurons (rounded up to whole batches; a whole
        layer is always allowed).
    granularity: neurons per solver variable; smaller = closer to the per-neuron optimum, more variables.
    solver: "auto" (greedy when provably optimal, else the exact DP when its table is small enough,
        else HiGHS MILP), "dp", "milp", or "greedy" (a heuristic when the minimum binds; kept for
        comparison). MILP and DP results never fall below the greedy's (the better one is kept).
    time_limit_s, mip_rel_gap: for the MILP only.
    Raises PlacementError if the budget cannot hold `fixed_bytes`.
    """
    layers = order_layers(freqs)
    L = len(layers)
    nb = [int(neuron_bytes)] * L if isinstance(neuron_bytes, (int, np.integer)) else [int(b) for b in neuron_bytes]
    if len(nb) != L or any(b <= 0 for b in nb):
        raise InvalidArgumentError(f"neuron_bytes needs one positive value per layer ({L}), got {neuron_bytes!r}")
    if granularity < 1 or min_neurons_per_layer < 0 or time_limit_s <= 0:
        raise InvalidArgumentError("granularity must be >= 1, min_neurons_per_layer >= 0, time_limit_s > 0")
    if solver not in ("auto", "dp", "milp", "greedy"):
        raise InvalidArgumentError(f"unknown solver {solver!r}; choose auto, dp, milp or greedy")
    terms = dict(fixed_bytes) if isinstance(fixed_bytes, Mapping) else {"fixed": int(fixed_bytes)}
    fixed = int(sum(terms.values()))
    budget = int(budget_bytes)
    if budget < fixed:
        mib = 2 ** 20
        detail = ", ".join(f"{k} {v / mib:.1f}" for k, v in terms.items() if v)
        raise PlacementError(f"VRAM budget {budget / mib:.1f} MiB cannot hold the tensors that must be on the "
                             f"GPU: {fixed / mib:.1f} MiB needed ({detail}); raise the budget by at least "
                             f"{(fixed - budget) / mib:.1f} MiB")
    cap = budget - fixed                                         # bytes left for FFN neurons
    orders = [hot_order(f) for f in layers]                      # per layer int64 [n_ff]
    sorted_freqs = [f[o] for f, o in zip(layers, orders)]
    n_ff = [f.size for f in layers]
    total_ffn = sum(n * b for n, b in zip(n_ff, nb))
    info: dict = {}
    t0 = time.perf_counter()
    if total_ffn <= cap:
        counts, used, status = np.array(n_ff, dtype=np.int64), "all-fit", "optimal"
    else:
        items = _build_items(sorted_freqs, nb, granularity, min_neurons_per_layer)
        uniform = bool(np.all(items.cost == items.cost[0]))     # every item the same bytes -> greedy exact
        taken = _greedy(items, cap)
        greedy_value = float(items.value[taken].sum())
        info.update(n_items=int(items.cost.size), greedy_value=greedy_value, uniform_items=uniform)
        if solver == "auto":
            if uniform:
                solver = "greedy"
            else:
                _, C, work = _dp_size(items, cap, L)
                fits = work <= DP_MAX_WORK and (L + 1) * (C + 1) * 8 <= DP_MAX_BYTES
                solver = "dp" if fits else "milp"
        used, status = solver, ("optimal" if uniform else "heuristic")
        if solver in ("dp", "milp"):
            if solver == "dp":
                _, C, _ = _dp_size(items, cap, L)
                if (L + 1) * (C + 1) * 8 > DP_MAX_BYTES:
                    raise InvalidArgumentError(f"the DP table would need {(L + 1) * (C + 1) * 8 / 2**20:.0f} MiB; "
                                               f"use a larger granularity or solver='milp'")
                xtaken, xinfo = _dp(items, cap, L)
            else:
                xtaken, xinfo = _milp(items, cap, time_limit_s, mip_rel_gap)
            info.update(xinfo)
            status = xinfo["status"]
            # keep the exact answer unless the greedy beats it by more than float summation noise
            if xtaken is not None and float(items.value[xtaken].sum()) >= greedy_value * (1 - 1e-12):
                taken = xtaken
            else:                                                # no solution in time, or worse: keep greedy
                info["fell_back_to_greedy"] = True
                status = f"{status}+greedy"
        info["value"] = float(items.value[taken].sum())
        counts = _counts_from_taken(items, taken, L)
    dt = time.perf_counter() - t0
    hot = [np.sort(o[:k]).astype(np.int32) for o, k in zip(orders, counts)]
    layer_freq = [float(f.sum()) for f in layers]
    layer_hot = [float(f[h].sum()) for f, h in zip(layers, hot)]   # same order as layer_freq: share 1.0 is exact
    p = Placement(hot=hot, n_ff=n_ff, layer_freq=layer_freq, layer_hot_freq=layer_hot, budget_bytes=budget,
                  fixed_bytes=fixed, neuron_bytes=nb, granularity=int(granularity),
                  min_neurons=int(min_neurons_per_layer), solver=used, status=status, solve_time_s=dt,
                  fingerprint=fingerprint, info=info)
    if p.bytes_used > budget:                                    # by construction impossible; never ship it
        raise PlacementError(f"internal error: placement uses {p.bytes_used} bytes of a {budget} budget")
    return p
