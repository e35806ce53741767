"""How pipower._cpu was built, and that a missing extension is reported rather than raised or hidden."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipower import _cpu


def test_extension_present_when_required():
    # CI sets PIPOWER_REQUIRE_EXT=1 so a broken build fails here instead of turning kernel tests into skips.
    if os.environ.get("PIPOWER_REQUIRE_EXT") != "1" and not _cpu.AVAILABLE:
        pytest.skip(f"extension not built ({_cpu.IMPORT_ERROR}); set PIPOWER_REQUIRE_EXT=1 to fail")
    assert _cpu.AVAILABLE, f"pipower._cpu extension missing: {_cpu.IMPORT_ERROR}"
    assert _cpu.IMPORT_ERROR is None


def test_openmp_present_when_required():
    # CI also sets PIPOWER_REQUIRE_OPENMP=1 on machines whose compiler has OpenMP: a failed probe would
    # otherwise quietly give serial kernels.
    if os.environ.get("PIPOWER_REQUIRE_OPENMP") != "1":
        pytest.skip("PIPOWER_REQUIRE_OPENMP not set")
    assert _cpu.AVAILABLE, _cpu.IMPORT_ERROR
    assert _cpu.BUILD_INFO["openmp"], f"built without OpenMP: {_cpu.BUILD_INFO}"


@pytest.mark.skipif(not _cpu.AVAILABLE, reason="extension not built")
def test_build_info_is_consistent():
    b = _cpu.BUILD_INFO
    assert isinstance(b["openmp"], bool)
    assert "-O3" in b["cflags"].split() or "/O2" in b["cflags"].split()
    assert ("-fopenmp" in b["cflags"].split()) == b["openmp"] == (b["openmp_version"] > 0)
    assert ("-march=native" in b["cflags"].split()) == (not b["portable"])
    assert b["max_threads"] >= 1 and (b["openmp"] or b["max_threads"] == 1)
    assert b["cython"].startswith("3.")
    assert isinstance(b["simd"], list)


def test_missing_extension_is_reported_not_raised():
    # A None entry in sys.modules makes `import pipower._cpu._kernels` raise ImportError.
    code = ("import sys; sys.modules['pipower._cpu._kernels'] = None\n"
            "import pipower._cpu as c\n"
            "assert c.AVAILABLE is False and c.BUILD_INFO == {} and c.kernels is None\n"
            "assert c.IMPORT_ERROR.startswith(('ImportError', 'ModuleNotFoundError')), c.IMPORT_ERROR\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tested_package_is_the_installed_copy():
    # .ci/run sets PIPOWER_CI_SRC to the source tree: the tests must exercise the installed package
    # (with the extension pip built), not the source folder shadowing it on sys.path.
    src = os.environ.get("PIPOWER_CI_SRC")
    if not src:
        pytest.skip("PIPOWER_CI_SRC not set (only .ci/run checks this)")
    import pipower
    pkg = Path(pipower.__file__).resolve()
    assert Path(src).resolve() not in pkg.parents, f"pipower imported from the source tree: {pkg}"
