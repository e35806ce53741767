"""The prepared-model cache (pipower.model_cache): cached loads equal fresh ones bitwise, keys follow
the source, damaged files are rebuilt with a warning, concurrent loads are safe, `pipower cache`."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pipower
from pipower import _cpu, model_cache
from pipower.cli import main
from pipower.panels import Panels
from pipower.quant import ROW_FORMATS as FORMATS, QMatrix

from helpers_models import random_llama_config, random_qwen2_config, random_tensors, write_gguf_from_hf
from helpers_models import CHILD_CWD

BACKENDS = ["numpy", pytest.param("cython", marks=pytest.mark.skipif(not _cpu.AVAILABLE,
                                                                       reason="extension not built"))]
IDS = [1, 17, 200, 3, 99, 42, 7]
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPOWER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PIPOWER_CACHE_LOAD", raising=False)
    monkeypatch.setattr(model_cache, "MIN_SOURCE_BYTES", 0)            # tiny models are not cached otherwise
    return tmp_path / "home"


def write_model(path, arch="qwen2", qtype="Q8_0", seed=0):
    cfg = (random_qwen2_config if arch == "qwen2" else random_llama_config)(**TINY)
    return write_gguf_from_hf(random_tensors(cfg, seed), cfg, path, qtype=qtype)


def cache_files():
    d = model_cache.cache_dir()
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def load(path, backend="numpy", weights="q8", **kw):
    return pipower.load(path, backend=backend, threads=1, weights=weights, progress=False, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", list(FORMATS) + ["q4m"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_cached_load_is_bitwise_a_fresh_load(tmp_path, backend, fmt, arch, caplog):
    path = write_model(tmp_path / "m.gguf", arch)
    fresh = load(path, backend, fmt, cache=False)
    assert cache_files() == []                               # cache=False writes nothing
    first = load(path, backend, fmt)                         # builds and writes the cache
    assert len(cache_files()) == 1
    with caplog.at_level(logging.INFO, logger="pipower"):
        warm = load(path, backend, fmt)                      # reads it
    assert "loaded prepared model from" in caplog.text
    want = fresh.logits(IDS)
    for m in (first, warm):
        np.testing.assert_array_equal(m.logits(IDS), want)
        assert m.weights == fmt and m.backend == backend and m.fingerprint == fresh.fingerprint
        assert m.config == fresh.config and m.source == fresh.source
        assert m.tokenizer.encode("the cat") == fresh.tokenizer.encode("the cat")
        assert m.generate("the", max_tokens=4) == fresh.generate("the", max_tokens=4)
    # same memory layout: strides of every weight (FFN bundles on the compiled backend) and tying
    for lw, lf in zip(warm.transformer.layers, fresh.transformer.layers):
        for name in ("q", "gate", "up", "down_t"):
            a, b = getattr(lw, name), getattr(lf, name)
            assert type(a) is type(b)                        # QMatrix, Panels (q4's integer dots) or array
            if isinstance(a, (QMatrix, Panels)):
                # q4m keeps an offset per block; its down_t (sparse FFN rows only) is q8 (model.SPARSE_ROWS)
                assert (a.offsets is None) == (b.offsets is None) == (fmt != "q4m" or name == "down_t")
            a, b = (a.data, b.data) if isinstance(a, (QMatrix, Panels)) else (a, b)
            assert a.strides == b.strides and a.shape == b.shape and a.dtype == b.dtype
        if hasattr(fresh.transformer.ops, "_join"):          # q, k, v one kernel call before and after
            qkv = lambda m, lay: m.transformer.ops._join((lay.q, lay.k, lay.v))  # noqa: E731
            assert (qkv(warm, lw) is None) == (qkv(fresh, lf) is None)
    tr = warm.transformer
    assert (tr.lm_head is tr.embed_tokens) == (arch == "qwen2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_ffn_and_decode_over_cached_weights(tmp_path, backend):
    path = write_model(tmp_path / "m.gguf")
    fresh, _ = load(path, backend, cache=False), load(path, backend)
    warm = load(path, backend)
    rows = np.arange(0, 128, 3, dtype=np.int32)
    outs = []
    for m in (fresh, warm):
        t = m.transformer
        t.ffn_neurons = lambda i, x, h: rows
        cache = t.new_cache(32)
        outs.append([t.forward(np.array(IDS[:3]), cache)] + [t.forward(np.array([i]), cache) for i in IDS[3:]])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt, qtype", [(f, "Q4_0") for f in FORMATS] + [("q4m", "Q4_0"), ("q4m", "Q4_1")])
def test_chunked_gguf_conversion_is_bitwise_whole(tmp_path, fmt, qtype, monkeypatch):
    from pipower.loader import gguf, load_gguf
    from pipower.loader.native import to_q4m
    from pipower.model import store
    from pipower.loader.gguf import unpermute_rows
    path = write_model(tmp_path / "m.gguf", "llama", qtype=qtype)
    monkeypatch.setattr(gguf, "STORE_CHUNK_FLOATS", 64 * 5)          # 5 rows per chunk, 300-row tensors
    files = load_gguf(path, progress=False)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.1.self_attn.q_proj.weight"):     # q: llama row permutation, converted whole
        a = files.tensors.stored(name, fmt)
        if fmt == "q4m":                # Q4_0 / Q4_1 converted from the file's blocks, whole: the same bits
            t = files.tensors._infos[name]
            b = to_q4m(files.tensors._raw(t), t.ggml_type, t.shape)
            if ".q_proj." in name:
                b = type(b)("q4m", b.shape, *(unpermute_rows(x, TINY["num_attention_heads"])
                                              for x in (b.data, b.scales, b.offsets)))
        else:
            b = store(files.tensors[name], fmt)
        for x, y in ((a.data, b.data), (a.scales, b.scales), (a.offsets, b.offsets)) if fmt != "f32" else ((a, b),):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)


def test_key_follows_the_source_and_old_entries_go(tmp_path):
    path = write_model(tmp_path / "m.gguf", seed=0)
    load(path)
    old = cache_files()
    write_model(path, seed=1)                                          # same path, new weights
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    got = load(path).logits(IDS)
    np.testing.assert_array_equal(got, load(path, cache=False).logits(IDS))
    assert len(cache_files()) == 1 and cache_files() != old           # the stale entry was removed
    # weight format and backend layout have entries of their own
    ops_np = pipower.backend.make_ops("numpy", 1)
    keys = {model_cache.cache_path(model_cache.cache_key(path, w, ops_np)) for w in FORMATS}
    assert len(keys) == 4
    if _cpu.AVAILABLE:
        ops_c = pipower.backend.make_ops("cython", 1)
        assert model_cache.cache_key(path, "q8", ops_c)["layout"] != model_cache.cache_key(path, "q8", ops_np)["layout"]


def test_small_models_are_not_cached(tmp_path, monkeypatch):
    path = write_model(tmp_path / "m.gguf")
    monkeypatch.setattr(model_cache, "MIN_SOURCE_BYTES", path.stat().st_size + 1)
    load(path)
    assert cache_files() == []


def test_entries_of_deleted_sources_are_pruned(tmp_path):
    a, b = write_model(tmp_path / "a.gguf"), write_model(tmp_path / "b.gguf", seed=1)
    load(a)
    a.unlink()
    load(b)
    (name,) = cache_files()
    assert name.startswith("b-")


def _damage(p, how):
    data = bytearray(p.read_bytes())
    h = model_cache.read_header(p)
    if how == "truncate":
        data = data[:len(data) // 2]
    elif how == "short-header":
        data = data[:50]
    elif how == "empty":
        data = b""
    elif how == "header-byte":
        data[100] ^= 0x01
    elif how == "data-byte":
        blob = h.json["blobs"][0]
        data[h.data_offset + blob["offset"] + blob["nbytes"] // 2] ^= 0x40
    elif how == "tokenizer-byte":
        blob = h.json["blobs"][h.json["tokenizer_blob"]]
        data[h.data_offset + blob["offset"] + blob["nbytes"] // 2] ^= 0x01
    elif how == "garbage":
        data = bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8))
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "short-header", "empty", "header-byte", "data-byte",
                                 "tokenizer-byte", "garbage"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog, how, backend):
    path = write_model(tmp_path / "m.gguf")
    want = load(path, backend).logits(IDS)
    (f,) = model_cache.cache_dir().glob("*.pwm")
    _damage(f, how)
    with caplog.at_level(logging.WARNING, logger="pipower"):
        got = load(path, backend).logits(IDS)
    assert "prepared-model cache unusable, rebuilding it" in caplog.text
    np.testing.assert_array_equal(got, want)
    model_cache.verify(f)                                             # rewritten whole
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipower"):
        np.testing.assert_array_equal(load(path, backend).logits(IDS), want)
    assert caplog.text == ""


def test_verify_catches_what_sampling_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cache, "_SAMPLES", 2)
    monkeypatch.setattr(model_cache, "_SAMPLE_BYTES", 64)
    path = write_model(tmp_path / "m.gguf")
    load(path)
    (f,) = model_cache.cache_dir().glob("*.pwm")
    h = model_cache.read_header(f)
    big = max(h.json["blobs"], key=lambda b: b["nbytes"])
    data = bytearray(f.read_bytes())
    data[h.data_offset + big["offset"] + big["nbytes"] // 3] ^= 0x01    # between the two samples
    f.write_bytes(bytes(data))
    (e,) = model_cache.entries(check=True)
    assert "checksum" in e.problem
    assert model_cache.entries()[0].problem == ""                      # the quick look passes it


def test_mmap_and_read_modes_agree(tmp_path, monkeypatch):
    path = write_model(tmp_path / "m.gguf")
    want = load(path).logits(IDS)
    for mode in model_cache.LOAD_MODES:
        monkeypatch.setenv("PIPOWER_CACHE_LOAD", mode)
        np.testing.assert_array_equal(load(path).logits(IDS), want)
    monkeypatch.setenv("PIPOWER_CACHE_LOAD", "bogus")
    with pytest.raises(pipower.InvalidArgumentError):
        load(path)


def test_unwritable_cache_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    path = write_model(tmp_path / "m.gguf")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("PIPOWER_HOME", str(blocker))
    with caplog.at_level(logging.WARNING, logger="pipower"):
        m = load(path)
    assert "could not write the prepared-model cache" in caplog.text
    np.testing.assert_array_equal(m.logits(IDS), load(path, cache=False).logits(IDS))


def test_no_cache_file_when_the_disk_is_nearly_full(tmp_path, monkeypatch, caplog):
    path = write_model(tmp_path / "m.gguf")
    monkeypatch.setattr(model_cache, "MIN_FREE_BYTES", 1 << 62)
    with caplog.at_level(logging.WARNING, logger="pipower"):
        load(path)
    assert "not writing the prepared-model cache" in caplog.text and cache_files() == []


_CHILD = textwrap.dedent("""
    import hashlib, sys
    import pipower, pipower.model_cache
    pipower.model_cache.MIN_SOURCE_BYTES = 0
    m = pipower.load(sys.argv[1], backend=sys.argv[2], threads=1, weights="q8", progress=False)
    print(hashlib.sha256(m.logits([1, 17, 200, 3]).tobytes()).hexdigest())
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_loading_at_once(tmp_path, home, backend):
    path = write_model(tmp_path / "m.gguf")
    import hashlib
    want = hashlib.sha256(load(path, backend, cache=False).logits([1, 17, 200, 3]).tobytes()).hexdigest()
    env = {**os.environ, "PIPOWER_HOME": str(home)}
    for _ in range(2):                     # both build and write at once; then both read at once
        procs = [subprocess.Popen(cwd=CHILD_CWD, args=[sys.executable, "-c", _CHILD, str(path), backend], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
            assert out.strip() == want
            assert "Traceback" not in err and "WARNING" not in err
        assert len(cache_files()) == 1                                 # no temporary files left
        model_cache.verify(model_cache.cache_dir() / cache_files()[0])


def test_cli_cache_list_and_clear(tmp_path, capsys):
    path = write_model(tmp_path / "m.gguf")
    assert main(["generate", "-m", str(path), "-n", "1", "--backend", "numpy", "--no-cache", "the"]) == 0
    assert cache_files() == []
    assert main(["generate", "-m", str(path), "-n", "1", "--backend", "numpy", "the"]) == 0
    assert len(cache_files()) == 1
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "1 file" in out and cache_files()[0] in out and str(path.resolve()) in out and "PROBLEM" not in out
    assert main(["cache", "list", "--json", "--verify"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["ok"] and entry["weights"] == "f32" and entry["source"] == str(path.resolve())
    os.utime(path, ns=(0, 10**9))                                      # the source changed: stale
    assert main(["cache", "list"]) == 0
    assert "PROBLEM: stale" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 file" in capsys.readouterr().out
    assert cache_files() == []
    assert main(["cache", "list"]) == 0
    assert "0 files" in capsys.readouterr().out
