"""pipower._cpu._bandwidth: the read kernel sums correctly and reports a finite positive rate.

No timing asserts: the machine's bandwidth is whatever it is; only the arithmetic is checked.
"""
import math

import numpy as np
import pytest

from pipower import _cpu

pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason=f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")
bw = pytest.importorskip("pipower._cpu._bandwidth")


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4096 * 16 * 2 + 17, 3 * 2**20 + 5])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_read_sum_matches_numpy(n, n_threads):
    x = np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
    want = float(np.sum(x, dtype=np.float64))
    got = bw.read_sum(x, n_threads)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-3)


def test_read_sum_of_ones_is_exact():
    # 64 float lanes of ones stay exact up to 2**24 per lane; the partials are summed in float64
    x = np.ones(2**22 + 3, dtype=np.float32)
    for nt in (1, 2):
        assert bw.read_sum(x, nt) == x.size


def test_bandwidth_is_positive_and_finite():
    x = np.ones(2**20, dtype=np.float32)                 # 4 MiB: fast; the rate itself is not checked
    g = bw.read_bandwidth_gbs(x, n_threads=2, repeats=3)
    assert isinstance(g, float) and math.isfinite(g) and g > 0
    rates, s = bw.read_bandwidth_samples(x, n_threads=1, repeats=2)
    assert len(rates) == 2 and all(math.isfinite(r) and r > 0 for r in rates)
    assert s == x.size


@pytest.mark.parametrize("bad", [np.ones(8, np.float64), np.ones((2, 4), np.float32),
                                 np.ones(16, np.float32)[::2], np.ones(0, np.float32), [1.0, 2.0]])
def test_rejects_bad_buffers(bad):
    with pytest.raises(ValueError):
        bw.read_sum(bad)


@pytest.mark.parametrize("kw", [{"n_threads": 0}, {"n_threads": True}, {"repeats": 0}])
def test_rejects_bad_counts(kw):
    with pytest.raises(ValueError):
        bw.read_bandwidth_gbs(np.ones(64, np.float32), **kw)
