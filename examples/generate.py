"""Generate text with the pipower library: a whole completion, the same one streamed, sampling, chat.

    python examples/generate.py                      # the default model, fetched on first use (~470 MiB)
    python examples/generate.py -m path/to/model.gguf -n 32
"""
import argparse
import sys
import time

import pipower


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b",
                    help="GGUF file, Hugging Face model directory or known model name (default: qwen2.5-coder-0.5b)")
    ap.add_argument("-n", "--max-tokens", type=int, default=64, help="new tokens per generation (default: 64)")
    ap.add_argument("--prompt", default="def fibonacci(n):", help="the prompt to complete")
    args = ap.parse_args()

    try:
        model = pipower.load(args.model)          # a known name, a .gguf file or a HF model directory
        return run(model, args)
    except pipower.PipowerError as e:             # every error pipower raises on purpose derives from this
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(model, args) -> int:
    print(f"loaded {model}")

    # 1. The whole completion at once (greedy: temperature 0 is the default).
    text = model.generate(args.prompt, max_tokens=args.max_tokens)
    st = model.last_stats
    print(f"--- generate ({st.new_tokens} tokens, {st.decode_tokens_per_second:.1f} tok/s, stop: {st.stop_reason})")
    print(args.prompt + text)

    # 2. The same completion streamed piece by piece, as it is generated.
    print("--- stream")
    stream = model.stream(args.prompt, max_tokens=args.max_tokens)
    pieces = []
    t0 = time.perf_counter()
    for piece in stream:
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(f"\n(first piece to last: {time.perf_counter() - t0:.2f} s; stream == generate: "
          f"{''.join(pieces) == text}; stats: {stream.stats.new_tokens} tokens)")

    # 3. Sampling: temperature, top-k, top-p; a seed makes it repeatable.
    sampled = model.generate(args.prompt, max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=1)
    again = model.generate(args.prompt, max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=1)
    print(f"--- sampled (seed 1, repeatable: {sampled == again})")
    print(args.prompt + sampled)

    # 4. Chat: the model's own chat template (instruct models); stop strings end the text early.
    if model.tokenizer is not None and model.tokenizer.chat_template:
        reply = model.chat([{"role": "user", "content": "Write a Python function that reverses a string."}],
                           max_tokens=args.max_tokens)
        print("--- chat")
        print(reply)
        # several turns keep their history in one KV cache: see `pipower chat` and pipower.chat.ChatSession
        session = model.chat_session(max_tokens=args.max_tokens)
        for question in ("Name a sorting algorithm.", "How fast is it?"):
            print(f"> {question}")
            for piece in session.send(question):
                print(piece, end="", flush=True)
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
