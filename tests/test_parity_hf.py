"""End to end: random models saved by transformers (and re-written as GGUF) -> pipower.load -> logits,
against transformers' own logits (torch CPU, fp32). Bound: max relative logit error <= 1e-4."""
import numpy as np
import pytest

import pipower
from helpers_models import (make_hf_model, random_llama_config, random_mistral_config, random_qwen2_config,
                            write_gguf_from_hf, write_hf_model)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
V = 320  # > 256 so the GGUF's byte-level vocab has merges (llama.cpp requires the merges key)
CONFIGS = {
    "llama-gqa-untied": random_llama_config(vocab_size=V),
    "llama-mha-tied": random_llama_config(vocab_size=V, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-relu": random_llama_config(vocab_size=V, hidden_act="relu"),
    "llama-rope-linear": random_llama_config(vocab_size=V, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-rope-llama3": random_llama_config(vocab_size=V, rope_scaling=LLAMA3),
    "qwen2-bias-tied": random_qwen2_config(vocab_size=V),
    "mistral-mqa": random_mistral_config(vocab_size=V, num_key_value_heads=1),
}
IDS = np.random.default_rng(7).integers(3, V, 48)


def oracle_logits(cfg, dtype, seed):
    """transformers' logits in fp32 for the weights as stored in `dtype` (what the file holds)."""
    model = make_hf_model(cfg, seed).to(getattr(torch, dtype)).float()
    with torch.no_grad():
        return model(torch.tensor(IDS)[None]).logits[0].numpy()


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def backends():
    from pipower import _cpu
    return ["numpy", "cython"] if _cpu.AVAILABLE else ["numpy"]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_directory_logits_match_transformers(tmp_path, name, dtype, backend):
    cfg = CONFIGS[name]
    write_hf_model(tmp_path, cfg, dtype=dtype, seed=3)
    model = pipower.load(tmp_path, backend=backend)
    assert model.weights == "f32"             # HF directories stay float32 by default
    assert model.tokenizer is None            # no tokenizer files: ids still work
    assert rel_err(model.logits(IDS), oracle_logits(cfg, dtype, seed=3)) <= 1e-4


def test_sharded_directory_equals_single_file(tmp_path):
    cfg = CONFIGS["llama-gqa-untied"]
    write_hf_model(tmp_path / "one", cfg, seed=4)
    write_hf_model(tmp_path / "many", cfg, seed=4, shards=3)
    a = pipower.load(tmp_path / "one", backend="numpy").logits(IDS)
    b = pipower.load(tmp_path / "many", backend="numpy").logits(IDS)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias-tied", "llama-rope-linear"])
def test_gguf_of_the_same_weights_matches(tmp_path, name, qtype):
    """F32 GGUF == HF load exactly in logits (up to summation order); quantized GGUF is close to the
    oracle run on the dequantized weights, checked through the whole graph."""
    cfg = CONFIGS[name]
    tensors = write_hf_model(tmp_path / "hf", cfg, seed=5)
    path = write_gguf_from_hf(tensors, cfg, tmp_path / "m.gguf", qtype=qtype)
    from_gguf = pipower.load(path, backend="numpy")
    from_hf = pipower.load(tmp_path / "hf", backend="numpy")
    got, ref = from_gguf.logits(IDS), from_hf.logits(IDS)
    bound = {"F32": 1e-5, "F16": 5e-3, "Q8_0": 5e-2}[qtype]   # storage rounding of the format
    assert rel_err(got, ref) <= bound
    if qtype == "F32":
        assert from_gguf.config.rope_scaling == from_hf.config.rope_scaling
