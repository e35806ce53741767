"""Chat templates: the real SmolLM2 and Qwen2.5 templates (from their GGUFs) and the HF-style environment."""
import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from pipower.errors import FetchError, TokenizerError
from pipower.fetcher import KNOWN_MODELS, fetch, pipower_home
from pipower.tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata
from pipower.tokenizer.chat import render_chat_template

Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol():
    try:
        return tokenizer_from_gguf_metadata(read_gguf_metadata(fetch("smollm2-135m", progress=False)))
    except FetchError as e:
        pytest.skip(f"cannot fetch smollm2-135m: {e}")


@pytest.fixture(scope="module")
def qwen_template():
    # only the metadata is needed: use the 491 MB file when it is already cached, or under -m slow
    cached = pipower_home() / "models" / KNOWN_MODELS["qwen2.5-coder-0.5b"].filename
    if not cached.is_file():
        pytest.skip(f"{cached} not cached (test_tokenizer_bpe.py -m slow fetches it)")
    return read_gguf_metadata(cached)["tokenizer.chat_template"]


def test_smol_template(smol):
    assert smol.apply_chat_template(Q) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    convo = [{"role": "system", "content": "Be brief."}, *Q, {"role": "assistant", "content": "Paris."}]
    assert smol.apply_chat_template(convo, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n")


def test_smol_prompt_tokens(smol):
    ids = smol.encode(smol.apply_chat_template(Q))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2      # 3x <|im_start|>, 2x <|im_end|>


def test_qwen_template(qwen_template):
    assert render_chat_template(qwen_template, Q) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "You write Python."}, *Q]
    assert render_chat_template(qwen_template, own_system, add_generation_prompt=False) == (
        "<|im_start|>system\nYou write Python.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")


def test_qwen_tools_use_tojson(qwen_template):
    tool = {"type": "function", "function": {"name": "météo", "parameters": {}}}
    text = render_chat_template(qwen_template, Q, tools=[tool])
    assert "\n<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in text


def test_missing_template_raises():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a"],
            "tokenizer.ggml.token_type": [1], "tokenizer.ggml.merges": []}
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(Q)
    with pytest.raises(TokenizerError, match="no chat template"):
        render_chat_template(None, Q)


def test_environment_matches_transformers():
    # trim_blocks / lstrip_blocks: a block tag on its own line leaves no blank line or indentation
    t = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<{{ m.content }}>\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(t, Q * 2) == "<What is the capital of France?>\n" * 2
    t = "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}" \
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}{{ eos_token }}"
    assert render_chat_template(t, [{"content": "é"}, {"content": "x"}], bos_token="<s>", eos_token="</s>") \
        == '<s>"é"</s>'
    assert render_chat_template("{{ strftime_now('%Y') }}", Q) == str(datetime.now().year)
    with pytest.raises(TokenizerError, match="only user"):
        render_chat_template("{{ raise_exception('only user roles') }}", Q)
    with pytest.raises(TokenizerError):               # the sandbox blocks attribute escapes
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", Q)
    with pytest.raises(TokenizerError, match="parse"):
        render_chat_template("{% for %}", Q)
    with pytest.raises(TokenizerError):
        render_chat_template("{{ messages[0]['content'] + 1 }}", Q)


def test_bos_token_variable_spm():
    vocab = Path(os.environ.get("PIPOWER_SHARED") or Path(__file__).resolve().parents[2] / "shared") \
        / "data" / "llama-spm-vocab" / "ggml-vocab-llama-spm.gguf"
    if not vocab.is_file():
        pytest.skip("llama.cpp SPM vocab not available")
    meta = read_gguf_metadata(vocab)
    meta["tokenizer.chat_template"] = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]" \
                                      "{% endfor %}"
    tok = tokenizer_from_gguf_metadata(meta)
    prompt = tok.apply_chat_template(Q)
    assert prompt == "<s>[INST] What is the capital of France? [/INST]"
    assert tok.encode(prompt, add_bos=False)[0] == 1
