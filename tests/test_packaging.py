"""Packaging: the wheel carries the extension, the CUDA sources and the console script; an editable
install builds the extension in place. Slow (each builds from a copy of the source tree)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _copy_tree(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                    ".pytest_cache", "results", ".venv", "venv")
    shutil.copytree(SRC, dst, ignore=ignore)
    return dst


def _pip(python, *args, cwd=None):
    r = subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if not (SRC / "setup.py").exists():
        pytest.skip("not run from a source checkout")
    return _copy_tree(tmp_path_factory.mktemp("src") / "pipower-src")


def test_wheel_contents(tree, tmp_path):
    _pip(sys.executable, "wheel", "--no-deps", "-w", str(tmp_path), str(tree))
    (whl,) = tmp_path.glob("pipower-0.1.0-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert any(n.startswith("pipower/_cpu/_kernels.") and n.endswith((".so", ".pyd")) for n in names), names
    assert "pipower/_gpu/rmsnorm.cu" in names and "pipower/_gpu/emulator_shim.h" in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pipower = pipower.cli:main" in zipfile.ZipFile(whl).read(entry).decode()
    assert {"pipower/cli/__init__.py", "pipower/cli/args.py", "pipower/__main__.py"} <= set(names)


def test_editable_install_builds_extension_in_place(tree, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _pip(py, "install", "-e", str(tree))
    assert list((tree / "pipower" / "_cpu").glob("_kernels.*.so")) or \
        list((tree / "pipower" / "_cpu").glob("_kernels.*.pyd")), "no in-place extension after pip install -e"
    code = ("import pipower, pipower._cpu as c, pathlib, sys; "
            "assert c.AVAILABLE, c.IMPORT_ERROR; "
            "print(pathlib.Path(pipower.__file__).resolve())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # the venv's own pipower, not a dev tree
    r = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == (tree / "pipower").resolve()


def test_portable_build_has_the_256bit_integer_kernels(tmp_path):
    """PIPOWER_PORTABLE=1 (no -march=native) still compiles the AVX2 and AVX-VNNI integer dots (target
    pragmas) and picks them by CPUID; their tests pass against the reference in that build."""
    if not (SRC / "setup.py").exists():
        pytest.skip("not run from a source checkout")
    tree = _copy_tree(tmp_path / "src")
    # Build a wheel (pip's isolated build brings Cython; the test venv need not have it), then put the
    # wheel's compiled extensions into the copied tree so that tree runs the portable build.
    env = {**os.environ, "PIPOWER_PORTABLE": "1"}
    wheel_dir = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(tree)],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    (whl,) = wheel_dir.glob("pipower-*.whl")
    with zipfile.ZipFile(whl) as zf:
        built = [n for n in zf.namelist() if n.startswith("pipower/_cpu/") and n.endswith((".so", ".pyd"))]
        assert built, zf.namelist()
        for name in built:
            zf.extract(name, tree)
    env = {k: v for k, v in os.environ.items() if k != "PIPOWER_INT_ISA"}
    env["PYTHONPATH"] = str(tree)                          # this build, not the installed pipower
    code = ("import pathlib, pipower, pipower._cpu as c; from pipower._cpu import _linear; "
            "assert c.BUILD_INFO.get('portable'), (c.BUILD_INFO, c.IMPORT_ERROR); "
            "assert pathlib.Path(pipower.__file__).resolve().parents[1] == pathlib.Path(%r).resolve(), pipower.__file__; "
            "print(' '.join(_linear.integer_kernels()[0]))" % str(tree))
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    names = r.stdout.split()
    assert "avx512vnni" not in names                       # needs the build's -march
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2 " in cpu_flags and " f16c " in cpu_flags and " fma " in cpu_flags:
        assert "avx2" in names
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_intdot.py",
                        "tests/test_panels.py"], cwd=tree, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:]
