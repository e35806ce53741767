"""The `pipower` command. The only place that prints or exits; the library raises PipowerError.

One module per command group (generate, fetch, info, sparse: profile/train-predictors/plan, bench, eval:
eval/sweep/report, cache, serve, chat), each with add_commands(sub) and COMMANDS; args holds what they
share (flag definitions, exit codes, error lines). The command modules import the library inside their
cmd_* functions, so --help and --version load no more than `import pipower` does; nothing outside
pipower.cli imports from it.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from .args import EPILOG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, Terminated, error, resolve_device
from ..errors import InvalidArgumentError, PipowerError


def groups() -> tuple:
    """The command-group modules, in the order of `pipower --help` (imported on first use, so --version
    does not load them)."""
    from . import bench, cache, chat, fetch, generate, info, serve, sparse
    from . import eval as evaluation
    return generate, fetch, info, sparse, bench, evaluation, cache, serve, chat


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipower", description="LLM inference exploiting activation sparsity.",
                                     epilog=EPILOG)
    from .. import __version__
    parser.add_argument("-V", "--version", action="version", version=f"pipower {__version__}",
                        help="print the version (pipower X.Y.Z) and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in groups():
        group.add_commands(sub)
    return parser


def commands() -> dict:
    """Command name -> cmd_*(args) -> exit status."""
    return {name: cmd for group in groups() for name, cmd in group.COMMANDS.items()}


def _raise_terminated(signum, frame):
    raise Terminated()


def _check_common_args(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"-t/--threads must be at least 1, got {threads}")
    resolve_device(args)


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else list(argv)) in (["-V"], ["--version"]):
        from .. import __version__                 # what argparse's version action prints, without the commands
        print(f"pipower {__version__}")
        return EXIT_OK
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
        return commands()[args.command](args)
    except PipowerError as e:
        return error(e)
    except Terminated:
        print("pipower: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("pipower: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as e:  # e.g. -f file missing
        return error(e)
    finally:
        if previous is not False:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
