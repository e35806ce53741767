"""The prepared benchmark scripts run end to end on tiny shapes (bench/hybrid.py with the device
emulated on the CPU engine, bench/ffn.py on synthetic layers), so a GPU session can run them as they are."""
import importlib.util
import json
from pathlib import Path

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


def test_qwen_1_5b_stand_in_has_the_real_models_bytes_per_token():
    """The all-GPU row of issue #5 runs a random model of Qwen2.5-Coder-1.5B's shape (its weights cannot
    reach the device machine): same matrices, so the same weight bytes per decode step in q8, give or
    take the biases and norms."""
    hybrid = load_script("hybrid")
    D, F, L, H, Hkv, V = hybrid.SHAPES["qwen2.5-1.5b"]
    hd = D // H
    per_layer = D * (H * hd + 2 * Hkv * hd) + H * hd * D + 3 * F * D      # q, k, v, o, gate, up, down
    total = L * per_layer + V * D                                          # + the untied head
    assert (L, D, F, H, Hkv, V) == (28, 1536, 8960, 12, 2, 151936)
    assert total == pytest.approx(1.54e9, rel=0.01)                        # the 1.5B model's parameters


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
