"""ModelFiles: what every loader returns, and the cheap fingerprint that names a set of weights."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig

# The fingerprint reads the header(s) plus this many evenly spaced samples of the data region, so it costs
# a few MiB of reads even for multi-GB files, yet changes when any header or any sampled block changes.
_N_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024


@dataclass
class ModelFiles:
    config: ModelConfig
    # HF names -> float32, C-contiguous; linear weights [out, in]. A dict, or a lazy Mapping that
    # materialises each tensor when read (GGUF: dequantized on access), with `n_params` and `close()`.
    tensors: Mapping[str, np.ndarray]
    metadata: dict = field(default_factory=dict)  # source extras (GGUF key/values incl. tokenizer.*, or HF dir info)
    source: str = ""                 # resolved path of the file or directory
    fingerprint: str = ""            # sha256 hex of headers + sizes + content samples (no mtimes)

    @property
    def n_params(self) -> int:
        n = getattr(self.tensors, "n_params", None)
        return int(n) if n is not None else int(sum(t.size for t in self.tensors.values()))

    def close(self) -> None:
        """Release what a lazy tensor mapping holds open (after the model is built)."""
        close = getattr(self.tensors, "close", None)
        if close is not None:
            close()


def update_fingerprint(h, path: str | os.PathLike, header_len: int) -> None:
    """Feed one file into hash `h`: its size, its first `header_len` bytes, and samples of the rest.

    Name- and mtime-free on purpose: a copied, renamed or re-fetched file keeps its fingerprint, so
    activation statistics and eval files recorded against it still match.
    """
    path = Path(path)
    size = path.stat().st_size
    h.update(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        h.update(f.read(min(header_len, size)))
        start, span = header_len, max(size - header_len, 0)
        if span <= _N_SAMPLES * _SAMPLE_BYTES:
            f.seek(start)
            h.update(f.read(span))
            return
        step = (span - _SAMPLE_BYTES) // (_N_SAMPLES - 1)
        for i in range(_N_SAMPLES):
            f.seek(start + i * step)
            h.update(f.read(_SAMPLE_BYTES))


def new_fingerprint():
    return hashlib.sha256()
