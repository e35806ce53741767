"""SentencePiece-style BPE: llama.cpp's reference tokenizations and a cross-check with `sentencepiece`."""
import json
import os
import shutil
from pathlib import Path

import pytest

from pipower.errors import FetchError, TokenizerError
from pipower.tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata, tokenizer_from_hf_dir
from pipower.tokenizer.spm import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, SpmTokenizer

SHARED = Path(os.environ.get("PIPOWER_SHARED") or Path(__file__).resolve().parents[2] / "shared")
VOCAB = SHARED / "data" / "llama-spm-vocab" / "ggml-vocab-llama-spm.gguf"

# Texts for the sentencepiece cross-check: code, unicode, emoji, whitespace runs, newlines, edge cases.
TEXTS = [
    "", " ", "  ", "\n", "\t", "a", "Hello world", " Hello world", "Hello  world  ", "   leading and trailing   ",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "日本語のテキストと中文, 한국어", "Ünïcödé çàfé naïve e\u0301 \u00a0nbsp \u2003em",
    "emoji 🤗🎉 👨‍👩‍👧 flags 🇫🇷", "ied 4 ½ months", "3.14159 1,000,000 2024-05-01",
    "\r\n\r\nwindows", "mixed\t\ttabs \t and  \n  newlines", "▁ already a metaspace ▁▁",
    "<s> not special for sentencepiece </s>", "'''\"\"\"```", "🦙" * 5, "a" * 300,
]


@pytest.fixture(scope="module")
def llama_vocab():
    if not VOCAB.is_file():
        pytest.skip(f"llama.cpp SPM vocab not found at {VOCAB} (set PIPOWER_SHARED)")
    return tokenizer_from_gguf_metadata(read_gguf_metadata(VOCAB))


def _reference_cases():
    texts = VOCAB.with_name(VOCAB.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = VOCAB.with_name(VOCAB.name + ".out").read_text(encoding="utf-8").split("\n")
    return texts[:-1], outs[:-1]            # both files end with a separator / newline


def test_llama_cpp_reference_tokenizations(llama_vocab):
    texts, outs = _reference_cases()
    assert len(texts) == len(outs) == 46
    failures = []
    for text, out in zip(texts, outs):
        expected = [int(x) for x in out.split()]
        got = llama_vocab.encode(text, add_bos=False)
        if got != expected:
            failures.append((text, got, expected))
    assert not failures, failures


def test_llama_vocab_roundtrip_and_defaults(llama_vocab):
    tok = llama_vocab
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (32000, 1, 2, True)
    assert 2 in tok.stop_ids
    texts, _ = _reference_cases()
    for text in texts + TEXTS:
        ids = tok.encode(text, parse_special=False)
        assert ids[:1] == [1]
        # a literal '▁' in the input decodes as a space (sentencepiece does the same)
        assert tok.decode(ids) == text.replace("▁", " "), text
    assert tok.encode("") == [1] and tok.encode("", add_bos=False) == []
    assert tok.decode([1, 15043, 3186, 2], skip_special=False) == "<s> Hello world</s>"


def test_llama_vocab_special_tokens(llama_vocab):
    tok = llama_vocab
    ids = tok.encode("<s>Hi</s>", add_bos=False, parse_special=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    plain = tok.encode("<s>Hi</s>", add_bos=False, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == "<s>Hi</s>"


def test_stream_decoder_never_splits_a_character(llama_vocab):
    tok = llama_vocab
    for text in ["🤗 héllo 日本", "🦙🦙 x", "e\u0301\u0301", "ied 4 ½ months"]:
        ids = tok.encode(text, add_bos=True)
        dec = tok.stream_decoder()
        pieces = [dec.feed(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(ids) == text
        # the byte-fallback tokens really split characters (otherwise this test proves little)
    assert len([i for i in tok.encode("🤗", add_bos=False) if 3 <= i < 259]) == 4
    cont = tok.stream_decoder(strip_first_space=False)
    assert "".join(cont.feed(i) for i in tok.encode("Paris", add_bos=False)) == " Paris"


def test_invalid_bytes_become_replacement_chars(llama_vocab):
    tok = llama_vocab
    lone = 3 + 0xF0                          # <0xF0>: a 4-byte lead with nothing after it
    assert tok.decode([lone]) == "\ufffd"
    assert tok.decode([lone, 3 + 0x41]) == "\ufffdA"
    with pytest.raises(TokenizerError):
        tok.decode([32000])


def test_long_text_is_linearithmic(llama_vocab):
    text = "The quick brown fox jumps over the lazy dog. " * 2000          # 90k characters
    ids = llama_vocab.encode(text, add_bos=False)
    assert llama_vocab.decode(ids) == text


def test_unused_pieces_are_resegmented_and_user_defined_matched_whole():
    # toy vocab: '▁ab' is unused (sentencepiece merges through it but never emits it)
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "▁ab", "<tool>", "c"]
    types = [UNKNOWN, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, NORMAL, UNUSED, USER_DEFINED, NORMAL]
    scores = [0, 0, 0, -5, -5, -5, -1, -0.5, 0, -5]
    tok = SpmTokenizer(tokens, scores, types, bos_id=1, eos_id=2, unk_id=0)
    assert tok.encode("ab", add_bos=False) == [6, 5]          # ▁ab resegmented into ▁a + b
    # user-defined tokens are matched even with parse_special=False (llama.cpp), control ones are not
    assert tok.encode("a<tool>a", add_bos=False, parse_special=False) == [6, 8, 6]
    assert tok.encode("x", add_bos=False) == [3, 0]          # no byte tokens: unknown
    assert tok.decode([6, 8, 6]) == "a<tool> a"


# --- cross-check with the sentencepiece library on a real model (Mistral-7B's tokenizer.model) ------

@pytest.fixture(scope="module")
def mistral_sp():
    spm = pytest.importorskip("sentencepiece")
    from pipower.fetcher import wheel_member
    try:
        path = wheel_member("mistral-common", None, "mistral_common/data/tokenizer.model.v1")
    except FetchError as e:
        pytest.skip(f"cannot fetch the Mistral tokenizer.model: {e}")
    return path, spm.SentencePieceProcessor(model_file=str(path))


def _ours_from_sp(sp) -> SpmTokenizer:
    n = sp.get_piece_size()
    types = [BYTE if sp.is_byte(i) else CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    # This model's normalizer is 'identity' with add_dummy_prefix=True, remove_extra_whitespaces=False
    # (checked below), which is exactly what add_space_prefix=True and no whitespace folding do.
    return SpmTokenizer([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types,
                        bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id(), add_space_prefix=True)


def test_matches_sentencepiece(mistral_sp):
    _, sp = mistral_sp
    ours = _ours_from_sp(sp)
    # the normalizer options the mapping above relies on
    assert sp.encode("  a  b  ", out_type=str) == ["▁▁", "▁a", "▁", "▁b", "▁▁"]   # no whitespace folding
    assert sp.encode("a", out_type=str)[0].startswith("▁")                       # dummy prefix
    code = Path(json.__file__).read_text(encoding="utf-8")[:20000]
    for text in TEXTS + [code]:
        # parse_special=False: sentencepiece never turns '<s>' in text into the control id
        assert ours.encode(text, add_bos=False, parse_special=False) == sp.encode(text), text
        ids = ours.encode(text, add_bos=False, parse_special=False)
        assert ours.decode(ids) == sp.decode(ids) == text.replace("▁", " ")


def test_hf_dir_with_tokenizer_model(mistral_sp, tmp_path):
    path, sp = mistral_sp
    shutil.copy(path, tmp_path / "tokenizer.model")
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": template,
        "added_tokens_decoder": {"32000": {"content": "<|im_end|>", "special": True}}}))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 32001)
    assert {2, 32000} <= tok.stop_ids
    for text in TEXTS:
        assert tok.encode(text, parse_special=False) == [1] + sp.encode(text)
    assert tok.encode("hi<|im_end|>", add_bos=False) == sp.encode("hi") + [32000]
    assert tok.decode(tok.encode("hi<|im_end|>")) == "hi"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x</s>"


def test_hf_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert tokenizer_from_hf_dir(tmp_path) is None


def test_hf_dir_with_spm_style_tokenizer_json(tmp_path):
    """A Llama-2-style tokenizer.json (BPE with byte fallback, '▁' decoder + Strip) decodes like HF."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "▁a", "▁b", "ab", "▁ab", "é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b")]
    hf = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.strip_first_space) == (1, 2, False, True)
    for text in ["ab ab", " a b", "é 🤗 日本 b", "", "bb  a"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        for skip in (True, False):
            full = [1] + ids + [2]
            assert tok.decode(full, skip_special=skip) == hf.decode(full, skip_special_tokens=skip), text
        dec = tok.stream_decoder()
        pieces = [dec.feed(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == tok.decode(ids)
