"""The one LLaMA-family graph (LLaMA, Mistral, Qwen2), written once against the ops interface.

One forward call takes T new token ids, appends their keys/values to the cache, and returns logits.
Shapes: T new tokens, S = cache positions after the call, D hidden, H/Hkv heads, hd head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .ops import NumpyOps
from .rope import cos_sin, inv_frequencies


@dataclass
class LayerWeights:
    attn_norm: np.ndarray            # [D]
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
    down: np.ndarray                 # [D, F]

    @classmethod
    def from_tensors(cls, t: dict, i: int) -> "LayerWeights":
        p = f"model.layers.{i}."
        return cls(
            attn_norm=t[p + "input_layernorm.weight"],
            q=t[p + "self_attn.q_proj.weight"], k=t[p + "self_attn.k_proj.weight"],
            v=t[p + "self_attn.v_proj.weight"], o=t[p + "self_attn.o_proj.weight"],
            q_bias=t.get(p + "self_attn.q_proj.bias"), k_bias=t.get(p + "self_attn.k_proj.bias"),
            v_bias=t.get(p + "self_attn.v_proj.bias"), o_bias=t.get(p + "self_attn.o_proj.bias"),
            ffn_norm=t[p + "post_attention_layernorm.weight"],
            gate=t.get(p + "mlp.gate_proj.weight"), up=t[p + "mlp.up_proj.weight"],
            down=t[p + "mlp.down_proj.weight"],
        )


class Transformer:
    """Weights + graph. Stateless between calls: all per-sequence state lives in the KVCache."""

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], ops: NumpyOps | None = None):
        self.config = config
        self.ops = ops or NumpyOps()
        self.embed_tokens = tensors["model.embed_tokens.weight"]                  # [V, D]
        self.layers = [LayerWeights.from_tensors(tensors, i) for i in range(config.num_hidden_layers)]
        self.final_norm = tensors["model.norm.weight"]                            # [D]
        self.lm_head = tensors.get("lm_head.weight", self.embed_tokens)           # [V, D], tied by default
        self.inv_freq = inv_frequencies(config)                                   # [hd/2]

    def new_cache(self, max_len: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                       max_len or c.max_position_embeddings)

    def forward(self, ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """ids: int [T] at positions cache.length .. +T -> logits float32 [T, V] (or [1, V] if last_only)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T, start = ids.shape[0], cache.length
        if start + T > cache.max_len:
            from .errors import ContextLengthError
            raise ContextLengthError(f"{start + T} tokens exceed the context length {cache.max_len}")
        ops = self.ops
        cos, sin = cos_sin(self.inv_freq, start, T)                               # [T, hd/2] each
        x = ops.embed(self.embed_tokens, ids)                                     # [T, D] residual stream
        for i, layer in enumerate(self.layers):
            x += self._attention(i, layer, ops.rms_norm(x, layer.attn_norm, self.config.rms_norm_eps),
                                 cache, start, cos, sin)
            h = ops.rms_norm(x, layer.ffn_norm, self.config.rms_norm_eps)
            x += ops.ffn(h, layer.gate, layer.up, layer.down, self.config.hidden_act)
        cache.advance(T)
        if last_only:
            x = x[-1:]
        x = ops.rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        return ops.linear(x, self.lm_head)                                        # [T, V]

    def _attention(self, i, layer: LayerWeights, h, cache, start, cos, sin) -> np.ndarray:
        """h: normed [T, D] -> attention output [T, D]; appends this layer's k/v to the cache."""
        c, ops = self.config, self.ops
        T = h.shape[0]
        q = ops.linear(h, layer.q, layer.q_bias).reshape(T, c.num_attention_heads, c.head_dim)
        k = ops.linear(h, layer.k, layer.k_bias).reshape(T, c.num_key_value_heads, c.head_dim)
        v = ops.linear(h, layer.v, layer.v_bias).reshape(T, c.num_key_value_heads, c.head_dim)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        k_all, v_all = cache.update_and_fetch(i, k, v)                            # [S, Hkv, hd]
        attn = ops.attention(q, k_all, v_all, start, c.sliding_window)                # [T, H*hd]
        return ops.linear(attn, layer.o, layer.o_bias)
