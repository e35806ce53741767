"""Byte-level BPE from GGUF metadata: SmolLM2 (pre 'smollm') and Qwen2.5 (pre 'qwen2').

Oracle: transformers builds a tokenizer from the same GGUF (`gguf_file=`). For 'smollm' its
conversion uses the plain GPT-2 ByteLevel pre-tokenizer and drops SmolLM2's Digits(individual_digits)
step, but the SmolLM2 vocabulary has no token or merge containing a digit, so every digit is its own
token either way and the ids agree; the digit split itself is checked from first principles below.
"""
import json
from pathlib import Path

import pytest

from pipower.errors import FetchError, TokenizerError
from pipower.fetcher import fetch
from pipower.tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir
from pipower.tokenizer.bpe import PRE_TOKENIZERS, build_hf_bpe, bytes_to_unicode

TEXTS = [
    "", " ", "\n", "a", "Hello world! 123", "The capital of France is Paris.",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) {\r\n  sum += a[i];\r\n}", "x=12345.678e-9; y = 'it's' I'M we've THEY'LL",
    "日本語のテキスト 中文 한국어", "emoji 🤗🎉👨‍👩‍👧 flags 🇫🇷 café naïve e\u0301\u0300",
    "  multiple   spaces\t\ttabs\n\n\n  \n", "\u00a0nbsp\u2003em\u200bzwsp", "🦙" * 7, "a" * 200,
]


@pytest.fixture(scope="module")
def smol_path():
    try:
        return Path(fetch("smollm2-135m", progress=False))
    except FetchError as e:
        pytest.skip(f"cannot fetch smollm2-135m: {e}")


@pytest.fixture(scope="module")
def smol(smol_path):
    return tokenizer_from_gguf_metadata(read_gguf_metadata(smol_path))


def _hf_from_gguf(path: Path, tmp_dir: Path):
    """transformers' own tokenizer conversion of a GGUF (an independent oracle)."""
    transformers = pytest.importorskip("transformers")
    (tmp_dir / path.name).symlink_to(path)
    return transformers.AutoTokenizer.from_pretrained(str(tmp_dir), gguf_file=path.name)


def test_smol_basics(smol):
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.add_bos) == (49152, 1, 2, False)
    assert smol.stop_ids == {0, 2}                       # <|endoftext|>, <|im_end|>
    assert smol.token_text(2) == "<|im_end|>"


def test_smol_roundtrip(smol):
    for text in TEXTS:
        ids = smol.encode(text)
        assert smol.decode(ids) == text, text


def test_smol_expected_ids(smol):
    # ids recorded from SmolLM2's HF tokenizer (also what llama.cpp produces)
    assert smol.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    # digits are always single tokens ('0'..'9' are ids 32..41), a space before them stays alone ('Ġ' 216)
    assert smol.encode("2024") == [34, 32, 34, 36]
    assert smol.encode(" 42") == [216, 36, 34]
    assert [smol.token_text(i) for i in smol.encode("x9y")] == ["x", "9", "y"]


def test_smol_matches_transformers(smol, smol_path, tmp_path):
    ref = _hf_from_gguf(smol_path, tmp_path)
    code = Path(json.__file__).read_text(encoding="utf-8")
    for text in TEXTS + [code, "<|im_start|>user\nhi<|im_end|>\n"]:
        assert smol.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_smol_special_tokens(smol):
    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = smol.encode(text, parse_special=True)
    assert ids[0] == 1 and 2 in ids and ids.count(1) == 1
    plain = smol.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain and len(plain) > len(ids)
    assert smol.decode(plain) == text                   # the markup survives as text
    assert smol.decode(ids) == "user\nhi\n"              # control tokens skipped by default
    assert smol.decode(ids, skip_special=False) == text


def test_smol_stream_decoder(smol):
    for text in TEXTS:
        ids = smol.encode(text)
        dec = smol.stream_decoder()
        pieces = [dec.feed(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in p for p in pieces), text
        assert "".join(pieces) == smol.decode(ids) == text
    # a CJK character is split over several byte-level tokens
    ids = smol.encode("語")
    assert len(ids) > 1
    dec = smol.stream_decoder()
    assert [dec.feed(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_smol_hf_dir_roundtrip(smol, tmp_path):
    """tokenizer.json path (hf.py) on the same vocabulary gives the same ids and text."""
    smol._hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": smol.chat_template}))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.stop_ids == smol.stop_ids
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        for special in (True, False):
            ids = tok.encode(text, parse_special=special)
            assert ids == smol.encode(text, parse_special=special)
            assert tok.decode(ids, skip_special=False) == text


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], table[0xAD]) == ("Ġ", "Ċ", "A", "Ń")


# each pre-tokenizer's split of one probe string, from llama.cpp's regexes / HF tokenizer.json
PROBE = "I'M 12345 ab!!  x\n\n y"
EXPECTED_SPLITS = {  # GPT-2's contractions are case-sensitive ("'M" splits), Qwen2/Llama-3's are not
    "gpt-2": ["I", "'", "M", " 12345", " ab", "!!", " ", " x", "\n\n", " y"],
    "smollm": ["I", "'", "M", " ", "1", "2", "3", "4", "5", " ab", "!!", " ", " x", "\n\n", " y"],
    "qwen2": ["I", "'M", " ", "1", "2", "3", "4", "5", " ab", "!!", " ", " x", "\n\n", " y"],
    "llama3": ["I", "'M", " ", "123", "45", " ab", "!!", " ", " x", "\n\n", " y"],
    # llama.cpp's 'default': punctuation runs, then GPT-2, then digit runs, then groups of 3 digits
    "default": ["I", "'", "M", " ", "123", "45", " ab", "!!", " ", " x", "\n\n", " y"],
}


@pytest.mark.parametrize("pre", sorted(EXPECTED_SPLITS))
def test_pre_tokenizer_splits(pre):
    hf = build_hf_bpe(["a"], [], pre)
    byte = {v: chr(k) for k, v in bytes_to_unicode().items()}
    pieces = ["".join(byte[c] for c in p) for p, _ in hf.pre_tokenizer.pre_tokenize_str(PROBE)]
    assert pieces == EXPECTED_SPLITS[pre]


def test_every_registered_pre_tokenizer_builds():
    for pre in PRE_TOKENIZERS:
        build_hf_bpe(["a", "b", "ab"], ["a b"], pre).encode("ab 12")


def _toy_meta(**over):
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.token_type": [1, 1, 1],
            "tokenizer.ggml.merges": ["a b"]}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def test_metadata_errors():
    assert tokenizer_from_gguf_metadata(_toy_meta()).encode("ab") == [2]
    with pytest.raises(TokenizerError, match="'tokenizer-x'"):
        tokenizer_from_gguf_metadata(_toy_meta(**{"tokenizer.ggml.pre": "tokenizer-x"}))
    for key in ("tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.model"):
        with pytest.raises(TokenizerError, match=key.replace(".", r"\.")):
            tokenizer_from_gguf_metadata(_toy_meta(**{key: None}))
    with pytest.raises(TokenizerError, match="'bert'"):
        tokenizer_from_gguf_metadata(_toy_meta(**{"tokenizer.ggml.model": "bert"}))


# --- Qwen2.5 (491 MB) ----------------------------------------------------------------------------

@pytest.mark.slow
def test_qwen_matches_transformers(tmp_path):
    try:
        path = Path(fetch("qwen2.5-coder-0.5b", progress=False))
    except FetchError as e:
        pytest.skip(f"cannot fetch qwen2.5-coder-0.5b: {e}")
    tok = tokenizer_from_gguf_metadata(read_gguf_metadata(path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (151936, 151643, 151645, False)
    assert {151643, 151645} <= tok.stop_ids
    ref = _hf_from_gguf(path, tmp_path)
    code = Path(json.__file__).read_text(encoding="utf-8")
    chat = "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n<tool_call>x</tool_call><|im_end|>\n"
    for text in TEXTS + [code, chat]:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids, skip_special=False) == text
    assert tok.encode("12345") == [16, 17, 18, 19, 20]            # qwen2 splits digits one by one
    assert tok.encode(chat)[0] == 151644


def test_merges_split_at_the_first_space_after_the_first_character():
    """build_hf_bpe splits 'left right' at the first space (fast path) or, where some merge starts with
    ' ', at the first space after the first character: both give the model the rule says."""
    import json
    from pipower.tokenizer.bpe import build_hf_bpe

    def merges_of(hf):
        return [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]

    tokens = ["a", "b", " ", "ab", " a", " ab"]
    assert merges_of(build_hf_bpe(tokens, ["a b"], "gpt-2")) == [("a", "b")]
    # '  a' is ' ' + 'a' (a plain split at the first space would read '' + ' a')
    assert merges_of(build_hf_bpe(tokens, ["a b", "  a", " a b"], "gpt-2")) == [("a", "b"), (" ", "a"), (" a", "b")]
