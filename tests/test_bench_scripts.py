"""The prepared benchmark scripts run end to end on tiny shapes (bench/hybrid.py with the device
emulated on the CPU engine, bench/ffn.py on synthetic layers, bench/decode.py re-rendering a stored
result), so a GPU session can run them as they are."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pipower import _cpu

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not _cpu.AVAILABLE, reason="compiled kernels not built")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hybrid_benchmark_dry_run(tmp_path):
    hybrid = load_script("hybrid")
    out = tmp_path / "h.json"
    assert hybrid.main(["--device", "emulated", "--shape", "tiny", "--tokens", "3", "--repeats", "1",
                        "--predictor-rank", "64", "--granularity", "64", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    engines = [(r["engine"], r["budget_fraction"]) for r in res["rows"]]
    assert engines == [("cpu dense", None), ("cpu sparse", None), ("gpu (all on device)", None),
                       ("hybrid", 0.25), ("hybrid serial", 0.25),
                       ("offload", 0.25), ("hybrid", 0.5), ("hybrid serial", 0.5), ("offload", 0.5)]
    for r in res["rows"]:
        assert r["decode_tok_s"] > 0
        if "budget_bytes" in r and "device_bytes" in r:
            assert r["device_bytes"] <= r["budget_bytes"]
    whole = next(r for r in res["rows"] if r["engine"] == "gpu (all on device)")
    assert whole["device_bytes"] > max(r["device_bytes"] for r in res["rows"] if r["engine"] == "hybrid")
    h25, h50 = (r for r in res["rows"] if r["engine"] == "hybrid")
    # more budget -> more hot neurons; the measured hot share tracks the plan's expected share
    assert h50["hot_neurons"] > h25["hot_neurons"] and h50["hot_share"] > h25["hot_share"]
    assert abs(h25["hot_share"] - h25["plan_hot_freq_share"]) < 0.1
    assert "vs_offload" in h25 and "overlap_saved_ms_per_token" in h25 and (tmp_path / "h.md").is_file()


@pytest.mark.parametrize("fmt", ["q8", "f16"])
def test_stand_in_model_has_the_loaded_models_bytes(fmt):
    """bench/hybrid.py builds its models in the compact format directly (its all-GPU row is
    a random model of Qwen2.5-Coder-1.5B's shape): every matrix the decode step reads has the shape,
    format and bytes the loader gives a model of that config."""
    from helpers_models import random_tensors
    from pipower.model import Transformer
    from pipower.ops import NumpyOps

    hybrid = load_script("hybrid")
    stand_in = hybrid.synthetic_transformer("tiny", fmt, NumpyOps())
    cfg = stand_in.config
    tensors = random_tensors(dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                  num_attention_heads=cfg.num_attention_heads,
                                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                  tie_word_embeddings=False))
    loaded = Transformer(cfg, tensors, NumpyOps(), weights=fmt)
    for a, b in zip(stand_in.layers, loaded.layers):
        for name in ("q", "k", "v", "o", "gate", "up", "down_t"):
            wa, wb = getattr(a, name), getattr(b, name)
            assert (wa.fmt, wa.shape, wa.nbytes) == (wb.fmt, wb.shape, wb.nbytes), name
    assert stand_in.nbytes_per_token == loaded.nbytes_per_token


def test_decode_benchmark_renders_a_stored_result(tmp_path):
    """bench/decode.py --render rebuilds the table of a stored run: one line per measured row, the
    numbers taken from the JSON."""
    decode = load_script("decode")
    src = ROOT / "bench" / "results" / "decode.json"
    stored = json.loads(src.read_text())
    out = tmp_path / "d.json"
    out.write_text(src.read_text())
    decode.main(["--render", str(out)])
    lines = out.with_suffix(".md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert lines[header] == "| " + " | ".join(decode.COLUMNS) + " |"
    table = lines[header + 2:header + 2 + len(stored["rows"])]
    assert all(line.startswith("| ") for line in table) and not lines[header + 2 + len(stored["rows"])].strip()
    for line, row in zip(table, stored["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(decode.COLUMNS)
        assert cells[:3] == [row["model"], row["engine"], row["weights"]]
        if row.get("status") == "ok":
            assert cells[decode.COLUMNS.index("decode tok/s")] == f"{row['decode_tps']:.1f}"
        else:
            assert row["status"] in cells


def test_decode_benchmark_formats_name_the_dot_mode(tmp_path):
    """--formats q8-int8 / q4-float load that weight format with that dot mode; a plain name keeps the
    format's default."""
    from helpers_models import random_qwen2_config, random_tensors, write_gguf_from_hf
    decode = load_script("decode")
    cfg = random_qwen2_config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    path = write_gguf_from_hf(random_tensors(cfg, 0), cfg, tmp_path / "m.gguf", qtype="Q8_0")
    for spec, (weights, dot) in {"q8-int8": ("q8", "int8"), "q4-float": ("q4", "float"),
                                 "q4": ("q4", "int8")}.items():
        m = decode.load_pipower(str(path), "cython", spec, 1)
        assert (m.weights, m.dot) == (weights, dot), spec


def test_power_law_profile_hits_the_mean():
    hybrid = load_script("hybrid")
    probs = hybrid.power_law_profile(3, 1000, 0.11, 1.0)
    assert all(abs(p.mean() - 0.11) < 1e-3 and p.max() <= 1 for p in probs)
    s = sorted(probs[0], reverse=True)
    assert sum(s[:200]) / sum(s) > 0.5          # a power law: the top 20% carry most activations


def test_ffn_benchmark_on_synthetic_layers(tmp_path):
    ffn = load_script("ffn")
    out = tmp_path / "f.json"
    assert ffn.main(["--models", "synthetic:64x128x2", "--threads", "1", "--repeats", "1", "--tokens", "1",
                     "--layouts", "bundled,separate", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["layout"] for r in results] == ["bundled", "separate"]
    for r in results:
        assert [row["row"] for row in r["rows"]] == ["dense", "0.1", "0.25", "0.5", "1"]
        assert r["rows"][0]["ratio_to_dense"] == 1.0
    assert "| bundled | sparse 25% active |" in out.with_suffix(".md").read_text()


def test_startup_benchmark_times_both_sides(tmp_path):
    """bench/startup.py runs each side as a fresh process per round and reports medians, the ratio to
    the baseline of the same rounds and peak RSS; a failing side stops it with its stderr."""
    from helpers_models import write_tiny_gguf
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    fake = tmp_path / "llama-simple"               # stands in for llama.cpp: checks its arguments, sleeps
    fake.write_text('#!/bin/sh\n[ "$1" = -m ] && [ "$3" = -n ] && [ "$4" = 1 ] || exit 3\nsleep 0.05\n')
    fake.chmod(0o755)
    out = tmp_path / "startup.json"
    startup = load_script("startup")
    assert startup.main(["--model", str(gguf), "--threads", "1", "--llama-simple", str(fake), "--cold",
                         "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == {"pipower warm", "llama.cpp", "pipower first"}
    assert rows["llama.cpp"]["x_llama"] == 1.0
    for name in ("pipower warm", "pipower first"):
        assert rows[name]["x_llama"] == pytest.approx(rows[name]["seconds"] / rows["llama.cpp"]["seconds"])
        assert len(result["runs"][name]) == 2
        assert rows[name]["peak_rss"] > 10 << 20          # a Python process with NumPy
    assert "PATH/llama-simple" in out.with_suffix(".md").read_text()
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 4\n")
    with pytest.raises(SystemExit, match="broken"):
        startup.main(["--model", str(gguf), "--llama-simple", str(fake), "--repeats", "1"])


def test_humaneval_draft_summary_counts_identical_text_and_ratios():
    hd = load_script("humaneval_draft")
    rows = [
        {"pipower plain": {"seconds": 4.0, "tokens": [1, 2, 3]},
         "pipower lookup": {"seconds": 2.0, "tokens": [1, 2, 3], "drafted": 4, "accepted": 3},
         "llama plain": {"seconds": 8.0, "text": "a", "completion_tokens": 3},
         "llama lookup": {"seconds": 16.0, "text": "a", "completion_tokens": 3}},
        {"pipower plain": {"seconds": 6.0, "tokens": [4, 5]},
         "pipower lookup": {"seconds": 3.0, "tokens": [4, 6], "drafted": 4, "accepted": 1}},
    ]
    s = {r["mode"]: r for r in hd.summarize(rows, ["pipower plain", "pipower lookup", "llama plain",
                                                   "llama lookup"])}
    assert s["pipower lookup"]["vs_plain"] == 2.0 and s["pipower lookup"]["identical"] == 1
    assert s["pipower lookup"]["acceptance"] == 0.5 and s["pipower plain"]["identical"] == 2
    assert s["llama plain"]["problems"] == 1 and s["llama lookup"]["vs_llama_plain"] == 0.5
    assert s["llama lookup"]["identical_to_llama_plain"] == 1 and s["llama plain"]["vs_pipower_plain"] == 0.5


def test_humaneval_draft_summary_leaves_out_problems_where_the_anchor_raised():
    hd = load_script("humaneval_draft")
    ok = {"seconds": 2.0, "text": "a", "completion_tokens": 1}
    rows = [
        {"pipower plain": {"seconds": 4.0, "tokens": [1]}, "llama plain": ok, "llama lookup": ok},
        {"pipower plain": {"seconds": 6.0, "tokens": [2]}, "llama plain": {**ok, "seconds": 9.0},
         "llama lookup": {"error": "ValueError: scores buffer"}},
    ]
    s = {r["mode"]: r for r in hd.summarize(rows, ["pipower plain", "llama plain", "llama lookup"])}
    # only the first problem counts for both llama modes (a pair is compared on the same problems)
    assert s["llama plain"]["problems"] == 1 and s["llama plain"]["seconds"] == 2.0
    assert s["llama plain"]["vs_pipower_plain"] == 2.0 and s["llama plain"]["failed"] == 0
    assert s["llama lookup"]["failed"] == 1 and s["llama lookup"]["vs_llama_plain"] == 1.0


def test_draft_replay_models_lookup_on_a_stored_token_stream():
    from pipower.speculative import LookupDrafter
    replay = load_script("draft_replay")
    steps = replay.cost_curve("2:1.2,8:1.4")
    assert steps(1) == 1.0 and steps(2) == 1.2 and abs(steps(5) - 1.3) < 1e-9
    assert abs(steps(14) - (1.4 + 0.4 / 7 * 6)) < 1e-9                         # past the last point: its line
    pattern = list(range(100, 120))
    tokens = pattern * 6                                                         # repeats: lookup finds them
    for price in (replay.LinePrice(), replay.calibrated(steps)):
        spent, plain, drafted, accepted, forwards = replay.replay(pattern[:5], tokens, LookupDrafter(8), price,
                                                                  steps, 384)
        assert plain == len(tokens) - 1 and 0 < accepted <= drafted
        assert forwards < plain / 2 and spent < plain / 2
    unique = list(range(200, 260))                                               # nothing to look up
    assert replay.replay([1, 2, 3], unique, LookupDrafter(8), replay.LinePrice(), steps, 384) == \
        (len(unique) - 1, len(unique) - 1, 0, 0, len(unique) - 1)


def test_gpu_batch_benchmark_dry_run(tmp_path):
    """bench/gpu_batch.py on the stand-in device over the CPU engine: the table, and the bitwise check
    (a forward over T tokens == T decode steps) true on a batch-invariant engine."""
    gpu_batch = load_script("gpu_batch")
    out = tmp_path / "gb.json"
    assert gpu_batch.main(["--device", "emulated", "--shape", "tiny", "--weights", "q8", "--tokens", "1,2,5",
                           "--repeats", "1", "--prompt-tokens", "6", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["T"] for r in res["rows"]] == [1, 2, 5] and res["rows"][0]["vs_step"] == 1.0
    assert res["checks"]["q8"] == {"tokens": 5, "bitwise": True, "invariant_engine": True}
    assert "5-token forward == 5 decode steps bit for bit: True" in out.with_suffix(".md").read_text()


def test_batch_benchmark_times_forwards_on_a_rolled_back_cache(tmp_path):
    """bench/batch.py's timing loop on a tiny model: every T timed on the same cache length (rolled back),
    ratios per round against that round's one-token step."""
    from helpers_models import write_tiny_gguf
    import pipower
    batch = load_script("batch")
    m = pipower.load(write_tiny_gguf(tmp_path / "t.gguf"), backend="cython", weights="q8", cache=False,
                     progress=False)
    t = m.transformer
    seen = []
    real_forward = t.forward

    def forward(ids, cache, **kw):
        seen.append((len(ids), cache.length))
        return real_forward(ids, cache, **kw)

    t.forward = forward
    times = batch.time_forwards(t, list(range(5, 15)), list(range(20, 28)), [1, 3, 8], repeats=2)
    assert {T: len(v) for T, v in times.items()} == {1: 2, 3: 2, 8: 2}        # round 0 dropped
    assert seen[0] == (10, 0) and all(length == 10 for _, length in seen[1:])  # prompt, then rolled back
    assert [n for n, _ in seen[1:]] == [1, 3, 8] * 3
    rows = batch.rows_of("tiny", "q8-int8", 1, [1, 8], {1: [1.0, 2.0], 8: [1.5, 2.0]})
    assert [r["vs_step"] for r in rows] == [1.0, 1.25] and rows[1]["tok_per_s"] == 8 / 1.75


def test_batch_benchmark_reports_each_cores_speed():
    """bench/batch.py's core check: one positive time per CPU of the process, the affinity left as it was."""
    import os
    batch = load_script("batch")
    home = os.sched_getaffinity(0)
    speeds = batch.core_speeds(rounds=1)
    assert os.sched_getaffinity(0) == home
    assert sorted(speeds) == sorted(home) and all(us > 0 for us in speeds.values())
    assert batch.speeds_text({0: 250.4, 1: 361.0}) == "250 / 361" and batch.speeds_text({}) == "n/a"


def test_ab_builds_swaps_the_module_per_build_and_restores_it(tmp_path, capsys):
    """bench/ab_builds.py with the installed _panel extension as both builds: each build is its own module
    object while it runs (the kernels the model calls come from it), and the original is back after."""
    from helpers_models import write_tiny_gguf
    from pipower._cpu import _panel, linear_ops
    ab = load_script("ab_builds")
    seen = set()
    real_use = ab.use

    def use(refs, build):
        real_use(refs, build)
        seen.add(id(linear_ops._panel))
    ab.use = use
    path = write_tiny_gguf(tmp_path / "t.gguf")
    assert ab.main(["--module", "_panel", "--a", _panel.__file__, "--b", _panel.__file__, "--models", str(path),
                    "--weights", "q8", "--threads", "1", "--tokens", "1,3", "--prompt-tokens", "4",
                    "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| T=1 |" in out and "| T=3 |" in out
    assert len(seen) == 3 and id(_panel) in seen               # build a, build b, then the original again
    assert linear_ops._panel is _panel


def test_threshold_bound_counts_each_part_once():
    """bench/threshold_bound.py: a q8 matrix is 1 byte per weight plus a float16 scale per 32, every
    layer's part counted once, the KV cache float32 keys and values up to the position; the bound is 1
    with nothing skipped and grows with the skipped share, staying under 1 / (1 - up+down share)."""
    from pipower.ops import NumpyOps

    hybrid = load_script("hybrid")
    tb = load_script("threshold_bound")
    t = hybrid.synthetic_transformer("tiny", "q8", NumpyOps())
    cfg = t.config
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q8 = lambda n, k: n * k + n * (k // 32) * 2                      # noqa: E731
    kv = cfg.num_key_value_heads * cfg.head_dim
    parts = tb.step_bytes(t, context=10)
    assert parts["gate"] == parts["up"] == parts["down"] == L * q8(F, D)
    assert parts["attention"] == L * (2 * q8(cfg.num_attention_heads * cfg.head_dim, D) + 2 * q8(kv, D))
    assert parts["output head"] == q8(V, D)
    assert parts["kv cache"] == 2 * L * kv * 10 * 4
    row = tb.report("tiny", parts, [0.0, 0.25, 0.4])
    b = list(row["bounds"].values())
    assert b[0] == 1.0 and 1.0 < b[1] < b[2] < 1 / (1 - row["up_down_share"])
    assert "| tiny |" in tb.render([row], 10)


def test_ops_profile_times_each_op_and_unwraps_them(tmp_path):
    """bench/ops_profile.py on a tiny model: every timed round has each op's share of the forward, the
    shares and the rest add up to the forward, and the ops object is left as it was."""
    from helpers_models import write_tiny_gguf
    import pipower
    prof = load_script("ops_profile")
    m = pipower.load(str(write_tiny_gguf(tmp_path / "t.gguf")), backend="cython", weights="q8", threads=1,
                     progress=False)
    ops = m.transformer.ops
    times = prof.profile(m.transformer, list(range(5, 11)), list(range(20, 24)), [1, 4], rounds=2)
    assert set(times) == {1, 4}
    for per in times.values():
        assert len(per["total"]) == 2 and {"linear", "attention", "ffn", "rms_norm"} <= set(per)
        for r in range(2):
            parts = sum(v[r] for k, v in per.items() if k != "total")
            assert parts == pytest.approx(per["total"][r]) and per["attention"][r] > 0
    assert not any(name in vars(ops) for name in prof.OPS)          # the wrappers are gone
    table = prof.markdown("tiny", times)
    assert table.splitlines()[2].startswith("| 1 |") and table.splitlines()[3].startswith("| 4 |")


def test_ab_builds_gemm_mode_times_each_build_on_the_same_matrix(capsys):
    """bench/ab_builds.py --gemm: no model; each build's gemm_panels on one random matrix, per T. The
    timer of a build computes what that build's module computes (the installed one, both sides here)."""
    from pipower._cpu import _panel
    ab = load_script("ab_builds")
    timed = ab.gemm_timer(_panel, "40x64", "q8", 3, 1, 2)
    assert timed() > 0
    assert ab.main(["--module", "_panel", "--a", _panel.__file__, "--b", _panel.__file__, "--gemm", "40x64",
                    "--weights", "q4", "--tokens", "1,3", "--threads", "2", "--calls", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| T=1 |" in out and "| T=3 |" in out and "q4 40x64, 2 threads" in out
    with pytest.raises(SystemExit, match="--module _panel"):
        ab.main(["--module", "_ffn", "--a", _panel.__file__, "--b", _panel.__file__, "--gemm", "40x64"])


def test_ab_builds_gemm_matrices_are_used_in_turn(monkeypatch, capsys):
    """bench/ab_builds.py --gemm --matrices N: N different random matrices, call k on matrix k mod N."""
    from pipower._cpu import _panel
    ab = load_script("ab_builds")
    mats = ab.random_panels("40x64", "q4", 3)
    assert len(mats) == 3 and mats[0].shape == (40, 64) and not np.array_equal(mats[0].data, mats[1].data)
    seen = []

    class Recording:
        quantize = staticmethod(_panel.quantize)

        @staticmethod
        def gemm_panels(fmt, data, scales, rows, xq, **kw):
            seen.append(next(i for i, m in enumerate(mats) if m.data is data))
            return _panel.gemm_panels(fmt, data, scales, rows, xq, **kw)

    timed = ab.gemm_timer(Recording, "40x64", "q4", 2, 1, 4, mats)
    timed()
    timed()
    assert seen == [0, 1, 2, 0, 1, 2, 0, 1]
    assert ab.main(["--module", "_panel", "--a", _panel.__file__, "--b", _panel.__file__, "--gemm", "40x64",
                    "--tokens", "2", "--calls", "2", "--rounds", "1", "--matrices", "3"]) == 0
    assert "x 3 matrices in turn" in capsys.readouterr().out


def test_core_speed_times_each_core_and_the_team():
    """bench/core_speed.py: one row per round with every CPU of the affinity, one thread and the team;
    the affinity is back as it was after."""
    import os
    cs = load_script("core_speed")
    home = os.sched_getaffinity(0)
    cpus = sorted(home)
    rows = cs.measure(*cs.timers(48, 64, 3, "q4", 2, calls=2), cpus, rounds=2)
    assert os.sched_getaffinity(0) == home
    assert len(rows) == 2 and all(set(r) == {*cpus, "one", "team"} and min(r.values()) > 0 for r in rows)
    table = cs.markdown(rows, cpus, 2)
    assert table.splitlines()[-1].startswith("| median |") and len(table.splitlines()) == 2 + 2 + 1
    assert cs.main(["--rows", "48", "--cols", "64", "--tokens", "3", "--rounds", "1", "--calls", "1"]) == 0
    assert os.sched_getaffinity(0) == home


def test_batch_floor_sums_cached_gemms_and_times_a_large_head_at_a_block_rate(tmp_path, capsys):
    """bench/batch_floor.py on a tiny model: the GEMM floor is every layer's matrices plus the head; a head
    over --cache-mib is costed at the per-block time of the largest timed matrix with its columns; the
    whole script prints a row with the forward, the floor and their ratio."""
    from helpers_models import write_tiny_gguf
    import pipower
    bf = load_script("batch_floor")
    path = str(write_tiny_gguf(tmp_path / "t.gguf"))
    t = pipower.load(path, backend="cython", weights="q4", threads=1, progress=False).transformer

    def blocks(shape):
        return -(-shape[0] // 16) * (shape[1] // 32)

    total, rows = bf.gemm_floor(t, 4, 1, 2, cache_mib=1e6)            # every matrix timed cached
    assert [r[0] for r in rows] == [*bf.LAYER_MATRICES, "head"]
    us = {n: v for n, _, v in rows}
    assert all(v > 0 for v in us.values())
    assert total * 1e6 == pytest.approx(len(t.layers) * sum(us[n] for n in bf.LAYER_MATRICES) + us["head"])

    total, rows = bf.gemm_floor(t, 4, 1, 2, cache_mib=0)               # the head too large to time
    shapes = {n: s for n, s, _ in rows}
    us = {n: v for n, _, v in rows}
    same_k = [n for n in bf.LAYER_MATRICES if shapes[n][1] == shapes["head"][1]]
    widest = max(same_k, key=lambda n: blocks(shapes[n]))
    assert us["head"] == pytest.approx(us[widest] / blocks(shapes[widest]) * blocks(shapes["head"]))

    r = bf.measure(t, t.config.vocab_size, 3, 6, rounds=1, threads=1, calls=2, cache_mib=1e6)
    assert r["floor"] == pytest.approx(r["gemms"] + r["non_gemm"]) and 0 < r["non_gemm"] < r["forward"]
    assert r["forward_steps"] == pytest.approx(r["forward"] / r["step"])
    assert r["floor_steps"] == pytest.approx(r["floor"] / r["step"])
    assert bf.markdown_row("t", "q4", r).startswith("| t | q4 | ")
    assert bf.main(["--models", path, "--weights", "q4", "--tokens", "3", "--rounds", "1", "--calls", "2",
                    "--threads", "1", "--prompt-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("| t.gguf | q4 |") for line in out.splitlines()) and "head" in out
