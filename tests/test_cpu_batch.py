"""Batch invariance of the compiled backend, bitwise: a token's result never depends on how tokens are
batched. Row t of a T-token projection / FFN / forward is bit for bit what a single-token call computes
for that token at that position, for every weight format, both SIMD settings, T = 1..33 and 1 or 2
threads; and the results never depend on the thread count."""
import numpy as np
import pytest

from pipower import _cpu
from pipower.config import ModelConfig
from pipower.quant import ROW_FORMATS as FORMATS, quantize

from helpers_models import CFG, random_tensors

pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")

TOKENS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33)
SIMD = (True, False)   # False: the portable C kernels (the same as True where AVX-512 was not compiled in)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def compact(w: np.ndarray, fmt: str) -> tuple:
    """float32 [N, K] -> (data, scales) in `fmt`."""
    if fmt == "f32":
        return w, None
    q = quantize(w, fmt)
    return q.data, q.scales


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("simd", SIMD)
def test_gemm_rows_are_bitwise_gemv(fmt, simd):
    from pipower._cpu import _linear
    rng = np.random.default_rng(3)
    # K: a multiple of 32 (every format), and for f32/f16 lengths with 16- and sub-16 tails
    for K in ((96, 896) if fmt in ("q8", "q4") else (96, 200, 83)):
        data, scales = compact(rng.standard_normal((70, K)).astype(np.float32), fmt)
        x = rng.standard_normal((max(TOKENS), K)).astype(np.float32)
        for nt in (1, 2):
            single = np.stack([_linear.gemv(fmt, data, scales, r, n_threads=nt, simd=simd) for r in x])
            for T in TOKENS:
                y = _linear.gemm(fmt, data, scales, x[:T], n_threads=nt, simd=simd)
                assert np.array_equal(bits(y), bits(single[:T])), (K, nt, T)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("simd", SIMD)
def test_ffn_rows_are_bitwise_single_token_ffn(fmt, simd):
    from pipower._cpu import _ffn
    rng = np.random.default_rng(4)
    D, F = 96, 300
    mats = [compact((0.2 * rng.standard_normal((F, D))).astype(np.float32), fmt) for _ in range(3)]
    x = rng.standard_normal((max(TOKENS), D)).astype(np.float32)
    x[3] = 0.0                      # every h exactly 0 for this token: its down rows are all skipped
    subset = np.sort(rng.choice(F, 77, replace=False)).astype(np.int32)
    for act, gated in (("silu", True), ("gelu_pytorch_tanh", True), ("relu", False)):
        gate = mats[0] if gated else None
        for idx in (None, subset):
            for nt in (1, 2):
                single = np.stack([_ffn.ffn_sparse(fmt, r, gate, mats[1], mats[2], idx, act, n_threads=nt,
                                                   simd=simd) for r in x])
                for T in TOKENS:
                    out = _ffn.ffn_sparse(fmt, x[:T], gate, mats[1], mats[2], idx, act, n_threads=nt,
                                          simd=simd)
                    assert np.array_equal(bits(out), bits(single[:T])), (act, idx is None, nt, T)


def test_ffn_batch_rejects_bad_shapes():
    from pipower._cpu import _ffn
    D, F = 64, 32
    m = (np.zeros((F, D), np.float32), None)
    with pytest.raises(ValueError, match="1 <= T"):
        _ffn.ffn_sparse("f32", np.zeros((_ffn.MAX_TOKENS + 1, D), np.float32), m, m, m, None, "silu")
    with pytest.raises(ValueError, match="shape"):
        _ffn.ffn_sparse("f32", np.zeros((2, D + 1), np.float32), m, m, m, None, "silu")
    with pytest.raises(ValueError, match="h_out"):
        _ffn.ffn_sparse("f32", np.zeros((2, D), np.float32), m, m, m, None, "silu",
                        h_out=np.zeros(F, np.float32))


# ---- the whole graph ----------------------------------------------------------------------------------
VARIANTS = {
    "qwen2": CFG,
    "llama-untied": {**CFG, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "tie_word_embeddings": False},
    "plain-relu": {**CFG, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu",
                   "mlp_gated": False, "tie_word_embeddings": False},
    "mistral-window": {**CFG, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                       "sliding_window": 5, "tie_word_embeddings": False},
}


def cython_transformer(cfg: dict, fmt: str, n_threads: int = 2, dot: str = "float"):
    from pipower._cpu.ops import CythonOps
    from pipower.model import Transformer
    return Transformer(ModelConfig.from_dict(cfg), random_tensors(cfg, seed=5), CythonOps(n_threads, dot),
                       weights=fmt)


# every weight format on the float path, and q4 on the integer path (pipower.intdot)
PATHS = [(fmt, "float") for fmt in FORMATS] + [("q4", "int8"), ("q8", "int8")]


def steps(t, ids, prefix: int, batches) -> np.ndarray:
    """Logits of ids[prefix:] fed in batches of the given sizes after a `prefix`-token prompt."""
    cache = t.new_cache(64)
    t.forward(ids[:prefix], cache)
    out, pos = [], prefix
    for n in batches:
        out.append(t.forward(ids[pos:pos + n], cache))
        pos += n
    assert pos == len(ids)
    return np.concatenate(out)


@pytest.mark.parametrize("fmt,dot", PATHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_is_bitwise_the_same_however_tokens_are_batched(fmt, dot, variant):
    cfg = VARIANTS[variant]
    t = cython_transformer(cfg, fmt, dot=dot)
    ids = np.random.default_rng(6).integers(0, cfg["vocab_size"], 7 + 33)
    one_by_one = steps(t, ids, 7, [1] * 33)
    for batches in ([33], [2, 3, 4, 8, 16], [16, 17], [5, 1, 9, 1, 17], [32, 1]):
        assert np.array_equal(bits(steps(t, ids, 7, batches)), bits(one_by_one)), batches
    # ... and the prompt itself: a 7-token forward's rows are its tokens' single steps
    cache = t.new_cache(64)
    first = np.concatenate([t.forward(ids[i:i + 1], cache) for i in range(7)])
    assert np.array_equal(bits(t.forward(ids[:7], t.new_cache(64))), bits(first))


@pytest.mark.parametrize("fmt,dot", [("f32", "float"), ("q8", "float"), ("q4", "float"), ("q4", "int8"),
                                     ("q8", "int8")])
def test_forward_bitwise_equal_for_one_and_two_threads(fmt, dot):
    ids = np.random.default_rng(7).integers(0, CFG["vocab_size"], 30)
    a = steps(cython_transformer(CFG, fmt, 1, dot), ids, 6, [1, 8, 15])
    b = steps(cython_transformer(CFG, fmt, 2, dot), ids, 6, [1, 8, 15])
    assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("fmt,dot", [("q8", "float"), ("q4", "int8"), ("q8", "int8")])
def test_batched_forward_close_to_the_numpy_reference(fmt, dot):
    from pipower.model import Transformer
    from pipower.ops import NumpyOps
    ids = np.random.default_rng(8).integers(0, CFG["vocab_size"], 24)
    fast = steps(cython_transformer(CFG, fmt, dot=dot), ids, 4, [4, 16])
    ref_t = Transformer(ModelConfig.from_dict(CFG), random_tensors(CFG, seed=5), NumpyOps(dot=dot), weights=fmt)
    ref = steps(ref_t, ids, 4, [4, 16])
    err = np.abs(fast - ref).max(axis=1) / np.abs(ref).max()            # per token (row of logits)
    if dot == "float":
        assert err.max() <= 1e-4
        return
    # Integer dots quantize every projection's input to int8 per 32 values. The reference's float parts
    # (NumPy / BLAS attention, the blocks' float tails) agree with the kernels' only to an ulp or so, and
    # an ulp can move a value across a rounding boundary of that quantization: one int8 step (1/127 of
    # its block's largest value) in one activation, which then shows in that token's later logits. Seen
    # on an Ice Lake Xeon (BLAS kernels differ per CPU): one token of 20 at 1.8e-3, the rest ~1e-7. So:
    # nearly every token as close as the float path, and none further than a few such steps.
    assert np.mean(err <= 1e-4) >= 0.8, err
    assert err.max() <= 1e-2, err


@pytest.mark.parametrize("fmt,dot", [("q8", "float"), ("f16", "float"), ("q4", "int8")])
def test_several_sequences_in_one_forward_get_their_solo_results(fmt, dot):
    """forward_batch (continuous batching): each sequence's logits are bitwise its own forward's, whatever
    else shares the batch, at different cache positions, decode rows and verify-sized rows mixed."""
    t = cython_transformer(VARIANTS["mistral-window"], fmt, dot=dot)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, CFG["vocab_size"], n) for n in (3, 11, 7)]
    news = [rng.integers(0, CFG["vocab_size"], n) for n in (1, 4, 1)]
    solo, together = [], []
    for p, new in zip(prompts, news):
        c = t.new_cache(64)
        t.forward(p, c)
        solo.append(t.forward(new, c))
    caches = []
    for p in prompts:
        c = t.new_cache(64)
        t.forward(p, c)
        caches.append(c)
    together = t.forward_batch(news, caches)
    for a, b in zip(solo, together):
        assert np.array_equal(bits(a), bits(b))
    last = t.forward_batch([n[:1] for n in news], [t.new_cache(8) for _ in news], last_only=True)
    assert [x.shape for x in last] == [(1, CFG["vocab_size"])] * 3
