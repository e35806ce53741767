"""A drafter's vocabulary subset (pipower.draft_vocab): its logits are exactly the full head's columns for
those ids (bitwise on the compiled backend and with integer dots), in every weight format; ids join from
the context; bad input is refused."""
import numpy as np
import pytest

from pipower import _cpu
from pipower.config import ModelConfig
from pipower.draft_vocab import DraftVocab, head_rows
from pipower.errors import InvalidArgumentError
from pipower.ops import NumpyOps

from helpers_models import CFG, random_tensors

V = CFG["vocab_size"]


def transformer(fmt, dot, backend):
    from pipower.model import Transformer
    if backend == "cython":
        if not _cpu.AVAILABLE:
            pytest.skip("compiled kernels not built")
        from pipower._cpu.ops import CythonOps
        ops = CythonOps(2, dot)
    else:
        ops = NumpyOps(1, dot)
    return Transformer(ModelConfig.from_dict(CFG), random_tensors(CFG, seed=3), ops, weights=fmt)


@pytest.mark.parametrize("backend", ["numpy", "cython"])
@pytest.mark.parametrize("fmt,dot", [("f32", "float"), ("f16", "float"), ("q8", "float"), ("q8", "int8"),
                                     ("q4", "int8")])
def test_subset_logits_are_the_full_heads_columns_bitwise(backend, fmt, dot):
    t = transformer(fmt, dot, backend)
    vocab = DraftVocab(t.lm_head, V, 40, always=[90, 95])
    assert vocab.ids.tolist() == list(range(40)) + [90, 95]
    vocab.cover(np.array([50, 70, 50, 3, 91]))                  # 3 is in already; 50, 70, 91 join
    assert vocab.ids.tolist() == list(range(40)) + [90, 95, 50, 70, 91] and vocab.size == 45
    vocab.cover(np.array([70, 50]))                              # nothing new: no rebuild
    assert vocab.size == 45 and len(vocab.weights) == 2
    ids = np.array([5, 17, 33, 2, 71, 40, 9])
    c1, c2 = t.new_cache(), t.new_cache()
    full = t.forward(ids, c1, last_only=True)                    # [1, V]
    sub = t.forward(ids, c2, last_only=True, head=vocab.weights)  # [1, 45]
    if backend == "numpy" and dot == "float":    # BLAS blocks a 45-row product differently from a 96-row one
        np.testing.assert_allclose(sub, full[:, vocab.ids], rtol=1e-5, atol=1e-5 * np.abs(full).max())
    else:                                         # the compiled kernels and integer dots: row by row
        np.testing.assert_array_equal(sub, full[:, vocab.ids])
    wide = vocab.full_logits(sub[0])
    assert np.isneginf(np.delete(wide, vocab.ids)).all() and (wide[vocab.ids] == sub[0]).all()
    assert int(vocab.ids[np.argmax(sub[0])]) == int(np.argmax(np.where(np.isin(np.arange(V), vocab.ids),
                                                                       full[0], -np.inf)))


def test_bad_input_is_refused():
    t = transformer("q8", "float", "numpy")
    with pytest.raises(InvalidArgumentError, match="at least one"):
        DraftVocab(t.lm_head, V, 0)
    v = DraftVocab(t.lm_head, V, 10)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        v.cover(np.array([1, V]))
    with pytest.raises(InvalidArgumentError, match="host memory"):
        head_rows(object(), np.array([1]), pack=True)
    big = DraftVocab(t.lm_head, V, 10 * V)                       # larger than the vocabulary: all ids
    assert big.ids.tolist() == list(range(V))
