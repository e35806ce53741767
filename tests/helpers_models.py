"""Tiny random models on disk, for loader / model / engine tests.

`random_tensors(CFG)` is a NumPy-only tiny model in HF tensor names (no torch needed).
`write_hf_model` uses transformers itself (random init under torch.manual_seed, save_pretrained), so the
directory layout, tensor names, tying and sharding are exactly what HF produces. `write_gguf_from_hf`
writes the same weights as llama.cpp's converter would (names, metadata keys, Q/K row permutation for
arch llama), with gguf.GGUFWriter + gguf.quants.quantize. torch / transformers are imported lazily:
they are test oracles only.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

_ARCH_CLASSES = {"LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
                 "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
                 "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM")}
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_TORCH_DTYPES = ("float32", "float16", "bfloat16")


# Working folder for child processes (`python -m pipower`): never the source tree, whose pipower package
# has no compiled extension when pipower was installed with `pip install .` (see conftest.py).
CHILD_CWD = tempfile.gettempdir()

# A tiny Qwen2-shaped config for graph/engine tests that need no torch (weights from random_tensors).
CFG = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=96, hidden_size=64,
           intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, hidden_act="silu", max_position_embeddings=128, rms_norm_eps=1e-6,
           rope_theta=10000.0, tie_word_embeddings=True)


def random_tensors(cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def w(*shape, s=0.1):
        return (rng.standard_normal(shape) * s).astype(np.float32)
    t = {"model.embed_tokens.weight": w(V, D, s=1.0), "model.norm.weight": 1 + w(D)}
    if not cfg.get("tie_word_embeddings", True):
        t["lm_head.weight"] = w(V, D)
    qwen = cfg["model_type"] == "qwen2"
    gated = cfg.get("mlp_gated", True)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.weight": 1 + w(D),
                  p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(Hkv * hd, D),
                  p + "self_attn.v_proj.weight": w(Hkv * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
                  p + "mlp.up_proj.weight": w(F, D), p + "mlp.down_proj.weight": w(D, F)})
        if qwen:
            t.update({p + "self_attn.q_proj.bias": w(H * hd), p + "self_attn.k_proj.bias": w(Hkv * hd),
                      p + "self_attn.v_proj.bias": w(Hkv * hd)})
        if gated:
            t[p + "mlp.gate_proj.weight"] = w(F, D)
    return t


def random_llama_config(**overrides) -> dict:
    """A tiny HF LLaMA config dict: D=64, 2 layers, H=4, Hkv=2 (GQA), hd=16, F=128, V=256."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return cfg


def random_qwen2_config(**overrides) -> dict:
    """Tiny Qwen2 (q/k/v biases), tied embeddings like the small Qwen2.5 models."""
    return random_llama_config(**{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                  "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                                  **overrides})


def random_mistral_config(**overrides) -> dict:
    return random_llama_config(**{"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                  "sliding_window": None, **overrides})


def make_hf_model(config_dict: dict, seed: int = 0):
    """A transformers model with random weights. Norm weights and biases are randomised too (HF inits
    them to 1 / 0, which would hide a swapped norm or an unpermuted bias)."""
    import torch
    import transformers
    arch = config_dict["architectures"][0]
    cfg_cls, model_cls = (getattr(transformers, n) for n in _ARCH_CLASSES[arch])
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**config_dict)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_hf_model(dir, config_dict: dict, dtype: str = "float32", seed: int = 0,
                   shards: int = 1) -> dict[str, np.ndarray]:
    """Save a random HF model to `dir` (config.json + safetensors, sharded when shards > 1).

    Returns the saved tensors as float32 numpy (bf16/fp16 values widened exactly), keyed by HF name, as
    the loader should return them: lm_head.weight omitted when the embeddings are tied.
    """
    import torch
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {_TORCH_DTYPES}")
    dir = Path(dir)
    model = make_hf_model(config_dict, seed).to(getattr(torch, dtype))
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    kwargs = {}
    if shards > 1:
        total = sum(v.size for v in sd.values()) * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        kwargs["max_shard_size"] = max(total // shards, 1)
    model.save_pretrained(dir, safe_serialization=True, **kwargs)
    if shards > 1 and not (dir / "model.safetensors.index.json").exists():
        raise RuntimeError(f"save_pretrained did not shard {dir} (max_shard_size={kwargs['max_shard_size']})")
    return sd


# ---- GGUF ---------------------------------------------------------------------------------------------

_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)          # model.layers.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_LAYER[module]}.{kind}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF halves -> interleaved pairs, per head.
    w: (out, in) or (out,). Written from the converter's formula, independent of the loader's inverse."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("a", "n"), ("Ġ", "a"), ("o", "n")]


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A GPT-2 byte-level vocab: the 256 byte symbols, then (room permitting) a few merged tokens, then
    <|extra_i|> control tokens up to vocab_size. Returns (tokens, token types, merges "a b")."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tokens = [chr(c) for _, c in sorted(zip(bs, cs))][:vocab_size]
    n_merges = min(len(_MERGES), max(vocab_size - 256, 0))
    merges = [f"{a} {b}" for a, b in _MERGES[:n_merges]]
    tokens += [a + b for a, b in _MERGES[:n_merges]]
    types = [1] * len(tokens)                                      # 1 = NORMAL
    n_extra = vocab_size - len(tokens)
    tokens += [f"<|extra_{i}|>" for i in range(n_extra)]
    types += [3] * n_extra                                         # 3 = CONTROL
    return tokens, types, merges


def quantize_like_gguf(w: np.ndarray, qtype: str) -> tuple[np.ndarray, "object"]:
    """(stored array, GGMLQuantizationType) the way write_gguf_from_hf stores a tensor."""
    from gguf import GGMLQuantizationType, quants
    t = GGMLQuantizationType[qtype]
    if w.ndim == 1:                            # llama.cpp keeps norms and biases in F32
        t = GGMLQuantizationType.F32
    return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), t), t


def expected_after_gguf(w: np.ndarray, qtype: str) -> np.ndarray:
    """What a loader must return for HF weight `w` stored as `qtype`: dequantize(quantize(w))."""
    from gguf import quants
    q, t = quantize_like_gguf(w, qtype)
    return np.asarray(quants.dequantize(q, t), dtype=np.float32)


def write_gguf_from_hf(tensors_fp32: dict[str, np.ndarray], config, path, qtype: str = "F32", *,
                       arch: str | None = None, tokenizer: bool = True, extra_tensors: dict | None = None,
                       skip_keys: tuple = (), extra_kv: dict | None = None, qtype_of: dict | None = None) -> Path:
    """Write HF-named float32 tensors + an HF config (dict or ModelConfig) as a llama.cpp-style GGUF.

    qtype: any type gguf.quants can quantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). `arch`
    overrides general.architecture (to test rejection); `skip_keys` omits metadata keys (suffixes after
    the arch prefix, e.g. "block_count"); `extra_kv` adds metadata (str / int as u32 / float as f32);
    `extra_tensors` adds raw GGUF tensors by GGUF name; `qtype_of` {substring of an HF name: qtype} gives
    matching tensors another type (the first match), as mixed files (Q4_K_M) do.
    """
    import gguf
    cfg = config if isinstance(config, dict) else config.to_dict()
    model_type = cfg.get("model_type") or _MODEL_TYPES[cfg["architectures"][0]]
    gg_arch = arch or ("qwen2" if model_type == "qwen2" else "llama")
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    permute = gg_arch == "llama" and model_type != "qwen2"
    w = gguf.GGUFWriter(str(path), gg_arch)

    def kv(suffix, fn, value):
        if suffix not in skip_keys and value is not None:
            fn(value)
    kv("context_length", w.add_context_length, cfg.get("max_position_embeddings", 2048))
    kv("embedding_length", w.add_embedding_length, D)
    kv("block_count", w.add_block_count, cfg["num_hidden_layers"])
    kv("feed_forward_length", w.add_feed_forward_length, cfg["intermediate_size"])
    kv("attention.head_count", w.add_head_count, H)
    kv("attention.head_count_kv", w.add_head_count_kv, Hkv)
    kv("attention.layer_norm_rms_epsilon", w.add_layer_norm_rms_eps, cfg.get("rms_norm_eps", 1e-6))
    kv("rope.freq_base", w.add_rope_freq_base, cfg.get("rope_theta", 10000.0))
    kv("rope.dimension_count", w.add_rope_dimension_count, hd)
    if hd != D // H:
        kv("attention.key_length", w.add_key_length, hd)
        kv("attention.value_length", w.add_value_length, hd)
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    for k, v in (extra_kv or {}).items():
        {str: w.add_string, int: w.add_uint32, float: w.add_float32}[type(v)](k, v)
    w.add_file_type(0 if qtype == "F32" else 1 if qtype == "F16" else 7)
    if tokenizer:
        tokens, types, merges = byte_level_vocab(cfg["vocab_size"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        if merges:                                                 # GGUFWriter drops empty arrays anyway
            w.add_token_merges(merges)
        for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
            if isinstance(cfg.get(key), int):
                fn(cfg[key])

    for name, t in tensors_fp32.items():
        t = np.asarray(t, dtype=np.float32)
        if permute and ".self_attn.q_proj." in name:
            t = llamacpp_permute(t, H)
        elif permute and ".self_attn.k_proj." in name:
            t = llamacpp_permute(t, Hkv)
        data, gtype = quantize_like_gguf(t, next((q for k, q in (qtype_of or {}).items() if k in name), qtype))
        w.add_tensor(gguf_name(name), data, raw_dtype=gtype)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def write_config(dir, **changes) -> dict:
    """Edit config.json in an HF model directory; returns the new dict."""
    p = Path(dir) / "config.json"
    d = json.loads(p.read_text())
    d.update(changes)
    p.write_text(json.dumps(d, indent=2))
    return d


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|extra_0|>{{ m['role'] }}\n{{ m['content'] }}<|extra_1|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|extra_0|>assistant\n{% endif %}")


def write_tiny_gguf(path, seed: int = 0, extra_kv: dict | None = None, endless: bool = False,
                    **config_overrides) -> Path:
    """A tiny llama GGUF (D=32, 1 layer, V=300: the byte-level BPE vocab with merges and control tokens,
    and a chat template) with random float32 weights made by NumPy alone: no torch, ~50 KB, milliseconds.
    endless: the output rows of EOS and the control tokens are zero (logit 0 while the maximum of the
    others is positive), so a greedy answer never ends by itself: it runs to its token limit."""
    from pipower.config import ModelConfig
    from pipower.loader.validate import expected_shapes
    cfg = random_llama_config(**{"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "head_dim": 16, **config_overrides})
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(ModelConfig.from_dict(cfg)).items():
        w = rng.standard_normal(shape).astype(np.float32)
        tensors[name] = 1.0 + 0.1 * w if name.endswith("norm.weight") else 0.5 * w
    if endless:
        tokens, types, _ = byte_level_vocab(cfg["vocab_size"])
        mute = [i for i, t in enumerate(types) if t == 3] + [cfg["eos_token_id"]]
        head = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
        tensors[head][mute] = 0.0
    kv = {"tokenizer.chat_template": TINY_CHAT_TEMPLATE, **(extra_kv or {})}
    return write_gguf_from_hf(tensors, cfg, path, qtype="F32", extra_kv=kv)
