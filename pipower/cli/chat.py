"""`pipower chat`: an interactive multi-turn REPL over pipower.chat.ChatSession (this module only does I/O)."""
from __future__ import annotations

import sys

from .args import (EPILOG, EXIT_INTERRUPTED, Terminated, add_model_args, add_n_predict, add_sampling_args,
                   add_system, alias, argv_text, error, load_kwargs, utf8_text)

COMMAND_HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message and start over; /system alone: back to the template's default
  /exit, /quit    leave (so do end-of-input (Ctrl-D) and Ctrl-C twice at the prompt)
  /help           this list
  //TEXT          send TEXT starting with '/'
  a line ending in '\\' continues on the next line; Ctrl-C during an answer stops it, the session goes on"""


def add_commands(sub) -> None:
    import argparse
    import textwrap

    description = textwrap.fill(
        "Chat with a model in the terminal: each line you type is a user message, the answer streams to "
        "stdout. The conversation is kept in the model's KV cache, so each turn reads only its new tokens, "
        "not the whole history again. Lines starting with '/' are commands (below). Ctrl-C during an answer "
        "stops it and keeps the conversation (the partial answer stays in it); Ctrl-C twice at the prompt "
        "quits with status 130, /exit and end-of-input with 0. Input must be UTF-8. Answers go to stdout; "
        "the prompt ('> ', on a terminal only) and notes go to stderr. Needs a model with a chat template "
        "(instruct models).", 100)
    c = sub.add_parser("chat", help="interactive multi-turn chat on the model's chat template",
                       description=description + "\n\n" + COMMAND_HELP, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(c)
    add_system(c, "it starts the conversation; /system changes it during the session")
    add_n_predict(c, 512, "counted per answer")
    add_sampling_args(c, seed_note="one for the whole session")
    alias(c, "--stats", c.add_argument(
        "--timings", action="store_true",
        help="after each answer, print tokens read and generated and their speed to stderr"))


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Input:
    """Lines from the terminal (readline editing, prompt on stderr) or from a pipe (no prompt)."""

    def __init__(self):
        self.tty = sys.stdin.isatty()
        if self.tty:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass

    def line(self, prompt: str) -> str:
        """One line without its newline; EOFError at the end of input."""
        if self.tty:
            if sys.stdout.isatty():
                return input(prompt)            # readline redraws the prompt it printed itself
            sys.stderr.write(prompt)
            sys.stderr.flush()
            return input()
        raw = sys.stdin.buffer.readline()
        if not raw:
            raise EOFError
        return utf8_text(raw, "the input line").rstrip("\r\n")

    def message(self) -> str:
        text = self.line("> ")
        while text.endswith("\\"):
            text = text[:-1] + "\n" + self.line("... ")
        return text


def cmd_chat(args) -> int:
    import pipower
    from ..errors import PipowerError
    system = argv_text(args.system, "--system")
    model = pipower.load(args.model, **load_kwargs(args))
    session = model.chat_session(system, max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    reader = _Input()
    ctrl_c = False                       # the previous thing at the prompt was a Ctrl-C
    # the banner is the last thing before the prompt loop, so a Ctrl-C right after it meets the loop's handler
    _note(f"pipower chat: {model.source} ({model.backend} backend, {model.weights} weights, context "
          f"{session.context_length} tokens). /help lists commands; /exit or Ctrl-D quits.")
    while True:
        try:
            text = reader.message()
        except EOFError:
            if reader.tty:
                sys.stderr.write("\n")
            return 0
        except Terminated:
            raise
        except KeyboardInterrupt:
            if ctrl_c:
                _note("")
                return EXIT_INTERRUPTED
            ctrl_c = True
            _note("\n(Ctrl-C again or /exit to quit)")
            continue
        except PipowerError as e:        # an input line that is not UTF-8: say so, keep the session
            error(e)
            continue
        ctrl_c = False
        if text.startswith("/") and not text.startswith("//"):
            if _command(text, session):
                return 0
            continue
        if text.startswith("//"):
            text = text[1:]
        if not text.strip():
            continue
        _answer(session, text, args.timings)


def _command(text: str, session) -> bool:
    """Run a /command; True means quit."""
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        session.reset()
        _note("(conversation cleared)")
    elif name == "/system":
        session.set_system(rest or None)
        _note("(system message set; conversation cleared)" if rest else
              "(system message removed: the template's default applies; conversation cleared)")
    elif name == "/help":
        _note(COMMAND_HELP)
    else:
        _note(f"unknown command {name}; /help lists them (start a message with // to send a leading '/')")
    return False


def _answer(session, text: str, show_stats: bool) -> None:
    from ..errors import PipowerError
    try:
        turn = session.send(text)
    except PipowerError as e:             # e.g. the conversation no longer fits the context
        error(e)
        return
    stopped = False
    try:
        for piece in turn:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except Terminated:
        turn.close()
        raise
    except KeyboardInterrupt:
        turn.close()
        stopped = True
    except PipowerError as e:
        turn.close()
        sys.stdout.write("\n")
        error(e)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    st = turn.stats
    if stopped:
        _note("[stopped; the partial answer stays in the conversation]")
    elif st.stop_reason == "context":
        _note("[the context is full: /reset to start over]")
    if show_stats:
        _note(f"[read {st.prompt_tokens} new tokens, {st.prefill_tokens_per_second:.1f} tok/s | "
              f"answer {st.new_tokens} tokens, {st.decode_tokens_per_second:.1f} tok/s | stop: "
              f"{'interrupted' if stopped else st.stop_reason} | conversation {len(session.ids)} tokens]")


COMMANDS = {"chat": cmd_chat}
