"""`pipower profile`, `pipower train-predictors`, `pipower plan`: the offline half of sparsity."""
from __future__ import annotations

import argparse
import sys

from .fetcher import DEFAULT_MODEL
from .units import parse_bytes


def add_commands(sub, add_model_args) -> None:
    p = sub.add_parser("profile", help="record per-neuron FFN activation frequencies over a corpus",
                       description="Run a corpus through the model (dense) and record how often each FFN "
                                   "neuron is active, plus samples for predictor training.")
    add_model_args(p)
    p.add_argument("--corpus", nargs="+", default=["stdlib"], metavar="SRC",
                   help="sources, any of: 'stdlib' (the Python standard library source, default), "
                        "'humaneval-prompts' (the 164 HumanEval prompts only, never solutions or tests), "
                        "files or folders (.py/.txt/.md)")
    p.add_argument("--tokens", type=int, default=32768,
                   help="tokens to profile (default: 32768); a corpus that runs out first is profiled whole "
                        "(in full sequences) with a warning saying how many tokens were profiled")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per profiled sequence (default: 512); the corpus must hold at least one")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--act-threshold", type=float, default=None,
                   help="tau_act: a neuron is active when |act(gate.x)| > tau_act (default: 0 for ReLU "
                        "models; SiLU/GELU neurons are never exactly 0, so they default to --target-sparsity 0.5)")
    g.add_argument("--target-sparsity", type=float, default=None,
                   help="calibrate a per-layer tau_act so this fraction of neurons is inactive")
    p.add_argument("--samples", type=int, default=None,
                   help="(input, label) rows kept per layer for predictor training, drawn evenly over the "
                        "profiled tokens; they are nearly all of the file (2*hidden + ffn/8 bytes per row and "
                        "layer). Default: as many as fit --max-size, at most 16384 and --tokens")
    p.add_argument("--max-size", default="100MB", metavar="SIZE",
                   help="size the stats file may reach when --samples is not given, e.g. 100MB, 1GiB "
                        "(default: 100MB: 1719 rows per layer on Qwen2.5-Coder-0.5B, 2470 on SmolLM2-135M). "
                        "The size is printed before profiling starts")
    p.add_argument("--out", required=True, help="stats file to write (.safetensors)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write sorted frequency curves to this PNG")

    t = sub.add_parser("train-predictors", help="train per-layer activation predictors from a stats file",
                       description="Train fc1-ReLU-fc2 predictors per layer (NumPy, Adam, weighted BCE).")
    t.add_argument("-m", "--model", default=None,
                   help="the model the stats were profiled on (path or known name); optional: when given, "
                        "training refuses stats recorded on another model file")
    t.add_argument("--stats", required=True, help="stats file from `pipower profile`")
    t.add_argument("--rank", type=int, default=256, help="predictor hidden size r (default: 256)")
    t.add_argument("--recall", type=float, default=None,
                   help="double a layer's rank until held-out recall reaches this (e.g. 0.95)")
    t.add_argument("--epochs", type=int, default=12, help="training epochs per layer (default: 12)")
    t.add_argument("--min-steps", type=int, default=180,
                   help="train more epochs than --epochs when needed to make this many optimizer steps (batches "
                        "of 1024) per layer, so a small stats file still trains to convergence (default: 180, "
                        "what 12 epochs over 16384 rows make)")
    t.add_argument("--pos-weight", type=float, default=3.0,
                   help="weight of active neurons in the loss; > 1 favours recall (default: 3)")
    t.add_argument("--out", required=True, help="predictor file to write (.safetensors)")

    pl = sub.add_parser("plan", help="choose hot (GPU) neurons per layer under a VRAM budget",
                        description="Maximise the activation frequency of GPU neurons under a byte budget, "
                                    "after attention, norms, predictors and the output head.")
    add_model_args(pl)
    pl.add_argument("--stats", required=True, help="stats file from `pipower profile`")
    pl.add_argument("--vram-budget", required=True, help="budget, e.g. 4GiB, 512MiB, 2.5GB")
    pl.add_argument("--predictors", default=None, metavar="FILE",
                    help="the predictor file that will run: its bytes are counted on the GPU (per-layer ranks)")
    pl.add_argument("--predictor-rank", type=int, default=0,
                    help="without --predictors: count predictors of this rank on every layer (0 = none)")
    pl.add_argument("--context", type=int, default=4096,
                    help="KV-cache positions to reserve on the GPU, float32 as the hybrid engine keeps them "
                         "(default: 4096, what --device hybrid plans for)")
    pl.add_argument("--reserve", default="96MiB",
                    help="GPU scratch kept free for activations and dequantization chunks (default: 96MiB)")
    pl.add_argument("--min-neurons", type=int, default=0, help="a layer gets 0 or at least this many hot neurons")
    pl.add_argument("--granularity", type=int, default=256, help="neurons per solver variable (default: 256)")
    pl.add_argument("--out", required=True, help="placement file to write (.safetensors)")
    add_bench(sub, add_model_args)


def add_bench(sub, add_model_args) -> None:
    b = sub.add_parser("bench", help="time prefill and decode of a model (optionally sparse)",
                       description="Median prefill and decode tokens/s, measured FFN sparsity and weight "
                                   "bytes per token. For the full comparison table see bench/decode.py.")
    add_model_args(b)
    b.add_argument("--tokens", type=int, default=32, help="decode steps per repeat (default: 32)")
    b.add_argument("--repeats", type=int, default=3, help="repeats after one warm-up (default: 3)")
    b.add_argument("--prompt-tokens", type=int, default=0,
                   help="use this many tokens of stdlib code as the prompt (default: a short code prompt)")
    from .cli import add_device_args, add_sparsity_args
    add_sparsity_args(b)
    add_device_args(b)
    b.add_argument("--target-sparsities", default=None, metavar="LIST",
                   help="time dense and oracle mode (the fused threshold FFN) at each target sparsity in LIST "
                        "(e.g. 0.25,0.4) in one run, interleaved round by round, and print tokens/s relative "
                        "to dense")
    b.add_argument("--pred-thresholds", default=None, metavar="LIST",
                   help="with --predictors: time dense and each tau_pred in LIST (e.g. 0,1,2) in one run, "
                        "interleaved round by round, and print tokens/s relative to dense")
    b.add_argument("--draft", default=None, metavar="D[,D...]",
                   help="speculative decoding: time greedy generation of --tokens new tokens without a drafter "
                        "and with each comma-separated drafter, interleaved, and check the text is identical. "
                        "Drafters: " + _draft_help())
    b.add_argument("--json", action="store_true", help="print the measurements as one JSON object")


def cmd_bench(args) -> int:
    import json

    import pipower
    from .benchmark import time_model
    from .cli import device_kwargs
    model = pipower.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights, dot=args.dot,
                         **device_kwargs(args))
    model.set_sparsity(act_threshold=args.act_threshold, target_sparsity=args.target_sparsity,
                       predictors=args.predictors, pred_threshold=args.pred_threshold)
    ids = None
    if args.prompt_tokens:
        from .sparse.corpus import stdlib_files, token_sequences
        ids = next(token_sequences(model.tokenizer, stdlib_files(), args.prompt_tokens, args.prompt_tokens))
    if args.pred_thresholds is not None or args.target_sparsities is not None:
        return _bench_thresholds(model, args, ids)
    if args.draft is not None:
        return _bench_drafts(model, args, ids)
    from .benchmark import cpu_model, read_gbs
    gbs = read_gbs(model.transformer.ops.n_threads)
    r = time_model(model, prompt_ids=ids, decode_tokens=args.tokens, repeats=args.repeats)
    r.update(cpu=cpu_model(), read_gbs=gbs, dot=model.dot)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{model.source}: {r['backend']} backend, {r['weights']} weights ({model.dot} dots), {r['threads']} "
          f"threads")
    print(f"machine: {r['cpu']}, memory read {gbs:.1f} GB/s just before (speeds scale with it: compare "
          f"runs of one machine)" if gbs else f"machine: {r['cpu']}")
    print(f"prefill {r['prompt_tokens']} tokens: {r['prefill_tok_s']:.1f} tok/s")
    print(f"decode: {r['decode_tok_s']:.2f} tok/s ({r['decode_ms']:.1f} ms/token, median of {r['repeats']} x "
          f"{r['decode_tokens']} steps); FFN sparsity {r['ffn_sparsity']:.1%} of neurons skipped per token")
    print(f"weights read per token (dense): {r['weight_mib_per_token']:.1f} MiB -> {r['achieved_gb_s']:.1f} GB/s")
    return 0


def _draft_help() -> str:
    from .speculative import DRAFT_HELP
    return DRAFT_HELP


def _bench_drafts(model, args, ids) -> int:
    import json

    from .benchmark import compare_drafts
    drafts = [d.strip() for d in args.draft.split(",") if d.strip()]
    res = compare_drafts(model, drafts, prompt_ids=ids, new_tokens=args.tokens, rounds=args.repeats)
    if args.json:
        print(json.dumps({"model": str(model.source), "weights": model.weights, "results": res}, indent=2))
        return 0
    print(f"{model.source}: {model.backend} backend, {model.weights} weights, {model.transformer.ops.n_threads} "
          f"threads; greedy, {args.tokens} new tokens, medians of {args.repeats} interleaved rounds")
    print(f"{'draft':<22} {'tok/s':>8} {'vs plain':>9} {'accepted/drafted':>17} {'identical':>10}")
    for name, r in res.items():
        acc = f"{r['accepted']}/{r['drafted']}" if name != "none" else ""
        print(f"{name:<22} {r['tok_s']:8.2f} {r['ratio_to_plain']:9.2f} {acc:>17} {str(r['identical']):>10}")
    return 0 if all(r["identical"] for r in res.values()) else 1


def _bench_thresholds(model, args, ids) -> int:
    import json

    from .benchmark import compare_settings
    from .errors import InvalidArgumentError

    def numbers(text, flag):
        try:
            return [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise InvalidArgumentError(f"{flag}: not a list of numbers: {text!r}") from None
    settings = {"dense": {}}
    if args.target_sparsities is not None:
        from .sparse.modes import calibrate_taus
        for s in numbers(args.target_sparsities, "--target-sparsities"):
            calibrate_taus(model, s)                      # once, before timing (then read from its cache)
            settings[f"target {s:g}"] = {"target_sparsity": s}
    if args.pred_thresholds is not None:
        if args.predictors is None:
            raise InvalidArgumentError("--pred-thresholds needs --predictors")
        from .sparse.predictor import Predictors
        preds = Predictors.load(args.predictors)              # once, not per round
        settings.update({f"tau_pred {t:g}": {"predictors": preds, "pred_threshold": t}
                         for t in numbers(args.pred_thresholds, "--pred-thresholds")})
    res = compare_settings(model, settings, prompt_ids=ids, decode_tokens=args.tokens, rounds=args.repeats)
    if args.json:
        print(json.dumps({"model": str(model.source), "weights": model.weights, "threads": model.transformer.ops.n_threads,
                          "predictors": args.predictors, "results": res}, indent=2))
        return 0
    print(f"{model.source}: {model.backend} backend, {model.weights} weights, {model.transformer.ops.n_threads} "
          f"threads; medians of {args.repeats} interleaved rounds x {args.tokens} decode steps")
    print(f"{'setting':<14} {'decode tok/s':>12} {'vs dense':>9} {'FFN sparsity':>13}")
    for name, r in res.items():
        print(f"{name:<14} {r['decode_tok_s']:12.2f} {r['ratio_to_first']:9.2f} {r['ffn_sparsity']:13.1%}")
    return 0




def cmd_profile(args) -> int:
    import pipower
    from tqdm import tqdm

    from .sparse.corpus import corpus_files, token_sequences
    from .sparse.profile import profile
    from .errors import InvalidArgumentError
    if args.tokens < 1:
        raise InvalidArgumentError(f"--tokens must be at least 1, got {args.tokens}")
    files = corpus_files(args.corpus)
    model = pipower.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights, dot=args.dot)
    if model.tokenizer is None:
        raise InvalidArgumentError(f"{model.source} has no tokenizer: profiling needs one to turn the corpus "
                                   f"into tokens")
    seqs = token_sequences(model.tokenizer, files, args.seq_len, args.tokens)
    first = next(seqs, None)            # tokenizes only until one sequence is full
    if first is None:
        raise InvalidArgumentError(f"the corpus ({' '.join(args.corpus)}) holds fewer tokens than one sequence of "
                                   f"--seq-len {args.seq_len}: nothing to profile; give more text or a smaller "
                                   f"--seq-len")
    samples, rate = _profile_samples(model.config, args)     # says the file's size before profiling
    import itertools
    seqs = itertools.chain([first], seqs)
    bar = tqdm(total=args.tokens, desc="profile", unit="tok", file=sys.stderr)
    tau, target = args.act_threshold, args.target_sparsity
    if tau is None and target is None:
        if model.config.hidden_act == "relu":
            tau = 0.0
        else:
            target = 0.5
            print(f"{model.config.hidden_act} model and no threshold given: calibrating per-layer tau_act "
                  f"for --target-sparsity {target}", file=sys.stderr)
    stats = profile(model, seqs, tau_act=tau, target_sparsity=target, max_samples=samples, sample_rate=rate,
                    progress=bar.update, meta={"corpus": " ".join(args.corpus), "files": len(files)})
    bar.close()
    if stats.n_tokens < args.tokens:
        print(f"pipower: warning: profiled only {stats.n_tokens} of the {args.tokens} requested tokens: the corpus "
              f"ran out (it is cut into whole sequences of --seq-len {args.seq_len}; a shorter last piece is "
              f"dropped)", file=sys.stderr)
    stats.save(args.out)
    import os
    print(f"wrote {args.out}: {_size(os.path.getsize(args.out))}, {stats.inputs[0].shape[0] if stats.inputs else 0} "
          f"sampled rows per layer", file=sys.stderr)
    freqs = stats.freqs
    print(f"profiled {stats.n_tokens} tokens; mean activity per layer: "
          + " ".join(f"{f:.2f}" for f in freqs.mean(axis=1)))
    if args.plot:
        from .sparse.plots import plot_frequencies
        plot_frequencies(stats, args.plot)
        print(f"plot: {args.plot}")
    print(args.out)
    return 0


def _profile_samples(config, args) -> tuple[int, float]:
    """(rows kept per layer, sampling rate): --samples, or as many as fit --max-size; the rate spreads them
    over all --tokens. Says the file's size on stderr before any profiling."""
    from .errors import InvalidArgumentError
    from .sparse.stats import estimate_bytes, samples_within
    L, D, F = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    if args.samples is not None:
        if args.samples < 0:
            raise InvalidArgumentError(f"--samples must be >= 0, got {args.samples}")
        samples, why = args.samples, "--samples"
    else:
        budget = parse_bytes(args.max_size)
        samples = min(samples_within(L, D, F, budget), MAX_AUTO_SAMPLES)
        why = f"what fits --max-size {args.max_size}"
        if samples < 10:
            raise InvalidArgumentError(f"--max-size {args.max_size} leaves room for {samples} sampled rows per layer "
                                       f"(predictor training needs at least 10; the counts alone take "
                                       f"{estimate_bytes(L, D, F, 0) / 1e6:.1f} MB): give a larger size or --samples")
    samples = min(samples, args.tokens)
    rate = min(1.0, samples / args.tokens) if args.tokens else 1.0
    print(f"stats file: at most {_size(estimate_bytes(L, D, F, samples))} ({samples} sampled rows per layer "
          f"({why}) x {L} layers x {2 * D + (F + 7) // 8} bytes, plus the counts); {MAX_AUTO_SAMPLES} rows would "
          f"be {_size(estimate_bytes(L, D, F, MAX_AUTO_SAMPLES))}", file=sys.stderr)
    return samples, rate


MAX_AUTO_SAMPLES = 16384       # the old default, which wrote 945 MB for Qwen2.5-Coder-0.5B


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def cmd_train(args) -> int:
    from .sparse.predictor import TrainConfig, train_predictors
    from .sparse.stats import ActivationStats
    stats = ActivationStats.load(args.stats)
    if args.model is not None:
        import pipower

        from .errors import InvalidArgumentError
        fp = pipower.load(args.model, progress=False).fingerprint
        if stats.meta.get("model_fingerprint") != fp:
            raise InvalidArgumentError(f"{args.stats} was profiled on another model file (fingerprint "
                                       f"{str(stats.meta.get('model_fingerprint'))[:16]}, {args.model} has {fp[:16]})")
    cfg = TrainConfig(rank=args.rank, epochs=args.epochs, pos_weight=args.pos_weight, min_steps=args.min_steps)
    from tqdm import tqdm
    n = stats.inputs[0].shape[0] if stats.inputs else 0
    epochs = cfg.epochs_for(n) if n else args.epochs
    print(f"training {stats.n_layers} layers x {epochs} epochs on {n} sampled rows per layer (rank {args.rank}"
          + (f"; more than --epochs {args.epochs} to make --min-steps {args.min_steps}" if epochs > args.epochs else "")
          + ")", file=sys.stderr)
    print(f"{'layer':>5} {'recall':>7} {'precision':>9} {'pred.sparsity':>13} {'true sparsity':>13}")
    # one bar over every epoch of every layer: its rate and time remaining are the ETA (stderr)
    bar = tqdm(total=stats.n_layers * epochs, desc="train-predictors", unit="epoch", file=sys.stderr)
    ranks = {}

    def epoch_done(layer, rank, epoch):
        if epoch == 0 and ranks.setdefault(layer, rank) != rank:     # --recall retrains at a higher rank
            ranks[layer] = rank
            bar.total += epochs
        bar.set_postfix_str(f"layer {layer}/{stats.n_layers}" + (f" rank {rank}" if rank != args.rank else ""),
                            refresh=False)
        bar.update(1)

    def done(i, r):
        tqdm.write(f"{i:5d} {r.recall:7.3f} {r.precision:9.3f} {r.predicted_sparsity:13.3f} {r.true_sparsity:13.3f}",
                   file=sys.stdout)
        sys.stdout.flush()
    try:
        preds = train_predictors(stats, cfg, target_recall=args.recall, layer_done=done, epoch_done=epoch_done)
    finally:
        bar.close()
    preds.save(args.out)
    print(args.out)
    return 0


def cmd_plan(args) -> int:
    import pipower
    from .hybrid.engine import predictor_ranks, solve_for
    model = pipower.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights, dot=args.dot)
    ranks = predictor_ranks(args.predictors) if args.predictors else (
        [args.predictor_rank] * model.config.num_hidden_layers if args.predictor_rank else None)
    placement = solve_for(model, args.stats, parse_bytes(args.vram_budget), args.context, ranks,
                          parse_bytes(args.reserve), min_neurons_per_layer=args.min_neurons,
                          granularity=args.granularity)
    placement.save(args.out)
    print(placement.summary())
    print(args.out)
    return 0


COMMANDS = {"profile": cmd_profile, "train-predictors": cmd_train, "plan": cmd_plan, "bench": cmd_bench}
__all__ = ["add_commands", "COMMANDS", "parse_bytes", "DEFAULT_MODEL", "argparse"]
