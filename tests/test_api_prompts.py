"""What Model.generate/stream/generate_ids accept as a prompt (issue #15): str, token ids; never bytes;
and what a model without a tokenizer can still do. Tiny NumPy-made models, no torch, no network."""
import json

import numpy as np
import pytest

import pipower
from helpers_models import random_llama_config, write_tiny_gguf
from pipower.errors import InvalidArgumentError, TokenizerError


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    return pipower.load(write_tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf"), backend="numpy", progress=False)


@pytest.fixture(scope="module")
def no_tokenizer_model(tmp_path_factory):
    """A HF directory with config.json and weights but no tokenizer files."""
    from safetensors.numpy import save_file

    from pipower.config import ModelConfig
    from pipower.loader.validate import expected_shapes
    d = tmp_path_factory.mktemp("hf")
    cfg = random_llama_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    rng = np.random.default_rng(1)
    save_file({n: (0.5 * rng.standard_normal(s)).astype(np.float32)
               for n, s in expected_shapes(ModelConfig.from_dict(cfg)).items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    m = pipower.load(d, backend="numpy", progress=False)
    assert m.tokenizer is None
    return m


@pytest.mark.parametrize("prompt", [b"hi", bytearray(b"hi"), memoryview(b"hi")])
def test_bytes_prompt_is_refused(gguf_model, prompt):
    for call in (gguf_model.generate, gguf_model.stream, gguf_model.generate_ids):
        with pytest.raises(InvalidArgumentError, match="str"):
            call(prompt, max_tokens=2)


@pytest.mark.parametrize("prompt", [[1.5, 2.0], [[1, 2]], 7, [True, False], object()])
def test_non_id_prompt_is_refused(gguf_model, prompt):
    with pytest.raises(InvalidArgumentError):
        gguf_model.generate(prompt, max_tokens=2)


def test_text_with_lone_surrogates_is_refused(gguf_model):
    bad = b"Hello \xff".decode("utf-8", "surrogateescape")     # how argv hands over invalid UTF-8
    with pytest.raises(InvalidArgumentError, match="character 6"):
        gguf_model.generate(bad, max_tokens=2)
    with pytest.raises(InvalidArgumentError):
        gguf_model.chat([{"role": "user", "content": bad}], max_tokens=2)


def test_str_and_ids_prompts_agree(gguf_model):
    ids = gguf_model.tokenizer.encode("Hello there")
    text = gguf_model.generate("Hello there", max_tokens=5)
    assert gguf_model.generate(ids, max_tokens=5) == text
    assert gguf_model.generate(np.array(ids, dtype=np.int32), max_tokens=5) == text
    new = gguf_model.generate_ids("Hello there", max_tokens=5)
    assert gguf_model.generate_ids(ids, max_tokens=5) == new
    assert gguf_model.tokenizer.decode(new) == text


def test_model_without_tokenizer_generates_ids(no_tokenizer_model):
    m = no_tokenizer_model
    new = m.generate_ids([1, 5, 9], max_tokens=4)
    assert len(new) == m.last_stats.new_tokens and 1 <= len(new) <= 4
    assert all(0 <= i < 64 for i in new)
    # greedy: the same as appending each token and taking the logits' argmax
    ids = [1, 5, 9]
    for t in new:
        assert int(np.argmax(m.logits(ids)[-1])) == t
        ids.append(t)


def test_model_without_tokenizer_explains_what_works(no_tokenizer_model):
    m = no_tokenizer_model
    with pytest.raises(TokenizerError) as e:
        m.generate([1, 5, 9], max_tokens=2)           # ids in, but the output is text
    msg = str(e.value)
    assert "generate_ids()" in msg and "logits()" in msg and "pass token ids instead of text" not in msg
    assert "return text" in msg
    with pytest.raises(TokenizerError, match="text prompts need one"):
        m.generate("hello", max_tokens=2)
    with pytest.raises(TokenizerError, match="generate_ids"):
        m.chat([{"role": "user", "content": "hi"}])
