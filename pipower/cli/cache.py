"""`pipower cache list|clear`: the prepared-model cache (pipower.model_cache) from the command line."""
from __future__ import annotations

import json
import time

from .args import add_json


def add_commands(sub) -> None:
    c = sub.add_parser("cache", help="list or clear the prepared-model cache",
                       description="GGUF models are converted to their in-memory layout once and kept under "
                                   "$PIPOWER_HOME/prepared; later loads read that file. `generate --no-cache` "
                                   "(library: load(..., cache=False)) bypasses it.")
    actions = c.add_subparsers(dest="cache_action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="show each cache file: size, weight format, source, state",
                            description="List the prepared-model cache files, newest first.")
    ls.add_argument("--verify", action="store_true",
                    help="read every file whole and check its data checksum (slow for big models)")
    add_json(ls)
    actions.add_parser("clear", help="delete every cache file (models are prepared again on their next load)",
                       description="Delete every prepared-model cache file.")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def cmd_cache(args) -> int:
    from ..model_cache import cache_dir, clear, entries
    if args.cache_action == "clear":
        n, freed = clear()
        print(f"removed {n} file{'s' if n != 1 else ''} ({_mib(freed)}) from {cache_dir()}")
        return 0
    found = entries(check=args.verify)
    if args.json:
        print(json.dumps([{"path": str(e.path), "bytes": e.nbytes, "source": e.source, "weights": e.weights,
                           "layout": e.layout, "created": e.created, "ok": not e.problem, "problem": e.problem}
                          for e in found], indent=2))
        return 0
    print(f"{cache_dir()}: {len(found)} file{'s' if len(found) != 1 else ''}, "
          f"{_mib(sum(e.nbytes for e in found))}")
    for e in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)) if e.created else "?"
        state = f"  PROBLEM: {e.problem}" if e.problem else ""
        print(f"  {e.path.name}  {_mib(e.nbytes)}  {e.weights or '?'}  {when}  {e.source or '?'}{state}")
    return 0


COMMANDS = {"cache": cmd_cache}
