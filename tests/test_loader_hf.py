"""HF directory loader: safetensors parsed by hand (F32/F16/BF16, sharded) vs the tensors torch saved."""
import json
import logging

import numpy as np
import pytest

from pipower.errors import ModelFileError, ShapeMismatchError, UnsupportedModelError
from pipower.loader import check_tensors, expected_shapes, load_hf_dir, load_model_files
from pipower.config import ModelConfig

pytest.importorskip("torch")
pytest.importorskip("transformers")
from helpers_models import (random_llama_config, random_mistral_config, random_qwen2_config,  # noqa: E402
                            write_config, write_hf_model)

CONFIGS = {"llama": random_llama_config, "qwen2": random_qwen2_config, "mistral": random_mistral_config}


def assert_same(loaded: dict, saved: dict):
    assert loaded.keys() == saved.keys()
    for name, want in saved.items():
        got = loaded[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture
def llama_dir(tmp_path):
    d = tmp_path / "llama"
    saved = write_hf_model(d, random_llama_config())
    return d, saved


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_dtypes_exact(tmp_path, arch, dtype):
    # bf16/fp16 are compared with torch's .float() of the stored tensor: widening must be exact
    saved = write_hf_model(tmp_path, CONFIGS[arch](), dtype=dtype, seed=3)
    m = load_model_files(tmp_path, progress=False)
    assert_same(m.tensors, saved)
    assert m.config.arch == ("qwen2" if arch == "qwen2" else "llama")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded(tmp_path, dtype):
    saved = write_hf_model(tmp_path, random_llama_config(), dtype=dtype, shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    m = load_hf_dir(tmp_path)
    assert_same(m.tensors, saved)
    assert len(m.metadata["weight_files"]) >= 3


def test_tied_and_untied(tmp_path):
    tied = write_hf_model(tmp_path / "tied", random_llama_config(tie_word_embeddings=True))
    m = load_hf_dir(tmp_path / "tied")
    assert m.config.tie_word_embeddings and "lm_head.weight" not in m.tensors
    assert_same(m.tensors, tied)
    untied = write_hf_model(tmp_path / "untied", random_llama_config(tie_word_embeddings=False))
    m = load_hf_dir(tmp_path / "untied")
    assert not m.config.tie_word_embeddings and "lm_head.weight" in m.tensors
    assert_same(m.tensors, untied)


def test_untied_missing_lm_head(tmp_path):
    write_hf_model(tmp_path, random_llama_config(tie_word_embeddings=True))
    write_config(tmp_path, tie_word_embeddings=False)
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*lm_head\.weight.*tie_word_embeddings"):
        load_hf_dir(tmp_path)


def test_tied_with_stored_lm_head_is_dropped(tmp_path, caplog):
    write_hf_model(tmp_path, random_llama_config(tie_word_embeddings=False))
    write_config(tmp_path, tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="pipower.loader.hf_dir"):
        m = load_hf_dir(tmp_path)
    assert "lm_head.weight" not in m.tensors
    assert "differs from embed_tokens" in caplog.text


def test_qwen2_biases(tmp_path):
    saved = write_hf_model(tmp_path, random_qwen2_config())
    m = load_hf_dir(tmp_path)
    for proj in "qkv":
        b = m.tensors[f"model.layers.1.self_attn.{proj}_proj.bias"]
        assert np.abs(b).max() > 0                      # the helper randomises biases
    assert "model.layers.0.self_attn.o_proj.bias" not in m.tensors
    assert_same(m.tensors, saved)


def test_config_mapping(tmp_path):
    # transformers 5 writes rope_parameters instead of rope_theta; the loader must translate it
    write_hf_model(tmp_path, random_llama_config(rope_theta=123456.0, num_key_value_heads=1, head_dim=32))
    c = load_hf_dir(tmp_path).config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (64, 2, 4, 1, 32, 128, 256)
    assert c.rope_theta == 123456.0
    assert c.rope_scaling is None


def test_linear_rope_scaling(tmp_path):
    write_hf_model(tmp_path, random_llama_config(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    c = load_hf_dir(tmp_path).config
    assert c.rope_scaling["rope_type"] == "linear" and c.rope_scaling["factor"] == 4.0


def test_metadata_and_fingerprint(tmp_path):
    write_hf_model(tmp_path / "a", random_llama_config(), seed=1)
    write_hf_model(tmp_path / "b", random_llama_config(), seed=1)
    write_hf_model(tmp_path / "c", random_llama_config(), seed=2)
    a, b, c = (load_hf_dir(tmp_path / n) for n in "abc")
    assert a.metadata["tokenizer_dir"] == a.source == str((tmp_path / "a").resolve())
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 64


def test_expected_shapes_counts():
    cfg = ModelConfig.from_dict(random_qwen2_config())
    shapes = expected_shapes(cfg)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 16, 64)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (32,)
    assert "lm_head.weight" not in shapes
    assert len(shapes) == 1 + 2 * 12 + 1


def test_check_tensors_extra_and_inv_freq():
    cfg = ModelConfig.from_dict(random_llama_config())
    tensors = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    check_tensors(cfg, tensors, "x")                    # ignorable buffer: dropped, no error
    assert not any("inv_freq" in k for k in tensors)
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    with pytest.raises(ModelFileError, match="unexpected tensor.*layers.2.mlp.up_proj"):
        check_tensors(cfg, tensors, "x")


# ---- bad inputs: the right error class, naming the file ---------------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(ModelFileError, match="nope"):
        load_model_files(tmp_path / "nope")
    with pytest.raises(ModelFileError, match="nope"):
        load_hf_dir(tmp_path / "nope")


def test_missing_config(llama_dir):
    d, _ = llama_dir
    (d / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"config\.json.*not found"):
        load_hf_dir(d)


def test_corrupt_config_json(llama_dir):
    d, _ = llama_dir
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"config\.json.*not valid JSON"):
        load_hf_dir(d)


def test_unknown_architecture(llama_dir):
    d, _ = llama_dir
    write_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*GPT2LMHeadModel"):
        load_hf_dir(d)


def test_missing_weights(llama_dir):
    d, _ = llama_dir
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"no model\.safetensors"):
        load_hf_dir(d)


def test_missing_shard(tmp_path):
    write_hf_model(tmp_path, random_llama_config(), shards=2)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelFileError, match=r"model-00002-of-.*not found"):
        load_hf_dir(tmp_path)


def test_truncated_safetensors(llama_dir):
    d, _ = llama_dir
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) - 100])
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(d)


@pytest.mark.parametrize("kind", ["json", "length", "tiny", "entry", "empty"])
def test_corrupt_header(llama_dir, kind):
    d, _ = llama_dir
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if kind == "json":
        data[8:8 + 10] = b"#" * 10
    elif kind == "length":
        data[:8] = (2 ** 62).to_bytes(8, "little")
    elif kind == "tiny":
        data = data[:5]
    elif kind == "entry":                              # valid JSON, offsets that contradict the shape
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] -= 4
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= n
        data[8:8 + n] = raw.ljust(n)
    else:
        data = b""
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"model\.safetensors"):
        load_hf_dir(d)


def test_unsupported_dtype(tmp_path):
    # a hand-written safetensors file with an I64 tensor
    d = tmp_path
    write_hf_model(d, random_llama_config())
    header = {"x": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    with pytest.raises(UnsupportedModelError, match=r"model\.safetensors.*tensor x.*I64"):
        load_hf_dir(d)


def test_shape_mismatch(llama_dir):
    d, _ = llama_dir
    write_config(d, intermediate_size=96)
    with pytest.raises(ShapeMismatchError, match=r"model\.safetensors.*mlp\.\w+_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_hf_dir(d)


def test_safetensors_file_alone(llama_dir):
    d, _ = llama_dir
    with pytest.raises(ModelFileError, match="directory"):
        load_model_files(d / "model.safetensors")


def test_garbage_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelFileError, match=r"model\.bin.*unknown file format"):
        load_model_files(f)
