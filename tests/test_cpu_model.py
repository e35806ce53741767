"""The whole model on the compiled backend: equal to the NumPy reference per weight format, and the same
greedy text for 1 and 2 threads."""
import numpy as np
import pytest

import pipower
from pipower import _cpu
from pipower.quant import ROW_FORMATS as FORMATS

pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from helpers_models import random_qwen2_config, write_hf_model
    d = tmp_path_factory.mktemp("tinyqwen")
    write_hf_model(d, random_qwen2_config(hidden_size=128, intermediate_size=256, head_dim=32), seed=8)
    return d


@pytest.mark.parametrize("fmt", FORMATS)
def test_cython_equals_numpy_reference_on_each_format(tiny_dir, fmt):
    ids = np.random.default_rng(0).integers(3, 256, 33)
    fast = pipower.load(tiny_dir, backend="cython", weights=fmt)
    ref = pipower.load(tiny_dir, backend="numpy", weights=fmt)
    assert fast.dot == ref.dot
    # Integer dots (q4's default) quantize activations to int8 before every projection and the FFN's
    # down: a 1e-7 difference upstream (BLAS vs compiled attention and norms) can move a value across a
    # rounding boundary, a step of max|x| / 127 of its block. Each op agrees bitwise
    # (tests/test_panels.py, test_intdot.py); the whole model only to within such steps.
    tol = 5e-3 if fast.dot == "int8" else 1e-4
    a, b = fast.logits(ids), ref.logits(ids)
    assert np.abs(a - b).max() <= tol * np.abs(b).max()
    # decode steps (the fused kernels) after a prefill, too
    for m, out in ((fast, []), (ref, [])):
        t = m.transformer
        cache = t.new_cache()
        t.forward(ids[:20], cache)
        out += [t.forward(ids[i:i + 1], cache) for i in range(20, 33)]
        m.steps = np.concatenate(out)
    assert np.abs(fast.steps - ref.steps).max() <= tol * np.abs(ref.steps).max()


def test_sparse_decode_on_cython_equals_reference(tiny_dir):
    """Oracle selection through the compiled sparse FFN == the NumPy reference's selection."""
    ids = np.random.default_rng(1).integers(3, 256, 12)
    outs = []
    for backend in ("cython", "numpy"):
        m = pipower.load(tiny_dir, backend=backend, weights="q8")
        m.set_sparsity(act_threshold=0.05)
        t = m.transformer
        cache = t.new_cache()
        t.forward(ids[:6], cache)                                   # prefill: per-token masks
        outs.append(np.concatenate([t.forward(ids[i:i + 1], cache) for i in range(6, 12)]))
        assert t.ffn_neurons.sparsity > 0.05
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4 * np.abs(outs[1]).max()


def test_same_greedy_text_for_one_and_two_threads():
    try:
        path = pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch: {e}")
    prompt = "def is_prime(n):"
    texts = [pipower.load(path, backend="cython", threads=n).generate(prompt, max_tokens=24) for n in (1, 2)]
    assert texts[0] == texts[1] and len(texts[0]) > 20
