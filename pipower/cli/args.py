"""What the commands share: the argument definitions (each concept defined once, with one name, one help
text and one default, and added to every command that takes it), the old spellings of renamed flags, and
the output conventions (error lines, exit codes). Imports nothing heavy: `pipower --help` builds every
command's parser from these."""
from __future__ import annotations

import argparse
import os
import sys

from ..fetcher import DEFAULT_MODEL, KNOWN_MODELS
from ..model import WEIGHTS

EPILOG = f"known model names: {', '.join(sorted(KNOWN_MODELS))} (fetched on first use into $PIPOWER_HOME)"

# ---- output: one-line messages on stderr, exit codes ---------------------------------------------------

EXIT_OK = 0
EXIT_ERROR = 1            # a PipowerError or OSError: one line "pipower: error: ..." on stderr
EXIT_USAGE = 2            # argparse's own status for a bad command line
EXIT_INTERRUPTED = 130    # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143     # SIGTERM (128 + SIGTERM)


def error(message) -> int:
    """Print `pipower: error: message` on stderr; -> EXIT_ERROR."""
    print(f"pipower: error: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def warning(message) -> None:
    print(f"pipower: warning: {message}", file=sys.stderr, flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same cleanup runs
    (a fetch removes its partial download, generation prints what it has); exit status 143."""


# ---- text from the command line ------------------------------------------------------------------------

def utf8_text(raw: bytes, what: str) -> str:
    """Strictly decode `raw`; invalid UTF-8 is an InvalidArgumentError naming the first bad byte's offset."""
    from ..errors import InvalidArgumentError
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


# ---- renamed flags -------------------------------------------------------------------------------------

class DeprecatedAlias(argparse.Action):
    """A renamed flag's old spelling: hidden from --help, stores into the new flag's dest, and says in one
    line on stderr that it is deprecated."""

    def __init__(self, option_strings, dest, new, **kw):
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        warning(f"{option_string} is deprecated, use {self.new}")
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def alias(p, old: str, new: argparse.Action) -> None:
    """Keep `old` working as a hidden, deprecated spelling of the flag `new` (what add_argument returned)."""
    kw = (dict(nargs=0, const=new.const) if new.nargs == 0 else
          dict(type=new.type, choices=new.choices, metavar=new.metavar))
    p.add_argument(old, dest=new.dest, action=DeprecatedAlias, new="/".join(new.option_strings),
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


# ---- defining a flag ----------------------------------------------------------------------------------

def flag(p, *names, concept: str, note: str = "", default_text: str | None = None, **kw) -> argparse.Action:
    """add_argument with the help text built from the flag's concept (the same words wherever the flag
    appears), what it does in this command (note) and its default; the action keeps `concept`, which
    tests/test_cli.py compares across commands."""
    text = concept + (f"; {note}" if note else "") + (f" (default: {default_text})" if default_text else "")
    action = p.add_argument(*names, help=text, **kw)
    action.concept = concept
    return action


# ---- the model to load -------------------------------------------------------------------------------------

BACKENDS = ("auto", "numpy", "cython")
DEVICES = ("cpu", "gpu", "hybrid", "offload")      # pipower.hybrid.engine.DEVICES (not imported: it is heavy)


def add_model(p, *, optional: str | None = None) -> argparse.Action:
    """-m/--model. optional: the command runs without a model; the text says what giving one does."""
    return flag(p, "-m", "--model", concept="GGUF file, Hugging Face model directory, or known model name",
                note=f"optional: {optional}" if optional else "",
                default=None if optional else DEFAULT_MODEL, default_text=None if optional else DEFAULT_MODEL)


def add_model_args(p, *, optional: str | None = None, threads: bool = True, no_cache: bool = True) -> None:
    """-m/--model, -t/--threads, --backend, --weights, --dot and --no-cache: which model and how it is loaded
    (pipower.load). optional: the model is not needed; the text says what giving it does (no default)."""
    add_model(p, optional=optional)
    if threads:
        flag(p, "-t", "--threads", type=int, default=None, metavar="N",
             concept="CPU threads for the kernels, at least 1; more than the cores available to this process "
                     "draws a warning", default_text="all cores available to this process")
    flag(p, "--backend", choices=BACKENDS, default="auto", default_text="auto",
         concept="ops backend: cython = compiled kernels, numpy = reference; auto = cython when built, else numpy "
                 "with a warning")
    flag(p, "--weights", choices=WEIGHTS, default=None,
         concept="in-memory weight format: f32, f16, q8 (int8 blocks of 32), q4 (4-bit blocks of 32), q4m "
                 "(4-bit blocks of 32 with a scale and an offset each: a GGUF's Q4_K / Q4_1 tensors kept as in "
                 "the file; the CPU's integer dots only), native (GGUF: the file's 4-bit "
                 "matrices as q4m, the others q8)",
         default_text="q8 for GGUF files when the backend has compact kernels, else f32")
    flag(p, "--dot", choices=("int8", "float"), default=None,
         concept="how q4/q8 weights multiply: int8 = activations quantized per 32-block to int8 and exact "
                 "4/8-bit x int8 sums over weight panels (as llama.cpp does; against float: decode 1.05x (q8) "
                 "/ 1.7x (q4), an 8-token forward 2.5-3x, a 512-token prefill ~2.5x; HumanEval "
                 "unchanged), float = weights converted to "
                 "float32 with exact activations; f32/f16 and the GPU devices are float only",
         default_text="int8 for --weights q4/q8/q4m on the CPU engine, float otherwise")
    if no_cache:
        flag(p, "--no-cache", action="store_true",
             concept="neither read nor write the prepared-model cache (see `pipower cache`)")


def load_kwargs(args, *, device: bool = True) -> dict:
    """pipower.load's keywords from the options add_model_args and (with device) add_device_args added."""
    kw = dict(backend=args.backend, weights=args.weights, dot=args.dot)
    if hasattr(args, "threads"):
        kw["threads"] = args.threads
    if hasattr(args, "no_cache"):
        kw["cache"] = not args.no_cache
    if device and hasattr(args, "device"):   # given with --device cpu they reach pipower.load, which says why not
        kw.update(device=args.device, vram_budget=args.vram_budget, placement=getattr(args, "placement", None),
                  stats=args.stats)
        if args.device != "cpu" and getattr(args, "predictors", None):
            kw["predictors"] = args.predictors             # the GPU plan counts the predictors' bytes
    return kw


# ---- generation: how many tokens, sampling, drafts --------------------------------------------------------

def add_n_predict(p, default: int, note: str = "") -> argparse.Action:
    """-n/--n-predict (llama.cpp's name): the most new tokens one generation makes."""
    return flag(p, "-n", "--n-predict", type=int, default=default, dest="max_tokens", metavar="N",
                concept="maximum number of new tokens", note=note, default_text=str(default))


def add_sampling_args(p, *, top: bool = True, seed_default: int | None = None, seed_note: str = "") -> dict:
    """--temp, --top-k, --top-p and -s/--seed (llama.cpp's names). seed_default None = a random seed;
    seed_note says what the seed seeds where that is more than one generation. -> {dest: action}."""
    acts = {"temperature": flag(p, "--temp", type=float, default=0.0, dest="temperature", metavar="T",
                                concept="sampling temperature; 0 = greedy", default_text="0")}
    if top:
        flag(p, "--top-k", type=int, default=0, metavar="K", default_text="0",
             concept="sample only from the K most likely tokens; 0 = off")
        flag(p, "--top-p", type=float, default=1.0, metavar="P", default_text="1",
             concept="nucleus sampling: sample from the most likely tokens that hold mass P; 1 = off")
    acts["seed"] = flag(p, "-s", "--seed", type=int, default=seed_default, metavar="SEED",
                        concept="random seed for sampling", note=seed_note,
                        default_text="random" if seed_default is None else str(seed_default))
    return acts


def add_system(p, note: str) -> argparse.Action:
    return flag(p, "--system", default=None, metavar="TEXT", concept="system message (UTF-8) for the model's chat "
                "template", note=note, default_text="the template's own, if any")


def add_draft(p, *, note: str = "", metavar: str = "D") -> argparse.Action:
    """--draft D: speculative decoding, lossless (the model verifies every drafted token)."""
    from ..speculative import DRAFT_HELP
    return flag(p, "--draft", default=None, metavar=metavar,
                concept="speculative decoding, lossless: a drafter D proposes tokens and the model verifies them "
                        "in one batched forward, so greedy text is exactly the plain text and sampling keeps the "
                        "model's distribution; only speed changes",
                note=(f"{note}; " if note else "") + f"D: {DRAFT_HELP}", default_text="none")


# ---- sparsity -----------------------------------------------------------------------------------------------

def add_act_threshold(p, note: str) -> argparse.Action:
    return flag(p, "--act-threshold", type=float, default=None, metavar="TAU", note=note,
                concept="oracle threshold tau_act: a neuron is active when |act(gate.x)| > TAU")


def add_target_sparsity(p, note: str) -> argparse.Action:
    return flag(p, "--target-sparsity", type=float, default=None, metavar="S", note=note,
                concept="oracle sparsity S: a per-layer tau_act that makes fraction S of the neurons inactive")


def add_predictors(p, note: str) -> argparse.Action:
    return flag(p, "--predictors", default=None, metavar="FILE", note=note,
                concept="predictor file from `pipower train-predictors`")


def add_values(p, name: str, one: str, example: str, note: str) -> argparse.Action:
    """A comparison over several values of the flag `one` in one run, e.g. --target-sparsities for
    --target-sparsity: LIST is comma-separated."""
    return flag(p, name, default=None, metavar="LIST", concept=f"comma-separated {one} values",
                note=f"e.g. {example}; {note}")


def add_sparsity_args(p):
    """--act-threshold | --target-sparsity | --predictors (one mode at a time), --pred-threshold.
    Returns the mutually exclusive group. These are research knobs: they change the output; for speed at
    dense output, generate has --draft."""
    sp = p.add_mutually_exclusive_group()
    add_act_threshold(sp, "research knob (changes the output): skip the inactive FFN neurons (one pass "
                          "computes every gate and selects; ~1.1-1.3x dense speed at 25-40%% skipped with --dot float, "
                          "below dense with the integer dots; 0 = dense on SiLU models)")
    add_target_sparsity(sp, "calibrated on stdlib code; research knob (changes the output; ~1.1-1.3x dense "
                            "speed at 0.25-0.4 with --dot float, below dense with the integer dots): skip the "
                            "inactive neurons")
    add_predictors(sp, "research knob (changes the output): skip neurons whose predictor logit < "
                       "--pred-threshold (faster than dense only at high thresholds, which cost accuracy)")
    flag(p, "--pred-threshold", type=float, default=0.0, metavar="TAU", default_text="0, i.e. p >= 0.5",
         concept="tau_pred for --predictors: compute neurons with predictor logit >= TAU")
    return sp


def sparsity_kwargs(args) -> dict:
    """Model.set_sparsity's keywords for the options add_sparsity_args added."""
    return dict(act_threshold=args.act_threshold, target_sparsity=args.target_sparsity,
                predictors=args.predictors, pred_threshold=args.pred_threshold)


# ---- where the model runs: device, VRAM budget, hot-neuron placement ---------------------------------------

GPU_NOTE = "GPU modes need CuPy and a CUDA device"


def add_stats(p, note: str, *, required: bool = False) -> argparse.Action:
    """--stats FILE: the activation-stats file (per-neuron activation frequencies and training rows)."""
    return flag(p, "--stats", required=required, default=None, metavar="FILE", note=note,
                concept="activation-stats file from `pipower profile`")


def add_vram_budget(p, note: str, *, required: bool = False) -> argparse.Action:
    return flag(p, "--vram-budget", required=required, default=None, metavar="B", note=note,
                concept="GPU memory budget, a hard limit, e.g. 4GiB, 512MiB, 2.5GB")


def add_device_args(p, *, devices=DEVICES, placement: bool = True, gpu_note: str = GPU_NOTE) -> None:
    """--device, --vram-budget, --stats (and --placement): where the model runs (pipower.hybrid.engine).
    --device defaults to cpu, or to hybrid when --vram-budget is given (resolve_device)."""
    modes = {"cpu": "cpu: CPU engine only",
             "gpu": "gpu: whole model on the GPU",
             "hybrid": "hybrid: attention, output and hot FFN neurons on the GPU, cold neurons on the CPU "
                       "concurrently (PowerInfer)",
             "offload": "offload: the first whole layers that fit on the GPU, the rest on the CPU (llama.cpp "
                        "-ngl baseline)"}
    flag(p, "--device", choices=devices, default=None, concept="where the model runs",
         note="; ".join(modes[d] for d in devices) + f". {gpu_note}",
         default_text="cpu, or hybrid when --vram-budget is given")
    add_vram_budget(p, "the GPU modes plan within it; giving it selects --device hybrid unless --device says "
                       "otherwise (not allowed with --device cpu)")
    if placement:
        flag(p, "--placement", default=None, metavar="FILE",
             concept="hot-neuron placement from `pipower plan`", note="for --device hybrid")
    alias(p, "--hot-stats", add_stats(p, "--device hybrid solves its hot-neuron placement from it at --vram-budget"
                                         + (" (instead of reading --placement)" if placement else "")))


def resolve_device(args) -> None:
    """--device's default: hybrid when --vram-budget is given, else cpu (every command, one rule)."""
    if getattr(args, "device", "cpu") is None:
        args.device = "hybrid" if args.vram_budget is not None else "cpu"


# ---- misc -------------------------------------------------------------------------------------------------

def add_json(p) -> argparse.Action:
    return flag(p, "--json", action="store_true", concept="print JSON instead of text")


def add_ctx_size(p, default: int | None, note: str, default_text: str) -> argparse.Action:
    """-c/--ctx-size (llama.cpp's name): KV-cache positions, prompt included."""
    return flag(p, "-c", "--ctx-size", type=int, default=default, metavar="N", note=note, default_text=default_text,
                concept="context size: KV-cache positions, prompt included")
