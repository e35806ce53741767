"""pipower._cpu._attention (decode/prefill attention, RoPE) kernels vs NumpyOps.

Covers GQA/MQA/MHA, head dims 32/64/128 (and an odd one for the portable path), S = 1, 37, 700, sliding
windows, strided KV-cache views, 1 vs 2 threads (bit-identical), and argument checks. CythonOps' ops as
the graph calls them are in tests/test_backend_ops.py.
"""
import numpy as np
import pytest

from pipower import _cpu
from pipower.ops import NumpyOps

pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason=f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")
A = pytest.importorskip("pipower._cpu._attention")
REF = NumpyOps()
# fp32. Outputs are O(1) weighted means of N(0,1) values; against a float64 oracle both NumpyOps and the
# kernel are within ~2e-6 absolute at S=700, hd=128 (the kernel slightly closer), so they agree to ~4e-6.
RTOL, ATOL = 1e-5, 5e-6


@pytest.fixture(autouse=True)
def _threads_on_small_inputs():
    """Force the OpenMP path even on tiny inputs, so 2-thread runs really use two threads."""
    old = A.set_min_parallel_work(0)
    yield
    A.set_min_parallel_work(old)


def cache_views(g, Hkv, S, hd, extra=9):
    """k, v: [Hkv, S, hd] slices of a larger [layers, Hkv, capacity, hd] buffer, like KVCache returns."""
    K = g.standard_normal((2, Hkv, S + extra, hd)).astype(np.float32)
    V = g.standard_normal((2, Hkv, S + extra, hd)).astype(np.float32)
    k, v = K[1, :, :S], V[1, :, :S]
    assert not k.flags.c_contiguous or Hkv == 1
    return k, v


HEADS = [(14, 2), (9, 3), (8, 1), (4, 4)]          # GQA (Qwen2.5-0.5B, SmolLM2-135M), MQA, MHA


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("hd", [32, 64, 128, 24])
@pytest.mark.parametrize("S", [1, 37, 700])
@pytest.mark.parametrize("window", [None, 16, 5000])
def test_decode_matches_numpy(H, Hkv, hd, S, window):
    g = np.random.default_rng(H * 1000 + S * 7 + hd)
    k, v = cache_views(g, Hkv, S, hd)
    q = (g.standard_normal((1, H, hd)) * 2).astype(np.float32)
    want = REF.attention(q, k, v, S - 1, window)                       # [1, H*hd]
    one = A.attention_decode(q[0], k, v, window=window or 0, n_threads=1)
    np.testing.assert_allclose(one, want[0], rtol=RTOL, atol=ATOL)
    assert np.array_equal(A.attention_decode(q[0], k, v, window=window, n_threads=2), one)


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("hd", [32, 64, 128, 24])
@pytest.mark.parametrize("start,T", [(0, 1), (0, 37), (5, 32), (663, 37), (0, 130)])
@pytest.mark.parametrize("window", [None, 16])
def test_prefill_matches_numpy(H, Hkv, hd, start, T, window):
    g = np.random.default_rng(H + start * 3 + T * 11 + hd)
    k, v = cache_views(g, Hkv, start + T, hd)
    q = (g.standard_normal((T, H, hd)) * 2).astype(np.float32)
    want = REF.attention(q, k, v, start, window)                       # [T, H*hd]
    one = A.attention_prefill(q, k, v, start, window=window, n_threads=1)
    np.testing.assert_allclose(one, want, rtol=RTOL, atol=ATOL)
    assert np.array_equal(A.attention_prefill(q, k, v, start, window=window, n_threads=2), one)
    # every row is the decode row at its position
    t = T - 1
    last = A.attention_decode(q[t], k, v, window=window)
    assert np.array_equal(one[t], last)


def test_decode_extreme_scores_stay_finite():
    g = np.random.default_rng(3)
    k, v = cache_views(g, 2, 50, 64)
    q = (g.standard_normal((1, 14, 64)) * 300).astype(np.float32)   # scores ~ +-1e3: exp needs the max trick
    got = A.attention_decode(q[0], k, v)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, REF.attention(q, k, v, 49)[0], rtol=RTOL, atol=1e-5)


def test_exp_accuracy():
    x = -np.linspace(0, 87, 400_001).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(A.exp_neg(x) - ref) / ref
    assert rel.max() < 3e-7            # ~2 ulp
    assert A.exp_neg(np.array([0.0], np.float32))[0] == 1.0
    assert 0 <= A.exp_neg(np.array([-1e30], np.float32))[0] < 1e-37


@pytest.mark.parametrize("T,nh,hd", [(1, 14, 64), (1, 2, 64), (37, 9, 64), (5, 4, 128), (3, 8, 32), (2, 3, 6)])
def test_rope_matches_numpy(T, nh, hd):
    g = np.random.default_rng(T * 31 + nh + hd)
    x = g.standard_normal((T, nh, hd)).astype(np.float32)
    ang = np.outer(np.arange(100, 100 + T), g.uniform(0, 1, hd // 2)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    want = REF.rope(x, cos, sin)
    got = A.rope(x, cos, sin)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(A.rope(x, cos, sin, n_threads=2), got)
    y = x.copy()
    assert A.rope(y, cos, sin, out=y) is y                     # in place
    assert np.array_equal(y, got)


def test_argument_checks():
    g = np.random.default_rng(0)
    k, v = cache_views(g, 2, 10, 64)
    q = g.standard_normal((14, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="q must have dtype float32"):
        A.attention_decode(q.astype(np.float64), k, v)
    with pytest.raises(ValueError, match="multiple"):
        A.attention_decode(q[:13], k, v)
    with pytest.raises(ValueError, match="head dim"):
        A.attention_decode(q[:, :32].copy(), k, v)
    with pytest.raises(ValueError, match="same shape"):
        A.attention_decode(q, k, v[:, :9])
    with pytest.raises(ValueError, match="last axis"):
        A.attention_decode(q, k[:, :, ::2], v[:, :, ::2])
    with pytest.raises(ValueError, match="n_threads"):
        A.attention_decode(q, k, v, n_threads=0)
    with pytest.raises(ValueError, match="window"):
        A.attention_decode(q, k, v, window=-1)
    with pytest.raises(ValueError, match="out must have shape"):
        A.attention_decode(q, k, v, out=np.empty(10, np.float32))
    with pytest.raises(ValueError, match="at least one position"):
        A.attention_decode(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="start"):
        A.attention_prefill(q.reshape(1, 14, 64), k, v, start=3)
    x = g.standard_normal((2, 3, 8)).astype(np.float32)
    c = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="cos and sin"):
        A.rope(x, c[:1], c[:1])
    with pytest.raises(ValueError, match="even"):
        A.rope(x[:, :, :7].copy(), c, c)
    buf = np.zeros(56, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        A.rope(buf[:48].reshape(2, 3, 8), c, c, out=buf[8:].reshape(2, 3, 8))


@pytest.mark.parametrize("H,Hkv,hd", [(14, 2, 64), (9, 3, 64), (8, 8, 32), (4, 1, 128), (6, 2, 48), (4, 2, 24)])
@pytest.mark.parametrize("start,T", [(0, 1), (15, 1), (16, 2), (17, 3), (63, 8), (64, 17), (130, 5)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_grouped_rows_bitwise_per_row(H, Hkv, hd, start, T, n_threads):
    # Without a window, a KV head's query rows run in units that share K and V blocks (pp_attn_unit); a
    # window wider than the sequence takes the one-row-at-a-time path (pp_attn_row) with the same keys.
    # Both must give the same bits, and decode must equal the prefill row of the same position.
    g = np.random.default_rng(start * 31 + T)
    S = start + T
    k, v = cache_views(g, Hkv, S, hd)
    q = g.standard_normal((T, H, hd)).astype(np.float32)
    per_row = A.attention_prefill(q, k, v, start, window=1 << 20, n_threads=n_threads)
    grouped = A.attention_prefill(q, k, v, start, n_threads=n_threads)
    np.testing.assert_array_equal(grouped, per_row)
    if T == 1:
        np.testing.assert_array_equal(A.attention_decode(q[0], k, v, n_threads=n_threads), per_row[0])


def test_kv_buffers_start_on_a_cache_line():
    """CythonOps.kv_buffer: zeroed float32 storage whose first element starts a 64-byte line (NumPy's
    allocator gives 16 bytes, and a head's rows then straddle lines), and the cache keeps its storage
    aligned, with its contents, when it grows."""
    from pipower._cpu.ops import CythonOps
    from pipower.cache import KVCache

    ops = CythonOps(1)
    for shape in [(2, 37, 64), (1, 1, 24), (3, 256, 128)]:
        a = ops.kv_buffer(0, shape)
        assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0 and not a.any()
    g = np.random.default_rng(0)
    cache = KVCache(2, 2, 64, max_len=100, initial=4, alloc=ops.kv_buffer)
    ks = [g.standard_normal((10, 2, 64)).astype(np.float32) for _ in range(2)]
    for layer in range(2):
        k, v = cache.update_and_fetch(layer, ks[layer], -ks[layer])        # 10 > 4: the storage grows
        np.testing.assert_array_equal(k, ks[layer].transpose(1, 0, 2))
        np.testing.assert_array_equal(v, -ks[layer].transpose(1, 0, 2))
    assert cache.capacity >= 10
    assert all(a.ctypes.data % 64 == 0 for a in cache._k + cache._v)
