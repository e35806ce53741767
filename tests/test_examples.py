"""Every script in examples/ runs, on a tiny generated model, and says what it promises."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_models import write_tiny_gguf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # a 1024-token context: the tiny byte-level vocabulary spends a token per character of a prompt
    return str(write_tiny_gguf(tmp_path_factory.mktemp("examples") / "tiny.gguf", max_position_embeddings=1024))


def run(script, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, timeout=300,
                         env=env, stdin=subprocess.DEVNULL)
    return out.returncode, out.stdout.decode("utf-8"), out.stderr.decode("utf-8")


def test_every_example_is_tested_and_documented():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["background_thread.py", "generate.py", "server_client.py", "speculative.py"]
    readme = (EXAMPLES / "README.md").read_text()
    assert all(s in readme for s in scripts)


def test_generate(tiny):
    rc, out, err = run("generate.py", "-m", tiny, "-n", "12")
    assert rc == 0, err
    assert "stream == generate: True" in out and "repeatable: True" in out
    assert "--- chat" in out and "> How fast is it?" in out


def test_background_thread(tiny):
    rc, out, err = run("background_thread.py", "-m", tiny, "-n", "8")
    assert rc == 0, err
    assert out.count("--- '") == 3 and "streamed from the worker" in out
    assert "cancelled after a first piece" in out
    assert "a bad request fails alone: max_tokens must be >= 0" in out and "still serving" in out


def test_speculative(tiny):
    import pipower
    rc, out, err = run("speculative.py", "-m", tiny, "-n", "24")
    assert rc == 0, err
    assert "drafted " in out and "draft_acceptance" in out
    if pipower.info()["default_backend"] == "cython":   # greedy equality rests on the compiled batch invariance
        assert "identical text: True" in out


@pytest.mark.parametrize("script", ["generate.py", "background_thread.py", "speculative.py"])
def test_a_bad_model_is_a_one_line_error(script, tmp_path):
    rc, out, err = run(script, "-m", str(tmp_path / "missing.gguf"))
    assert rc == 1 and "Traceback" not in err and err.strip().count("\n") == 0 and "missing.gguf" in err


def test_server_client(tiny):
    pytest.importorskip("openai")
    pytest.importorskip("starlette")
    rc, out, err = run("server_client.py", "-m", tiny, "-n", "8")
    assert rc == 0, err
    assert "--- chat:" in out and "streamed == not streamed: True" in out
    assert "--- completion:" in out and "server exit code: 0" in out
