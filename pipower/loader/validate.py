"""Check a loaded tensor dict against the config: every expected tensor present, nothing extra, shapes right.

Extra tensors are an error, not a warning: a tensor the graph would not read means the file and the config
disagree (e.g. biases the config does not declare, a layer beyond num_hidden_layers), and silently dropping
it would run a different model than the file describes. Only known non-weight buffers (rotary inv_freq,
which the graph recomputes from the config) are dropped, with a debug log.
"""
from __future__ import annotations

import logging
import re

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError, ShapeMismatchError

log = logging.getLogger(__name__)

# Buffers some exporters save that carry no weights (recomputed from rope_theta / rope_scaling).
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for exactly the tensors the graph reads."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (H * hd, D)
        shapes[p + "self_attn.k_proj.weight"] = (Hkv * hd, D)
        shapes[p + "self_attn.v_proj.weight"] = (Hkv * hd, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, H * hd)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (H * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (Hkv * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (Hkv * hd,)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        if config.mlp_gated:
            shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
    shapes["model.norm.weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> None:
    """Raise ModelFileError (missing / unexpected tensor) or ShapeMismatchError, naming `source`.

    Drops ignorable buffers (IGNORED_TENSORS) from `tensors` in place.
    """
    for name in [n for n in tensors if IGNORED_TENSORS.search(n)]:
        log.debug("%s: ignoring buffer %s", source, name)
        del tensors[name]
    want = expected_shapes(config)
    missing = want.keys() - tensors.keys()
    if missing:
        hint = ""
        if "lm_head.weight" in missing:
            hint = " (lm_head.weight is required because the config has tie_word_embeddings=false)"
        raise ModelFileError(f"{source}: missing tensor(s) {_few(missing)}{hint}")
    extra = tensors.keys() - want.keys()
    if extra:
        raise ModelFileError(f"{source}: unexpected tensor(s) {_few(extra)} that the model config "
                             f"({config.architectures}, {config.num_hidden_layers} layers, "
                             f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}) does not use")
    for name, shape in want.items():
        actual = tuple(tensors[name].shape)
        if actual != shape:
            raise ShapeMismatchError(f"{source}: tensor {name} has shape {list(actual)}, "
                                     f"expected {list(shape)} from the model config")
