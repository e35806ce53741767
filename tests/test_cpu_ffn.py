"""pipower._cpu._ffn.ffn_sparse and linear_ops.ffn vs NumPy over quant.dequantize.

Reference: float64 over the same dequantized rows; act() in float32 via NumpyOps (as the graph does).
Tolerance 1e-5 relative to sum_i |h_i| |down_t[i]| plus the propagated gate/up dot error (same argument
as tests/test_cpu_linear.py: only float32 summation order differs).
"""
import numpy as np
import pytest

from pipower import _cpu
from pipower.ops import NumpyOps
from pipower.quant import ROW_FORMATS as FORMATS, dequantize, quantize

Fm = pytest.importorskip("pipower._cpu._ffn", reason=f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")
from pipower._cpu import _linear as L  # noqa: E402
from pipower._cpu import linear_ops  # noqa: E402

REF = NumpyOps()
SIMDS = (True, False) if L.HAVE_AVX512 else (False,)
ACTS = ("silu", "relu", "gelu", "gelu_pytorch_tanh")


def make(F, D, fmt, gated=True, seed=0):
    g = np.random.default_rng(seed + 31 * F + D)
    mats = [quantize((g.standard_normal((F, D)) * 0.1).astype(np.float32), fmt) for _ in range(3)]
    x = g.standard_normal(D).astype(np.float32)
    return (mats[0] if gated else None), mats[1], mats[2], x, g


def pair(m):
    return None if m is None else (m.data, m.scales)


def reference(x, gate, up, down, act, idx):
    """-> (out float64 [T, D], error scale [T, D], h [T, n]); x [T, D]."""
    idx = np.arange(up.shape[0]) if idx is None else idx
    U = dequantize(up)[idx].astype(np.float64)
    u = x.astype(np.float64) @ U.T
    if gate is not None:
        G = dequantize(gate)[idx].astype(np.float64)
        h = REF.activation(act, (x.astype(np.float64) @ G.T).astype(np.float32)).astype(np.float64) * u
    else:
        h = REF.activation(act, u.astype(np.float32)).astype(np.float64)
    Dn = dequantize(down)[idx].astype(np.float64)
    # errors of g and u (~1e-7 of sum|w||x|) pass through act and into h; bound them generously
    hs = np.abs(h) + 2 * (np.abs(x) @ np.abs(U).T) * (1 + (np.abs(x) @ np.abs(G).T if gate is not None else 1))
    return h @ Dn, hs @ np.abs(Dn) + 1e-30, h


def check(got, want, scale, tol=1e-5):
    err = np.max(np.abs(got.astype(np.float64) - want) / scale) if want.size else 0.0
    assert err <= tol, f"max error {err:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gated", [True, False])
def test_sparse_subset_matches_reference(fmt, act, gated):
    gate, up, down, x, g = make(1536, 576 if fmt != "f32" else 200, fmt, gated)
    F = up.shape[0]
    for frac in (0.01, 0.1, 0.5):
        idx = np.sort(g.choice(F, max(1, int(F * frac)), replace=False)).astype(np.int32)
        want, scale, h = reference(x[None], gate, up, down, act, idx)
        results = []
        for simd in SIMDS:
            for nt in (1, 2, 3):
                hout = np.empty(idx.size, np.float32)
                y = Fm.ffn_sparse(fmt, x, pair(gate), pair(up), pair(down), idx, act, h_out=hout,
                                  n_threads=nt, simd=simd)
                check(y[None], want, scale)
                np.testing.assert_allclose(hout, h[0], rtol=1e-4, atol=1e-6 * np.abs(h).max())
                results.append(y)
        # bitwise independent of the thread count (same code path)
        for r in results[1:3]:
            assert np.array_equal(r, results[0])
        if len(SIMDS) == 2:
            for r in results[4:6]:
                assert np.array_equal(r, results[3])


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_active_equals_dense(fmt):
    gate, up, down, x, _ = make(4864 // 4, 896, fmt)
    F = up.shape[0]
    dense = Fm.ffn_sparse(fmt, x, pair(gate), pair(up), pair(down), None, "silu", n_threads=2)
    full = Fm.ffn_sparse(fmt, x, pair(gate), pair(up), pair(down), np.arange(F, dtype=np.int32), "silu")
    assert np.array_equal(dense, full)           # same chunks, same order: identical bits
    want, scale, _ = reference(x[None], gate, up, down, "silu", None)
    check(dense[None], want, scale)


def test_empty_idx_gives_zeros():
    gate, up, down, x, _ = make(64, 64, "q4")
    out = np.full(64, np.nan, np.float32)
    y = Fm.ffn_sparse("q4", x, pair(gate), pair(up), pair(down), np.zeros(0, np.int32), "silu", out=out)
    assert y is out and np.all(out == 0)


def test_thread_invariance_many_thread_counts():
    gate, up, down, x, g = make(4864, 128, "q8")
    idx = np.sort(g.choice(4864, 1217, replace=False)).astype(np.int32)
    ref = Fm.ffn_sparse("q8", x, pair(gate), pair(up), pair(down), idx, "silu", n_threads=1)
    for nt in (2, 3, 4, 7, 64):
        assert np.array_equal(Fm.ffn_sparse("q8", x, pair(gate), pair(up), pair(down), idx, "silu",
                                            n_threads=nt), ref)


@pytest.mark.parametrize("idx,match", [
    ([3, 1], "sorted"), ([1, 1], "sorted"), ([0, 64], "within"), ([-1, 2], "within"),
])
def test_bad_idx_rejected(idx, match):
    gate, up, down, x, _ = make(64, 64, "f16")
    with pytest.raises(ValueError, match=match):
        Fm.ffn_sparse("f16", x, pair(gate), pair(up), pair(down), np.array(idx, np.int32), "silu")


@pytest.mark.parametrize("bad,match", [
    (dict(idx=np.array([1, 2], np.int64)), "dtype"),
    (dict(act="tanh"), "unknown activation"),
    (dict(x=np.zeros(63, np.float32)), "x must have shape"),
    (dict(fmt="q4"), "dtype"),
    (dict(h_out=np.zeros(3, np.float32)), "h_out must have shape"),
    (dict(out=np.zeros(64, np.float64)), "dtype"),
    (dict(n_threads=0), "n_threads"),
])
def test_bad_arguments_rejected(bad, match):
    gate, up, down, x, _ = make(64, 64, "q8")
    a = dict(fmt="q8", x=x, gate=pair(gate), up=pair(up), down_t=pair(down), idx=np.array([1, 2], np.int32),
             act="silu")
    a.update(bad)
    with pytest.raises(ValueError, match=match):
        Fm.ffn_sparse(**a)


def test_mismatched_matrix_shapes_rejected():
    gate, up, down, x, _ = make(64, 64, "q8")
    small, _, _, _, _ = make(32, 64, "q8")
    with pytest.raises(ValueError, match="gate must be"):
        Fm.ffn_sparse("q8", x, pair(small), pair(up), pair(down), None, "silu")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 2, 37])
@pytest.mark.parametrize("sparse", [False, True])
def test_linear_ops_ffn(fmt, T, sparse):
    gate, up, down, _, g = make(600, 128, fmt)
    x = g.standard_normal((T, 128)).astype(np.float32)
    idx = np.sort(g.choice(600, 150, replace=False)).astype(np.int32) if sparse else None
    y = linear_ops.ffn(x, gate, up, down, "silu", 2, idx=idx)
    assert y.shape == (T, 128) and y.dtype == np.float32
    want, scale, _ = reference(x, gate, up, down, "silu", idx)
    check(y, want, scale)


def test_linear_ops_ffn_rejects_bad_idx():
    gate, up, down, _, _ = make(64, 64, "q4")
    with pytest.raises(ValueError, match="sorted"):
        linear_ops.ffn(np.zeros((3, 64), np.float32), gate, up, down, "silu", 1, idx=np.array([2, 1], np.int32))
