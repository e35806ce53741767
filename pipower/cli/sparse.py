"""`pipower profile`, `pipower train-predictors`, `pipower plan`: the offline half of sparsity."""
from __future__ import annotations

import sys

from .args import (add_act_threshold, add_ctx_size, add_model, add_model_args, add_predictors, add_stats,
                   add_target_sparsity, add_vram_budget, alias, load_kwargs, warning)
from ..units import parse_bytes


def add_commands(sub) -> None:
    p = sub.add_parser("profile", help="record per-neuron FFN activation frequencies over a corpus",
                       description="Run a corpus through the model (dense) and record how often each FFN "
                                   "neuron is active, plus samples for predictor training.")
    add_model_args(p)
    p.add_argument("--corpus", nargs="+", default=["stdlib"], metavar="SRC",
                   help="sources, any of: 'stdlib' (the Python standard library source, default), "
                        "'humaneval-prompts' (the 164 HumanEval prompts only, never solutions or tests), "
                        "files or folders (.py/.txt/.md)")
    p.add_argument("--tokens", type=int, default=32768, metavar="N",
                   help="tokens to profile (default: 32768); a corpus that runs out first is profiled whole "
                        "(in full sequences) with a warning saying how many tokens were profiled")
    p.add_argument("--seq-len", type=int, default=512, metavar="N",
                   help="tokens per profiled sequence (default: 512); the corpus must hold at least one")
    g = p.add_mutually_exclusive_group()
    add_act_threshold(g, "the profile counts activity by it (default: 0 for ReLU models; SiLU/GELU neurons "
                         "are never exactly 0, so they default to --target-sparsity 0.5)")
    add_target_sparsity(g, "calibrated on the first two profiled sequences; the profile counts activity by it")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="(input, label) rows kept per layer for predictor training, drawn evenly over the "
                        "profiled tokens; they are nearly all of the file (2*hidden + ffn/8 bytes per row and "
                        "layer). Default: as many as fit --max-size, at most 16384 and --tokens")
    p.add_argument("--max-size", default="100MB", metavar="SIZE",
                   help="size the stats file may reach when --samples is not given, e.g. 100MB, 1GiB "
                        "(default: 100MB: 1719 rows per layer on Qwen2.5-Coder-0.5B, 2470 on SmolLM2-135M). "
                        "The size is printed before profiling starts")
    p.add_argument("--out", required=True, metavar="FILE", help="activation-stats file to write (.safetensors)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write sorted frequency curves to this PNG")

    t = sub.add_parser("train-predictors", help="train per-layer activation predictors from a stats file",
                       description="Train fc1-ReLU-fc2 predictors per layer (NumPy, Adam, weighted BCE).")
    add_model(t, optional="the model the stats were profiled on, so training refuses stats recorded on another "
                          "model file")
    add_stats(t, "the rows to train on", required=True)
    t.add_argument("--rank", type=int, default=256, metavar="R", help="predictor hidden size R (default: 256)")
    t.add_argument("--recall", type=float, default=None,
                   help="double a layer's rank until held-out recall reaches this (e.g. 0.95)")
    t.add_argument("--epochs", type=int, default=12, metavar="N", help="training epochs per layer (default: 12)")
    t.add_argument("--min-steps", type=int, default=180, metavar="N",
                   help="train more epochs than --epochs when needed to make this many optimizer steps (batches "
                        "of 1024) per layer, so a small stats file still trains to convergence (default: 180, "
                        "what 12 epochs over 16384 rows make)")
    t.add_argument("--pos-weight", type=float, default=3.0,
                   help="weight of active neurons in the loss; > 1 favours recall (default: 3)")
    t.add_argument("--out", required=True, metavar="FILE", help="predictor file to write (.safetensors)")

    pl = sub.add_parser("plan", help="choose hot (GPU) neurons per layer under a VRAM budget",
                        description="Maximise the activation frequency of GPU neurons under a byte budget, "
                                    "after attention, norms, predictors and the output head.")
    add_model_args(pl)
    add_stats(pl, "the activation frequencies to maximise", required=True)
    add_vram_budget(pl, "the placement fills it", required=True)
    add_predictors(pl, "the one that will run: its bytes are counted on the GPU (per-layer ranks)")
    pl.add_argument("--predictor-rank", type=int, default=0, metavar="R",
                    help="without --predictors: count predictors of this rank on every layer (0 = none)")
    alias(pl, "--context", add_ctx_size(pl, 4096, "the positions reserved on the GPU, float32 as the hybrid "
                                                  "engine keeps them", "4096, what --device hybrid plans for"))
    pl.add_argument("--reserve", default="96MiB", metavar="SIZE",
                    help="GPU scratch kept free for activations and dequantization chunks (default: 96MiB)")
    pl.add_argument("--min-neurons", type=int, default=0, metavar="N",
                    help="a layer gets 0 or at least this many hot neurons (default: 0)")
    pl.add_argument("--granularity", type=int, default=256, metavar="N",
                    help="neurons per solver variable (default: 256)")
    pl.add_argument("--out", required=True, metavar="FILE", help="placement file to write (.safetensors)")


def cmd_profile(args) -> int:
    import pipower
    from tqdm import tqdm

    from ..sparse.corpus import corpus_files, token_sequences
    from ..sparse.profile import profile
    from ..errors import InvalidArgumentError
    if args.tokens < 1:
        raise InvalidArgumentError(f"--tokens must be at least 1, got {args.tokens}")
    files = corpus_files(args.corpus)
    model = pipower.load(args.model, **load_kwargs(args))
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
        warning(f"profiled only {stats.n_tokens} of the {args.tokens} requested tokens: the corpus ran out (it is "
                f"cut into whole sequences of --seq-len {args.seq_len}; a shorter last piece is dropped)")
    stats.save(args.out)
    import os
    print(f"wrote {args.out}: {_size(os.path.getsize(args.out))}, {stats.inputs[0].shape[0] if stats.inputs else 0} "
          f"sampled rows per layer", file=sys.stderr)
    freqs = stats.freqs
    print(f"profiled {stats.n_tokens} tokens; mean activity per layer: "
          + " ".join(f"{f:.2f}" for f in freqs.mean(axis=1)))
    if args.plot:
        from ..sparse.plots import plot_frequencies
        plot_frequencies(stats, args.plot)
        print(f"plot: {args.plot}")
    print(args.out)
    return 0


def _profile_samples(config, args) -> tuple[int, float]:
    """(rows kept per layer, sampling rate): --samples, or as many as fit --max-size; the rate spreads them
    over all --tokens. Says the file's size on stderr before any profiling."""
    from ..errors import InvalidArgumentError
    from ..sparse.stats import estimate_bytes, samples_within
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
    from ..sparse.predictor import TrainConfig, train_predictors
    from ..sparse.stats import ActivationStats
    stats = ActivationStats.load(args.stats)
    if args.model is not None:
        import pipower

        from ..errors import InvalidArgumentError
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
    from ..hybrid.engine import predictor_ranks, solve_for
    model = pipower.load(args.model, **load_kwargs(args))
    ranks = predictor_ranks(args.predictors) if args.predictors else (
        [args.predictor_rank] * model.config.num_hidden_layers if args.predictor_rank else None)
    placement = solve_for(model, args.stats, parse_bytes(args.vram_budget), args.ctx_size, ranks,
                          parse_bytes(args.reserve), min_neurons_per_layer=args.min_neurons,
                          granularity=args.granularity)
    placement.save(args.out)
    print(placement.summary())
    print(args.out)
    return 0


COMMANDS = {"profile": cmd_profile, "train-predictors": cmd_train, "plan": cmd_plan}
