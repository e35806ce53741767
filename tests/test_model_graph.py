"""The graph against Hugging Face transformers (torch CPU, the oracle), weights handed over in memory.

End-to-end parity through the file loaders lives in test_parity_hf.py; this file isolates the graph.
"""
import numpy as np
import pytest

from pipower.config import ModelConfig
from pipower.model import Transformer
from pipower.ops import NumpyOps

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama-mqa-headdim": ("llama", {"num_key_value_heads": 1, "head_dim": 32}),
    "llama-relu": ("llama", {"hidden_act": "relu"}),
    "llama-gelu": ("llama", {"hidden_act": "gelu"}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3}),
    "llama-attn-bias": ("llama", {"attention_bias": True}),
    "qwen2-bias": ("qwen2", {}),
    "mistral-window": ("mistral", {"sliding_window": 7}),
}


def hf_model(arch, overrides, seed=0):
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than HF's init so every op visibly matters
    return model


def to_pipower(model):
    config = ModelConfig.from_dict(model.config.to_dict())
    tensors = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return Transformer(config, tensors, NumpyOps())


def max_rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_sequence_logits_match_transformers(case):
    arch, overrides = CASES[case]
    model = hf_model(arch, overrides)
    ids = np.random.default_rng(1).integers(0, BASE["vocab_size"], 40)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    t = to_pipower(model)
    out = t.forward(ids, t.new_cache())
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert max_rel(out, ref) <= 1e-4


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2-bias", "mistral-window"])
def test_prefill_then_decode_equals_one_pass(case):
    t = to_pipower(hf_model(*CASES[case]))
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], 30)
    full = t.forward(ids, t.new_cache())
    cache = t.new_cache()
    parts = [t.forward(ids[:11], cache), t.forward(ids[11:20], cache)]
    parts += [t.forward(ids[i:i + 1], cache) for i in range(20, 30)]
    assert cache.length == 30
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-5 * np.abs(full).max())


def test_last_only_returns_last_row():
    t = to_pipower(hf_model("llama", {}))
    ids = np.arange(12)
    last = t.forward(ids, t.new_cache(), last_only=True)
    full = t.forward(ids, t.new_cache())
    assert last.shape == (1, BASE["vocab_size"])
    # a 1-row GEMM may round differently from the many-row one: equal up to fp32 summation order
    np.testing.assert_allclose(last[0], full[-1], rtol=0, atol=1e-6 * np.abs(full).max())


def test_plain_relu_mlp_matches_numpy_reference():
    # transformers has no ungated LLaMA MLP, so check the block against a direct formula
    ops = NumpyOps()
    rng = np.random.default_rng(3)
    x, up, down = (rng.standard_normal(s).astype(np.float32) for s in [(5, 16), (32, 16), (16, 32)])
    expected = np.maximum(x @ up.T, 0) @ down.T
    np.testing.assert_allclose(ops.ffn(x, None, up, np.ascontiguousarray(down.T), "relu"), expected,
                               rtol=1e-5, atol=1e-6)
