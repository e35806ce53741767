"""Every shipped CUDA kernel source compiles to PTX for Hopper (sm_90) and Ampere (sm_80) with nvcc.

Compiles the copies installed with the package (so this also checks they ship as package data).
Skipped without nvcc; nothing here needs a GPU.
"""
import re
import shutil
import subprocess

import pytest

from pipower import _gpu
from pipower._gpu import kernels

NVCC = shutil.which("nvcc")
SOURCES = _gpu.cu_sources()


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.skipif(not SOURCES, reason="no .cu files in pipower/_gpu")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_cu_compiles_to_ptx(src, arch, tmp_path):
    out = tmp_path / (src.stem + ".ptx")
    r = subprocess.run([NVCC, f"-arch={arch}", "--ptx", str(src), "-o", str(out)],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed for {src.name} ({arch}):\n{r.stderr}"
    ptx = out.read_text()
    assert ".entry" in ptx   # at least one extern "C" __global__ kernel made it through
    # and exactly the kernels the loader (pipower._gpu.kernels) expects from this file
    assert set(re.findall(r"\.entry\s+(\w+)\(", ptx)) == {k for k, f in kernels.KERNELS.items() if f == src.name}


def test_gpu_probe_never_raises():
    ok, why = _gpu.status()
    assert isinstance(ok, bool) and (ok or why)
    assert _gpu.available() is ok


def test_kernel_sources_ship():
    """The kernels pipower._gpu.kernels loads are all there (package data: pyproject's "pipower._gpu" = ["*.cu"])."""
    assert {"rmsnorm.cu", "ffn.cu", "linear.cu", "attention.cu"} <= {p.name for p in SOURCES}
