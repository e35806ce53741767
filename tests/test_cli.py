"""The command line: help for every flag, one-line errors with non-zero exit and no traceback."""
import argparse
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


def _leaf_parsers(parser, path=()):
    """(command path, parser) of every command that takes flags, e.g. ("eval", "humaneval")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for a in subs:
        for name, sub in a.choices.items():
            yield from _leaf_parsers(sub, path + (name,))


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_help_lists_every_flag_with_an_explanation():
    commands = list(_leaf_parsers(build_parser()))
    assert len(commands) >= 15 and ("eval", "humaneval") in dict(commands)
    for path, sub in commands:
        text = sub.format_help()
        for action in _flags(sub):
            if action.help == argparse.SUPPRESS:           # a renamed flag's old spelling: hidden
                assert not any(o in text.split() for o in action.option_strings), (path, action.option_strings)
                continue
            assert action.help and len(action.help) > 10, f"{path} {action.option_strings} lacks help"
            assert all(o in text for o in action.option_strings), (path, action.option_strings)
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
    (["generate", "--device", "cpu", "--vram-budget", "1GiB", "hi"], "not to the CPU engine"),
    (["generate", "--device", "cpu", "--stats", "s.safetensors", "hi"], "not to the CPU engine"),
    (["eval", "humaneval", "--device", "cpu", "--vram-budget", "1GiB", "--out", "o"], "not to the CPU engine"),
    (["eval", "humaneval", "--device", "hybrid", "--stats", "s", "--out", "o"], "needs --vram-budget"),
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


def test_vram_budget_without_device_means_hybrid_in_every_command(capsys, monkeypatch):
    """One rule everywhere: --device defaults to cpu, or to hybrid when --vram-budget is given."""
    from pipower.cli.args import resolve_device
    for argv in (["generate", "hi"], ["bench"], ["info", "-m", "x"], ["eval", "humaneval", "--out", "o"]):
        for extra, device in (([], "cpu"), (["--vram-budget", "1GiB"], "hybrid"),
                              (["--vram-budget", "1GiB", "--device", "cpu"], "cpu")):
            args = build_parser().parse_args(argv + extra)
            resolve_device(args)
            assert args.device == device, (argv, extra)
    from pipower import _gpu
    monkeypatch.setattr(_gpu, "_status", (False, "no CUDA device (test)"))
    assert main(["generate", "--vram-budget", "1GiB", "-m", "/no/such/model.gguf", "hi"]) == 1
    assert "no usable GPU" in capsys.readouterr().err


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
    assert main(["generate", "-m", path, "-n", "12", "--chat", "Who wrote Romeo and Juliet?"]) == 0
    out, err = capsys.readouterr()
    assert "Shakespeare" in out
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
    """--dot int8 is the q4, q8 and q4m default, named on the stats line; on another format it is a one-line
    error, and so is --dot float with q4m."""
    for fmt in ("q4", "q8", "q4m"):
        out = run_cli("generate", "-m", tiny_gguf, "-n", "2", "--weights", fmt, "--no-cache", "hi")
        assert out.returncode == 0, out.stderr
        assert f"{fmt} weights (int8 dots)" in out.stderr
    out = run_cli("generate", "-m", tiny_gguf, "-n", "2", "--weights", "q4", "--dot", "float", "--no-cache", "hi")
    assert out.returncode == 0 and "int8 dots" not in out.stderr
    _one_line_error(run_cli("generate", "-m", tiny_gguf, "-n", "1", "--weights", "f16", "--dot", "int8", "hi"),
                    "q4, q8 and q4m weights")
    _one_line_error(run_cli("generate", "-m", tiny_gguf, "-n", "1", "--weights", "q4m", "--dot", "float", "hi"),
                    "integer dots only")


# ---- issue #17 item 4: one package, every flag defined once, one name per concept ------------------------

# A flag's concept and help come from pipower/cli/args.py; only these may differ between commands, by design:
PER_COMMAND_DEFAULT = {"--n-predict",   # the workload: 256 (generate), 512 per chat answer, 384 per HumanEval sample
                       "--seed",        # eval/sweep: a fixed base seed (0), so a run resumes and repeats exactly
                       "--model",       # optional (no default) where a model is not needed: info, train-predictors
                       "--ctx-size"}    # plan: 4096, what --device hybrid plans for; serve: the model's own
PER_COMMAND_CHOICES = {"--device"}      # eval humaneval runs cpu or hybrid only
PER_COMMAND_METAVAR = {"--draft"}       # bench compares a list of drafters: D[,D...]
# The same word for different things in different commands (not one concept):
HOMONYMS = {"--out": "what each command writes", "--tokens": "profile: corpus tokens; bench: decode steps",
            "--samples": "profile: training rows per layer; eval: samples per problem"}


def test_a_flag_means_one_thing_in_every_command():
    by_name = {}
    for path, sub in _leaf_parsers(build_parser()):
        for a in _flags(sub):
            if a.help != argparse.SUPPRESS and path:
                by_name.setdefault(a.option_strings[-1], []).append((path, a))
    shared = {name: used for name, used in by_name.items() if len(used) > 1 and name not in HOMONYMS}
    assert {"--model", "--stats", "--vram-budget", "--device", "--n-predict", "--temp", "--seed", "--draft",
            "--json", "--no-cache", "--predictors"} <= set(shared)
    for name, used in shared.items():
        (_, first), commands = used[0], [" ".join(p) for p, _ in used]
        for path, a in used:
            assert getattr(a, "concept", None), f"{name} in {path} is not defined by pipower.cli.args"
            assert a.concept == first.concept and a.help.startswith(a.concept), (name, commands)
            assert (a.option_strings, a.dest, a.type, a.nargs, a.const) == \
                   (first.option_strings, first.dest, first.type, first.nargs, first.const), (name, path)
            assert name in PER_COMMAND_DEFAULT or a.default == first.default, (name, path, a.default)
            assert name in PER_COMMAND_CHOICES or a.choices == first.choices, (name, path)
            assert name in PER_COMMAND_METAVAR or a.metavar == first.metavar, (name, path)
    # the activation-stats file has one name, and llama.cpp's names are kept
    assert "--hot-stats" not in by_name and {p[0] for p, _ in by_name["--stats"]} >= {
        "generate", "info", "bench", "eval", "sweep", "plan", "train-predictors"}
    gen = {o for a in _flags(dict(_leaf_parsers(build_parser()))[("generate",)]) for o in a.option_strings}
    assert {"-m", "-p", "-n", "-t", "-s", "--temp", "--top-k", "--top-p"} <= gen
    assert by_name["--ctx-size"][0][1].option_strings == ["-c", "--ctx-size"]


RENAMED = [  # (command, flags the command needs, old spelling, new spelling, value, dest, parsed)
    (("generate",), ["hi"], "--hot-stats", "--stats", "s.safetensors", "stats", "s.safetensors"),
    (("info",), [], "--hot-stats", "--stats", "s.safetensors", "stats", "s.safetensors"),
    (("bench",), [], "--hot-stats", "--stats", "s.safetensors", "stats", "s.safetensors"),
    (("eval", "humaneval"), ["--out", "o"], "--max-tokens", "--n-predict", "5", "max_tokens", 5),
    (("eval", "humaneval"), ["--out", "o"], "--temperature", "--temp", "0.5", "temperature", 0.5),
    (("sweep", "humaneval"), ["--out", "o"], "--max-tokens", "-n", "5", "max_tokens", 5),
    (("sweep", "humaneval"), ["--out", "o"], "--temperature", "--temp", "0.5", "temperature", 0.5),
    (("sweep", "humaneval"), ["--out", "o"], "--budgets", "--vram-budgets", "1GiB", "vram_budgets", "1GiB"),
    (("plan",), ["--stats", "s", "--vram-budget", "1GiB", "--out", "o"], "--context", "-c", "64", "ctx_size", 64),
    (("chat",), [], "--stats", "--timings", None, "timings", True),
]


@pytest.mark.parametrize("command, needs, old, new, value, dest, parsed", RENAMED)
def test_renamed_flags_still_work_hidden_with_a_deprecation_note(command, needs, old, new, value, dest, parsed,
                                                                  capsys):
    given = [value] if value is not None else []
    a = build_parser().parse_args([*command, *needs, new, *given])
    assert capsys.readouterr().err == ""
    b = build_parser().parse_args([*command, *needs, old, *given])
    err = capsys.readouterr().err
    assert getattr(a, dest) == getattr(b, dest) == parsed
    assert err.count("\n") == 1 and err.startswith(f"pipower: warning: {old} is deprecated, use ") and new in err
    assert old not in dict(_leaf_parsers(build_parser()))[command].format_help().split()


def test_a_deprecated_flag_through_the_command_line(tmp_path):
    out = run_cli("chat", "-m", str(tmp_path / "none.gguf"), "--stats")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 2, out.stderr
    assert lines[0] == "pipower: warning: --stats is deprecated, use --timings" and "none.gguf" in lines[1]


def test_cli_modules_import_alone_without_circles_and_the_library_never_imports_them():
    import ast
    import re
    from pathlib import Path

    import pipower.cli
    cli = Path(pipower.cli.__file__).parent
    modules = sorted(p.stem for p in cli.glob("*.py"))
    assert {"__init__", "args", "generate", "sparse", "eval", "bench", "cache", "chat", "serve"} <= set(modules)
    for stem in modules:
        name = "pipower.cli" if stem == "__init__" else f"pipower.cli.{stem}"
        r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=CHILD_CWD, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (name, r.stderr)
        # only the package imports the command modules; they import args (and the library), never each other
        for node in ast.walk(ast.parse((cli / f"{stem}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and stem != "__init__":
                assert node.module == "args", (stem, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("pipower.cli"), stem
    library = [p for p in cli.parent.rglob("*.py") if cli not in p.parents and p.name != "__main__.py"]
    assert len(library) > 20
    for p in library:
        assert not re.search(r"from \.+cli\b|pipower\.cli\b|from \.+ import cli\b", p.read_text()), p
