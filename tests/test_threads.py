"""pipower.threads: scoped BLAS limits restore the pool, and the pool report has what `info` shows."""
import os

import numpy as np  # noqa: F401  (loads the BLAS library the helpers control)
import pytest

from pipower import threads


def test_blas_threads_limits_and_restores():
    before = threads.blas_num_threads()
    if not before:
        pytest.skip("no BLAS library visible to threadpoolctl")
    with threads.blas_threads(1):
        assert threads.blas_num_threads() == [1] * len(before)
    assert threads.blas_num_threads() == before


def test_blas_threads_restores_after_error():
    before = threads.blas_num_threads()
    with pytest.raises(RuntimeError), threads.blas_threads(1):
        raise RuntimeError("boom")
    assert threads.blas_num_threads() == before


def test_blas_threads_rejects_zero():
    with pytest.raises(ValueError), threads.blas_threads(0):
        pass


def test_pool_info_shape():
    info = threads.pool_info()
    assert set(info) == {"blas", "openmp", "env"}
    for p in info["blas"]:
        assert p["user_api"] == "blas" and p["num_threads"] >= 1


def test_openmp_wait_policy_default_is_set():
    from pipower import _cpu  # noqa: F401  (importing it applies the default)
    assert os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT")


def test_openmp_env_defaults_respect_user(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")   # setenv first so monkeypatch restores the original
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.openmp_env_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads.openmp_env_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "1000"
