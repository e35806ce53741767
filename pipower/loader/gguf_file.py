"""GGUF tensor descriptors: parsed from the header, bounds-checked against the file size.

The metadata key/values before them are read by `pipower.tokenizer.gguf_meta.read_gguf_header` (a fast
mmap parser; `gguf.GGUFReader` builds one numpy view per array element and takes 6 s just to open the
0.5B Qwen file). Here we continue from where it stopped. Every length is checked before use, so a
truncated or garbage file fails at once with a ModelFileError. Tensor data is read (by
`gguf.LazyGGUFTensors`) and dequantized with `gguf.quants`.

Tensor info layout (v2/v3, little-endian): string name (u64 length + UTF-8), u32 n_dims, u64 ne[n_dims],
u32 ggml_type, u64 offset relative to the data section, which starts at the next multiple of
`general.alignment` (default 32) after the last info.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFileError, UnsupportedModelError

DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                   # GGML_MAX_DIMS


@dataclass
class TensorInfo:
    name: str
    ggml_type: int              # raw type id (a GGMLQuantizationType value when known)
    ne: tuple[int, ...]         # ggml order: ne[0] is the contiguous (input) dimension
    offset: int                 # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / HF order, e.g. (out, in) for a linear weight."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"unknown type {self.ggml_type}"


class _Cursor:
    """Sequential little-endian reader over a bytes-like object; every read is checked against its end."""

    def __init__(self, buf, path: Path, pos: int):
        self.buf, self.pos, self.end, self.path = buf, pos, len(buf), path
        self.where = "the tensor infos"

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise ModelFileError(f"{self.path}: truncated or corrupt GGUF: {n} bytes needed at offset "
                                 f"{self.pos} while reading {self.where}, file has {self.end}")

    def unpack(self, fmt: str, size: int):
        self.need(size)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")


def parse_tensor_infos(buf, path: Path, pos: int, n_tensors: int,
                       alignment: int = DEFAULT_ALIGNMENT) -> tuple[list[TensorInfo], int]:
    """Tensor descriptors starting at byte `pos` of `buf` (bytes or mmap). Returns (infos, data start)."""
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: corrupt GGUF: general.alignment {alignment!r} is not a power of two")
    c = _Cursor(buf, path, pos)
    c.need(n_tensors * 32)             # smallest info: name (8) + n_dims (4) + one dim (8) + type + offset
    raw_infos = []
    for i in range(n_tensors):
        c.where = f"tensor info {i}"
        name = c.string()
        c.where = f"tensor info {name!r}"
        n_dims = c.unpack("<I", 4)
        if n_dims > MAX_DIMS:
            raise ModelFileError(f"{path}: corrupt GGUF: tensor {name} has {n_dims} dimensions (max {MAX_DIMS})")
        ne = tuple(c.unpack("<Q", 8) for _ in range(n_dims))
        raw_infos.append((name, ne, c.unpack("<I", 4), c.unpack("<Q", 8)))
    data_start = -(-c.pos // alignment) * alignment

    infos, seen = [], set()
    for name, ne, gtype, offset in raw_infos:
        if name in seen:
            raise ModelFileError(f"{path}: corrupt GGUF: duplicate tensor {name}")
        seen.add(name)
        info = TensorInfo(name, gtype, ne, data_start + offset, 0)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise UnsupportedModelError(f"{path}: tensor {name} has unsupported {info.type_name}") from None
        if ne and ne[0] % block:
            raise ModelFileError(f"{path}: corrupt GGUF: tensor {name} row of {ne[0]} is not a multiple of the "
                                 f"{info.type_name} block size {block}")
        info.n_bytes = math.prod(ne) // block * type_size
        if info.offset + info.n_bytes > len(buf):
            raise ModelFileError(f"{path}: truncated GGUF: tensor {name} needs bytes up to "
                                 f"{info.offset + info.n_bytes}, file has {len(buf)}")
        infos.append(info)
    return infos, data_start


def tensor_bytes(mm: np.ndarray, info: TensorInfo) -> np.ndarray:
    """The raw data of one tensor as the array `gguf.quants.dequantize` takes: float views for F32/F16,
    uint8 of shape (*rows, row_bytes) for block-quantized types."""
    raw = mm[info.offset:info.offset + info.n_bytes]
    shape = info.shape
    if info.ggml_type == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    if info.ggml_type == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(shape)
    return raw.reshape(*shape[:-1], -1) if shape else raw
