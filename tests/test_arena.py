"""Weights packed into one huge-page arena keep their values, dtypes, shapes and alignment."""
import numpy as np
import pytest

from pipower.arena import ALIGN, HUGE_PAGE, Arena
from pipower.quant import quantize


def test_arena_copies_are_exact_aligned_and_contiguous():
    rng = np.random.default_rng(0)
    ws = [quantize(rng.standard_normal((37, 64)).astype(np.float32), f) for f in ("q8", "q4", "f16")]
    ws += [rng.standard_normal((5, 7)).astype(np.float32), None]
    arena = Arena.for_weights(ws)
    out = [arena.copy_weight(w) for w in ws]
    assert out[-1] is None
    for w, o in zip(ws[:3], out[:3]):
        assert o.fmt == w.fmt and o.shape == w.shape
        np.testing.assert_array_equal(o.data, w.data)
        assert o.data.flags.c_contiguous and o.data.ctypes.data % ALIGN == 0
        if w.scales is not None:
            np.testing.assert_array_equal(o.scales, w.scales)
            assert o.scales.ctypes.data % ALIGN == 0
    np.testing.assert_array_equal(out[3], ws[3])
    assert out[0].data.ctypes.data % HUGE_PAGE == 0          # the first array opens the aligned buffer
    with pytest.raises(ValueError):
        arena.copy_in(np.zeros(10 ** 6, np.uint8))           # sized for exactly these weights


def test_cython_model_weights_live_in_one_arena():
    from pipower import _cpu
    if not _cpu.AVAILABLE:
        pytest.skip("compiled kernels not built")
    from helpers_models import CFG, random_tensors

    from pipower.backend import make_ops
    from pipower.config import ModelConfig
    from pipower.model import Transformer
    t = Transformer(ModelConfig.from_dict(CFG), random_tensors(CFG), make_ops("cython", 1), weights="q8")
    bases = {np.asarray(layer.gate.data).base is not None for layer in t.layers}
    assert bases == {True}
    roots = set()
    for layer in t.layers:
        a = layer.up.data
        while a.base is not None and isinstance(a.base, np.ndarray):
            a = a.base
        roots.add(id(a))
    assert len(roots) == 1
