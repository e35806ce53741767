"""ModelConfig: the model's hyper-parameters under Hugging Face `config.json` key names.

GGUF metadata is translated into the same names by the GGUF loader, so the graph reads one thing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedModelError
from .ops import ACTIVATIONS

# architectures -> the graph flavour we run. Qwen2 = LLaMA + q/k/v biases; Mistral = LLaMA + a sliding
# attention window (`sliding_window`, applied by every attention op). Qwen2 configs carry a sliding_window
# that applies only with use_sliding_window (see from_dict).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)     # the graph runs what the ops table defines


@dataclass
class ModelConfig:
    architectures: list = field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096             # D
    intermediate_size: int = 11008      # n_ff, FFN neurons per layer
    num_hidden_layers: int = 32
    num_attention_heads: int = 32       # H
    num_key_value_heads: int | None = None  # Hkv; None = H (MHA)
    head_dim: int | None = None         # hd; None = D // H
    hidden_act: str = "silu"
    mlp_gated: bool = True              # False: plain up -> act -> down MLP (no gate_proj)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # None, {"rope_type": "linear", "factor"}, {"rope_type": "llama3", ...}
    attention_bias: bool = False        # q/k/v (and o) biases; Qwen2 has q/k/v only
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    sliding_window: int | None = None   # Mistral: a query sees only the last `sliding_window` positions

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.rope_scaling, dict) and "type" in self.rope_scaling and "rope_type" not in self.rope_scaling:
            self.rope_scaling = {**self.rope_scaling, "rope_type": self.rope_scaling["type"]}

    @property
    def arch(self) -> str:
        """The graph flavour: 'llama' or 'qwen2'."""
        for name in self.architectures or []:
            if name in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[name]
        raise UnsupportedModelError(f"unsupported architecture {self.architectures!r}; "
                                    f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.arch != "qwen2" and self.attention_bias

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a HF config.json dict; unknown keys are ignored (HF configs carry many)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if d.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true (biases on gate/up/down) is not supported")
        if isinstance(d.get("rope_parameters"), dict):
            # transformers >= 5 writes rope_theta and the scaling dict together as `rope_parameters`
            rp = dict(d["rope_parameters"])
            kwargs["rope_theta"] = rp.pop("rope_theta", kwargs.get("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                kwargs["rope_scaling"] = rp
        if not kwargs.get("architectures") and "model_type" in d:
            kwargs["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                        "mistral": "MistralForCausalLM"}.get(d["model_type"], d["model_type"])]
        if d.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in (d.get("architectures") or []):
            # Qwen2 configs carry a sliding_window that HF applies only with use_sliding_window (off)
            if not d.get("use_sliding_window", False):
                kwargs["sliding_window"] = None
            elif d.get("max_window_layers", 0) < d.get("num_hidden_layers", 0):
                raise UnsupportedModelError("Qwen2 use_sliding_window with max_window_layers is not supported")
        elif kwargs.get("architectures") == ["LlamaForCausalLM"] or d.get("model_type") == "llama":
            kwargs.pop("sliding_window", None)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise UnsupportedModelError for anything the graph does not implement."""
        _ = self.arch
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported hidden_act {self.hidden_act!r}; supported: {SUPPORTED_ACTIVATIONS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                                        f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise UnsupportedModelError(f"rope_scaling must be a dict or null, got {self.rope_scaling!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"unsupported rope_scaling type {rope_type!r}; supported: none, linear, llama3")
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(rope_type, ())
        for k in needed:
            v = self.rope_scaling.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise UnsupportedModelError(f"rope_scaling type {rope_type} needs a positive number {k}, got {v!r}")
        if rope_type == "llama3" and self.rope_scaling["low_freq_factor"] == self.rope_scaling["high_freq_factor"]:
            raise UnsupportedModelError("rope_scaling type llama3 needs low_freq_factor != high_freq_factor")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
