"""The command line: help for every flag, one-line errors with non-zero exit and no traceback."""
import os
import subprocess
import sys

import pytest

from pipower.cli import build_parser, main


def run_cli(*args, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "pipower", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def test_help_lists_every_flag_with_an_explanation():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"{name} {action.option_strings} lacks help"
    out = run_cli("generate", "--help")
    assert out.returncode == 0
    for flag in ("-m", "-p", "-n", "--temp", "--top-k", "--top-p", "-s", "-t", "--chat"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "-m", "/no/such/model.gguf", "hi"], "/no/such/model.gguf"),
    (["generate", "-m", "not-a-known-model", "hi"], "not a known model name"),
])
def test_bad_model_is_one_line_error(args, needle):
    out = run_cli(*args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert needle in out.stderr and out.stderr.strip().count("\n") == 0


def test_corrupt_gguf_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    out = run_cli("generate", "-m", str(bad), "hi")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "bad.gguf" in out.stderr


@pytest.mark.parametrize("args, needle", [
    (["generate", "--vram-budget", "1GiB", "hi"], "not to the CPU engine"),
    (["generate", "--device", "tpu", "hi"], "invalid choice"),
    (["info", "--device", "hybrid"], "give it with -m"),
])
def test_device_argument_errors_are_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) if "invalid choice" in needle else _no_raise():
        rc = main(args)
        assert rc == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_gpu_device_without_a_gpu_says_so(capsys, monkeypatch):
    from pipower import _gpu
    monkeypatch.setattr(_gpu, "_status", (False, "no CUDA device (test)"))
    assert main(["generate", "--device", "hybrid", "--vram-budget", "1GiB", "-m", "/no/such/model.gguf",
                 "hi"]) == 1
    err = capsys.readouterr().err
    assert "no usable GPU" in err and "no CUDA device (test)" in err and err.strip().count("\n") == 0


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backend cython" in text and "default backend" in text


def test_prompt_required_exactly_once():
    out = run_cli("generate", "-m", "/no/such.gguf")
    assert out.returncode != 0 and "exactly one prompt" in out.stderr


def test_fetch_prints_the_path_last(capsys):
    import pipower
    try:
        expected = pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch: {e}")
    assert main(["fetch", "smollm2-135m", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected


def test_generate_streams_text_and_reports_speed(capsys):
    import pipower
    try:
        path = pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch: {e}")
    assert main(["generate", "-m", path, "-n", "8", "--chat", "What is the capital of France?"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "prefill:" in err and "decode:" in err and "tok/s" in err


def test_known_name_wins_over_a_same_named_non_model_folder(tmp_path, monkeypatch):
    from pipower.api import resolve_source
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()          # e.g. a results folder named after the model
    import pipower.api as api
    monkeypatch.setattr(api, "fetch", lambda name: f"fetched:{name}")
    assert resolve_source("smollm2-135m") == "fetched:smollm2-135m"
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    assert resolve_source("smollm2-135m") == "smollm2-135m"
