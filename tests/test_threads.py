"""pipower.threads: scoped BLAS limits restore the pool, and the pool report has what `info` shows."""
import os
import subprocess
import sys

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


@pytest.mark.parametrize("user_env, want", [
    ({}, ("PASSIVE", "20000")),                                   # nothing set: pipower's default
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", None)),          # the user's choice is kept
    ({"GOMP_SPINCOUNT": "5"}, (None, "5")),
])
def test_importing_the_kernels_applies_the_openmp_default(user_env, want):
    """In a fresh process (this one may have inherited either variable), importing pipower._cpu sets
    the wait policy before the OpenMP runtime loads, unless the user set one."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os; from pipower import _cpu; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **user_env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(w) for w in want]


def test_openmp_env_defaults_respect_user(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")   # setenv first so monkeypatch restores the original
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.openmp_env_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads.openmp_env_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "20000"
