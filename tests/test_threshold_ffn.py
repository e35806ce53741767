"""The fused threshold FFN (oracle mode in one pass): the same selection and bitwise the same output as
selecting from a separately computed gate and running the sparse FFN over that selection."""
import numpy as np
import pytest

from pipower import _cpu
from pipower.config import ModelConfig
from pipower.ops import ACTIVATIONS, NumpyOps, Threshold
from pipower.quant import quantize

from helpers_models import CFG, random_tensors

pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def compact(w, fmt):
    if fmt == "f32":
        return w, None
    q = quantize(w, fmt)
    return q.data, q.scales


@pytest.mark.parametrize("fmt,int_dot", [("f32", False), ("f16", False), ("q8", False), ("q4", False),
                                         ("q4", True)])
@pytest.mark.parametrize("act,gated", [("silu", True), ("relu", False), ("gelu_pytorch_tanh", True)])
def test_fused_threshold_is_bitwise_the_sparse_ffn_over_its_selection(fmt, int_dot, act, gated):
    from pipower._cpu import _ffn, _linear
    rng = np.random.default_rng(1)
    D, F = 96, 400
    mats = [compact((0.3 * rng.standard_normal((F, D))).astype(np.float32), fmt) for _ in range(3)]
    gate = mats[0] if gated else None
    sel_w = mats[0] if gated else mats[1]
    for trial in range(3):
        x = rng.standard_normal(D).astype(np.float32)
        pre = (_linear.gemm_int8(fmt, *sel_w, x.reshape(1, -1))[0] if int_dot
               else _linear.gemv(fmt, *sel_w, x))
        a = np.abs(_ffn.activation(act, pre))                   # the kernels' own act (libm)
        srt = np.sort(a)
        for q in (0.0, 0.3, 0.8):
            tau = np.float32(np.quantile(a, q))            # exactly an activation value at q = 0
            sel = np.flatnonzero(a > tau).astype(np.int32)
            for nt in (1, 2):
                out, n = _ffn.ffn_threshold(fmt, x, gate, mats[1], mats[2], tau, act, n_threads=nt,
                                            int_dot=int_dot)
                ref = _ffn.ffn_sparse(fmt, x, gate, mats[1], mats[2], sel, act, n_threads=nt, int_dot=int_dot)
                assert n == len(sel)
                assert np.array_equal(bits(out), bits(ref)), (trial, q, nt)
    out, n = _ffn.ffn_threshold(fmt, x, gate, mats[1], mats[2], np.float32(1e30), act, int_dot=int_dot)
    assert n == 0 and not out.any()
    with pytest.raises(ValueError, match="one token"):
        _ffn.ffn_threshold(fmt, np.zeros((2, D), np.float32), gate, mats[1], mats[2], 0.1, act)


def _transformer(ops, fmt):
    from pipower.model import Transformer
    return Transformer(ModelConfig.from_dict(CFG), random_tensors(CFG, seed=3), ops, weights=fmt)


@pytest.mark.parametrize("fmt,dot", [("q8", "float"), ("q8", "int8"), ("q4", "int8"), ("f16", "float")])
def test_threshold_mode_decode_same_with_and_without_fusion(fmt, dot, monkeypatch):
    """Oracle mode's decode steps through the fused kernel equal the unfused path (gate GEMV, NumPy
    selection, sparse FFN) bitwise, with the same measured sparsity."""
    from pipower._cpu.ops import CythonOps
    from pipower.sparse.oracle import OracleSelector
    ids = np.random.default_rng(2).integers(0, CFG["vocab_size"], 20)
    results = []
    for fused in (True, False):
        t = _transformer(CythonOps(2, dot), fmt)
        monkeypatch.setattr(type(t.ops), "fused_threshold", fused)
        t.ffn_neurons = sel = OracleSelector(t, 0.02)
        cache = t.new_cache(32)
        t.forward(ids[:6], cache)
        steps = np.concatenate([t.forward(ids[i:i + 1], cache) for i in range(6, 20)])
        results.append((steps, sel.skipped, sel.total))
    (a, sa, ta), (b, sb, tb) = results
    assert np.array_equal(bits(a), bits(b))
    assert (sa, ta) == (sb, tb) and 0 < sa < ta


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_threshold_on_a_panel_packed_layer_takes_the_gate_from_the_panels(fmt):
    """With integer dots a layer's gate and up are weight panels: the threshold FFN computes every gate
    dot with the panel GEMV, then reads only the kept neurons' up and down rows (bundles without gate rows).
    Same selection and bitwise the same output as the sparse FFN over that selection (gate rows
    recomputed by the row kernels), and as the same call on plain (unpacked) matrices."""
    from pipower import panels
    from pipower._cpu.ops import CythonOps
    r = np.random.default_rng(31)
    F, D = 160, 96
    g, u, d = (quantize(r.standard_normal((F, D)).astype(np.float32), fmt) for _ in range(3))
    pg, pu = panels.pack(g), panels.pack(u)
    ops = CythonOps(2, "int8")
    x = r.standard_normal((1, D)).astype(np.float32)
    pre = np.abs(ACTIVATIONS["silu"](ops.linear(x, g)))[0]
    for q in (0.0, 0.4, 0.8):
        tau = float(np.quantile(pre, q))
        want_idx = np.flatnonzero(pre > np.float32(tau)).astype(np.int32)
        counts = []
        got = ops.ffn(x, pg, pu, d, "silu", Threshold(tau, lambda n, total: counts.append((n, total))))
        assert counts == [(want_idx.size, F)]
        if q == 0.0:    # the threshold FFN's bundles hold up and down_t alone (no copy of the gate rows)
            (_, (bgate, bup, _)), = ops._bundles.values()
            assert bgate is None and bup.data.strides[0] < 3 * bup.data.shape[1]
        want = ops.ffn(x, pg, pu, d, "silu", want_idx)                  # bundles with gate rows
        plain = ops.ffn(x, g, u, d, "silu", Threshold(tau, lambda n, total: None))   # row kernels' gate pass
        assert np.array_equal(bits(got), bits(want)) and np.array_equal(bits(got), bits(plain))


@pytest.mark.parametrize("fmt,dot,packed", [("q8", "int8", True), ("q4", "int8", True), ("q8", "int8", False),
                                            ("q8", "float", False)])
def test_threshold_over_several_tokens_is_bitwise_the_masked_ffn(fmt, dot, packed):
    """CythonOps takes a Threshold for a prompt (T > 1) too: each token keeps the neurons of its own
    |act(gate . x_t)| > tau. Bitwise the sparse FFN under that bool mask (oracle mode's old prompt path),
    and on integer dots row by row the one-token threshold call (float dots run a masked prompt through
    the reference's chunked BLAS FFN); the count is the mask's. On panel-packed layers it runs on bundles
    of up and down_t alone, the decode step's, so no second set with gate rows is built."""
    from pipower import panels
    from pipower._cpu.ops import CythonOps
    r = np.random.default_rng(7)
    F, D, T = 96, 64, 5
    g, u, d = (quantize(r.standard_normal((F, D)).astype(np.float32), fmt) for _ in range(3))
    gate, up = (panels.pack(g), panels.pack(u)) if packed else (g, u)
    ops = CythonOps(2, dot)
    assert ops.fused_threshold_batch
    x = r.standard_normal((T, D)).astype(np.float32)
    act = np.abs(ops.activation("silu", ops.linear(x, gate)))                      # [T, F]
    tau = float(np.quantile(act, 0.4))
    mask = act > np.float32(tau)
    counts = []
    got = ops.ffn(x, gate, up, d, "silu", Threshold(tau, lambda n, total: counts.append((n, total))))
    assert sum(n for n, _ in counts) == mask.sum() and sum(t for _, t in counts) == mask.size
    assert 0 < mask.sum() < mask.size and not (mask == mask[0]).all()      # tokens keep different neurons
    assert np.array_equal(bits(got), bits(ops.ffn(x, gate, up, d, "silu", mask)))
    for t in range(T if dot == "int8" else 0):
        one = ops.ffn(x[t:t + 1], gate, up, d, "silu", Threshold(tau, lambda n, total: None))
        assert np.array_equal(bits(got[t]), bits(one[0]))
    if packed:      # the threshold calls' bundles (up | down_t) plus the mask call's (gate | up | down_t)
        assert sorted(key[1] for key in ops._bundles) == [False, True]


def test_threshold_with_gate_dots_given_is_bitwise_the_gate_pass():
    """ffn_threshold(gate_dots=): the gate's dots from elsewhere, no gate pass; bitwise the fused call
    that computes them itself, whether the gate rows are in the bundles (skipped) or left out (bundles of
    up and down_t alone: still a gated FFN, act(gate dot) * up dot). Dots of the wrong length are
    refused."""
    from pipower._cpu import _ffn
    from pipower.errors import InvalidArgumentError
    from pipower.arena import Arena, ffn_nbytes
    r = np.random.default_rng(1)
    F, D = 64, 64
    g, u, d = (quantize(r.standard_normal((F, D)).astype(np.float32), "q8") for _ in range(3))
    bg, bu, bd = Arena(ffn_nbytes(g, u, d)).bundle_ffn(g, u, d)
    x = r.standard_normal(D).astype(np.float32)
    tau = 0.3
    want, n_want = _ffn.ffn_threshold("q8", x, (bg.data, bg.scales), (bu.data, bu.scales), (bd.data, bd.scales),
                                      tau, "silu", int_dot=True)
    dots = _cpu.ops.CythonOps(1, "int8").linear(x.reshape(1, -1), g)[0]
    got, n_got = _ffn.ffn_threshold("q8", x, (bg.data, bg.scales), (bu.data, bu.scales), (bd.data, bd.scales),
                                    tau, "silu", int_dot=True, gate_dots=dots)
    assert n_got == n_want and 0 < n_got < F and np.array_equal(bits(got), bits(want))
    with pytest.raises(InvalidArgumentError, match="gate_dots must have shape"):
        _ffn.ffn_threshold("q8", x, (bg.data, bg.scales), (bu.data, bu.scales), (bd.data, bd.scales), tau,
                           "silu", gate_dots=np.zeros(F - 1, np.float32))
    _, ou, od = Arena(ffn_nbytes(None, u, d)).bundle_ffn(None, u, d)
    assert _ffn.layout("q8", None, (ou.data, ou.scales), (od.data, od.scales)) == "bundled"
    alone, n_alone = _ffn.ffn_threshold("q8", x, None, (ou.data, ou.scales), (od.data, od.scales), tau, "silu",
                                        int_dot=True, gate_dots=dots, n_threads=2)
    assert n_alone == n_want and np.array_equal(bits(alone), bits(want))
    # without gate_dots, gate None is a plain MLP: act(up dot), a different FFN
    plain, _ = _ffn.ffn_threshold("q8", x, None, (ou.data, ou.scales), (od.data, od.scales), tau, "silu",
                                  int_dot=True)
    assert not np.array_equal(bits(plain), bits(want))


def test_numpy_reference_of_the_threshold_idx():
    rng = np.random.default_rng(4)
    D, F = 32, 64
    g, u, d = ((0.3 * rng.standard_normal((F, D))).astype(np.float32) for _ in range(3))
    x = rng.standard_normal((1, D)).astype(np.float32)
    ops = NumpyOps()
    a = np.abs(ACTIVATIONS["silu"](x @ g.T))[0]
    srt = np.sort(a)
    tau = float((srt[F // 2] + srt[F // 2 + 1]) / 2)
    counted = []
    out = ops.ffn(x, g, u, d, "silu", Threshold(tau, lambda n, total: counted.append((n, total))))
    sel = np.flatnonzero(a > np.float32(tau)).astype(np.int32)
    np.testing.assert_array_equal(out, ops.ffn(x, g, u, d, "silu", sel))
    assert counted == [(len(sel), F)]


def _float32_neighbours(center: float, n: int) -> np.ndarray:
    """The 2n + 1 float32 values around center, consecutive."""
    out = [np.float32(center)]
    up = down = np.float32(center)
    for _ in range(n):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return np.array(out, dtype=np.float32)


def _silu_roots(tau: float) -> list[float]:
    """The v with |silu(v)| = tau (float64 bisection on the monotone pieces of silu)."""
    def f(v):
        return abs(v / (1 + np.exp(-v))) - tau
    roots = []
    for a, b in ((0.0, 50.0), (-1.2784645, 0.0), (-60.0, -1.2784645)):   # silu's minimum at -1.2784645
        if f(a) * f(b) < 0:
            for _ in range(200):
                m = (a + b) / 2
                a, b = (m, b) if f(a) * f(m) > 0 else (a, m)
            roots.append((a + b) / 2)
    return roots


@pytest.mark.parametrize("tau", [0.2, 0.05, 0.0, -1.0])
def test_vector_silu_selection_is_the_scalar_one(tau):
    """With gate dots given, the AVX-512 selection (a vector silu with a margin, the libm formula for the
    undecided) keeps exactly the neurons the scalar |act(g)| > tau test keeps: the output and the count
    equal the portable path's bitwise, over values a few ulps around every root of |silu| = tau, large
    and special values and random ones."""
    from pipower._cpu import _ffn
    from pipower.arena import Arena, ffn_nbytes
    r = np.random.default_rng(3)
    roots = _silu_roots(tau) if tau > 0 else []
    dots = [_float32_neighbours(root, 150) for root in roots]       # the undecided band: libm decides
    dots += [np.linspace(root * 0.99, root * 1.01, 2001, dtype=np.float32) for root in roots]   # its edges
    dots.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 80.0, -80.0, 79.99, -79.99, 88.0, -88.0, 1e-40, 2e-30,
                          -1e-40, 100.0, -100.0, 1e30, -1e30], dtype=np.float32))
    dots.append((r.standard_normal(700) * 3).astype(np.float32))
    dots = np.concatenate(dots)
    F, D = dots.size + (-dots.size) % 16 + 5, 64                          # a tail past the 16-lane steps
    dots = np.concatenate([dots, r.standard_normal(F - dots.size).astype(np.float32)])
    g, u, d = (quantize(r.standard_normal((F, D)).astype(np.float32), "q8") for _ in range(3))
    bg, bu, bd = Arena(ffn_nbytes(g, u, d)).bundle_ffn(g, u, d)
    x = r.standard_normal(D).astype(np.float32)
    runs = [_ffn.ffn_threshold("q8", x, (bg.data, bg.scales), (bu.data, bu.scales), (bd.data, bd.scales), tau,
                               "silu", int_dot=True, gate_dots=dots, simd=simd) for simd in (True, False)]
    want_n = int((np.abs(_ffn.activation("silu", dots)) > np.float32(tau)).sum())
    (got, n_got), (ref, n_ref) = runs
    assert n_got == n_ref == want_n and 0 < want_n
    assert np.array_equal(bits(got), bits(ref))
