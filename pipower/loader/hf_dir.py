"""Load a Hugging Face model directory: config.json + model.safetensors (or a sharded index).

The safetensors header is parsed here (8-byte little-endian length, JSON, raw data) rather than with the
`safetensors` package because `safetensors.numpy` cannot return bfloat16 and we must not need torch.
Every length and offset is checked against the file size before anything is read, so a truncated or
garbage file fails fast with a ModelFileError that names it.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError, UnsupportedModelError
from .validate import check_tensors
from .weights import ModelFiles, new_fingerprint, update_fingerprint

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024   # the safetensors spec's own limit
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # BF16 read as raw bits
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")


def _read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: cannot read {what}: {e}") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: {what} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ModelFileError(f"{path}: {what} must hold a JSON object, got {type(d).__name__}")
    return d


def read_safetensors_header(path: Path) -> tuple[dict, int, int]:
    """Return (tensor entries, data start offset, file size); validates lengths and offsets."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: too short for a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
                raise ModelFileError(f"{path}: absurd safetensors header length {n} for a {size}-byte file "
                                     "(corrupt or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: corrupt safetensors header JSON: {e}") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, size - 8 - n
    for name, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError) as err:
            raise ModelFileError(f"{path}: corrupt safetensors header entry for {name!r}: {e!r}") from err
        if dtype not in _DTYPES:
            raise UnsupportedModelError(f"{path}: tensor {name} has dtype {dtype}; supported: {sorted(_DTYPES)}")
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise ModelFileError(f"{path}: corrupt safetensors header entry for {name}: shape {shape}, "
                                 f"offsets [{begin}, {end}]")
        if end > data_len:
            raise ModelFileError(f"{path}: truncated: tensor {name} ends at data byte {end} but the file holds "
                                 f"only {data_len} data bytes")
        if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise ModelFileError(f"{path}: tensor {name}: {end - begin} bytes do not match {dtype} shape {shape}")
        header[name] = (dtype, tuple(shape), begin, end)
    return header, data_start, size


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """All tensors of one .safetensors file widened to float32 (owned C-contiguous copies), and the
    header length in bytes (for the fingerprint)."""
    header, data_start, _ = read_safetensors_header(path)
    out: dict[str, np.ndarray] = {}
    if not header:
        return out, data_start
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, (dtype, shape, begin, end) in header.items():
        n = (end - begin) // _DTYPES[dtype].itemsize
        a = np.frombuffer(mm, dtype=_DTYPES[dtype], count=n, offset=data_start + begin).reshape(shape)
        if dtype == "BF16":
            # bf16 is the top half of a float32: widen the bit pattern exactly, no rounding
            a = (a.astype(np.uint32) << 16).view(np.float32)
        # F32 must be copied off the memmap (so the file can close); F16/BF16 are already new arrays
        out[name] = np.array(a, dtype=np.float32, order="C", copy=True if dtype == "F32" else None)
    del mm
    return out, data_start


def _weight_files(path: Path) -> list[Path]:
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():          # same preference as transformers
        return [single]
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no weight_map in the safetensors index")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise ModelFileError(f"{path / f}: shard listed in {INDEX_FILE} not found")
        return [path / f for f in files]
    hint = " (pytorch_model.bin is not supported; save with safe_serialization=True)" \
        if (path / "pytorch_model.bin").exists() else ""
    raise ModelFileError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def load_hf_dir(path: str | Path, *, progress: bool = True) -> ModelFiles:
    """Load a HF model directory into float32 HF-named tensors. `progress` is accepted for symmetry."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelFileError(f"{path}: model directory not found")
    cfg_path = path / "config.json"
    raw_cfg = _read_json(cfg_path, "config.json")
    try:
        config = ModelConfig.from_dict(raw_cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{cfg_path}: {e}") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:    # e.g. a string or 0 where a count belongs
        raise ModelFileError(f"{cfg_path}: bad config value: {e}") from e

    files = _weight_files(path)
    h = new_fingerprint()
    h.update(cfg_path.read_bytes())
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        part, header_len = read_safetensors(f)
        dup = part.keys() & tensors.keys()
        if dup:
            raise ModelFileError(f"{f}: tensor(s) {sorted(dup)[:5]} also present in another shard")
        tensors.update(part)
        update_fingerprint(h, f, header_len)

    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        # transformers ties lm_head to embed_tokens on load, ignoring a stored copy; do the same
        lm = tensors.pop("lm_head.weight")
        emb = tensors.get("model.embed_tokens.weight")
        if emb is not None and (lm.shape != emb.shape or not np.array_equal(lm, emb)):
            log.warning("%s: tie_word_embeddings=true but lm_head.weight differs from embed_tokens; "
                        "using embed_tokens as transformers does", path)
    check_tensors(config, tensors, str(files[0] if len(files) == 1 else path / INDEX_FILE))

    metadata = {"format": "hf_dir", "tokenizer_dir": str(path), "config_json": raw_cfg,
                "weight_files": [f.name for f in files],
                "tokenizer_files": [n for n in TOKENIZER_FILES if (path / n).is_file()]}
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            metadata["generation_config"] = json.loads(gen.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("%s: ignoring unreadable generation_config.json: %s", gen, e)
    log.info("loaded %s: %d tensors, %.1fM params", path, len(tensors),
             sum(t.size for t in tensors.values()) / 1e6)
    return ModelFiles(config, tensors, metadata, str(path), h.hexdigest())
