"""`pipower generate`: text from a prompt, streamed to stdout."""
from __future__ import annotations

import sys

from .args import (EPILOG, add_device_args, add_draft, add_model_args, add_n_predict, add_sampling_args,
                   add_sparsity_args, add_system, argv_text, load_kwargs, sparsity_kwargs, utf8_text)


def add_commands(sub) -> None:
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
    add_model_args(g)
    add_n_predict(g, 256)
    add_sampling_args(g)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text is generated (not printed); repeatable")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the model's chat template "
                        "(use this with instruct models)")
    add_system(g, "used with --chat")
    add_sparsity_args(g)
    add_draft(g)
    add_device_args(g)


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


def cmd_generate(args) -> int:
    import pipower
    prompt = _read_prompt(args)
    system = argv_text(args.system, "--system")
    stops = tuple(argv_text(s, "--stop") for s in args.stop)
    model = pipower.load(args.model, **load_kwargs(args))
    model.set_sparsity(**sparsity_kwargs(args))
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


COMMANDS = {"generate": cmd_generate}
