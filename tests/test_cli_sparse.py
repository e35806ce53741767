"""The offline sparsity commands end to end on a tiny model (profile -> train -> plan -> generate/bench)."""
import json

import pytest

from pipower.cli import main
from pipower.cli_sparse import parse_bytes


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
