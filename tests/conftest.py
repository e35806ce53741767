"""Shared test set-up.

Child processes (`python -m pipower ...`, `python -c ...`) must import the pipower the tests are
testing, the installed one with its compiled extension, not the source tree that `pytest tests` is run
from: Python puts the current folder first on a child's sys.path unless PYTHONSAFEPATH is set (3.11+).
Tests that start children also pass them a neutral working folder (helpers_models.CHILD_CWD) for older
Pythons.

Backends of the ops interface, as fixtures:
  backend    every backend (tests/test_backend_ops.py): "numpy" (the reference), "cython" (skipped when
             the extension is not built), "cupy-emu" (CupyOps over pipower._gpu.emulator: the .cu kernels
             compiled for the host and a NumPy stand-in for CuPy; skipped without g++) and "cupy"
             (@pytest.mark.gpu: a real CUDA device; skipped without one).
  cupy_ops   the CupyOps class, over the emulator ("emu") or on a real GPU ("gpu", @pytest.mark.gpu).
`pytest -m gpu` runs only the real-GPU cases.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

os.environ.setdefault("PYTHONSAFEPATH", "1")


def cupy_ops_class(kind: str, monkeypatch):
    """CupyOps with CuPy emulated on the CPU for this test ("emu"), or on a real GPU ("gpu")."""
    from pipower import _gpu
    if kind == "emu":
        from pipower._gpu import emulator, kernels
        if emulator.CXX is None:
            pytest.skip("no host C++ compiler for the kernel emulator")
        monkeypatch.setitem(sys.modules, "cupy", emulator.FakeCupy())
        monkeypatch.setattr(_gpu, "_status", (True, None))
        monkeypatch.setattr(kernels, "get", emulator.get)
    else:
        ok, why = _gpu.status()
        if not ok:
            pytest.skip(f"no GPU: {why}")
    from pipower._gpu.ops import CupyOps
    return CupyOps


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def cupy_ops(request, monkeypatch):
    return cupy_ops_class(request.param, monkeypatch)


@dataclass
class Backend:
    """One backend as the tests drive it: make(dot) builds its ops; formats / dots: what it computes."""
    name: str
    make: object
    formats: tuple
    dots: tuple

    def ops(self, dot: str = "float", fmt: str = "f32"):
        if fmt not in self.formats:
            pytest.skip(f"{self.name} does not take {fmt} weights")
        if dot not in self.dots:
            pytest.skip(f"{self.name} has no dot={dot}")
        return self.make(dot)


@pytest.fixture(params=["numpy", "cython", "cupy-emu", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request, monkeypatch) -> Backend:
    from pipower.ops import DOTS, NumpyOps
    from pipower.quant import FORMATS
    if request.param == "numpy":
        return Backend("numpy", lambda dot: NumpyOps(1, dot), FORMATS, DOTS)
    if request.param == "cython":
        from pipower import _cpu
        if not _cpu.AVAILABLE:
            pytest.skip(f"pipower._cpu not built: {_cpu.IMPORT_ERROR}")
        from pipower._cpu.ops import CythonOps
        return Backend("cython", lambda dot: CythonOps(2, dot), FORMATS, DOTS)
    cls = cupy_ops_class("emu" if request.param == "cupy-emu" else "gpu", monkeypatch)
    from pipower._gpu.memory import FORMATS as DEVICE_FORMATS
    return Backend(request.param, lambda dot: cls(), DEVICE_FORMATS, ("float",))
