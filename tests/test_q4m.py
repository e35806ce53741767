"""q4m: the affine 4-bit format (scale and offset per block of 32), from floats and straight from GGUF
Q4_1 / Q4_K blocks, and a model on it: the integer-dot reference, the kernels bitwise, batch and thread
invariance, clear errors where it has no kernels."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

import pipower
from helpers_kernels import INT_SIMD
from helpers_models import random_llama_config, random_qwen2_config, random_tensors, write_gguf_from_hf
from pipower import intdot, panels
from pipower.loader.native import from_q4_1, from_q4_k
from pipower.quant import dequantize, quantize

RNG = np.random.default_rng(7)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
IDS = [1, 17, 200, 3, 99, 42, 7, 250, 11, 5, 60]


def needs_ext():
    from pipower import _cpu
    if not _cpu.AVAILABLE:
        pytest.skip(f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")


def test_quantize_q4m_error_is_half_a_step_and_uses_the_block_range():
    # blocks far from zero-centred: q4m keeps their whole range on 16 levels (q4's symmetric grid does not)
    w = (RNG.standard_normal((24, 256)) * 0.1 + RNG.uniform(-3, 3, (24, 1))).astype(np.float32)
    m = quantize(w, "q4m")
    err = np.abs(dequantize(m) - w).reshape(24, -1, 32).max(axis=-1)
    d = m.scales.astype(np.float32)
    o = np.abs(m.offsets.astype(np.float32))
    assert np.all(err <= d / 2 + o * 2 ** -11 + 1e-7)
    assert np.abs(dequantize(m) - w).mean() < np.abs(dequantize(quantize(w, "q4")) - w).mean() / 2
    nib = np.concatenate([m.data & 15, m.data >> 4], axis=1)
    assert nib.min() == 0 and nib.max() == 15
    assert m.nbytes == w.size * 0.625


def q4_1_bytes(w):
    return np.asarray(gguf_quants.quantize(w, GGMLQuantizationType.Q4_1))


def random_q4_k_bytes(n_rows, K):
    """Random but valid Q4_K rows: f16 d / dmin, 12 bytes of 6-bit scales and minimums, 128 of nibbles."""
    nsb = n_rows * K // 256
    b = RNG.integers(0, 256, (nsb, 144), dtype=np.uint8)
    b[:, 0:2] = np.float16(RNG.uniform(1e-3, 2e-2)).reshape(1).view(np.uint8)
    b[:, 2:4] = np.float16(RNG.uniform(1e-3, 1e-2)).reshape(1).view(np.uint8)
    for i in range(nsb):            # a spread of per-superblock scales
        b[i, 0:2] = np.float16(RNG.uniform(1e-3, 2e-2)).reshape(1).view(np.uint8)
    return b.reshape(n_rows, -1)


def test_q4_1_blocks_convert_with_their_nibbles_and_scales():
    w = RNG.standard_normal((16, 128)).astype(np.float32)
    raw = q4_1_bytes(w)
    m = from_q4_1(raw, w.shape)
    want = gguf_quants.dequantize(raw, GGMLQuantizationType.Q4_1)
    blocks = raw.reshape(16, 4, 20)
    assert np.array_equal(m.data.reshape(16, 4, 16), blocks[..., 4:])                    # nibbles as stored
    assert np.array_equal(m.scales.view(np.uint8).reshape(16, 4, 2), blocks[..., :2])    # d exactly
    o = np.abs(m.offsets.astype(np.float32))[..., None]
    err = np.abs(dequantize(m) - want).reshape(16, 4, 32)
    assert np.all(err <= o * 2 ** -11 + 1e-7)                                          # only o rounds


def test_q4_k_blocks_convert_within_float16_rounding_of_scale_and_offset():
    raw = random_q4_k_bytes(8, 512)
    m = from_q4_k(raw, (8, 512))
    want = gguf_quants.dequantize(raw, GGMLQuantizationType.Q4_K)                     # [8, 512]
    got = dequantize(m)
    d = m.scales.astype(np.float32)[..., None]
    o = np.abs(m.offsets.astype(np.float32))[..., None]
    err = np.abs(got - want).reshape(8, 16, 32)
    assert np.all(err <= (8 * d + o) * 2 ** -10 + 1e-7)
    # the nibbles are the file's: where d sc is exact in float16, the values are too (up to o)
    requant = np.abs(dequantize(quantize(want, "q4m")) - want).max()
    assert np.abs(got - want).max() < requant / 4


def test_q4_k_sub_block_order_follows_the_file():
    # one superblock, every sub-block s with scale s + 1, minimum 0 and all nibbles = 3: values 3 (s + 1) d
    b = np.zeros((1, 144), np.uint8)
    b[0, 0:2] = np.float16(0.5).reshape(1).view(np.uint8)
    sc = np.arange(1, 9, dtype=np.uint8)
    b[0, 4:8] = sc[:4]                                                   # j < 4: scales[j] & 63
    b[0, 12:16] = sc[4:] & 15                                            # j >= 4: low bits in scales[j + 4]
    b[0, 16:] = 0x33
    m = from_q4_k(b, (1, 256))
    np.testing.assert_array_equal(dequantize(m).reshape(8, 32), np.repeat(1.5 * sc[:, None], 32, axis=1))
    np.testing.assert_array_equal(dequantize(m), gguf_quants.dequantize(b, GGMLQuantizationType.Q4_K))


@pytest.mark.parametrize("T", [1, 2, 5, 8, 11])
def test_integer_dot_reference_is_close_to_the_float_product(T):
    w = (RNG.standard_normal((40, 320)) * 0.05 + RNG.uniform(-0.2, 0.2, (40, 1))).astype(np.float32)
    m = quantize(w, "q4m")
    x = RNG.standard_normal((T, 320)).astype(np.float32)
    exact = x @ dequantize(m).T
    got = intdot.dot(m, x)
    # activation rounding: <= dx / 2 per element, times |w|
    bound = (np.abs(x).reshape(T, -1, 32).max(axis=-1) / 254).repeat(32, axis=1) @ np.abs(dequantize(m)).T
    assert np.all(np.abs(got - exact) <= bound * 1.01 + 1e-5)


def test_panels_kernel_is_bitwise_the_reference_on_every_isa_and_batch():
    needs_ext()
    from pipower._cpu import _panel
    m = quantize((RNG.standard_normal((53, 1056)) * 0.1 + 0.02).astype(np.float32), "q4m")
    p = panels.pack(m)
    x = RNG.standard_normal((33, 1056)).astype(np.float32)
    x[4] = 0
    want = intdot.dot(m, x)
    for isa in INT_SIMD:
        for nt in (1, 2):
            for T in (1, 3, 8, 9, 33):
                got = _panel.gemm_panels("q4m", p.data, p.scales, 53, x[:T], n_threads=nt, simd=isa,
                                         offsets=p.offsets)
                assert np.array_equal(got.view(np.uint32), want[:T].view(np.uint32)), (isa, nt, T)
    # the offsets matter: without them the result is q4's
    q4 = _panel.gemm_panels("q4", p.data, p.scales, 53, x[:3])
    assert not np.allclose(q4, want[:3], atol=1e-3)


def tiny_model(tmp_path, qtype="Q4_1", arch="qwen2", backend="cython", threads=2, **kw):
    cfg = (random_qwen2_config if arch == "qwen2" else random_llama_config)(**TINY)
    path = tmp_path / f"{arch}-{qtype}.gguf"
    if not path.exists():
        write_gguf_from_hf(random_tensors(cfg, 0), cfg, path, qtype=qtype)
    return pipower.load(path, backend=backend, weights="q4m", threads=threads, cache=False, progress=False, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_matrices_are_the_files_q4_1_blocks(tmp_path, arch):
    needs_ext()
    from pipower.loader import load_gguf
    model = tiny_model(tmp_path, arch=arch)
    files = load_gguf(tmp_path / f"{arch}-Q4_1.gguf", progress=False)
    layer = model.transformer.layers[1]
    for name, hf in (("q", "self_attn.q_proj"), ("up", "mlp.up_proj"), ("down", "mlp.down_proj")):
        m = panels.unpack(getattr(layer, name))
        want = files.tensors[f"model.layers.1.{hf}.weight"]                  # the file's values (unpermuted)
        o = np.abs(m.offsets.astype(np.float32)).repeat(32, axis=1)
        assert np.all(np.abs(dequantize(m) - want) <= o * 2 ** -11 + 1e-7), name
    files.close()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_forward_is_batch_and_thread_invariant_and_matches_the_reference(tmp_path, arch):
    needs_ext()
    model = tiny_model(tmp_path, arch=arch)
    t = model.transformer
    assert all(isinstance(getattr(lw, n), panels.Panels) and getattr(lw, n).fmt == "q4m"
               for lw in t.layers for n in ("q", "k", "v", "o", "gate", "up", "down"))
    cache = t.new_cache(64)
    batch = t.forward(np.array(IDS), cache)                                   # [T, V]
    cache = t.new_cache(64)
    steps = np.concatenate([t.forward(np.array([i]), cache) for i in IDS])
    assert np.array_equal(batch, steps)                                       # bitwise, T = 11 vs 11 steps
    one = tiny_model(tmp_path, arch=arch, threads=1)
    assert np.array_equal(one.logits(IDS), model.logits(IDS))
    ref = tiny_model(tmp_path, arch=arch, backend="numpy")                   # NumPy: pipower.intdot's dots
    assert ref.weights == "q4m" and ref.dot == "int8"
    np.testing.assert_allclose(model.logits(IDS), ref.logits(IDS), rtol=1e-4, atol=1e-4)
    assert model.generate("the", max_tokens=6) == ref.generate("the", max_tokens=6)


@pytest.mark.parametrize("weights", ["q4m", "native"])
def test_sparse_ffn_on_q4m_runs_on_q8_rows_close_to_dense(tmp_path, weights):
    """The sparse FFN kernels have no q4m code: a q4m layer's sparse calls run on q8 copies of its gate and
    up rows (built on first use) with a q8 down_t; every neuron kept = dense up to q8's rounding."""
    needs_ext()
    model = tiny_model(tmp_path) if weights == "q4m" else mixed_model(tmp_path)
    t = model.transformer
    layer = t.layers[0]
    assert layer.down_t.fmt == "q8" and layer.up.fmt == "q4m"
    x = np.random.default_rng(3).standard_normal((1, TINY["hidden_size"])).astype(np.float32)
    dense = t.ops.ffn(x, layer.gate, layer.up, layer.down_t, "silu", down=layer.down)
    every = t.ops.ffn(x, layer.gate, layer.up, layer.down_t, "silu", idx=np.arange(TINY["intermediate_size"],
                                                                                   dtype=np.int32))
    np.testing.assert_allclose(every, dense, rtol=0.05, atol=0.05 * np.abs(dense).max())
    gate, up, _ = t.ops._sparse_bundles(layer.gate, layer.up, layer.down_t)
    assert gate.fmt == up.fmt == "q8"
    np.testing.assert_allclose(dequantize(up), dequantize(panels.unpack(layer.up)),
                               atol=np.abs(dequantize(panels.unpack(layer.up))).max() / 254 * 1.01)
    half = np.arange(0, TINY["intermediate_size"], 2, dtype=np.int32)
    assert not np.allclose(t.ops.ffn(x, layer.gate, layer.up, layer.down_t, "silu", idx=half), every)


def test_q4m_refuses_float_dots(tmp_path):
    from pipower.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="integer dots only"):
        tiny_model(tmp_path, dot="float")


# ---- weights="native": per matrix of a GGUF, its 4-bit blocks kept as q4m, every other one q8 ----------

MIXED = {"mlp.down_proj": "Q8_0", "self_attn.v_proj": "Q5_0", "embed_tokens": "Q8_0"}


def mixed_model(tmp_path, weights="native", backend="cython", arch="qwen2"):
    cfg = (random_qwen2_config if arch == "qwen2" else random_llama_config)(**TINY)
    path = tmp_path / f"mixed-{arch}.gguf"
    if not path.exists():
        write_gguf_from_hf(random_tensors(cfg, 1), cfg, path, qtype="Q4_0", qtype_of=MIXED)
    return pipower.load(path, backend=backend, weights=weights, threads=2, cache=False, progress=False)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_native_keeps_4_bit_matrices_and_makes_the_rest_q8(tmp_path, arch):
    needs_ext()
    from pipower.loader import load_gguf
    model = mixed_model(tmp_path, arch=arch)
    assert model.weights == "native" and model.dot == "int8"
    t = model.transformer
    for lw in t.layers:
        assert {n: getattr(lw, n).fmt for n in ("q", "k", "v", "o", "gate", "up", "down", "down_t")} == dict(
            q="q4m", k="q4m", v="q8", o="q4m", gate="q4m", up="q4m", down="q8", down_t="q8")
    # Q4_0 blocks convert exactly (offset 0): the file's values
    files = load_gguf(tmp_path / f"mixed-{arch}.gguf", progress=False)
    q = panels.unpack(t.layers[1].q)
    assert not q.offsets.any()
    np.testing.assert_array_equal(dequantize(q), files.tensors["model.layers.1.self_attn.q_proj.weight"])
    files.close()
    # one forward over 11 tokens = 11 steps, bitwise; close to the NumPy reference of the same matrices
    cache = t.new_cache(64)
    batch = t.forward(np.array(IDS), cache)
    cache = t.new_cache(64)
    assert np.array_equal(batch, np.concatenate([t.forward(np.array([i]), cache) for i in IDS]))
    ref = mixed_model(tmp_path, backend="numpy", arch=arch)
    np.testing.assert_allclose(model.logits(IDS), ref.logits(IDS), rtol=1e-4, atol=1e-4)


def test_native_on_a_file_without_4_bit_matrices_is_q8(tmp_path):
    needs_ext()
    cfg = random_qwen2_config(**TINY)
    path = write_gguf_from_hf(random_tensors(cfg, 2), cfg, tmp_path / "q8.gguf", qtype="Q8_0")
    kw = dict(backend="cython", threads=2, cache=False, progress=False)
    native, q8 = pipower.load(path, weights="native", **kw), pipower.load(path, weights="q8", **kw)
    assert np.array_equal(native.logits(IDS), q8.logits(IDS))


def test_native_needs_a_gguf_and_the_cpu_engine(tmp_path):
    from helpers_models import write_hf_model
    from pipower.errors import InvalidArgumentError
    d = tmp_path / "hf"
    write_hf_model(d, random_qwen2_config(**TINY))
    with pytest.raises(InvalidArgumentError, match="GGUF"):
        pipower.load(d, backend="numpy", weights="native", progress=False)
    from pipower.api import check_dot
    with pytest.raises(InvalidArgumentError, match="CPU engine only"):
        check_dot(None, "native", device="gpu")
    with pytest.raises(InvalidArgumentError, match="integer dots only"):
        check_dot("float", "native")
