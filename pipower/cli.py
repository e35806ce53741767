"""The `pipower` command. The only place that prints or exits; the library raises PipowerError."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from .errors import InvalidArgumentError, PipowerError
from .fetcher import DEFAULT_MODEL, KNOWN_MODELS
from .quant import FORMATS

EPILOG = f"known model names: {', '.join(sorted(KNOWN_MODELS))} (fetched on first use into $PIPOWER_HOME)"


def add_sparsity_args(p: argparse.ArgumentParser):
    """--act-threshold | --target-sparsity | --predictors (one mode at a time), --pred-threshold.
    Returns the mutually exclusive group so a command can add more modes to it. These are research knobs:
    they change the output; for speed at dense output, generate has --draft."""
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--act-threshold", type=float, default=None, metavar="TAU",
                    help="research knob (changes the output): oracle sparsity, skip FFN neurons with "
                         "|act(gate.x)| <= TAU (gate computed fully, so today it decodes ~0.8x as fast as "
                         "dense; 0 = dense on SiLU models)")
    sp.add_argument("--target-sparsity", type=float, default=None, metavar="S",
                    help="research knob (changes the output; ~0.8x dense speed today): oracle sparsity with "
                         "per-layer TAU calibrated (on stdlib code) to skip fraction S")
    sp.add_argument("--predictors", default=None, metavar="FILE",
                    help="research knob (changes the output): predictor sparsity, skip neurons whose "
                         "predictor logit < --pred-threshold (faster than dense only at high thresholds, "
                         "which cost accuracy)")
    p.add_argument("--pred-threshold", type=float, default=0.0, metavar="TAU",
                   help="tau_pred for --predictors (default: 0, i.e. p >= 0.5)")
    return sp


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device, --vram-budget, --placement, --hot-stats: where the model runs (pipower.hybrid.engine)."""
    p.add_argument("--device", choices=("cpu", "gpu", "hybrid", "offload"), default="cpu",
                   help="cpu: CPU engine only; gpu: whole model on the GPU; hybrid: attention, output and hot "
                        "FFN neurons on the GPU, cold neurons on the CPU concurrently (PowerInfer); offload: "
                        "the first whole layers that fit on the GPU, the rest on the CPU (llama.cpp -ngl "
                        "baseline). GPU modes need CuPy and a CUDA device (default: cpu)")
    p.add_argument("--vram-budget", default=None, metavar="B",
                   help="hard limit on GPU memory, e.g. 4GiB, 512MiB (needed by hybrid and offload)")
    p.add_argument("--placement", default=None, metavar="FILE",
                   help="hot-neuron placement from `pipower plan` for --device hybrid")
    p.add_argument("--hot-stats", default=None, metavar="FILE",
                   help="activation stats from `pipower profile`: solve the hybrid placement at --vram-budget "
                        "here instead of reading --placement")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"GGUF file, Hugging Face model directory, or known model name (default: {DEFAULT_MODEL})")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads for the kernels, at least 1; more than the cores available to this "
                        "process draws a warning (default: all cores available to this process)")
    p.add_argument("--backend", choices=("auto", "numpy", "cython"), default="auto",
                   help="ops backend: cython = compiled kernels, numpy = reference; auto = cython when built, "
                        "else numpy with a warning (default: auto)")
    p.add_argument("--weights", choices=FORMATS, default=None,
                   help="in-memory weight format: f32, f16, q8 (int8 blocks of 32), q4 (4-bit blocks of 32); "
                        "default: q8 for GGUF files when the backend has compact kernels, else f32")
    p.add_argument("--dot", choices=("int8", "float"), default=None,
                   help="how q4/q8 weights multiply: int8 = activations quantized per 32-block to int8 and "
                        "exact 4/8-bit x int8 sums (as llama.cpp does; q4 decodes ~2x faster), float = weights "
                        "converted to float32 with exact activations. Default: int8 for --weights q4 on the "
                        "CPU engine, float otherwise; f32/f16 and the GPU devices are float only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipower", description="LLM inference exploiting activation sparsity.",
                                     epilog=EPILOG)
    from . import __version__
    parser.add_argument("-V", "--version", action="version", version=f"pipower {__version__}",
                        help="print the version (pipower X.Y.Z) and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout", epilog=EPILOG,
                       description="Generate text, streamed to stdout; prefill and decode speed go to stderr. "
                                   "Prompts (PROMPT, -p, -f, --system, --stop) must be valid UTF-8: invalid "
                                   "bytes are an error that names the first bad byte's offset, never replaced "
                                   "silently. Ctrl-C stops generation, prints what was generated and the "
                                   "stats, and exits 130.")
    g.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or use -p); UTF-8 text")
    g.add_argument("-p", "--prompt", help="the prompt text (UTF-8)")
    g.add_argument("-f", "--file", metavar="FILE",
                   help="read the prompt from this file, or from standard input when FILE is '-'; the bytes "
                        "must be valid UTF-8 (an invalid byte is an error naming its offset)")
    _add_model_args(g)
    g.add_argument("-n", "--n-predict", type=int, default=256, dest="max_tokens",
                   help="maximum number of new tokens (default: 256)")
    g.add_argument("--temp", type=float, default=0.0, dest="temperature",
                   help="sampling temperature; 0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default: 1)")
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed for sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template "
                        "(use this with instruct models)")
    g.add_argument("--system", help="system message for --chat (default: the template's own)")
    add_sparsity_args(g)
    from .speculative import DRAFT_HELP
    g.add_argument("--draft", default=None, metavar="D",
                   help="speculative decoding, lossless: a drafter proposes tokens and the model verifies them "
                        "in one batched forward, so greedy text is exactly the plain text and sampling keeps "
                        "the model's distribution; only speed changes. D: " + DRAFT_HELP)
    add_device_args(g)
    g.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the prepared-model cache (see `pipower cache`)")

    f = sub.add_parser("fetch", help="download a known model and print its local path",
                       description="Fetch a known model (verified by SHA-256); the last stdout line is the path.",
                       epilog=EPILOG)
    f.add_argument("name", choices=sorted(KNOWN_MODELS), help="known model name")
    f.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="show backends, compiled extension, threads, BLAS and GPU",
                       description="Report what this installation can run and what it uses by default.")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("-m", "--model", default=None,
                   help="also load this model (path or known name) and report its config and weight format")
    i.add_argument("--backend", choices=("auto", "numpy", "cython"), default="auto",
                   help="backend to load --model with (default: auto)")
    i.add_argument("--weights", choices=FORMATS, default=None, help="weight format to load --model in")
    add_device_args(i)
    from .cli_sparse import add_commands
    add_commands(sub, _add_model_args)
    from .cli_eval import add_commands as add_eval_commands
    add_eval_commands(sub, _add_model_args)
    from .cli_cache import add_commands as add_cache_commands
    add_cache_commands(sub)
    from .cli_serve import add_commands as add_serve_commands
    add_serve_commands(sub, _add_model_args)
    from .cli_chat import add_commands as add_chat_commands
    add_chat_commands(sub, _add_model_args)
    return parser


def utf8_text(raw: bytes, what: str) -> str:
    """Strictly decode `raw`; invalid UTF-8 is an InvalidArgumentError naming the first bad byte's offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{what} is not valid UTF-8: byte 0x{raw[e.start]:02X} at byte offset {e.start} "
                                   f"({e.reason}); give UTF-8 text") from None


def argv_text(s: str | None, what: str) -> str | None:
    """A command-line string, checked to be UTF-8. Python hands over argv bytes that are not valid UTF-8
    as lone surrogates (surrogateescape); they would reach the tokenizer as unencodable text."""
    if s is None:
        return None
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(s)                      # the bytes as they were on the command line
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "surrogatepass")
    return utf8_text(raw, what)


def _read_prompt(args) -> str:
    given = [x for x in (argv_text(args.prompt_pos, "the PROMPT argument"), argv_text(args.prompt, "-p PROMPT"))
             if x is not None]
    if args.file is not None:
        if args.file == "-":
            given.append(utf8_text(sys.stdin.buffer.read(), "the prompt read from standard input (-f -)"))
        else:
            with open(args.file, "rb") as fh:
                given.append(utf8_text(fh.read(), f"prompt file {args.file}"))
    if len(given) != 1:
        raise SystemExit("pipower generate: error: give exactly one prompt (PROMPT, -p or -f)")
    return given[0]


def device_kwargs(args) -> dict:
    kw = dict(device=args.device, vram_budget=args.vram_budget, placement=args.placement, stats=args.hot_stats)
    if args.device != "cpu" and getattr(args, "predictors", None):
        kw["predictors"] = args.predictors                 # the GPU plan counts the predictors' bytes
    return kw


def cmd_generate(args) -> int:
    import pipower
    prompt = _read_prompt(args)
    system = argv_text(args.system, "--system")
    stops = tuple(argv_text(s, "--stop") for s in args.stop)
    model = pipower.load(args.model, backend=args.backend, threads=args.threads, weights=args.weights,
                         cache=not args.no_cache, dot=args.dot,
                         **device_kwargs(args))
    model.set_sparsity(act_threshold=args.act_threshold, target_sparsity=args.target_sparsity,
                       predictors=args.predictors, pred_threshold=args.pred_threshold)
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, stop=stops, draft=args.draft)
    if args.chat:
        messages = ([{"role": "system", "content": system}] if system else [])
        stream = model.stream_chat(messages + [{"role": "user", "content": prompt}], **kwargs)
    else:
        stream = model.stream(prompt, **kwargs)
    interrupted = None
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt as e:     # Ctrl-C (or SIGTERM, see main): keep what was generated, exit 130
        stream.close()
        stream.stats.stop_reason = "interrupted"
        interrupted = e
    sys.stdout.write("\n")
    st = stream.stats
    print(f"\nprefill: {st.prompt_tokens} tokens, {st.prefill_tokens_per_second:.1f} tok/s | "
          f"decode: {st.new_tokens} tokens, {st.decode_tokens_per_second:.1f} tok/s | "
          f"stop: {st.stop_reason} | FFN sparsity: {st.ffn_sparsity:.1%} | "
          + (f"draft {args.draft}: {st.accepted}/{st.drafted} accepted ({st.draft_acceptance:.0%}) | "
             if args.draft else "") +
          f"backend: {model.backend}, {model.weights} weights" + (f" ({model.dot} dots)" if model.dot != "float" else "")
          + ", "
          f"{model.transformer.ops.n_threads} threads",
          file=sys.stderr)
    if interrupted is not None:
        raise interrupted
    return 0


def cmd_fetch(args) -> int:
    from .fetcher import fetch
    print(fetch(args.name, progress=not args.quiet))
    return 0


def cmd_info(args) -> int:
    from .info import info, model_info
    report = info()
    if not args.model and (args.device != "cpu" or args.vram_budget or args.placement or args.hot_stats):
        raise InvalidArgumentError("--device, --vram-budget, --placement and --hot-stats describe how to load "
                                   "a model: give it with -m")
    if args.model:
        import pipower
        report["model"] = model_info(pipower.load(args.model, backend=args.backend, weights=args.weights,
                                                  **device_kwargs(args)))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"pipower {report['pipower']}  python {report['python']}  numpy {report['numpy']}")
    print(f"platform: {report['platform']}")
    for name, b in report["backends"].items():
        state = "available" if b["available"] else f"NOT available ({b.get('error')})"
        print(f"backend {name:7s}: {state}")
        for d in b.get("devices", []):
            print(f"    GPU {d['id']}: {d['name']} (sm {d['compute_capability']}), "
                  f"{d['memory_total_bytes'] / 2**30:.1f} GiB total, {d['memory_free_bytes'] / 2**30:.1f} GiB free")
        if b.get("build"):
            print("    build: " + ", ".join(f"{k}={v}" for k, v in b["build"].items()))
    print(f"default backend: {report['default_backend']}  threads: {report['threads']}")
    if report["fallback_warning"]:
        print(f"WARNING: {report['fallback_warning']}")
    for blas in report["blas"]:
        print(f"BLAS: {blas['internal_api']} {blas['version']} ({blas['architecture']}), "
              f"{blas['num_threads']} threads")
    if "model" in report:
        print("model: " + ", ".join(f"{k}={v}" for k, v in report["model"].items()))
    return 0


def _commands() -> dict:
    from .cli_eval import COMMANDS as EVAL
    from .cli_sparse import COMMANDS as SPARSE
    from .cli_cache import COMMANDS as CACHE
    from .cli_serve import COMMANDS as SERVE
    from .cli_chat import COMMANDS as CHAT
    return {"generate": cmd_generate, "fetch": cmd_fetch, "info": cmd_info, **SPARSE, **EVAL, **CACHE, **SERVE,
            **CHAT}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same cleanup runs
    (a fetch removes its partial download, generation prints what it has); exit status 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _check_common_args(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"-t/--threads must be at least 1, got {threads}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="pipower: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:                  # not the main thread (main() called from a thread): leave it
        previous = False
    try:
        _check_common_args(args)
        return _commands()[args.command](args)
    except PipowerError as e:
        print(f"pipower: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("pipower: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("pipower: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # e.g. -f file missing
        print(f"pipower: error: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not False:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
