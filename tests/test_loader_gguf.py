"""GGUF loader: files written from HF weights load back exactly (given the quantization), configs map,
bad files fail with the right error, and the real GGUFs load."""
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipower.errors import FetchError, ModelFileError, UnsupportedModelError  # noqa: E402
from pipower.loader import load_gguf, load_hf_dir, load_model_files  # noqa: E402
from pipower.loader.gguf import unpermute_rows  # noqa: E402
from helpers_models import (expected_after_gguf, llamacpp_permute, random_llama_config,  # noqa: E402
                            random_mistral_config, random_qwen2_config, write_gguf_from_hf, write_hf_model)

CONFIGS = {"llama": random_llama_config, "qwen2": random_qwen2_config,
           "mistral-tied": lambda **kw: random_mistral_config(tie_word_embeddings=True, **kw)}
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """arch -> (HF ModelFiles, HF config dict), written once per module."""
    out = {}
    for arch, make in CONFIGS.items():
        d = tmp_path_factory.mktemp(arch)
        cfg = make()
        write_hf_model(d, cfg, seed=7)
        out[arch] = (load_hf_dir(d), cfg)
    return out


def write(tmp_path, hf_models, model="llama", qtype="F32", name="m.gguf", **kw):
    files, cfg = hf_models[model]
    return write_gguf_from_hf(files.tensors, cfg, tmp_path / name, qtype, **kw)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_exact_given_quantization(tmp_path, hf_models, arch, qtype):
    hf = hf_models[arch][0]
    g = load_gguf(write(tmp_path, hf_models, arch, qtype), progress=False)
    assert g.tensors.keys() == hf.tensors.keys()
    for name, w in hf.tensors.items():
        got = g.tensors[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable, name
        np.testing.assert_array_equal(got, expected_after_gguf(w, qtype), err_msg=name)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_f32_and_f16_vs_hf(tmp_path, hf_models, arch):
    hf = hf_models[arch][0]
    f32 = load_gguf(write(tmp_path, hf_models, arch, "F32"), progress=False)
    f16 = load_gguf(write(tmp_path, hf_models, arch, "F16", name="h.gguf"), progress=False)
    for name, w in hf.tensors.items():
        np.testing.assert_array_equal(f32.tensors[name], w, err_msg=name)
        want16 = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)   # 1-D stay F32
        np.testing.assert_array_equal(f16.tensors[name], want16, err_msg=name)


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    for n_head, hd in ((4, 16), (3, 64), (1, 8)):
        w = rng.standard_normal((n_head * hd, 24)).astype(np.float32)
        b = rng.standard_normal(n_head * hd).astype(np.float32)
        assert not np.array_equal(llamacpp_permute(w, n_head), w)
        np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(w, n_head), n_head), w)
        np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(b, n_head), n_head), b)
    # the layout itself: head 0 stored rows are [0, hd/2, 1, hd/2+1, ...] of the HF rows
    rows = np.arange(16, dtype=np.float32)[:, None]
    assert llamacpp_permute(rows, 1)[:4, 0].tolist() == [0, 8, 1, 9]


def test_qwen2_not_permuted(tmp_path, hf_models):
    # qwen2 GGUFs hold HF row order: the loader must return the stored rows untouched
    path = write(tmp_path, hf_models, "qwen2")
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    g = load_gguf(path, progress=False)
    np.testing.assert_array_equal(g.tensors["model.layers.0.self_attn.q_proj.weight"], raw["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(g.tensors["model.layers.0.self_attn.k_proj.bias"], raw["blk.0.attn_k.bias"])


def test_llama_with_attention_bias(tmp_path):
    # llama arch + biases: q/k biases are permuted by the converter and must be unpermuted too
    cfg = random_llama_config(attention_bias=True)
    saved = write_hf_model(tmp_path / "hf", cfg, seed=1)
    g = load_gguf(write_gguf_from_hf(saved, cfg, tmp_path / "b.gguf"), progress=False)
    assert g.config.attention_bias
    for name, w in saved.items():
        np.testing.assert_array_equal(g.tensors[name], w, err_msg=name)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_config_mapping(tmp_path, hf_models, arch):
    hf = hf_models[arch][0]
    c = load_gguf(write(tmp_path, hf_models, arch), progress=False).config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                  "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "qkv_bias", "o_bias",
                  "arch", "hidden_act", "rope_scaling"):
        assert getattr(c, field) == getattr(hf.config, field), field


def test_config_head_dim_and_rope_scaling(tmp_path):
    cfg = random_llama_config(head_dim=32, num_key_value_heads=1, rope_theta=5e5,
                              rope_scaling={"rope_type": "linear", "factor": 4.0})
    saved = write_hf_model(tmp_path / "hf", cfg)
    g = load_gguf(write_gguf_from_hf(saved, cfg, tmp_path / "m.gguf"), progress=False)
    c = g.config
    assert (c.head_dim, c.num_key_value_heads, c.rope_theta) == (32, 1, 5e5)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    for name, w in saved.items():
        np.testing.assert_array_equal(g.tensors[name], w, err_msg=name)


def test_metadata_matches_gguf_reader(tmp_path, hf_models):
    path = write(tmp_path, hf_models)
    g = load_model_files(path, progress=False)        # dispatch by magic
    fields = gguf.GGUFReader(str(path)).fields
    want = {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}
    assert g.metadata == want
    assert g.metadata["tokenizer.ggml.model"] == "gpt2" and len(g.metadata["tokenizer.ggml.tokens"]) == 256
    assert g.source == str(path.resolve()) and len(g.fingerprint) == 64


def test_dispatch_without_extension(tmp_path, hf_models):
    path = write(tmp_path, hf_models, name="weights.bin")
    assert load_model_files(path, progress=False).config.arch == "llama"


def test_fingerprint_stable_and_sensitive(tmp_path, hf_models):
    a = write(tmp_path, hf_models, name="a.gguf")
    b = write(tmp_path, hf_models, name="b.gguf")
    c = write(tmp_path, hf_models, "llama", "Q8_0", name="c.gguf")
    fa, fb, fc = (load_gguf(p, progress=False).fingerprint for p in (a, b, c))
    assert fa == fb != fc                              # content decides, not the file name or mtime


# ---- bad inputs ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="nope.gguf"):
        load_model_files(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="nope.gguf.*not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.gguf"
    f.write_bytes(b"")
    for load in (load_gguf, load_model_files):
        with pytest.raises(ModelFileError, match="empty.gguf.*empty"):
            load(f)


def test_wrong_magic(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFileError, match="x.gguf"):
        load_gguf(f)
    with pytest.raises(ModelFileError, match="x.gguf"):
        load_model_files(f)


def test_truncated_everywhere(tmp_path, hf_models):
    path = write(tmp_path, hf_models)
    data = path.read_bytes()
    load_gguf(path, progress=False)                    # intact: loads
    cut = tmp_path / "cut.gguf"
    # in the fixed header, inside metadata strings / arrays, inside tensor infos, inside tensor data
    for n in (5, 20, 30, 200, 1500, len(data) // 3, len(data) - 5000, len(data) - 1):
        cut.write_bytes(data[:n])
        with pytest.raises(ModelFileError, match="cut.gguf"):
            load_gguf(cut, progress=False)


def test_garbage_after_magic_is_rejected(tmp_path):
    rng = np.random.default_rng(1)
    f = tmp_path / "garbage.gguf"
    for seed in range(5):
        body = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + body)
        with pytest.raises((ModelFileError, UnsupportedModelError), match="garbage.gguf"):
            load_gguf(f, progress=False)
    # plausible counts but a huge array length: rejected from the declared length, before reading it
    f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                  + (3).to_bytes(8, "little") + b"abc" + (9).to_bytes(4, "little") + (4).to_bytes(4, "little")
                  + (2 ** 60).to_bytes(8, "little") + rng.bytes(64))
    with pytest.raises(ModelFileError, match=r"garbage.gguf.*array at byte 51 runs past the end"):
        load_gguf(f, progress=False)


@pytest.mark.parametrize("arch", ["falcon", "gpt2"])
def test_unknown_arch(tmp_path, hf_models, arch):
    path = write(tmp_path, hf_models, arch=arch)
    with pytest.raises(UnsupportedModelError, match=rf"m.gguf.*{arch}.*supported.*llama.*qwen2"):
        load_gguf(path, progress=False)


def test_unsupported_tensor_type(tmp_path, hf_models):
    files, cfg = hf_models["llama"]
    tensors = dict(files.tensors)
    norm = tensors.pop("model.layers.1.input_layernorm.weight")
    path = write_gguf_from_hf(tensors, cfg, tmp_path / "i32.gguf",
                              extra_tensors={"blk.1.attn_norm.weight": norm.astype(np.int32)})
    with pytest.raises(UnsupportedModelError, match=r"i32.gguf.*blk\.1\.attn_norm\.weight.*I32"):
        load_gguf(path, progress=False)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "attention.head_count",
                                 "feed_forward_length", "context_length", "attention.layer_norm_rms_epsilon"])
def test_missing_metadata_key(tmp_path, hf_models, key):
    path = write(tmp_path, hf_models, skip_keys=(key,))
    with pytest.raises(ModelFileError, match=rf"m.gguf.*'llama\.{key}'"):
        load_gguf(path, progress=False)


def test_bad_metadata_value(tmp_path, hf_models):
    path = write(tmp_path, hf_models, skip_keys=("block_count",), extra_kv={"llama.block_count": "two"})
    with pytest.raises(ModelFileError, match=r"m.gguf.*bad GGUF metadata value"):
        load_gguf(path, progress=False)


def test_rope_freqs_rejected(tmp_path, hf_models):
    # Llama 3.1-style GGUFs store RoPE scaling as a tensor; refusing beats silently wrong positions
    path = write(tmp_path, hf_models, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"m.gguf.*rope_freqs"):
        load_gguf(path, progress=False)


def test_missing_and_extra_tensor(tmp_path, hf_models):
    files, cfg = hf_models["llama"]
    tensors = dict(files.tensors)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ModelFileError, match=r"missing.*layers\.1\.mlp\.down_proj"):
        load_gguf(write_gguf_from_hf(tensors, cfg, tmp_path / "a.gguf"), progress=False)
    path = write_gguf_from_hf(files.tensors, cfg, tmp_path / "b.gguf",
                              extra_tensors={"blk.0.attn_weird.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(ModelFileError, match=r"unexpected.*blk\.0\.attn_weird"):
        load_gguf(path, progress=False)


# ---- the real files ----------------------------------------------------------------------------------

def _real(name: str, network: bool):
    from pipower.fetcher import KNOWN_MODELS, fetch, pipower_home
    cached = pipower_home() / "models" / KNOWN_MODELS[name].filename
    if not cached.is_file() and not network:
        pytest.skip(f"{name} not cached at {cached}")
    try:
        return fetch(name, progress=False)
    except FetchError as e:
        pytest.skip(f"{name} unavailable: {e}")


def _check_against_reader(path, loaded, names, permute_heads) -> set:
    """Independent path: GGUFReader + gguf.quants.dequantize (+ llama.cpp's permute of our output).
    Returns the tensor type names in the file."""
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gname, hname in names:
        t = reader[gname]
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        got = loaded.tensors[hname]
        for key, n in permute_heads.items():
            if key in hname:
                got = llamacpp_permute(got, n)
        np.testing.assert_array_equal(got, want, err_msg=gname)
    return {t.tensor_type.name for t in reader.values()}


def test_real_smollm2():
    path = _real("smollm2-135m", network=True)
    m = load_model_files(path, progress=False)
    c = m.config
    assert c.architectures == ["LlamaForCausalLM"]
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.head_dim) == (576, 30, 9, 3, 1536, 49152, 64)
    assert c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert m.metadata["tokenizer.ggml.pre"] == "smollm"
    _check_against_reader(path, m, [("token_embd.weight", "model.embed_tokens.weight"),
                                    ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
                                    ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
                                    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight")],
                          {"q_proj": 9, "k_proj": 3})


@pytest.mark.slow
def test_real_qwen25_coder_05b():
    path = _real("qwen2.5-coder-0.5b", network=bool(os.environ.get("PIPOWER_TEST_NETWORK")))
    m = load_model_files(path, progress=False)
    c = m.config
    assert c.arch == "qwen2" and c.qkv_bias
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (896, 24, 14, 2, 4864, 151936)
    assert c.rope_theta == 1e6
    # K-quants (Q4_K / Q6_K) and Q5_0 / Q8_0 all appear in this file; no permutation for qwen2
    types = _check_against_reader(path, m, [("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                                    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                                    ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
                                    ("output.weight", "lm_head.weight")], {})
    assert {"Q4_K", "Q6_K"} <= types
