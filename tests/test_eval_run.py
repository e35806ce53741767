"""HumanEval runner, sweep and report: resumability, settings checks, summary math, extraction modes
(on a scripted fake model), the CLI on a tiny random GGUF, and an end-to-end sweep on SmolLM2."""
import json
import math
import shlex
import time
from types import SimpleNamespace

import numpy as np
import pytest

from pipower.eval import humaneval as he
from pipower.eval.knobs import Point
from pipower.eval.run import EvalSettingsError, evaluate, read_samples, sample_seed
from pipower.eval.sweep import points_for, sweep
from pipower.generate import GenerationStats

TOY = [
    {"task_id": f"Toy/{i}", "entry_point": name, "canonical_solution": body,
     "prompt": f'def {name}(a, b):\n    """{doc}"""\n', "test": f"def check(f):\n    assert f(2, 3) == {want}\n"}
    for i, (name, body, doc, want) in enumerate([
        ("add", "    return a + b\n", "Return a + b.", 5),
        ("mul", "    return a * b\n", "Return a * b.", 6),
        ("sub", "    return a - b\n", "Return a - b.", -1)])
]


class FakeStream:
    """Like pipower.api.TextStream: pieces, then .stats; records whether it was closed early."""

    def __init__(self, text, stats, piece=7):
        self._pieces = iter([text[i:i + piece] for i in range(0, len(text), piece)])
        self.stats, self.closed = stats, False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._pieces)

    def close(self):
        self.closed = True


class FakeModel:
    """Scripted answers per task id. Each call reports fixed token counts and seconds, and the
    sparsity of the current "act_threshold" (its value itself), so summary math is checkable by hand."""

    def __init__(self, answers, fingerprint="fake", chat_answers=None):
        self.answers, self.chat_answers = answers, chat_answers or {}
        self.fingerprint, self.weights, self.backend, self.source = fingerprint, "q8", "fake", f"/x/{fingerprint}.gguf"
        self.transformer = SimpleNamespace(ops=SimpleNamespace(n_threads=1), ffn_neurons=None)
        self.calls, self.streams, self.tau = [], [], 0.0

    def set_sparsity(self, act_threshold=None, **kw):
        self.tau = act_threshold or 0.0
        self.transformer.ffn_neurons = None if act_threshold is None else object()

    def _stream(self, tid, text, kw):
        self.calls.append((tid, kw))
        st = GenerationStats(prompt_tokens=10, new_tokens=5, prefill_seconds=0.5, decode_seconds=2.0,
                             stop_reason="stop", ffn_sparsity=self.tau)
        s = FakeStream(text, st)
        self.streams.append(s)
        return s

    def stream(self, prompt, **kw):
        tid = next(p["task_id"] for p in TOY if p["prompt"] == prompt)
        a = self.answers[tid]
        return self._stream(tid, a(kw) if callable(a) else a, kw)

    def stream_chat(self, messages, **kw):
        tid = next(p["task_id"] for p in TOY if p["prompt"].strip() in messages[-1]["content"])
        return self._stream(tid, self.chat_answers[tid], kw)


RIGHT = {p["task_id"]: p["canonical_solution"] for p in TOY}
TWO_OF_THREE = {**RIGHT, "Toy/2": "    return a + b\n"}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# --- summary math ------------------------------------------------------------------------------------

def test_summary_by_hand(tmp_path):
    s = evaluate(FakeModel(TWO_OF_THREE), TOY, tmp_path, max_tokens=16)
    assert s["pass@1"] == pytest.approx(2 / 3) and s["passed"] == 2 and s["n_problems"] == 3
    lo, hi = s["ci95"]
    # Wilson by hand: p = 2/3, n = 3, z = 1.96
    z, n, p = 1.959963984540054, 3, 2 / 3
    c, h = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h)) and s["ci_method"] == "wilson"
    assert s["decode_tok_s"] == pytest.approx(3 * 4 / (3 * 2.0))     # (new_tokens - 1) / decode seconds
    assert s["prefill_tok_s"] == pytest.approx(30 / 1.5)
    assert s["outcomes"] == {"passed": 2, "AssertionError": 1} and s["stop_reasons"] == {"stop": 3}
    assert s["model"] == {"source": "/x/fake.gguf", "fingerprint": "fake", "weights": "q8", "backend": "fake",
                          "threads": 1}
    recs = lines(tmp_path / "samples.jsonl")
    assert [r["task_id"] for r in recs] == ["Toy/0", "Toy/1", "Toy/2"]
    for key in ("completion", "raw", "passed", "result", "new_tokens", "prompt_tokens", "seconds",
                "check_seconds", "ffn_sparsity", "stop_reason", "sample"):
        assert key in recs[0]
    assert json.loads((tmp_path / "summary.json").read_text())["pass@1"] == s["pass@1"]


def test_sparsity_is_token_weighted():
    from pipower.eval.run import summarize_run
    rec = dict(passed=True, result="passed", prefill_seconds=1, decode_seconds=1, seconds=2, check_seconds=0,
               stop_reason="eos", sample=0)
    recs = [dict(rec, task_id="a", prompt_tokens=10, new_tokens=10, ffn_sparsity=0.5),
            dict(rec, task_id="b", prompt_tokens=50, new_tokens=10, ffn_sparsity=0.1)]
    s = summarize_run(recs, 1, {})
    assert s["ffn_sparsity"] == pytest.approx((20 * 0.5 + 60 * 0.1) / 80)
    assert s["decode_tok_s"] == pytest.approx(18 / 2) and s["prefill_tok_s"] == pytest.approx(60 / 2)


def test_pass_at_k_with_samples(tmp_path):
    # Toy/0 always right, Toy/1 right on every third call, Toy/2 never: c = 10, 4, 0 of n = 10.
    count = {"n": 0}

    def sometimes(kw):
        count["n"] += 1
        return RIGHT["Toy/1"] if count["n"] % 3 == 1 else "    return 0\n"
    model = FakeModel({"Toy/0": RIGHT["Toy/0"], "Toy/1": sometimes, "Toy/2": "    return 0\n"})
    s = evaluate(model, TOY, tmp_path, samples=10, temperature=0.8, max_tokens=8)
    c = [10, 4, 0]
    assert s["pass@1"] == pytest.approx(np.mean([x / 10 for x in c]))
    assert s["pass@10"] == pytest.approx(2 / 3) and "pass@100" not in s
    rates = np.array(c) / 10
    half = 1.959963984540054 * rates.std(ddof=1) / math.sqrt(3)
    assert s["ci_method"] == "normal"
    assert s["ci95"] == pytest.approx([max(0, rates.mean() - half), min(1, rates.mean() + half)])
    seeds = [kw["seed"] for _, kw in model.calls]
    assert len(set(seeds)) == 30 and seeds[0] == sample_seed(0, TOY[0], 0)


# --- resumability and settings -----------------------------------------------------------------------

class Stop(Exception):
    pass


def test_resume_after_kill_and_partial_line(tmp_path):
    def die_after_one(done, total, rec):
        if rec is not None:
            raise Stop                       # "killed" right after the first record was written
    with pytest.raises(Stop):
        evaluate(FakeModel(RIGHT), TOY, tmp_path, max_tokens=16, progress=die_after_one)
    with open(tmp_path / "samples.jsonl", "ab") as fh:
        fh.write(b'{"task_id": "Toy/1", "sample": 0, "pas')        # killed mid-write
    assert set(read_samples(tmp_path / "samples.jsonl")) == {("Toy/0", 0)}
    model, seen = FakeModel(RIGHT), []
    s = evaluate(model, TOY, tmp_path, max_tokens=16, progress=lambda d, t, r: seen.append(d))
    assert [tid for tid, _ in model.calls] == ["Toy/1", "Toy/2"]   # Toy/0 not redone
    assert seen == [1, 2, 3] and s["resumed_samples"] == 1 and s["pass@1"] == 1.0
    recs = lines(tmp_path / "samples.jsonl")                        # every line parses: tail was cut
    assert [r["task_id"] for r in recs] == ["Toy/0", "Toy/1", "Toy/2"]
    # a third run does nothing new; a smaller selection summarises just that selection
    model = FakeModel(RIGHT)
    s = evaluate(model, TOY[:2], tmp_path, max_tokens=16)
    assert model.calls == [] and s["n_problems"] == 2


def test_rerun_of_a_finished_run_keeps_its_summary(tmp_path, monkeypatch):
    """A sweep re-visits finished points: nothing is generated, and the summary keeps the timestamps of
    the run that made the samples (a later clock must not rewrite it); a new selection is re-stamped."""
    import pipower.eval.run as run_mod
    first = evaluate(FakeModel(RIGHT), TOY, tmp_path, max_tokens=16)
    text = (tmp_path / "summary.json").read_text()

    class Later(run_mod.datetime):
        @classmethod
        def now(cls, tz=None):
            return run_mod.datetime(2099, 1, 1, tzinfo=tz)
    monkeypatch.setattr(run_mod, "datetime", Later)
    again = evaluate(FakeModel(RIGHT), TOY, tmp_path, max_tokens=16)
    assert again["started_at"] == first["started_at"] and again["finished_at"] == first["finished_at"]
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(text)
    subset = evaluate(FakeModel(RIGHT), TOY[:2], tmp_path, max_tokens=16)
    assert subset["started_at"].startswith("2099")


def test_changed_settings_are_refused(tmp_path):
    evaluate(FakeModel(RIGHT), TOY[:1], tmp_path, max_tokens=16)
    for kwargs, model in [(dict(max_tokens=17), FakeModel(RIGHT)), (dict(max_tokens=16), FakeModel(RIGHT, "other")),
                          (dict(max_tokens=16, temperature=0.5), FakeModel(RIGHT)),
                          (dict(max_tokens=16, settings={"sparsity": {"knob": "act_threshold", "act_threshold": 0.1}}),
                           FakeModel(RIGHT))]:
        with pytest.raises(EvalSettingsError, match="another --out"):
            evaluate(model, TOY, tmp_path, **kwargs)
    assert len(lines(tmp_path / "samples.jsonl")) == 1


def test_unknown_results_and_undescribed_sparsity_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "samples.jsonl").write_text("")
    with pytest.raises(EvalSettingsError, match="no settings.json"):
        evaluate(FakeModel(RIGHT), TOY, tmp_path / "a")
    m = FakeModel(RIGHT)
    m.set_sparsity(act_threshold=0.2)
    with pytest.raises(he.InvalidArgumentError, match="describe it"):
        evaluate(m, TOY, tmp_path / "b")


# --- extraction modes --------------------------------------------------------------------------------

def test_completion_mode_uses_stop_sequences_and_cuts(tmp_path):
    model = FakeModel({**RIGHT, "Toy/0": "    return a + b\n\ndef helper():\n    return 1\n"})
    s = evaluate(model, TOY, tmp_path, max_tokens=16)
    assert all(kw["stop"] == he.STOP_SEQUENCES for _, kw in model.calls)
    r = lines(tmp_path / "samples.jsonl")[0]
    assert r["completion"] == "    return a + b\n" and r["raw"].endswith("return 1\n") and s["pass@1"] == 1.0


def test_chat_mode_extracts_block_and_stops_at_it(tmp_path):
    reply = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nThis adds the numbers, as asked."
    body = "Here is the body:\n```python\nreturn a * b\n```\n"
    model = FakeModel({}, chat_answers={"Toy/0": reply, "Toy/1": body, "Toy/2": "no code at all"})
    s = evaluate(model, TOY, tmp_path, mode="chat", max_tokens=64)
    recs = lines(tmp_path / "samples.jsonl")
    assert [r["passed"] for r in recs] == [True, True, False]
    # generation stops at the piece that closes the block (pieces are 7 characters here)
    assert recs[0]["stop_reason"] == "code_block" and "    return a + b\n```" in recs[0]["raw"]
    assert "as asked" not in recs[0]["raw"] and model.streams[0].closed
    assert recs[0]["completion"] == "\ndef add(a, b):\n    return a + b\n"
    assert recs[1]["completion"] == "    return a * b\n" and recs[1]["stop_reason"] == "stop"
    assert s["settings"]["mode"] == "chat"


def test_rescore_recomputes_from_raw(tmp_path):
    """rescore redoes extraction and checks from the stored raw text, bumps the harness version,
    keeps generation timings, and reports how many outcomes changed."""
    from pipower.eval import rescore as rs
    from pipower.eval.run import HARNESS_VERSION
    cut = "```python\ndef add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\nprint(add(2, [\n"
    model = FakeModel({}, chat_answers={"Toy/0": cut, "Toy/1": "```python\nreturn a * b\n```",
                                        "Toy/2": "nothing"})
    evaluate(model, TOY, tmp_path, mode="chat", max_tokens=64)
    recs = lines(tmp_path / "samples.jsonl")
    assert recs[0]["passed"]
    # simulate a result filed by an older harness whose extraction broke the first answer
    recs[0].update(passed=False, result="failed: SyntaxError", completion="broken")
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    settings = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({**settings, "harness_version": 1}))
    s = rs.rescore(tmp_path, TOY)
    new = lines(tmp_path / "samples.jsonl")
    assert [r["passed"] for r in new] == [True, True, False]
    assert s["rescore_changed_outcomes"] == 1 and s["rescored_from_harness_version"] == 1
    assert s["passed"] == 2 and s["settings"]["harness_version"] == HARNESS_VERSION
    assert json.loads((tmp_path / "settings.json").read_text())["harness_version"] == HARNESS_VERSION
    assert [r["decode_seconds"] for r in new] == [r["decode_seconds"] for r in recs]
    assert "print(add(2" not in new[0]["completion"]
    # the rescored directory resumes under the current harness without regenerating
    model.calls.clear()
    evaluate(model, TOY, tmp_path, mode="chat", max_tokens=64)
    assert model.calls == []


def test_rescore_refuses_unusable_dirs(tmp_path):
    from pipower.eval import rescore as rs
    with pytest.raises(EvalSettingsError):
        rs.rescore(tmp_path, TOY)
    evaluate(FakeModel(RIGHT), TOY[:1], tmp_path / "a", max_tokens=8)
    with pytest.raises(EvalSettingsError, match="not in the problem set"):
        rs.rescore(tmp_path / "a", TOY[1:])


# --- sweep and report on the fake model ----------------------------------------------------------------

def test_points_for():
    pts = points_for({"act_thresholds": [0, 0.1, 0.1], "budgets": ["1MiB"]})
    assert [p.name for p in pts] == ["dense", "act-0", "act-0.1", "budget-1048576"]
    with pytest.raises(he.InvalidArgumentError):
        points_for({"thresholds": [1]})
    with pytest.raises(he.InvalidArgumentError):
        Point("act_threshold")


def test_fake_sweeps_merge_into_one_report(tmp_path):
    pytest.importorskip("matplotlib")
    from pipower.eval.report import write_report
    for fp in ("small", "large"):
        s = sweep(FakeModel(TWO_OF_THREE, fp), {"act_thresholds": [0.2, 0.4]}, tmp_path / fp, TOY, max_tokens=8)
        assert [x["ffn_sparsity"] for x in s] == pytest.approx([0, 0.2, 0.4])
        assert s[1]["vs_dense"] == {"compared": 3, "identical": 3}
    paths = write_report([tmp_path / "small", tmp_path / "large"], tmp_path / "r")
    rows = (tmp_path / "r" / "report.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[1].startswith("large,dense,") and rows[4].startswith("small,dense,")
    md = paths["md"].read_text()
    assert "| small | act_threshold | 0.4 | 40.0% | 0.667 (" in md and "pipower sweep humaneval" in md
    assert paths["png"].stat().st_size > 5000


# --- the CLI on a tiny random GGUF model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from helpers_models import random_llama_config, write_gguf_from_hf, write_hf_model

    from pipower.cli import main
    d = tmp_path_factory.mktemp("tiny")
    cfg = random_llama_config(vocab_size=300)
    gguf = write_gguf_from_hf(write_hf_model(d / "hf", cfg, seed=5), cfg, d / "m.gguf", qtype="F32")
    data = d / "toy.jsonl"
    data.write_text("".join(json.dumps({**p, "task_id": f"HumanEval/{i}"}) + "\n" for i, p in enumerate(TOY)))
    corpus = d / "c.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 100)
    stats = d / "s.safetensors"
    assert main(["profile", "-m", str(gguf), "--corpus", str(corpus), "--tokens", "128", "--seq-len", "64",
                 "--samples", "64", "--target-sparsity", "0.5", "--out", str(stats)]) == 0
    return SimpleNamespace(gguf=str(gguf), data=str(data), stats=str(stats))


def test_cli_eval_sweep_report(tiny, tmp_path, capsys):
    from pipower.cli import main
    common = ["-m", tiny.gguf, "--data", tiny.data, "-n", "4"]
    assert main(["eval", "humaneval", *common, "--act-threshold", "0.5", "--out", str(tmp_path / "e")]) == 0
    assert "pass@1 0.000" in capsys.readouterr().out
    # same directory, other settings: one-line error, non-zero exit
    assert main(["eval", "humaneval", *common, "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipower: error:") and "another --out" in err and "\n" not in err
    assert main(["eval", "humaneval", *common, "--problems", "7", "--out", str(tmp_path / "x")]) == 1
    assert main(["eval", "humaneval", *common, "--vram-budget", "1MiB", "--out", str(tmp_path / "x")]) == 1
    assert "--stats" in capsys.readouterr().err
    out = str(tmp_path / "sw")
    assert main(["sweep", "humaneval", *common, "--limit", "2", "--act-thresholds", "0,0.5",
                 "--vram-budgets", "96.2MiB", "--stats", tiny.stats, "--out", out]) == 0   # 96 MiB reserve + a split
    rows = [r.split(",") for r in (tmp_path / "sw" / "report.csv").read_text().splitlines()]
    head = rows[0]
    assert [(r[1], r[2]) for r in rows[1:]] == [("dense", ""), ("act_threshold", "0.0"), ("act_threshold", "0.5"),
                                               ("budget", str(int(96.2 * 2**20)))]
    budget = dict(zip(head, rows[4]))
    assert budget["identical_to_dense"] == "2/2" and 0 < float(budget["hot_freq_share"]) < 1
    cmd = json.loads((tmp_path / "sw" / "sweep.json").read_text())["equivalent_command"]
    from pipower.cli import build_parser
    assert build_parser().parse_args(shlex.split(cmd)[1:]).vram_budgets == str(int(96.2 * 2**20))
    assert "deprecated" not in capsys.readouterr().err          # the equivalent command uses today's flags
    (bdir,) = (tmp_path / "sw").glob("budget-*")
    from pipower import _gpu
    engine = json.loads((bdir / "settings.json").read_text())["sparsity"]["engine"]
    assert engine == ("hybrid-cuda" if _gpu.available() else "hybrid-emulated")
    assert dict(zip(head, rows[2]))["identical_to_dense"] == "2/2"      # tau 0 on SiLU = dense
    assert float(dict(zip(head, rows[3]))["measured_sparsity"]) > 0.2
    assert main(["report", out, str(tmp_path / "e"), "--out", str(tmp_path / "r"), "--no-plot"]) == 0
    assert len((tmp_path / "r" / "report.csv").read_text().splitlines()) == 1 + 5


# --- end to end on real weights ------------------------------------------------------------------------

def _smollm2():
    import pipower
    try:
        return pipower.fetch("smollm2-135m", progress=False)
    except pipower.FetchError as e:
        pytest.skip(f"cannot fetch SmolLM2: {e}")


def _e2e(tmp_path, problems_spec, max_tokens):
    pytest.importorskip("matplotlib")
    try:
        problems = he.select_problems(he.load_problems(), problems_spec)
    except he.PipowerError as e:
        pytest.skip(f"HumanEval data not available: {e}")
    t0 = time.perf_counter()
    # the float path: there tau_act 0 on SiLU computes exactly the dense FFN. (With integer dots the
    # sparse FFN keeps a float down projection while the dense one quantizes h: docs/BATCHING.md.)
    s = sweep(_smollm2(), {"act_thresholds": [0, 0.3]}, tmp_path, problems, weights="q8", dot="float", threads=2,
              max_tokens=max_tokens)
    elapsed = time.perf_counter() - t0
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert [r.split(",")[1:3] for r in rows[1:]] == [["dense", ""], ["act_threshold", "0.0"],
                                                   ["act_threshold", "0.3"]]
    assert all(r.startswith("smollm2-135m,") for r in rows[1:])
    assert s[1]["vs_dense"]["identical"] == len(problems)     # tau_act 0 on SiLU computes dense
    assert s[1]["pass@1"] == s[0]["pass@1"] and s[2]["ffn_sparsity"] > 0.3
    assert "| smollm2-135m | act_threshold | 0.3 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "pass_vs_sparsity.png").stat().st_size > 5000
    return elapsed


def test_smollm2_sweep_one_problem(tmp_path):
    _e2e(tmp_path, "23", 32)           # HumanEval/23 has the shortest prompt (40 tokens)


@pytest.mark.slow
def test_smollm2_sweep_three_problems(tmp_path):
    _e2e(tmp_path, "23,45,53", 64)


def test_every_eval_flag_has_help():
    import argparse

    from pipower.cli import build_parser

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")
            elif action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS \
                    or action.dest == "dirs":
                yield name, action
    top = build_parser()._subparsers._group_actions[0].choices
    checked = 0
    for cmd in ("eval", "sweep", "report"):
        for name, action in walk(top[cmd], cmd):
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings} lacks help"
            checked += 1
    assert checked > 40


def test_mcnemar_exact_p_values():
    from scipy.stats import binomtest

    from pipower.eval.report import mcnemar_p
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    for g, lost in [(0, 6), (1, 9), (4, 11), (10, 2), (20, 35)]:
        want = binomtest(min(g, lost), g + lost, 0.5).pvalue       # two-sided exact binomial = exact McNemar
        assert abs(mcnemar_p(g, lost) - want) < 1e-12, (g, lost)


def test_paired_comparison_with_dense(tmp_path):
    from pipower.eval.report import paired_vs_dense
    evaluate(FakeModel(TWO_OF_THREE), TOY, tmp_path / "dense", max_tokens=8)            # Toy/2 fails
    flipped = {**RIGHT, "Toy/0": "    return a - b\n"}                                   # Toy/0 fails, Toy/2 passes
    evaluate(FakeModel(flipped), TOY, tmp_path / "act-0.1", max_tokens=8)
    r = paired_vs_dense(tmp_path / "act-0.1")
    assert (r["gained"], r["lost"], r["pairs"]) == (1, 1, 3) and r["p"] == 1.0
    assert paired_vs_dense(tmp_path / "dense") is None


def test_cli_eval_with_a_drafter_records_acceptance_and_keeps_the_completions(tiny, tmp_path, capsys):
    from pipower.cli import main
    from pipower.eval.report import paired
    from pipower.eval.run import SAMPLES, read_samples
    common = ["-m", tiny.gguf, "--data", tiny.data, "-n", "24", "--limit", "3"]
    assert main(["eval", "humaneval", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["eval", "humaneval", *common, "--draft", "lookup+act:0.5", "--out", str(tmp_path / "d")]) == 0
    assert "draft accepted" in capsys.readouterr().out
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert s["settings"]["draft"] == "lookup+act:0.5" and s["drafted"] >= s["accepted"] >= 0
    assert all("drafted" in r for r in read_samples(tmp_path / "d" / SAMPLES).values())
    p = paired(tmp_path / "plain", tmp_path / "d")
    assert p["identical_completions"] == p["pairs"] == 3 and p["gained"] == p["lost"] == 0
