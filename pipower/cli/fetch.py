"""`pipower fetch`: download a known model (verified by SHA-256) and print its path."""
from __future__ import annotations

from .args import EPILOG
from ..fetcher import KNOWN_MODELS


def add_commands(sub) -> None:
    f = sub.add_parser("fetch", help="download a known model and print its local path",
                       description="Fetch a known model (verified by SHA-256); the last stdout line is the path.",
                       epilog=EPILOG)
    f.add_argument("name", choices=sorted(KNOWN_MODELS), help="known model name")
    f.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_fetch(args) -> int:
    from ..fetcher import fetch
    print(fetch(args.name, progress=not args.quiet))
    return 0


COMMANDS = {"fetch": cmd_fetch}
