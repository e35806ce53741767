"""Byte sizes as people write them: "4GiB", "512MiB", "2.5GB", "1000"."""
from __future__ import annotations

from .errors import InvalidArgumentError

_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "b": 1}


def parse_bytes(text: str) -> int:
    """"4GiB" -> 4294967296 (binary units KiB/MiB/GiB/TiB, decimal kB/MB/GB/TB, plain numbers = bytes).
    Raises InvalidArgumentError for anything else or a negative size."""
    s = str(text).strip().lower()
    try:
        for u, f in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
            if s.endswith(u):
                n = int(float(s[:-len(u)]) * f)
                break
        else:
            n = int(float(s))
    except ValueError:
        raise InvalidArgumentError(f"not a size: {text!r} (use e.g. 4GiB, 512MiB, 2.5GB or a byte count)") from None
    if n < 0:
        raise InvalidArgumentError(f"a size cannot be negative: {text!r}")
    return n
