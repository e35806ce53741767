"""The command line: help for every flag, one-line errors with non-zero exit and no traceback."""
import os
import subprocess
import sys

import pytest

from pipower.cli import build_parser, main
from helpers_models import CHILD_CWD


def run_cli(*args, timeout=120):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", *args], capture_output=True, text=True,
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


# ---- issue #15: a newcomer's first hour ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from helpers_models import write_tiny_gguf
    return str(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


def _one_line_error(out, needle):
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert needle in out.stderr, out.stderr


def test_invalid_utf8_prompt_file_is_one_line_error_naming_the_offset(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Hello \xff there")
    out = run_cli("generate", "-m", tiny_gguf, "-n", "2", "-f", str(bad))
    _one_line_error(out, "not valid UTF-8")
    assert "bad.txt" in out.stderr and "0xFF" in out.stderr and "offset 6" in out.stderr


def test_invalid_utf8_argv_prompt_is_one_line_error_naming_the_offset(tiny_gguf):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for argv, where in (([b"Hello \xff"], "PROMPT argument is not valid UTF-8: byte 0xFF at byte offset 6"),
                        ([b"-p", b"\xe2\x82 x"], "-p PROMPT is not valid UTF-8: byte 0xE2 at byte offset 0"),
                        ([b"--chat", b"--system", b"ok\xc0", b"hi"], "--system is not valid UTF-8: byte 0xC0")):
        out = subprocess.run(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", "generate", "-m", tiny_gguf, "-n", "2", *argv],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)
        _one_line_error(out, where)


def test_utf8_rule_is_in_the_help():
    out = run_cli("generate", "--help")
    assert out.returncode == 0 and "UTF-8" in out.stdout and "standard input" in out.stdout


def test_prompt_file_dash_reads_standard_input(tiny_gguf, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("def add(a, b):")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outs = []
    for args, stdin in ((["-f", "-"], "def add(a, b):"), (["-f", str(f)], None), (["def add(a, b):"], None)):
        outs.append(subprocess.run(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", "generate", "-m", tiny_gguf, "-n", "4", *args],
                                   capture_output=True, text=True, timeout=120, env=env,
                                   input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL))
        assert outs[-1].returncode == 0, outs[-1].stderr
    prompt_tokens = {o.stderr.split("prefill: ")[1].split()[0] for o in outs}
    assert len(prompt_tokens) == 1 and prompt_tokens != {"0"}       # the same prompt each way
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout


def test_invalid_utf8_on_standard_input_is_one_line_error(tiny_gguf):
    out = subprocess.run(cwd=CHILD_CWD, args=[sys.executable, "-m", "pipower", "generate", "-m", tiny_gguf, "-f", "-"],
                         capture_output=True, timeout=120, input=b"ok\n\x80", env=os.environ)
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err and "standard input" in err and "offset 3" in err


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag):
    import pipower
    out = run_cli(flag)
    assert out.returncode == 0 and out.stdout.strip() == f"pipower {pipower.__version__}"


def test_zero_threads_is_one_line_error(tiny_gguf):
    _one_line_error(run_cli("generate", "-m", tiny_gguf, "-n", "1", "-t", "0", "hi"), "--threads")
    _one_line_error(run_cli("bench", "-m", tiny_gguf, "-t", "-2"), "--threads")


def test_more_threads_than_cores_warns(tiny_gguf):
    from pipower.backend import default_threads
    n = default_threads() + 3
    out = run_cli("generate", "-m", tiny_gguf, "-n", "1", "--backend", "numpy", "-t", str(n), "hi")
    assert out.returncode == 0, out.stderr
    assert f"{n} threads requested but only {default_threads()} cores" in out.stderr


def test_library_threads_zero_raises_and_too_many_warns(caplog):
    from pipower.backend import default_threads, make_ops
    from pipower.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="threads"):
        make_ops("numpy", 0)
    with caplog.at_level("WARNING", logger="pipower"):
        assert make_ops("numpy", default_threads() + 1).n_threads == default_threads() + 1
    assert "cores are available" in caplog.text


def test_ctrl_c_during_generation_prints_the_text_so_far_and_exits_130(tiny_gguf, capsys, monkeypatch):
    assert main(["generate", "-m", tiny_gguf, "-n", "3", "--backend", "numpy", "Once upon"]) == 0
    full, _ = capsys.readouterr()
    import pipower.generate as gen
    real, calls = gen.decode_one_token, []

    def decode_then_interrupt(*a, **kw):          # the user presses Ctrl-C during the third token's step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(gen, "decode_one_token", decode_then_interrupt)
    assert main(["generate", "-m", tiny_gguf, "-n", "50", "--backend", "numpy", "Once upon"]) == 130
    out, err = capsys.readouterr()
    assert len(calls) == 3
    assert out == full                              # the 3 tokens generated before the interrupt
    assert "decode: 3 tokens" in err and "stop: interrupted" in err and "pipower: interrupted" in err


def test_profile_corpus_shorter_than_a_sequence_is_one_line_error(tiny_gguf, tmp_path):
    short, empty = tmp_path / "short.txt", tmp_path / "empty.txt"
    short.write_text("x = 1\n")
    empty.write_text("")
    for corpus in (short, empty):
        out = run_cli("profile", "-m", tiny_gguf, "--corpus", str(corpus), "--out", str(tmp_path / "s.st"))
        _one_line_error(out, "fewer tokens than one sequence of --seq-len 512")
    assert not (tmp_path / "s.st").exists()


def test_profile_warns_when_the_corpus_runs_out(tiny_gguf, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x = 1\ny = 2\n")                 # 12 tokens: one sequence of 8, 4 left over
    out_file = str(tmp_path / "s.safetensors")
    assert main(["profile", "-m", tiny_gguf, "--backend", "numpy", "--corpus", str(corpus), "--seq-len", "8",
                 "--tokens", "64", "--target-sparsity", "0.5", "--out", out_file]) == 0
    err = capsys.readouterr().err
    assert "profiled only 8 of the 64 requested tokens" in err


def test_library_profile_of_no_sequences_raises(tiny_gguf):
    import pipower
    from pipower.errors import InvalidArgumentError
    from pipower.sparse.profile import profile
    m = pipower.load(tiny_gguf, backend="numpy", progress=False)
    for kw in (dict(tau_act=0.0), dict(target_sparsity=0.5)):
        with pytest.raises(InvalidArgumentError, match="no sequences"):
            profile(m, [], **kw)


def test_dot_option(tiny_gguf):
    """--dot int8 is the q4 default, named on the stats line; on another format it is a one-line error."""
    out = run_cli("generate", "-m", tiny_gguf, "-n", "2", "--weights", "q4", "--no-cache", "hi")
    assert out.returncode == 0, out.stderr
    assert "q4 weights (int8 dots)" in out.stderr
    out = run_cli("generate", "-m", tiny_gguf, "-n", "2", "--weights", "q4", "--dot", "float", "--no-cache", "hi")
    assert out.returncode == 0 and "int8 dots" not in out.stderr
    _one_line_error(run_cli("generate", "-m", tiny_gguf, "-n", "1", "--weights", "f16", "--dot", "int8", "hi"),
                    "q4 and q8 weights")
