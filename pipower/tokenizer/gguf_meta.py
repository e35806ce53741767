"""Read a GGUF file's key/value metadata into a plain dict, without touching the tensor data.

Why not gguf.GGUFReader: it builds a numpy view per element of every array, which takes 6-7 s for
a 151k-token vocabulary (Qwen2.5). Parsing the header ourselves from an mmap takes ~0.2 s. Values
come back as Python objects: str, int, float, bool, and lists of those for arrays.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelFileError

# GGUF value type codes -> (struct code, numpy dtype code) for the fixed-size scalars
_SCALARS = {0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "u2"), 3: ("h", "i2"), 4: ("I", "u4"),
            5: ("i", "i4"), 6: ("f", "f4"), 7: ("?", "u1"), 10: ("Q", "u8"), 11: ("q", "i8"),
            12: ("d", "f8")}
_BOOL, _STRING, _ARRAY = 7, 8, 9
MAX_ARRAY_NESTING = 8         # arrays of arrays: GGUF allows them; real files nest at most once


@dataclass
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict
    tensor_info_offset: int      # byte offset where the tensor descriptions start
    byteorder: str               # '<' or '>' (big-endian GGUFs exist, rarely)


class _Cursor:
    def __init__(self, buf, path: str, order: str):
        self.buf, self.pos, self.path, self.order = buf, 0, path, order

    def unpack(self, code: str):
        try:
            (v,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        except struct.error as e:
            raise ModelFileError(f"{self.path}: GGUF header truncated at byte {self.pos}") from e
        self.pos += struct.calcsize(code)
        return v

    def string(self) -> str:
        n = self.unpack("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ModelFileError(f"{self.path}: GGUF string at byte {self.pos} runs past the end")
        s = bytes(self.buf[self.pos:end]).decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype][0])
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise ModelFileError(f"{self.path}: GGUF arrays nested more than {MAX_ARRAY_NESTING} deep at "
                                     f"byte {self.pos}: a corrupt header")
            etype, n = self.unpack("I"), self.unpack("Q")
            if etype in _SCALARS:             # one numpy read instead of n struct calls
                dtype = np.dtype(self.order + _SCALARS[etype][1])
                end = self.pos + n * dtype.itemsize
                if end > len(self.buf):
                    raise ModelFileError(f"{self.path}: GGUF array at byte {self.pos} runs past the end")
                arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
                self.pos = end
                return arr.astype(bool).tolist() if etype == _BOOL else arr.tolist()
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype != _ARRAY:
                raise ModelFileError(f"{self.path}: unknown GGUF array element type {etype} at byte {self.pos}")
            return [self.value(etype, depth + 1) for _ in range(n)]
        raise ModelFileError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf_header(path) -> GGUFHeader:
    """Version, tensor count, metadata dict and where the tensor infos begin."""
    path = str(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path)
    except (OSError, ValueError) as e:        # missing file, empty file (mmap of length 0)
        if not Path(path).is_file():
            raise ModelFileError(f"{path}: no such file") from e
        raise ModelFileError(f"{path}: cannot read as GGUF: {e}") from e


def read_gguf_metadata(path) -> dict:
    """{key: value} of a GGUF file's metadata (e.g. meta['tokenizer.ggml.tokens'] is a list of str)."""
    return read_gguf_header(path).metadata


def _parse(buf, path: str) -> GGUFHeader:
    if bytes(buf[:4]) != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if version & 0xFFFF == 0:                 # a big-endian file reads as a huge little-endian number
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version < 2:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (need 2 or later)")
    cur = _Cursor(buf, path, order)
    cur.pos = 8
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("I"))
    return GGUFHeader(version, n_tensors, meta, cur.pos, order)
