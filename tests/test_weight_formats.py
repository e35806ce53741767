"""Compact weight formats: quantize/dequantize round trips, and the graph over each format."""
import numpy as np
import pytest

from pipower.errors import InvalidArgumentError, UnsupportedModelError
from pipower.model import SPARSE_ROWS, Transformer
from pipower.ops import NumpyOps
from pipower.quant import BLOCK, FORMATS, dequantize, quantize

RNG = np.random.default_rng(0)


def block_max(w):
    return np.abs(w.reshape(w.shape[0], -1, BLOCK)).max(axis=-1)


@pytest.mark.parametrize("fmt, bound", [("q8", 1 / 254), ("q4", 1 / 8)])
def test_block_quantization_error_within_format_bound(fmt, bound):
    w = RNG.standard_normal((48, 160)).astype(np.float32) * RNG.uniform(0.01, 10, (48, 1)).astype(np.float32)
    err = np.abs(dequantize(quantize(w, fmt)) - w).reshape(48, -1, BLOCK).max(axis=-1)
    # the stored scale is float16: allow its relative rounding (2^-11) on top of the format bound
    assert np.all(err <= block_max(w) * bound * (1 + 2 ** -10) + 1e-12)


def test_q4_uses_16_levels_and_q8_is_exact_on_grid_values():
    q = RNG.integers(-127, 128, (8, 32))
    q[:, 0] = 127                                               # every block's scale is exactly 0.5
    w = (q * 0.5).astype(np.float32)
    np.testing.assert_array_equal(dequantize(quantize(w, "q8")), w)
    q = quantize(RNG.standard_normal((4, 64)).astype(np.float32), "q4")
    nibbles = np.concatenate([q.data & 0xF, q.data >> 4])
    assert nibbles.max() <= 15 and len(np.unique(nibbles)) > 8


def test_f16_and_f32_round_trip():
    w = RNG.standard_normal((5, 40)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(quantize(w, "f32")), w)
    np.testing.assert_array_equal(dequantize(quantize(w, "f16")), w.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_dequantization_equals_full(fmt):
    w = RNG.standard_normal((20, 64)).astype(np.float32)
    q = quantize(w, fmt)
    rows = np.array([0, 3, 19], dtype=np.int32)
    np.testing.assert_array_equal(dequantize(q, rows=rows), dequantize(q)[rows])
    assert q.nbytes == {"f32": 4, "f16": 2, "q8": 1.0625, "q4": 0.5625, "q4m": 0.625}[fmt] * w.size


def test_bad_inputs():
    with pytest.raises(UnsupportedModelError, match="multiple of 32"):
        quantize(np.zeros((4, 40), np.float32), "q8")
    with pytest.raises(InvalidArgumentError):
        quantize(np.zeros((4, 32), np.float32), "q3")


def test_zero_blocks_quantize_to_zero():
    for fmt in FORMATS:
        np.testing.assert_array_equal(dequantize(quantize(np.zeros((2, 64), np.float32), fmt)), 0)


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("torch")                 # the HF model is the oracle's source of random weights
    pytest.importorskip("transformers")
    from helpers_models import make_hf_model, random_llama_config
    from pipower.config import ModelConfig
    m = make_hf_model(random_llama_config(), seed=1)
    return ModelConfig.from_dict(m.config.to_dict()), {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_over_format_equals_graph_over_dequantized_weights(tiny, fmt):
    """The graph on QMatrix weights computes exactly what it computes on their dequantized values."""
    config, tensors = tiny
    t = Transformer(config, tensors, NumpyOps(), weights=fmt)
    deq = dict(tensors)
    for name, w in tensors.items():
        if name.endswith("down_proj.weight"):      # stored transposed: blocks run along D; q4m's as q8
            down_fmt = SPARSE_ROWS.get(fmt, fmt)
            deq[name] = dequantize(quantize(np.ascontiguousarray(w.T), down_fmt)).T
        elif w.ndim == 2:
            deq[name] = dequantize(quantize(w, fmt))
    ref = Transformer(config, deq, NumpyOps())
    ids = np.arange(3, 20)
    np.testing.assert_allclose(t.forward(ids, t.new_cache()), ref.forward(ids, ref.new_cache()), rtol=1e-5,
                               atol=1e-5)
    if fmt != "f32":
        assert t.nbytes_per_token < ref.nbytes_per_token


def test_ffn_neuron_subset_equals_zeroing_the_others(tiny):
    config, tensors = tiny
    ops = NumpyOps()
    x = RNG.standard_normal((3, config.hidden_size)).astype(np.float32)
    g, u = tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    dt = np.ascontiguousarray(tensors["model.layers.0.mlp.down_proj.weight"].T)
    idx = np.array([1, 5, 6, 40, 127], dtype=np.int32)
    mask = np.zeros(config.intermediate_size, np.float32)
    mask[idx] = 1
    h = ops.activation("silu", x @ g.T) * (x @ u.T) * mask
    np.testing.assert_allclose(ops.ffn(x, g, u, dt, "silu", idx), h @ dt, rtol=1e-5, atol=1e-6)
    full = np.arange(config.intermediate_size, dtype=np.int32)
    np.testing.assert_allclose(ops.ffn(x, g, u, dt, "silu", full), ops.ffn(x, g, u, dt, "silu"), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_chunked_quantization_equals_one_shot(fmt, monkeypatch):
    """Large matrices are quantized in row chunks (bounded temporaries): same bytes as in one piece."""
    from pipower import quant
    w = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    whole = quant.quantize(w, fmt)
    monkeypatch.setattr(quant, "_CHUNK_FLOATS", 64 * 5)          # 5 rows per chunk, last one short
    chunked = quant.quantize(w, fmt)
    np.testing.assert_array_equal(chunked.data, whole.data)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    assert chunked.data.flags.c_contiguous and chunked.shape == whole.shape
