"""The offline sparsity commands end to end on a tiny model (profile -> train -> plan -> generate/bench)."""
import json

import pytest

from pipower.cli import main
from pipower.units import parse_bytes


def test_parse_bytes():
    from pipower.errors import InvalidArgumentError
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2.5GB") == 2_500_000_000 and parse_bytes("1000") == 1000
    for bad in ("lots", "4 GiBs", "-1MiB", ""):
        with pytest.raises(InvalidArgumentError):
            parse_bytes(bad)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from helpers_models import random_llama_config, write_gguf_from_hf, write_hf_model
    d = tmp_path_factory.mktemp("m")
    cfg = random_llama_config(vocab_size=400)
    tensors = write_hf_model(d / "hf", cfg, seed=4)
    return write_gguf_from_hf(tensors, cfg, d / "m.gguf", qtype="F32")


def test_profile_train_plan_generate(gguf_model, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    stats, preds, plan = (str(tmp_path / n) for n in ("s.safetensors", "p.safetensors", "pl.safetensors"))
    assert main(["profile", "-m", str(gguf_model), "--corpus", str(corpus), "--tokens", "256", "--seq-len", "64",
                 "--samples", "200", "--target-sparsity", "0.5", "--out", stats, "--plot", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert main(["train-predictors", "-m", str(gguf_model), "--stats", stats, "--rank", "8", "--epochs", "2",
                 "--out", preds]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == preds and "recall" in out
    assert main(["plan", "-m", str(gguf_model), "--stats", stats, "--vram-budget", "200KiB", "--reserve", "0",
                 "--out", plan]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["bench", "-m", str(gguf_model), "--predictors", preds, "--tokens", "3", "--repeats", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decode_tok_s"] > 0 and 0.0 <= r["ffn_sparsity"] <= 1.0
    # dense and several tau_pred in one interleaved run
    assert main(["bench", "-m", str(gguf_model), "--predictors", preds, "--pred-thresholds=-100,0,100",
                 "--tokens", "2", "--repeats", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert list(res) == ["dense", "tau_pred -100", "tau_pred 0", "tau_pred 100"]
    assert res["dense"]["ffn_sparsity"] == 0 and res["dense"]["ratio_to_first"] == 1.0
    assert res["tau_pred -100"]["ffn_sparsity"] == 0 and res["tau_pred 100"]["ffn_sparsity"] == 1.0
    assert len(res["tau_pred 0"]["rounds"]) == 2
    # dense and oracle mode (the fused threshold FFN) at target sparsities, interleaved
    assert main(["bench", "-m", str(gguf_model), "--target-sparsities", "0.3,0.6", "--tokens", "2",
                 "--repeats", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert list(res) == ["dense", "target 0.3", "target 0.6"]
    assert 0 < res["target 0.3"]["ffn_sparsity"] < res["target 0.6"]["ffn_sparsity"] < 1
    assert main(["generate", "-m", str(gguf_model), "-n", "4", "--act-threshold", "0.1", "hello"]) == 0
    assert "FFN sparsity" in capsys.readouterr().err


def test_plan_budget_too_small_is_one_line_error(gguf_model, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x = 1\n" * 300)
    stats = str(tmp_path / "s.safetensors")
    assert main(["profile", "-m", str(gguf_model), "--corpus", str(corpus), "--tokens", "64", "--seq-len", "32",
                 "--out", stats]) == 0
    assert main(["plan", "-m", str(gguf_model), "--stats", stats, "--vram-budget", "1KiB",
                 "--out", str(tmp_path / "p")]) == 1
    assert "budget" in capsys.readouterr().err


def test_train_predictors_refuses_stats_of_another_model(gguf_model, tmp_path, capsys):
    from helpers_models import random_llama_config, write_gguf_from_hf, write_hf_model
    cfg = random_llama_config(vocab_size=400)
    other = write_gguf_from_hf(write_hf_model(tmp_path / "hf", cfg, seed=9), cfg, tmp_path / "o.gguf", qtype="F32")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x = 1\n" * 200)
    stats = str(tmp_path / "s.safetensors")
    assert main(["profile", "-m", str(gguf_model), "--corpus", str(corpus), "--tokens", "64", "--seq-len", "32",
                 "--samples", "32", "--out", stats]) == 0
    capsys.readouterr()
    assert main(["train-predictors", "-m", str(other), "--stats", stats, "--rank", "4", "--epochs", "1",
                 "--out", str(tmp_path / "p.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "another model" in err and not (tmp_path / "p.safetensors").exists()


# ---- #15: the stats file's size is chosen and said before profiling; training shows an ETA ----------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from helpers_models import write_tiny_gguf
    return str(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", max_position_embeddings=512))


@pytest.fixture()
def code_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 200)
    return str(corpus)


def test_stats_size_estimate():
    from pipower.sparse.stats import estimate_bytes, samples_within
    # Qwen2.5-Coder-0.5B (24 layers, D 896, F 4864): the old default of 16384 rows wrote 945 MB
    assert round(estimate_bytes(24, 896, 4864, 16384) / 1e6) == 945
    n = samples_within(24, 896, 4864, 100_000_000)
    assert n == 1719 and estimate_bytes(24, 896, 4864, n) <= 100_000_000 < estimate_bytes(24, 896, 4864, n + 1)
    assert samples_within(24, 896, 4864, 1000) == 0


def test_profile_default_fits_max_size_and_says_it_first(tiny_gguf, code_corpus, tmp_path, capsys):
    from pipower.sparse.stats import ActivationStats, estimate_bytes
    out = str(tmp_path / "s.safetensors")
    assert main(["profile", "-m", tiny_gguf, "--corpus", code_corpus, "--tokens", "1024", "--seq-len", "64",
                 "--max-size", "20kB", "--act-threshold", "0.1", "--out", out]) == 0
    err = capsys.readouterr().err
    said = err.split("stats file: at most ")[1]
    assert err.index("stats file: at most") < err.index("profile:")          # before the profiling bar
    rows = int(said.split("(")[1].split()[0])
    assert rows == (20_000 - estimate_bytes(1, 32, 64, 0)) // (2 * 32 + 8)  # every byte row that fits 20 kB
    assert estimate_bytes(1, 32, 64, rows) <= 20_000 and said.split()[1] == "kB"
    assert (tmp_path / "s.safetensors").stat().st_size <= estimate_bytes(1, 32, 64, rows)
    stats = ActivationStats.load(out)
    kept = stats.inputs[0].shape[0]
    # drawn at rows/tokens over the whole corpus, not the first rows: about `rows`, never more
    assert 0.7 * rows < kept <= rows and stats.n_tokens == 1024
    assert f"wrote {out}: " in err and f"{kept} sampled rows per layer" in err


def test_profile_samples_flag_wins_and_old_files_still_load(tiny_gguf, code_corpus, tmp_path, capsys):
    from pipower.sparse.stats import ActivationStats
    out = str(tmp_path / "s.safetensors")
    assert main(["profile", "-m", tiny_gguf, "--corpus", code_corpus, "--tokens", "256", "--seq-len", "64",
                 "--samples", "500", "--act-threshold", "0.1", "--out", out]) == 0
    assert "(256 sampled rows per layer (--samples)" in capsys.readouterr().err   # capped at --tokens
    stats = ActivationStats.load(out)
    assert stats.inputs[0].shape[0] == 256 and stats.meta["version"] == 1    # the same format as before


def test_profile_max_size_too_small_is_one_line_error(tiny_gguf, code_corpus, tmp_path, capsys):
    assert main(["profile", "-m", tiny_gguf, "--corpus", code_corpus, "--max-size", "5kB",
                 "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--max-size 5kB" in err and "\n" not in err and not (tmp_path / "s").exists()


def test_train_predictors_shows_a_progress_bar_with_eta(tiny_gguf, code_corpus, tmp_path, capsys):
    stats, preds = str(tmp_path / "s.safetensors"), str(tmp_path / "p.safetensors")
    assert main(["profile", "-m", tiny_gguf, "--corpus", code_corpus, "--tokens", "256", "--seq-len", "64",
                 "--act-threshold", "0.1", "--out", stats]) == 0
    capsys.readouterr()
    assert main(["train-predictors", "--stats", stats, "--rank", "8", "--epochs", "3", "--min-steps", "5",
                 "--recall", "0.999", "--out", preds]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines()[-1] == preds and "recall" in cap.out
    assert "train-predictors" in cap.err and "epoch" in cap.err and "<" in cap.err     # tqdm: elapsed<remaining
    bar = cap.err.replace("\r", "\n").strip().splitlines()[-1]
    done, total = bar.split("|")[2].split()[0].split("/")
    # 256 rows = 1 step per epoch: 5 epochs per training (--min-steps 5); retrains at higher ranks add 5 each
    assert done == total and int(total) % 5 == 0 and "x 5 epochs" in cap.err and "--min-steps 5" in cap.err


def test_min_steps_sets_the_epochs():
    from pipower.sparse.predictor import TrainConfig
    cfg = TrainConfig(epochs=12, min_steps=180)
    assert cfg.epochs_for(16384) == 12            # 15 steps per epoch already make 180
    assert cfg.epochs_for(1719) == 90             # 1548 rows to fit = 2 steps per epoch
    assert TrainConfig(epochs=12).epochs_for(1719) == 12


def test_train_predictors_epoch_callback():
    import numpy as np

    from pipower.sparse.predictor import TrainConfig, train_predictors
    from pipower.sparse.stats import ActivationStats
    rng = np.random.default_rng(0)
    L, n, D, F = 2, 64, 16, 24
    x = [rng.standard_normal((n, D)).astype(np.float16) for _ in range(L)]
    y = [np.packbits(rng.random((n, F)) < 0.3, axis=1) for _ in range(L)]
    stats = ActivationStats(np.zeros((L, F), np.int64), n, np.zeros(L, np.float32), x, y)
    calls = []
    train_predictors(stats, TrainConfig(rank=4, epochs=2), epoch_done=lambda *a: calls.append(a))
    assert calls == [(0, 4, 0), (0, 4, 1), (1, 4, 0), (1, 4, 1)]
    calls.clear()
    train_predictors(stats, TrainConfig(rank=4, epochs=1, min_steps=3), epoch_done=lambda *a: calls.append(a))
    assert [c[2] for c in calls] == [0, 1, 2, 0, 1, 2]
