"""The one LLaMA-family graph (LLaMA, Mistral, Qwen2), written once against the ops interface.

One forward call takes T new token ids, appends their keys/values to the cache, and returns logits.
Shapes: T new tokens, S = cache positions after the call, D hidden, H/Hkv heads, hd head dim, V vocab.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .errors import ContextLengthError, InvalidArgumentError
from .ops import NumpyOps
from .quant import FORMATS, quantize
from .rope import cos_sin, inv_frequencies

# (layer index, residual stream x [T, D] before the FFN norm, normed FFN input h [T, D])
#   -> sorted int32 indices of the FFN neurons to compute for these tokens, or None = all of them.
# Predictors read x (PowerInfer's input), profilers record both; must not modify either.
NeuronSelector = Callable[[int, np.ndarray, np.ndarray], "np.ndarray | None"]
MATRICES = ("q", "k", "v", "o", "gate", "up", "down_t")   # LayerWeights fields stored in the weight format
# weights= of a model: one format for every matrix (quant.FORMATS), or "native": per matrix of a GGUF file,
# its 4-bit blocks kept as q4m, every other matrix q8 (pipower.loader.native)
WEIGHTS = FORMATS + ("native",)
INT_DOT_WEIGHTS = ("q4", "q8", "q4m", "native")        # weights= with integer dot products (pipower.intdot)
INT_DOT_ONLY = ("q4m", "native")     # weights= with no float-dot or device code: integer dots on the CPU only
# down_t serves only the sparse FFN, whose kernels have no q4m code: q8 there (and its gate / up rows,
# CythonOps._sparse_bundles)
SPARSE_ROWS = {"q4m": "q8", "native": "q8"}


def store(w: np.ndarray, fmt: str):
    """float32 [N, K] -> the in-memory format: the array itself for f32, else a QMatrix."""
    return w if fmt == "f32" else quantize(w, fmt)


def stored(tensors, name: str, fmt: str):
    """store(tensors[name], fmt); a lazy mapping with its own `stored` (the GGUF loader) converts a large
    matrix row chunk by row chunk, so its float32 copy never exists whole."""
    convert = getattr(tensors, "stored", None)
    return convert(name, fmt) if convert is not None else store(tensors[name], fmt)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray            # [D]
    # Matrices (MATRICES) are float32 arrays or QMatrix in the model's weight format; norms/biases float32.
    q: np.ndarray                    # [H*hd, D]
    k: np.ndarray                    # [Hkv*hd, D]
    v: np.ndarray                    # [Hkv*hd, D]
    o: np.ndarray                    # [D, H*hd]
    q_bias: np.ndarray | None        # [H*hd]   (Qwen2)
    k_bias: np.ndarray | None        # [Hkv*hd]
    v_bias: np.ndarray | None        # [Hkv*hd]
    o_bias: np.ndarray | None        # [D]
    ffn_norm: np.ndarray             # [D]
    gate: np.ndarray | None          # [F, D]   (None: plain MLP)
    up: np.ndarray                   # [F, D]
    down_t: np.ndarray               # [F, D]   HF's down_proj [D, F] transposed: neuron i's row is contiguous
    # [D, F] HF's down_proj as is (quantization blocks along F), kept only for integer dots: the dense
    # FFN then multiplies h [T, F], quantized per 32 neurons, by it (as llama.cpp does); down_t serves
    # the sparse FFN, which picks neurons. None otherwise.
    down: np.ndarray | None = None

    @classmethod
    def from_tensors(cls, t: dict, i: int, fmt: str = "f32", keep_down: bool = False) -> LayerWeights:
        p = f"model.layers.{i}."
        gate = p + "mlp.gate_proj.weight"
        # each matrix goes from the file to its format on its own (stored: a GGUF's 4-bit blocks straight
        # into q4m); down_t, a transpose, through float32
        layer = cls(
            attn_norm=t[p + "input_layernorm.weight"],
            q=stored(t, p + "self_attn.q_proj.weight", fmt), k=stored(t, p + "self_attn.k_proj.weight", fmt),
            v=stored(t, p + "self_attn.v_proj.weight", fmt), o=stored(t, p + "self_attn.o_proj.weight", fmt),
            q_bias=t.get(p + "self_attn.q_proj.bias"), k_bias=t.get(p + "self_attn.k_proj.bias"),
            v_bias=t.get(p + "self_attn.v_proj.bias"), o_bias=t.get(p + "self_attn.o_proj.bias"),
            ffn_norm=t[p + "post_attention_layernorm.weight"],
            gate=stored(t, gate, fmt) if gate in t else None, up=stored(t, p + "mlp.up_proj.weight", fmt),
            down_t=store(np.ascontiguousarray(t[p + "mlp.down_proj.weight"].T), SPARSE_ROWS.get(fmt, fmt)),
        )
        if keep_down:
            layer.down = stored(t, p + "mlp.down_proj.weight", fmt)
        return layer

    @property
    def nbytes(self) -> int:
        """Bytes of the weights one dense step reads: all of them, but down_t where `down` is kept (it
        is there for sparse FFN calls only)."""
        skip = "down_t" if self.down is not None else None
        return sum(getattr(self, f.name).nbytes for f in fields(self)
                   if f.name != skip and getattr(self, f.name) is not None)


class Transformer:
    """Weights + graph. Stateless between calls: all per-sequence state lives in the KVCache."""

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray] | None, ops: NumpyOps | None = None,
                 weights: str = "f32", *, prepared: tuple | None = None):
        """prepared: (embed_tokens, layers, final_norm, lm_head) already in `weights` format and in the
        layout `ops.prepare` makes (pipower.model_cache): used as they are, `tensors` unused."""
        if weights not in WEIGHTS:
            raise InvalidArgumentError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHTS)}")
        if weights == "native" and prepared is None and not hasattr(tensors, "stored"):
            raise InvalidArgumentError("weights='native' keeps a GGUF file's 4-bit blocks; this model's tensors "
                                       "come from elsewhere: choose a format (q8, q4m, ...)")
        self.config = config
        self.ops = ops or NumpyOps()
        self.weights = weights                                                    # WEIGHTS
        if prepared is not None:
            self.embed_tokens, self.layers, self.final_norm, self.lm_head = prepared
        else:
            self.embed_tokens = stored(tensors, "model.embed_tokens.weight", weights)  # [V, D]
            keep_down = self.ops.dot == "int8" and weights in INT_DOT_WEIGHTS   # the integer-dot dense FFN's
            self.layers = [LayerWeights.from_tensors(tensors, i, weights, keep_down)
                           for i in range(config.num_hidden_layers)]
            self.final_norm = tensors["model.norm.weight"]                        # [D]
            self.lm_head = (stored(tensors, "lm_head.weight", weights) if "lm_head.weight" in tensors
                            else self.embed_tokens)                               # [V, D], tied by default
        self.inv_freq = inv_frequencies(config)                                   # [hd/2]
        self.ffn_neurons: NeuronSelector | None = None                            # None = dense FFN
        if prepared is None:
            self.ops.prepare(self)                                                # backend weight layout

    @property
    def nbytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every layer, the final norm and the output head."""
        return sum(layer.nbytes for layer in self.layers) + self.final_norm.nbytes + self.lm_head.nbytes

    def new_cache(self, max_len: int | None = None) -> KVCache:
        c = self.config
        limit = c.max_position_embeddings
        reserved = getattr(self.ops, "max_context", None)       # hybrid: the KV positions its budget holds
        if reserved:
            limit = min(limit, reserved)
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                       min(max_len or limit, limit), alloc=self.ops.kv_buffer)

    def forward(self, ids, cache: KVCache, last_only: bool = False, head: tuple | None = None) -> np.ndarray:
        """ids: int [T] at positions cache.length .. +T -> logits float32 [T, V] (or [1, V] if last_only).
        head: output weights to use instead of lm_head, e.g. a drafter's vocabulary subset
        (pipower.draft_vocab): logits are then their rows' columns side by side, [T, sum of their rows]."""
        return self.forward_batch([ids], [cache], last_only, head)[0]

    def forward_batch(self, ids_list, caches: list[KVCache], last_only: bool = False,
                      head: tuple | None = None) -> list[np.ndarray]:
        """Several sequences in one forward: ids_list[s] (int [T_s]) continues caches[s]. Projections, norms
        and the FFN run once over all rows (each weight read once); attention runs per sequence over its
        own cache. -> logits per sequence ([T_s, V], or [1, V] if last_only). On the compiled backend a
        row's result does not depend on the other rows (batch invariance), so each sequence gets bitwise
        what forward() alone gives it, while the batch has at most MAX_TOKENS rows (pipower._cpu.linear_ops)."""
        if len(ids_list) != len(caches) or not caches:
            raise InvalidArgumentError(f"forward_batch needs one cache per sequence, got {len(ids_list)} "
                                       f"sequences and {len(caches)} caches")
        if len(caches) > 1 and not isinstance(self.ops, NumpyOps):
            raise InvalidArgumentError("several sequences in one forward run on the CPU engine only")
        seqs = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in ids_list]
        for ids, cache in zip(seqs, caches):
            if cache.length + ids.shape[0] > cache.max_len:
                raise ContextLengthError(f"{cache.length + ids.shape[0]} tokens exceed the context length "
                                         f"{cache.max_len}")
        with self.ops.forward_scope(sum(ids.shape[0] for ids in seqs)):
            return self._forward(seqs, caches, last_only, head)

    def _forward(self, seqs: list[np.ndarray], caches: list[KVCache], last_only: bool,
                 head: tuple | None = None) -> list[np.ndarray]:
        ops = self.ops
        lengths = [ids.shape[0] for ids in seqs]
        starts = [cache.length for cache in caches]
        rows = np.cumsum([0] + lengths)                                           # sequence s: rows[s]:rows[s+1]
        tables = [cos_sin(self.inv_freq, start, T) for start, T in zip(starts, lengths)]
        cos, sin = ((tables[0][0], tables[0][1]) if len(seqs) == 1 else
                    tuple(np.concatenate([t[j] for t in tables]) for j in (0, 1)))  # [Tsum, hd/2] each
        ids = seqs[0] if len(seqs) == 1 else np.concatenate(seqs)
        x = ops.embed(self.embed_tokens, ids)                                     # [Tsum, D] residual stream
        for i, layer in enumerate(self.layers):
            x = ops.enter_layer(i, x)                     # hybrid engines move x to where layer i runs
            x += self._attention(i, layer, ops.rms_norm(x, layer.attn_norm, self.config.rms_norm_eps),
                                 caches, starts, rows, cos, sin)
            h = ops.rms_norm(x, layer.ffn_norm, self.config.rms_norm_eps)
            idx = self.ffn_neurons(i, x, h) if self.ffn_neurons is not None else None
            if layer.down is None:
                x += ops.ffn(h, layer.gate, layer.up, layer.down_t, self.config.hidden_act, idx)
            else:                                         # integer dots: the dense FFN multiplies by down
                x += ops.ffn(h, layer.gate, layer.up, layer.down_t, self.config.hidden_act, idx, down=layer.down)
        for cache, T in zip(caches, lengths):
            cache.advance(T)
        if last_only:
            x = x[rows[1:] - 1]                                                   # each sequence's last row
            rows = np.arange(len(seqs) + 1)
        x = ops.enter_output(x)
        x = ops.rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        if head is None:
            logits = ops.to_host(ops.linear(x, self.lm_head))                     # [rows, V] on the host
        else:
            logits = np.concatenate([ops.to_host(ops.linear(x, w)) for w in head], axis=1)
        return [logits] if len(seqs) == 1 else [logits[rows[s]:rows[s + 1]] for s in range(len(seqs))]

    def _attention(self, i, layer: LayerWeights, h, caches, starts, rows, cos, sin) -> np.ndarray:
        """h: normed [Tsum, D] -> attention output [Tsum, D]; appends this layer's k/v to each cache."""
        c, ops = self.config, self.ops
        T = h.shape[0]
        q, k, v = ops.linear_many(h, (layer.q, layer.k, layer.v), (layer.q_bias, layer.k_bias, layer.v_bias))
        q = q.reshape(T, c.num_attention_heads, c.head_dim)
        k = k.reshape(T, c.num_key_value_heads, c.head_dim)
        v = v.reshape(T, c.num_key_value_heads, c.head_dim)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        parts = []
        for s, (cache, start) in enumerate(zip(caches, starts)):
            a, b = rows[s], rows[s + 1]
            k_all, v_all = cache.update_and_fetch(i, k[a:b], v[a:b])              # [Hkv, S, hd]
            parts.append(ops.attention(q[a:b], k_all, v_all, start, c.sliding_window))   # [T_s, H*hd]
        attn = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return ops.linear(attn, layer.o, layer.o_bias)
