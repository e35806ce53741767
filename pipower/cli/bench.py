"""`pipower bench`: prefill and decode speed of a model, optionally sparse, drafted or on a device."""
from __future__ import annotations

from .args import (EXIT_ERROR, EXIT_OK, add_device_args, add_draft, add_json, add_model_args,
                   add_sparsity_args, add_values, load_kwargs, sparsity_kwargs)


def add_commands(sub) -> None:
    b = sub.add_parser("bench", help="time prefill and decode of a model (optionally sparse)",
                       description="Median prefill and decode tokens/s, measured FFN sparsity and weight "
                                   "bytes per token. For the full comparison table see bench/decode.py.")
    add_model_args(b)
    b.add_argument("--tokens", type=int, default=32, metavar="N",
                   help="new tokens decoded per repeat, as in the bench/*.py scripts (default: 32)")
    b.add_argument("--repeats", type=int, default=3, metavar="N", help="repeats after one warm-up (default: 3)")
    b.add_argument("--prompt-tokens", type=int, default=0, metavar="N",
                   help="use this many tokens of stdlib code as the prompt (default: a short code prompt)")
    add_sparsity_args(b)
    add_device_args(b)
    add_values(b, "--target-sparsities", "--target-sparsity", "0.25,0.4",
               "time dense and oracle mode (the fused threshold FFN) at each in one run, interleaved round by "
               "round, and print tokens/s relative to dense")
    add_values(b, "--pred-thresholds", "--pred-threshold", "0,1,2",
               "with --predictors: time dense and each in one run, interleaved round by round, and print "
               "tokens/s relative to dense")
    add_draft(b, metavar="D[,D...]",
              note="bench times greedy generation of --tokens new tokens without a drafter and with each "
                   "comma-separated D, interleaved, and checks the text is identical")
    add_json(b)


def cmd_bench(args) -> int:
    import json

    import pipower
    from ..benchmark import time_model
    model = pipower.load(args.model, **load_kwargs(args))
    model.set_sparsity(**sparsity_kwargs(args))
    ids = None
    if args.prompt_tokens:
        from ..sparse.corpus import stdlib_files, token_sequences
        ids = next(token_sequences(model.tokenizer, stdlib_files(), args.prompt_tokens, args.prompt_tokens))
    if args.pred_thresholds is not None or args.target_sparsities is not None:
        return _bench_thresholds(model, args, ids)
    if args.draft is not None:
        return _bench_drafts(model, args, ids)
    from ..benchmark import cpu_model, read_gbs
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


def _bench_drafts(model, args, ids) -> int:
    import json

    from ..benchmark import compare_drafts
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
    return EXIT_OK if all(r["identical"] for r in res.values()) else EXIT_ERROR      # a drafter changed the text


def _bench_thresholds(model, args, ids) -> int:
    import json

    from ..benchmark import compare_settings
    from ..errors import InvalidArgumentError

    def numbers(text, flag):
        try:
            return [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise InvalidArgumentError(f"{flag}: not a list of numbers: {text!r}") from None
    settings = {"dense": {}}
    if args.target_sparsities is not None:
        from ..sparse.modes import calibrate_taus
        for s in numbers(args.target_sparsities, "--target-sparsities"):
            calibrate_taus(model, s)                      # once, before timing (then read from its cache)
            settings[f"target {s:g}"] = {"target_sparsity": s}
    if args.pred_thresholds is not None:
        if args.predictors is None:
            raise InvalidArgumentError("--pred-thresholds needs --predictors")
        from ..sparse.predictor import Predictors
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


COMMANDS = {"bench": cmd_bench}
