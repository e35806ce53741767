"""FFN neuron bundles (pipower.arena.Arena.bundle_ffn): row-strided weight views that every kernel reads
exactly as the contiguous matrices they came from, and that the fused FFN kernel recognises as bundles.

Bundled and contiguous inputs run the same float operations in the same order (only the addresses of the
rows differ), so the results are compared bitwise.
"""
import numpy as np
import pytest

from pipower import _cpu
from pipower.arena import Arena, bundle_stride, ffn_nbytes
from pipower.quant import ROW_FORMATS as FORMATS, QMatrix, dequantize, quantize

_ffn = pytest.importorskip("pipower._cpu._ffn", reason=f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")
from pipower._cpu import _linear, linear_ops  # noqa: E402


def ffn_mats(F, D, fmt, gated=True, seed=0):
    g = np.random.default_rng(seed)
    mats = [quantize((g.standard_normal((F, D)) * 0.1).astype(np.float32), fmt) for _ in range(3)]
    return (mats[0] if gated else None), mats[1], mats[2]


def bundled(gate, up, down_t, rows=None):
    n = None if rows is None else len(rows)
    arena = Arena(ffn_nbytes(gate, up, down_t, n))
    return arena.bundle_ffn(gate, up, down_t, rows=rows)


def parts(m):
    return None if m is None else (m.data, m.scales)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gated", [True, False])
def test_bundle_views_hold_the_same_weights_in_one_span_per_neuron(fmt, gated):
    gate, up, down = ffn_mats(40, 64, fmt, gated)
    bg, bu, bd = bundled(gate, up, down)
    stride = bundle_stride(gate, up, down)
    assert stride % 64 == 0
    for w, b in ((gate, bg), (up, bu), (down, bd)):
        if w is None:
            assert b is None
            continue
        assert b.fmt == w.fmt and b.shape == w.shape and not b.data.flags.c_contiguous
        np.testing.assert_array_equal(dequantize(b), dequantize(w))
        assert b.data.strides[0] == stride
        if w.scales is not None:
            assert b.scales.strides[0] == stride
    # neuron i's rows and scale rows all lie in [base + i*stride, base + (i+1)*stride)
    base = (bg or bu).data.ctypes.data
    for b in (bg, bu, bd):
        if b is None:
            continue
        for a in ([b.data] + ([b.scales] if b.scales is not None else [])):
            off = a.ctypes.data - base
            assert 0 <= off and off + a.shape[1] * a.itemsize <= stride
    assert linear_ops.ffn_layout(bg, bu, bd) == "bundled"
    assert linear_ops.ffn_layout(gate, up, down) == "separate"


def test_bundle_of_selected_rows_and_unbundleable_layers():
    gate, up, down = ffn_mats(30, 64, "q8")
    rows = np.array([1, 4, 5, 29])
    _, bu, bd = bundled(gate, up, down, rows)
    assert bu.shape == (4, 64)
    np.testing.assert_array_equal(dequantize(bd), dequantize(down)[rows])
    # different formats cannot share bundles: copied separately (contiguous), values kept
    mixed = (quantize(dequantize(gate), "f16"), up, down)
    arena = Arena(ffn_nbytes(*mixed))
    out = arena.bundle_ffn(*mixed)
    assert all(o.data.flags.c_contiguous for o in out)
    np.testing.assert_array_equal(dequantize(out[0]), dequantize(mixed[0]))
    assert linear_ops.ffn_layout(*out) == "separate"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("F, D", [(200, 96), (90, 768)])   # spans prefetched in one burst / spread (q8, f32)
def test_fused_ffn_over_bundles_is_bitwise_the_contiguous_result(fmt, gated, n_threads, F, D):
    gate, up, down = ffn_mats(F, D, fmt, gated, seed=3)
    bg, bu, bd = bundled(gate, up, down)
    x = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    for idx in (None, np.arange(0, F, 3, dtype=np.int32), np.array([7], np.int32)):
        want = _ffn.ffn_sparse(fmt, x, parts(gate), parts(up), parts(down), idx, "silu", n_threads=n_threads)
        got = _ffn.ffn_sparse(fmt, x, parts(bg), parts(bu), parts(bd), idx, "silu", n_threads=n_threads)
        np.testing.assert_array_equal(got, want)
    # several tokens: the batched kernel reads the strided rows too
    X = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
    np.testing.assert_array_equal(linear_ops.ffn(X, bg, bu, bd, "silu", n_threads),
                                  linear_ops.ffn(X, gate, up, down, "silu", n_threads))


@pytest.mark.parametrize("fmt", FORMATS)
def test_projections_read_strided_rows_bitwise(fmt):
    gate, up, down = ffn_mats(70, 128, fmt, seed=5)
    _, bu, _ = bundled(gate, up, down)
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    np.testing.assert_array_equal(_linear.gemv(fmt, bu.data, bu.scales, x, n_threads=2),
                                  _linear.gemv(fmt, up.data, up.scales, x, n_threads=2))
    X = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_array_equal(_linear.gemm(fmt, bu.data, bu.scales, X), _linear.gemm(fmt, up.data, up.scales, X))
    idx = np.array([69, 0, 3, 3], np.int32)
    np.testing.assert_array_equal(_linear.dequantize_rows(fmt, bu.data, bu.scales, idx=idx),
                                  dequantize(up)[idx])


def test_rows_must_be_contiguous_and_not_overlap():
    up = quantize(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32), "q8")
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="contiguous along its last axis"):
        _linear.gemv("q8", up.data[:, ::2], up.scales[:, :1], x[:32])          # gaps inside rows
    overlap = np.lib.stride_tricks.as_strided(up.data, shape=(8, 64), strides=(32, 1))
    with pytest.raises(ValueError, match="contiguous, non-overlapping rows"):
        _linear.gemv("q8", overlap, up.scales, x)


def test_ffn_matrices_must_share_their_row_strides():
    gate, up, down = ffn_mats(16, 64, "q8")
    _, bu, _ = bundled(gate, up, down)
    x = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="strided like up"):
        _ffn.ffn_sparse("q8", x, parts(gate), parts(bu), parts(down), None, "silu")


def test_cython_model_runs_on_bundles_and_matches_numpy():
    from helpers_models import CFG, random_tensors

    from pipower.backend import make_ops
    from pipower.config import ModelConfig
    from pipower.model import Transformer
    from pipower.ops import NumpyOps
    cfg = ModelConfig.from_dict(CFG)
    tc = Transformer(cfg, random_tensors(CFG), make_ops("cython", 2), weights="q8")
    tn = Transformer(cfg, random_tensors(CFG), NumpyOps(), weights="q8")
    assert {linear_ops.ffn_layout(lw.gate, lw.up, lw.down_t) for lw in tc.layers} == {"bundled"}
    ids = np.array([3, 1, 4, 1, 5])
    a = tc.forward(ids, tc.new_cache(16))
    b = tn.forward(ids, tn.new_cache(16))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert isinstance(tc.layers[0].up, QMatrix)


def test_info_reports_the_ffn_layout():
    from helpers_models import CFG, random_tensors
    from pipower.hybrid import StandInDeviceOps, make_hybrid
    from pipower.hybrid.plan import ExecutionPlan

    from pipower.backend import make_ops
    from pipower.config import ModelConfig
    from pipower.info import ffn_layout
    from pipower.model import Transformer
    from pipower.ops import NumpyOps
    cfg = ModelConfig.from_dict(CFG)
    assert ffn_layout(Transformer(cfg, random_tensors(CFG), make_ops("cython", 1), weights="q8")) == "bundled"
    assert ffn_layout(Transformer(cfg, random_tensors(CFG), NumpyOps(), weights="q8")) == "separate"
    int8 = make_ops("cython", 1)
    int8.dot = "int8"                                       # integer dots: weight panels (pipower.panels)
    assert ffn_layout(Transformer(cfg, random_tensors(CFG), int8, weights="q8")) == "panels"
    t = Transformer(cfg, random_tensors(CFG), NumpyOps(), weights="q8")
    t = make_hybrid(t, ExecutionPlan("gpu", ["device"] * cfg.num_hidden_layers, "device"), StandInDeviceOps())
    assert ffn_layout(t) == "device"


def test_plain_float32_arrays_bundle_too():
    """A model stored in f32 keeps plain ndarrays (not QMatrix): they bundle and compute alike."""
    r = np.random.default_rng(4)
    g, u, d = (r.standard_normal((10, 64)).astype(np.float32) for _ in range(3))
    bg, bu, bd = bundled(g, u, d)
    assert type(bu) is np.ndarray and bu.strides == (3 * 64 * 4, 4)
    np.testing.assert_array_equal(bu, u)
    assert linear_ops.ffn_layout(bg, bu, bd) == "bundled"
    x = r.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_array_equal(linear_ops.ffn(x, bg, bu, bd, "silu", 2), linear_ops.ffn(x, g, u, d, "silu", 2))
