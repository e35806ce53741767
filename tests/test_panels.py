"""Weight panels (pipower.panels, pipower/_cpu/_panel_impl.h): packing is lossless, the panel kernel
equals the exact integer-dot reference (pipower.intdot) bit for bit for every T, thread count and
kernel, and a model whose projections are panels computes bitwise what the row-major integer kernel
computes."""
import numpy as np
import pytest

import pipower
from pipower import _cpu, intdot, panels
from pipower.errors import InvalidArgumentError
from pipower.panels import Panels
from pipower.quant import QMatrix, dequantize, quantize

from helpers_kernels import INT_SIMD
from helpers_models import random_qwen2_config, random_tensors, write_gguf_from_hf

needs_ext = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")
SHAPES = [(1, 32), (16, 32), (37, 96), (64, 512), (100, 1024), (33, 896), (5, 4864)]   # (N, K)


def matrix(fmt, N, K, seed=0):
    w = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32)
    w[:, :32] *= 20                                        # blocks of very different scales
    return quantize(w, fmt)


@pytest.mark.parametrize("fmt", panels.FORMATS)
@pytest.mark.parametrize("N,K", SHAPES)
def test_pack_then_rows_gives_the_matrix_back(fmt, N, K):
    m = matrix(fmt, N, K)
    p = panels.pack(m)
    P = -(-N // 16)
    assert p.data.shape == (P, K // 32, 64 * panels.CHUNKS[fmt]) and p.scales.shape == (P, K // 32, 16)
    back = panels.unpack(p)
    assert np.array_equal(back.data, m.data) and np.array_equal(back.scales, m.scales)
    assert (back.offsets is None and m.offsets is None) or np.array_equal(back.offsets, m.offsets)
    idx = np.array([N - 1, 0, N // 2, N - 1])
    sub = panels.rows(p, idx)
    np.testing.assert_array_equal(dequantize(sub), dequantize(m)[idx])


def test_q8_panel_bytes_are_the_biased_weights_16_rows_apart():
    m = matrix("q8", 20, 64)
    p = panels.pack(m)
    d = p.data.reshape(2, 2, 8, 16, 4)                    # [P, nb, chunk, row, 4]
    assert d[0, 1, 3, 5, 2] == (int(m.data[5, 32 + 12 + 2]) + 128)
    assert d[1, 0, 0, 3, 1] == (int(m.data[19, 1]) + 128)
    assert not d[1, :, :, 4:].any() and not p.scales[1, :, 4:].any()      # rows past N are zero


@needs_ext
@pytest.mark.parametrize("fmt", panels.FORMATS)
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("simd", INT_SIMD)
def test_panel_kernel_is_bitwise_the_reference(fmt, N, K, simd):
    from pipower._cpu import _panel
    m = matrix(fmt, N, K, seed=N + K)
    p = panels.pack(m)
    x = np.random.default_rng(1).standard_normal((9, K)).astype(np.float32)
    x[2] = 0.0                                             # all-zero blocks: dx = 0
    x[3, :40] *= 1e4
    want = intdot.dot(m, x)
    for nt in (1, 2):
        for T in (1, 9):                                   # the one-token and the multi-token kernels
            got = _panel.gemm_panels(fmt, p.data, p.scales, N, x[:T], n_threads=nt, simd=simd, offsets=p.offsets)
            assert np.array_equal(got.view(np.uint32), want[:T].view(np.uint32)), (nt, T, np.abs(got - want[:T]).max())



@needs_ext
@pytest.mark.parametrize("fmt", panels.FORMATS)
def test_panels_shared_out_to_threads_are_each_computed_once_with_the_same_bits(fmt):
    # threads claim runs of panels as they go (a quarter of each one's share, at least a pair, the last
    # run maybe odd): 42 panels, the last of 5 rows, over 1 .. 7 threads; an output left unwritten stays
    # NaN, a panel computed twice would still have to give the reference's bits
    from pipower._cpu import _panel
    N, K = 16 * 41 + 5, 96
    m = matrix(fmt, N, K, seed=7)
    p = panels.pack(m)
    x = np.random.default_rng(3).standard_normal((16, K)).astype(np.float32)
    want = intdot.dot(m, x)
    for nt in (1, 2, 3, 4, 7):
        for T in (1, 3, 8, 16):                            # row-at-a-time, short, paired (q4), 16-token passes
            out = np.full((T, N), np.nan, dtype=np.float32)
            _panel.gemm_panels(fmt, p.data, p.scales, N, x[:T], out=out, n_threads=nt, offsets=p.offsets)
            assert np.array_equal(out.view(np.uint32), want[:T].view(np.uint32)), (nt, T)

@needs_ext
@pytest.mark.parametrize("fmt", panels.FORMATS)
def test_panel_rows_do_not_depend_on_the_batch(fmt):
    from pipower._cpu import _linear, _panel
    # every token count of the multi-token kernel (1 .. 8 compiled apart, then tiles of 8 plus a rest);
    # K = 320 leaves lanes of the 16 accumulators unused, 1056 (33 blocks) wraps them twice
    for N, K in ((70, 320), (40, 1056)):
        m = matrix(fmt, N, K, seed=3)
        p = panels.pack(m)
        x = np.random.default_rng(2).standard_normal((33, K)).astype(np.float32)
        one = np.stack([_panel.gemm_panels(fmt, p.data, p.scales, N, x[t:t + 1], offsets=p.offsets)[0]
                        for t in range(33)])
        for T in range(1, 34):
            got = _panel.gemm_panels(fmt, p.data, p.scales, N, x[:T], n_threads=2, offsets=p.offsets)
            assert np.array_equal(got, one[:T]), (K, T)
        # and the row-major integer kernel (q4m: none, the reference) gives the same bits
        row_major = (intdot.dot(m, x) if fmt == "q4m" else _linear.gemm_int8(fmt, m.data, m.scales, x, n_threads=2))
        assert np.array_equal(row_major, one)


@pytest.mark.parametrize("fmt", panels.FORMATS)
def test_matrices_packed_back_to_back_join_into_one(fmt):
    q, k, v = matrix(fmt, 64, 320, 1), matrix(fmt, 32, 320, 2), matrix(fmt, 40, 320, 3)
    ps = panels.pack_adjacent([q, k, v])
    for p, m in zip(ps, (q, k, v)):                        # each view is its matrix's own panels
        back = panels.unpack(p)
        assert p.shape == m.shape and np.array_equal(back.data, m.data) and np.array_equal(back.scales, m.scales)
        assert fmt != "q4m" or np.array_equal(back.offsets, m.offsets)
    whole = panels.joined(ps)
    assert whole.shape == (136, 320) and whole.data.shape[0] == 4 + 2 + 3
    assert np.array_equal(panels.unpack(whole).data, np.concatenate([q.data, k.data, v.data]))
    # not joined: packed apart, out of order, or a matrix before the last with a partial panel
    assert panels.joined([panels.pack(q), panels.pack(k)]) is None
    assert panels.joined([ps[1], ps[0]]) is None
    apart = panels.pack_adjacent([v, q])
    assert panels.joined(apart) is None
    assert all(np.array_equal(panels.unpack(p).data, m.data) for p, m in zip(apart, (v, q)))
    assert panels.joined(ps[:1]) is None


@needs_ext
@pytest.mark.parametrize("fmt", panels.FORMATS)
def test_linear_many_over_joined_panels_is_bitwise_separate_calls(fmt):
    from pipower._cpu.ops import CythonOps
    ops = CythonOps(2, dot="int8")
    ms = [matrix(fmt, 64, 320, 1), matrix(fmt, 16, 320, 2), matrix(fmt, 16, 320, 3)]
    rng = np.random.default_rng(4)
    biases = [rng.standard_normal(m.shape[0]).astype(np.float32) for m in ms[:2]] + [None]
    for ws, adjacent in ((panels.pack_adjacent(ms), True), ([panels.pack(m) for m in ms], False)):
        assert (ops._join(ws) is not None) == adjacent                       # only the adjacent ones join
        for T in (1, 3, 9):
            x = rng.standard_normal((T, 320)).astype(np.float32)
            got = ops.linear_many(x, ws, biases)
            for g, w, b in zip(got, ws, biases):
                assert g.flags.c_contiguous and np.array_equal(g, ops.linear(x, w, b))


@needs_ext
def test_panel_kernel_rejects_bad_arguments():
    from pipower._cpu import _panel
    p = panels.pack(matrix("q8", 20, 64))
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(InvalidArgumentError, match="q4, q8 or q4m"):
        _panel.gemm_panels("f16", p.data, p.scales, 20, x)
    with pytest.raises(InvalidArgumentError, match="need their offsets"):
        _panel.gemm_panels("q4m", p.data, p.scales, 20, x)
    with pytest.raises(InvalidArgumentError, match="take no offsets"):
        _panel.gemm_panels("q8", p.data, p.scales, 20, x, offsets=p.scales)
    m = panels.pack(matrix("q4m", 20, 64))
    with pytest.raises(InvalidArgumentError, match="the scales' shape"):
        _panel.gemm_panels("q4m", m.data, m.scales, 20, x, offsets=np.ascontiguousarray(m.offsets[:, :1]))
    with pytest.raises(InvalidArgumentError, match="panels of 40 rows"):
        _panel.gemm_panels("q8", p.data, p.scales, 40, x)
    with pytest.raises(InvalidArgumentError, match="panels of 20 rows"):
        _panel.gemm_panels("q4", p.data, p.scales, 20, x)                  # q8 bytes per block
    with pytest.raises(InvalidArgumentError, match=r"shape \(T, 64\)"):
        _panel.gemm_panels("q8", p.data, p.scales, 20, np.zeros((2, 96), np.float32))
    with pytest.raises(InvalidArgumentError, match="q4, q8 or q4m QMatrix"):
        panels.pack(quantize(np.zeros((4, 32), np.float32), "f16"))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        panels.rows(p, [20])


@needs_ext
@pytest.mark.parametrize("fmt", ["q4", "q8"])             # q4m has no row-major path: tests/test_q4m.py
def test_model_on_panels_is_bitwise_the_row_major_integer_path(tmp_path, fmt, monkeypatch):
    from pipower._cpu.ops import CythonOps
    cfg = random_qwen2_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    path = write_gguf_from_hf(random_tensors(cfg, 0), cfg, tmp_path / "m.gguf", qtype="Q8_0")

    def load():
        return pipower.load(path, backend="cython", weights=fmt, dot="int8", threads=2, cache=False,
                            progress=False)
    on = load()
    tr = on.transformer
    assert isinstance(tr.lm_head, Panels) and tr.embed_tokens is tr.lm_head          # tied: one copy
    assert all(isinstance(getattr(lw, n), Panels) for lw in tr.layers for n in ("q", "k", "v", "o"))
    monkeypatch.setattr(CythonOps, "_pack_panels", lambda self, t: None)
    off = load()
    assert isinstance(off.transformer.lm_head, QMatrix)
    ids = [1, 17, 200, 3, 99, 42, 7, 250]
    assert np.array_equal(on.logits(ids), off.logits(ids))
    assert on.generate("the", max_tokens=6) == off.generate("the", max_tokens=6)
    # the float path keeps row-major weights
    flt = pipower.load(path, backend="cython", weights=fmt, dot="float", threads=1, cache=False, progress=False)
    assert isinstance(flt.transformer.layers[0].q, QMatrix)


@needs_ext
def test_sparse_calls_on_a_panel_model_use_bundles_built_on_first_use(tmp_path, monkeypatch):
    """Oracle (threshold) sparsity on a q4 integer-dot model: the sparse FFN's neuron bundles are built
    from the panels on first use, and every logit equals the same model without panels bit for bit."""
    from pipower._cpu.ops import CythonOps
    cfg = random_qwen2_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    path = write_gguf_from_hf(random_tensors(cfg, 1), cfg, tmp_path / "m.gguf", qtype="Q8_0")
    ids = np.array([5, 17, 200, 3, 99, 42, 7, 250, 11, 12])

    def run(m):
        m.set_sparsity(act_threshold=0.1)
        t = m.transformer
        cache = t.new_cache()
        out = [t.forward(ids[:4], cache)] + [t.forward(ids[i:i + 1], cache) for i in range(4, len(ids))]
        assert t.ffn_neurons.sparsity > 0.05
        return np.concatenate(out)

    on = pipower.load(path, backend="cython", weights="q4", threads=2, cache=False, progress=False)
    assert on.dot == "int8" and isinstance(on.transformer.layers[0].up, Panels)
    assert on.transformer.ops._bundles == {}                  # dense use builds none
    got = run(on)
    assert len(on.transformer.ops._bundles) == cfg["num_hidden_layers"]
    monkeypatch.setattr(CythonOps, "_pack_panels", lambda self, t: None)
    off = pipower.load(path, backend="cython", weights="q4", threads=2, cache=False, progress=False)
    assert isinstance(off.transformer.layers[0].up, QMatrix)
    assert np.array_equal(got, run(off))


def test_dense_panel_ffn_reuses_per_thread_scratch_safely():
    """linear_ops.ffn_panels keeps its [T, F] work arrays per thread between calls: calls of growing and
    shrinking T, and two threads at once, give bitwise what a fresh call gives (NumpyOps' integer FFN)."""
    import threading
    from pipower._cpu import linear_ops
    from pipower.ops import NumpyOps
    F, D = 96, 64
    gate, up, down = (matrix("q8", *shape, seed=s) for s, shape in enumerate(((F, D), (F, D), (D, F))))
    pg, pu, pd = (panels.pack(w) for w in (gate, up, down))
    ref = NumpyOps(dot="int8")
    r = np.random.default_rng(5)
    xs = [r.standard_normal((T, D)).astype(np.float32) for T in (40, 3, 17, 1, 40)]
    want = [ref.ffn(x, gate, up, None, "silu", down=down) for x in xs]
    for x, w in zip(xs, want):                                     # one thread, T up and down
        assert np.array_equal(linear_ops.ffn_panels(x, pg, pu, pd, "silu"), w)
    got = [[None] * len(xs) for _ in range(2)]

    def run(k):
        for _ in range(20):
            for i, x in enumerate(xs):
                got[k][i] = linear_ops.ffn_panels(x, pg, pu, pd, "silu")
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        for g, w in zip(got[k], want):
            assert np.array_equal(g, w)


@needs_ext
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("N,K", [(40, 320), (100, 1056), (16, 32), (67, 96)])
def test_gemm_silu_is_both_gemms_then_the_silu_product(fmt, N, K):
    """_panel.gemm_silu (gate and up panel p together, the product after each run of panels) gives bitwise
    up.gemm(x) * silu(gate.gemm(x)) as _kernels.silu_multiply computes it, and leaves gate.gemm(x) in
    gate_out: every T from one token to past two 16-token tiles, 1-3 threads, every integer kernel."""
    from pipower._cpu import _kernels, _panel
    gate, up = (panels.pack(matrix(fmt, N, K, seed=s)) for s in (3, 4))
    gm, um = (_panel.PanelMatrix(m.fmt, m.data, m.scales, m.shape[0]) for m in (gate, up))
    r = np.random.default_rng(N + K)
    for T in (1, 2, 3, 4, 5, 8, 16, 17, 33):
        x = (r.standard_normal((T, K)) * 3).astype(np.float32)
        for simd in INT_SIMD:
            g = gm.gemm(x, simd=simd)
            want = _kernels.silu_multiply(um.gemm(x, simd=simd), g)
            for nt in (1, 2, 3):
                gate_out = np.full((T, N), np.nan, np.float32)
                got = _panel.gemm_silu(gm, um, _panel.quantize(x, fmt) if nt == 2 else x, gate_out=gate_out,
                                       n_threads=nt, simd=simd)
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (T, simd, nt)
                assert np.array_equal(gate_out.view(np.uint32), g.view(np.uint32))


@needs_ext
def test_gemm_silu_refuses_what_it_cannot_compute(monkeypatch):
    from pipower._cpu import _kernels, _panel
    from pipower.errors import BackendError
    q4, q4b, q8 = (panels.pack(matrix(f, 32, 64, seed=s)) for s, f in enumerate(("q4", "q4", "q8")))
    m4, m4b, m8 = (_panel.PanelMatrix(m.fmt, m.data, m.scales, m.shape[0]) for m in (q4, q4b, q8))
    wide = panels.pack(matrix("q4", 32, 96))
    mw = _panel.PanelMatrix(wide.fmt, wide.data, wide.scales, wide.shape[0])
    q4m = panels.pack(matrix("q4m", 32, 64))
    mm = _panel.PanelMatrix(q4m.fmt, q4m.data, q4m.scales, q4m.shape[0], q4m.offsets)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(InvalidArgumentError, match="one format"):
        _panel.gemm_silu(m4, m8, x)
    with pytest.raises(InvalidArgumentError, match="one format"):
        _panel.gemm_silu(mm, mm, x)
    with pytest.raises(InvalidArgumentError, match="one shape"):
        _panel.gemm_silu(m4, mw, x)
    with pytest.raises(InvalidArgumentError, match=r"shape \(T, 64\)"):
        _panel.gemm_silu(m4, m4b, np.ones((2, 96), np.float32))
    with pytest.raises(InvalidArgumentError, match="q8 panels, not q4"):
        _panel.gemm_silu(m4, m4b, _panel.quantize(x, "q8"))
    with pytest.raises(InvalidArgumentError, match="gate_out"):
        _panel.gemm_silu(m4, m4b, x, gate_out=np.zeros((2, 31), np.float32))
    both = np.zeros((2, 32), np.float32)
    with pytest.raises(InvalidArgumentError, match="must not overlap"):
        _panel.gemm_silu(m4, m4b, x, out=both, gate_out=both)
    monkeypatch.setattr(_kernels, "SILU_UNAVAILABLE", "a test's reason")
    with pytest.raises(BackendError, match="a test's reason"):
        _panel.gemm_silu(m4, m4b, x)


@needs_ext
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_dense_panel_ffn_fused_and_separate_give_the_same_bits(fmt, monkeypatch):
    """linear_ops.ffn_panels with gate, up and the product in one pass (the default for SiLU) and with
    the separate calls (any other case) agree bit for bit, and with NumpyOps' integer FFN."""
    from pipower._cpu import linear_ops
    from pipower.ops import NumpyOps
    F, D = 96, 64                                   # six gate / up panels, four down panels
    gate, up, down = (matrix(fmt, *shape, seed=s) for s, shape in enumerate(((F, D), (F, D), (D, F))))
    pg, pu, pd = (panels.pack(w) for w in (gate, up, down))
    x = np.random.default_rng(9).standard_normal((21, D)).astype(np.float32)
    assert linear_ops.fused_silu(pg, pu, "silu") and not linear_ops.fused_silu(pg, pu, "gelu")
    fused = linear_ops.ffn_panels(x, pg, pu, pd, "silu", n_threads=2)
    monkeypatch.setattr(linear_ops, "fused_silu", lambda *a: False)
    separate = linear_ops.ffn_panels(x, pg, pu, pd, "silu", n_threads=2)
    assert np.array_equal(fused, separate)
    assert np.array_equal(fused, NumpyOps(dot="int8").ffn(x, gate, up, None, "silu", down=down))


@needs_ext
def test_panel_matrix_is_checked_once_and_gives_gemm_panels_bits():
    """_panel.PanelMatrix (a matrix checked once) computes what gemm_panels does; linear_ops keeps one per
    Panels object while that object lives, and a matrix of the wrong width is refused per call."""
    import gc

    from pipower._cpu import _panel, linear_ops
    from pipower.errors import InvalidArgumentError
    m = matrix("q4m", 40, 96, seed=5)
    p = panels.pack(m)
    x = np.random.default_rng(6).standard_normal((5, 96)).astype(np.float32)
    pm = _panel.PanelMatrix(p.fmt, p.data, p.scales, 40, p.offsets)
    want = _panel.gemm_panels(p.fmt, p.data, p.scales, 40, x, offsets=p.offsets)
    for nt in (1, 2):
        assert np.array_equal(pm.gemm(x, n_threads=nt), want)
        assert np.array_equal(pm.gemm(_panel.quantize(x, p.fmt), n_threads=nt), want)
    with pytest.raises(InvalidArgumentError, match=r"shape \(T, 96\)"):
        pm.gemm(np.zeros((2, 64), np.float32))
    with pytest.raises(InvalidArgumentError, match="need their offsets"):
        _panel.PanelMatrix(p.fmt, p.data, p.scales, 40)
    assert linear_ops.panel_matrix(p) is linear_ops.panel_matrix(p)
    key = id(p)
    assert key in linear_ops._MATRICES
    del p
    gc.collect()
    assert key not in linear_ops._MATRICES


@needs_ext
@pytest.mark.parametrize("fmt", panels.FORMATS)
def test_activations_quantized_on_a_team_are_the_same_bytes(fmt):
    """Rows quantized apart on several threads (from 16 K elements) give one thread's bytes, NaN and
    infinite rows included, and the GEMM over them the same bits."""
    from pipower._cpu import _panel
    r = np.random.default_rng(8)
    x = (r.standard_normal((21, 4096)) * 3).astype(np.float32)
    x[3, 100] = np.nan
    x[5, :32] = np.inf
    x[7] = 0.0
    one = _panel.quantize(x, fmt, n_threads=1).arrays()
    for nt in (2, 3):
        team = _panel.quantize(x, fmt, n_threads=nt).arrays()
        assert all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(one, team)), nt
    m = matrix(fmt, 48, 4096, seed=9)
    p = panels.pack(m)
    ok = np.isfinite(x).all(axis=1)
    y1 = _panel.gemm_panels(fmt, p.data, p.scales, 48, x[ok], n_threads=1, offsets=p.offsets)
    y2 = _panel.gemm_panels(fmt, p.data, p.scales, 48, x[ok], n_threads=2, offsets=p.offsets)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))
