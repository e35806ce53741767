"""Real weights: the small real GGUF models' known greedy outputs (fetched once into $PIPOWER_HOME)."""
import numpy as np
import pytest

import pipower
from pipower.errors import ContextLengthError


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch SmolLM2: {e}")
    return pipower.load(path)


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 1e5, True)


def test_smollm2_knows_who_wrote_romeo_and_juliet(smollm2):
    # (Not the capital of France: there "The" and "L" are 0.13 logits apart and the default integer dots
    # answer "L'Étoile, la Cité, ..." -- as llama.cpp does on the same file.)
    answer = smollm2.chat([{"role": "user", "content": "Who wrote Romeo and Juliet?"}], max_tokens=20)
    assert "Shakespeare" in answer
    assert smollm2.last_stats.stop_reason in ("eos", "length")


def test_stream_equals_generate(smollm2):
    prompt = "def fibonacci(n):"
    pieces = list(smollm2.stream(prompt, max_tokens=24))
    assert len(pieces) > 1 and "".join(pieces) == smollm2.generate(prompt, max_tokens=24)


def test_stop_string_cuts_the_output(smollm2):
    full = smollm2.generate("def fibonacci(n):", max_tokens=40)
    assert "\n" in full.strip("\n")
    cut = smollm2.generate("def fibonacci(n):", max_tokens=40, stop=["\n"])
    assert cut == full.split("\n")[0] and smollm2.last_stats.stop_reason == "stop"


def test_prefill_then_decode_equals_one_pass_on_real_weights(smollm2):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    full = smollm2.logits(ids)
    t = smollm2.transformer
    cache = t.new_cache()
    steps = [t.forward(ids[:-5], cache)] + [t.forward(ids[i:i + 1], cache) for i in range(len(ids) - 5, len(ids))]
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_prompt_longer_than_context_raises(smollm2):
    too_long = [1] * (smollm2.config.max_position_embeddings + 1)
    with pytest.raises(ContextLengthError):
        smollm2.generate(too_long, max_tokens=1)
