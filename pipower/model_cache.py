"""The prepared-model cache: a GGUF model converted to its in-memory layout once, then reused.

Loading a GGUF means dequantizing every tensor, re-storing it in the weight format (q8...) and, on the
compiled backend, laying the FFN out as neuron bundles (pipower.arena): ~10 s for Qwen2.5-Coder-0.5B.
The first load writes the result (weights, bundles, norms, biases, config, the tokenizer's metadata) to
one file under $PIPOWER_HOME/prepared/; later loads read it back in a fraction of a second.

File layout (little-endian):

    0   8  magic b"PIPWPREP"          40  4  crc32 of every blob, in order (`verify`)
    8   4  container version          44  4  zero
    12  4  zero                       48 32  sha256 of bytes 0..48 and the JSON header
    16  8  JSON header length         80     JSON header: key, config, tokenizer blob, blobs, arrays, tree
    24  8  data offset (2 MiB-aligned)
    32  8  data length

The data region holds blobs: each the bytes of one memory buffer of the prepared model, as it was in
memory (the FFN arena whole, bundles and padding included), so every array comes back with its offset
and strides and the kernels see the same layout. Blobs of 2 MiB or more start on a 2 MiB boundary.

Only GGUF files of MIN_SOURCE_BYTES (32 MiB) or more are cached. Keyed by the source (resolved path, size, mtime), the weight format, the backend's layout (its ffn_layout
and prepare method), LAYOUT_VERSION and a hash of the code that converts and lays out weights, so an
edit to that code, a re-fetched file or another backend gets its own entry. One entry is kept per
(source, weights, layout): writing a new one removes the older ones, and the entries of source
files that no longer exist.

Safety: written to a temporary file and renamed into place (two processes loading at once each write a
complete file; the last rename wins; readers keep the file they opened). On load the header checksum,
the file size, every array's bounds within its blob and sampled crc32s of every blob are checked; a
truncated or corrupt file is logged as a warning and rebuilt. The full data crc32 is checked by
`verify` (`pipower cache list --verify`); it costs a read of the whole file.

Bytes come back one of two ways (`LOAD_MODES`, default "mmap", or $PIPOWER_CACHE_LOAD): "mmap" maps
the file copy-on-write (nothing is copied; processes share the page cache; where the file system keeps
the file in 2 MiB folios, as ext4 on Linux 6.x does, the kernel maps the 2 MiB-aligned blobs with huge
pages, which the sparse FFN's scattered row reads want); "read" copies the data region into one
2 MiB-aligned anonymous buffer (transparent huge pages wherever THP is on, at the price of the copy).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arena import aligned_bytes
from .config import ModelConfig
from .errors import InvalidArgumentError, PipowerError
from .panels import Panels
from .quant import FORMATS, QMatrix

log = logging.getLogger(__name__)

MAGIC = b"PIPWPREP"
CONTAINER_VERSION = 1
LAYOUT_VERSION = 1                  # bump when the meaning of the tree or of a blob changes
SUFFIX = ".pwm"
HUGE = 2 << 20
_PREFIX = struct.Struct("<8sIIQQQI4x32s")          # 80 bytes, see the module docstring
_SAMPLES, _SAMPLE_BYTES = 8, 4096                   # per blob, checked on every load
_DTYPES = {"|i1", "|u1", "<f2", "<f4"}
# the code whose edits change what a cached file must contain (besides the ops' own prepare module)
_CODE = ("quant.py", "arena.py", "panels.py", "model.py", "loader/gguf.py")
LOAD_MODES = ("mmap", "read")
MIN_FREE_BYTES = 1 << 30            # a cache file is not written when it would leave less disk free
MIN_SOURCE_BYTES = 32 << 20         # smaller GGUFs convert in well under a second: not worth a file


class CacheFileError(PipowerError):
    """A prepared-model cache file is truncated, corrupt or stale (load rebuilds it)."""


def cache_dir() -> Path:
    from .fetcher import pipower_home
    return pipower_home() / "prepared"


# -- keys --------------------------------------------------------------------------------------------

def layout_id(ops) -> str:
    """How `ops.prepare` lays weights out: its ffn_layout, the prepare method that does it and the dot
    mode (integer dots lay projections out as pipower.panels on the compiled backend)."""
    prepare = type(ops).prepare
    return (f"{getattr(ops, 'ffn_layout', 'separate')}:{prepare.__module__}.{prepare.__qualname__}"
            f":dot-{getattr(ops, 'dot', 'float')}")


def _code_hash(ops) -> str:
    import inspect
    import sys
    root = Path(__file__).parent
    files = [root / name for name in _CODE]
    try:
        files.append(Path(inspect.getsourcefile(sys.modules[type(ops).prepare.__module__])))
    except (TypeError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(f.read_bytes())
        except OSError:                   # no sources shipped: the version stands in for them
            from . import __version__
            h.update(__version__.encode())
    try:                          # gguf's dequantization makes the float weights (find_spec: no import)
        import importlib.util
        h.update((Path(importlib.util.find_spec("gguf").origin).parent / "quants.py").read_bytes())
    except (AttributeError, TypeError, ImportError, OSError):
        pass
    return h.hexdigest()[:16]


def worth_caching(path: str | os.PathLike) -> bool:
    """A GGUF file of at least MIN_SOURCE_BYTES (tiny test models would only fill the cache)."""
    try:
        return os.path.isfile(path) and os.path.getsize(path) >= MIN_SOURCE_BYTES
    except OSError:
        return False


def cache_key(path: str | os.PathLike, weights: str, ops) -> dict:
    """What a cache file must have been made from: compared field by field on load."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"source": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "weights": weights,
            "layout": layout_id(ops), "layout_version": LAYOUT_VERSION, "code": _code_hash(ops),
            "byteorder": "little"}


def cache_path(key: dict) -> Path:
    """$PIPOWER_HOME/prepared/<file stem>-<slot>-<key>.pwm; slot = (source, weights, layout)."""
    slot = hashlib.sha256(json.dumps([key["source"], key["weights"], key["layout"]]).encode()).hexdigest()[:10]
    full = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = Path(key["source"]).name.removesuffix(".gguf")[:60]
    return cache_dir() / f"{stem}-{key['weights']}-{slot}-{full}{SUFFIX}"


def _slot_prefix(path: Path) -> str:
    return path.name.rsplit("-", 1)[0] + "-"


# -- writing -----------------------------------------------------------------------------------------

def _extent(a: np.ndarray) -> tuple[int, int]:
    """[lo, hi) byte addresses an array touches."""
    lo = hi = a.ctypes.data
    if a.size == 0:
        return lo, lo
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + a.itemsize


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _sample_ranges(n: int) -> list[tuple[int, int]]:
    if n <= _SAMPLES * _SAMPLE_BYTES:
        return [(0, n)]
    step = (n - _SAMPLE_BYTES) // (_SAMPLES - 1)
    return [(i * step, i * step + _SAMPLE_BYTES) for i in range(_SAMPLES)]


def _samples_crc(buf, n: int) -> int:
    crc = 0
    for a, b in _sample_ranges(n):
        crc = zlib.crc32(buf[a:b], crc)
    return crc


class _Layout:
    """The arrays of a prepared model grouped into blobs (one per memory buffer they live in)."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []
        self._index: dict[int, int] = {}

    def array(self, a) -> int | None:
        if a is None:
            return None
        i = self._index.get(id(a))
        if i is None:
            if not isinstance(a, np.ndarray) or a.dtype.str not in _DTYPES:
                raise TypeError(f"cannot cache a {type(a).__name__} {getattr(a, 'dtype', '')}")
            self._index[id(a)] = i = len(self.arrays)
            self.arrays.append(a)
        return i

    def weight(self, w):
        if w is None:
            return None
        if isinstance(w, (QMatrix, Panels)):
            return {"fmt": w.fmt, "shape": list(w.shape), "data": self.array(w.data), "scales": self.array(w.scales),
                    **({"offsets": self.array(w.offsets)} if w.offsets is not None else {}),
                    **({"panels": True} if isinstance(w, Panels) else {})}
        return {"a": self.array(w)}

    def blobs(self) -> tuple[list[np.ndarray], list[dict]]:
        """-> (blob byte arrays, array descriptors). Arrays that share a contiguous root buffer share a
        blob spanning the bytes they use; others are copied to a blob of their own."""
        groups: dict[int, tuple[np.ndarray, list[int]]] = {}
        for i, a in enumerate(self.arrays):
            r = _root(a)
            if not r.flags.c_contiguous or r.size == 0:
                r = a = self.arrays[i] = np.ascontiguousarray(a)
            groups.setdefault(id(r), (r, []))[1].append(i)
        blobs, descs = [], [None] * len(self.arrays)
        for r, members in groups.values():
            base = r.ctypes.data
            extents = [_extent(self.arrays[i]) for i in members]
            lo, hi = min(e[0] for e in extents), max(e[1] for e in extents)
            raw = r.reshape(-1).view(np.uint8)
            for i, (a_lo, _) in zip(members, extents):
                a = self.arrays[i]
                descs[i] = {"blob": len(blobs), "offset": a_lo - lo, "dtype": a.dtype.str,
                            "shape": list(a.shape), "strides": list(a.strides)}
            blobs.append(raw[lo - base:hi - base])
        return blobs, descs


def _tree(transformer, layout: _Layout) -> dict:
    t = transformer
    return {"embed_tokens": layout.weight(t.embed_tokens),
            "lm_head": "tied" if t.lm_head is t.embed_tokens else layout.weight(t.lm_head),
            "final_norm": layout.weight(t.final_norm),
            "layers": [{f.name: layout.weight(getattr(lw, f.name)) for f in dataclasses.fields(lw)}
                       for lw in t.layers]}


def _align(n: int, a: int) -> int:
    return n + (-n) % a


def save(key: dict, transformer, config: ModelConfig, tokenizer_meta: dict | None, fingerprint: str) -> Path | None:
    """Write the prepared model to its cache file (atomically). Never raises for I/O: a cache that
    cannot be written (disk full, read-only home) is logged and skipped. Returns the path or None."""
    final = cache_path(key)
    t0 = time.perf_counter()
    try:
        layout = _Layout()
        tree = _tree(transformer, layout)
        blobs, arrays = layout.blobs()
    except TypeError as e:                # a weight type this cache does not know: do not cache
        log.warning("not caching the prepared model: %s", e)
        return None
    tok = json.dumps(tokenizer_meta or {}, ensure_ascii=False).encode()
    blobs.append(np.frombuffer(tok, np.uint8))
    specs, pos = [], 0
    for b in blobs:
        pos = _align(pos, HUGE if b.nbytes >= HUGE else 64)
        specs.append({"offset": pos, "nbytes": int(b.nbytes), "crc": _samples_crc(b, b.nbytes)})
        pos += b.nbytes
    data_nbytes = pos
    header = json.dumps({"key": key, "config": config.to_dict(), "fingerprint": fingerprint,
                         "tokenizer_blob": len(blobs) - 1, "tokenizer_crc": zlib.crc32(tok),
                         "blobs": specs, "arrays": arrays, "tree": tree, "created": time.time()}).encode()
    data_offset = _align(_PREFIX.size + len(header), HUGE)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(final.parent).free
        if free < data_offset + data_nbytes + MIN_FREE_BYTES:
            log.warning("not writing the prepared-model cache %s: it needs %.0f MiB and %.0f MiB are free "
                        "(keeping %.0f MiB spare)", final, (data_offset + data_nbytes) / 2**20, free / 2**20,
                        MIN_FREE_BYTES / 2**20)
            return None
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=SUFFIX)
        crc = 0
        with os.fdopen(fd, "wb") as f:
            for b, s in zip(blobs, specs):
                f.seek(data_offset + s["offset"])
                f.write(memoryview(b))
                crc = zlib.crc32(b, crc)
            f.truncate(data_offset + data_nbytes)
            f.seek(0)
            prefix = _PREFIX.pack(MAGIC, CONTAINER_VERSION, 0, len(header), data_offset, data_nbytes, crc, b"")
            f.write(_PREFIX.pack(MAGIC, CONTAINER_VERSION, 0, len(header), data_offset, data_nbytes, crc,
                                 hashlib.sha256(prefix[:48] + header).digest()))
            f.write(header)
        os.replace(tmp, final)
        tmp = None
    except OSError as e:
        log.warning("could not write the prepared-model cache %s: %s", final, e)
        return None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _prune(final)
    log.info("wrote prepared-model cache %s (%.0f MiB, %.2f s)", final, (data_offset + data_nbytes) / 2**20,
             time.perf_counter() - t0)
    return final


def _prune(keep: Path) -> None:
    """Remove the older entries of `keep`'s slot and entries whose source file is gone (models
    loaded from temporary directories would otherwise pile up)."""
    for p in keep.parent.glob("*" + SUFFIX):
        if p == keep:
            continue
        if not p.name.startswith(_slot_prefix(keep)):
            try:
                if os.path.exists(read_header(p).json["key"]["source"]):
                    continue
            except (CacheFileError, KeyError, TypeError):
                continue                  # another version's file, or being replaced: leave it
        try:
            p.unlink()
        except OSError:
            pass


# -- reading -----------------------------------------------------------------------------------------

@dataclass
class Header:
    path: Path
    json: dict
    data_offset: int
    data_nbytes: int
    data_crc: int


def read_header(path: Path) -> Header:
    """Parse and check the prefix and JSON header (magic, version, sha256, file size)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise CacheFileError(f"{path}: truncated ({len(prefix)} bytes)")
            magic, version, _, hlen, data_offset, data_nbytes, crc, digest = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise CacheFileError(f"{path}: not a prepared-model cache file")
            if version != CONTAINER_VERSION:
                raise CacheFileError(f"{path}: container version {version}, expected {CONTAINER_VERSION}")
            size = os.fstat(f.fileno()).st_size
            if data_offset < _PREFIX.size + hlen or data_offset + data_nbytes != size:
                raise CacheFileError(f"{path}: {size} bytes, the header says {data_offset + data_nbytes}")
            header = f.read(hlen)
    except OSError as e:
        raise CacheFileError(f"{path}: cannot read: {e}") from e
    if hashlib.sha256(prefix[:48] + header).digest() != digest:
        raise CacheFileError(f"{path}: header checksum mismatch")
    try:
        return Header(path, json.loads(header), data_offset, data_nbytes, crc)
    except ValueError as e:
        raise CacheFileError(f"{path}: bad header: {e}") from e


def _map_data(h: Header, mode: str) -> np.ndarray:
    """The data region as a writable uint8 array: read into a 2 MiB-aligned buffer, or mapped."""
    with open(h.path, "rb") as f:
        if mode == "mmap":
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError):   # not Linux, or THP off
                pass
            return np.frombuffer(mm, np.uint8, count=h.data_nbytes, offset=h.data_offset)
        data = aligned_bytes(h.data_nbytes, HUGE)               # NumPy madvises it for huge pages
        f.seek(h.data_offset)
        view, done = memoryview(data), 0
        while done < h.data_nbytes:
            n = f.readinto(view[done:done + (64 << 20)])
            if not n:
                raise CacheFileError(f"{h.path}: truncated data")
            done += n
        return data


def _rebuild(h: Header, data: np.ndarray):
    """Arrays and the weight tree from the data region; every bound checked first."""
    j = h.json
    blobs = []
    for s in j["blobs"]:
        off, n = int(s["offset"]), int(s["nbytes"])
        if off < 0 or n < 0 or off + n > h.data_nbytes:
            raise CacheFileError(f"{h.path}: blob outside the data region")
        b = data[off:off + n]
        if _samples_crc(b, n) != s["crc"]:
            raise CacheFileError(f"{h.path}: data checksum mismatch")
        blobs.append(b)
    arrays = []
    for d in j["arrays"]:
        blob = blobs[d["blob"]]
        dtype = np.dtype(d["dtype"])
        shape, strides = tuple(d["shape"]), tuple(d["strides"])
        if (d["dtype"] not in _DTYPES or len(shape) != len(strides) or any(n < 0 for n in shape)
                or any(s <= 0 for s in strides) or d["offset"] < 0):
            raise CacheFileError(f"{h.path}: bad array descriptor")
        end = d["offset"] + (sum((n - 1) * s for n, s in zip(shape, strides)) + dtype.itemsize
                             if all(shape) else 0)
        if end > blob.nbytes:
            raise CacheFileError(f"{h.path}: array outside its blob")
        arrays.append(np.ndarray(shape, dtype, buffer=blob, offset=d["offset"], strides=strides))

    def weight(w):
        if w is None:
            return None
        if "a" in w:
            return arrays[w["a"]]
        if w["fmt"] not in FORMATS:
            raise CacheFileError(f"{h.path}: unknown format {w['fmt']!r}")
        scales = None if w["scales"] is None else arrays[w["scales"]]
        offsets = arrays[w["offsets"]] if w.get("offsets") is not None else None
        if (offsets is None) != (w["fmt"] != "q4m"):
            raise CacheFileError(f"{h.path}: {w['fmt']} weights {'without' if offsets is None else 'with'} offsets")
        if w.get("panels"):
            return Panels(w["fmt"], tuple(w["shape"]), arrays[w["data"]], scales, offsets)
        return QMatrix(w["fmt"], tuple(w["shape"]), arrays[w["data"]], scales, offsets)

    tok_blob = blobs[j["tokenizer_blob"]]
    if zlib.crc32(tok_blob) != j["tokenizer_crc"]:
        raise CacheFileError(f"{h.path}: tokenizer checksum mismatch")
    return weight, j["tree"], json.loads(bytes(tok_blob))


@dataclass
class Cached:
    config: ModelConfig
    transformer: object
    tokenizer_meta: dict
    fingerprint: str
    path: Path


def load(key: dict, ops, mode: str | None = None) -> Cached | None:
    """The cached prepared model for `key` on `ops`, or None when there is none. A corrupt, truncated
    or mismatching file is logged as a warning and removed (the caller rebuilds and rewrites it).
    mode: one of LOAD_MODES; None = $PIPOWER_CACHE_LOAD or "mmap"."""
    from .model import LayerWeights, Transformer
    mode = mode or os.environ.get("PIPOWER_CACHE_LOAD") or LOAD_MODES[0]
    if mode not in LOAD_MODES:
        raise InvalidArgumentError(f"prepared-model cache load mode must be one of {', '.join(LOAD_MODES)}, "
                                   f"got {mode!r}")
    path = cache_path(key)
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        h = read_header(path)
        if h.json.get("key") != key:
            raise CacheFileError(f"{path}: made from another source or by other code")
        config = ModelConfig(**h.json["config"])
        weight, tree, tok_meta = _rebuild(h, _map_data(h, mode))
        layers = [LayerWeights(**{name: weight(w) for name, w in lw.items()}) for lw in tree["layers"]]
        if len(layers) != config.num_hidden_layers:
            raise CacheFileError(f"{path}: {len(layers)} layers, config says {config.num_hidden_layers}")
        embed = weight(tree["embed_tokens"])
        head = embed if tree["lm_head"] == "tied" else weight(tree["lm_head"])
        transformer = Transformer(config, None, ops, key["weights"],
                                  prepared=(embed, layers, weight(tree["final_norm"]), head))
    except (CacheFileError, KeyError, TypeError, ValueError, IndexError, OSError) as e:
        why = str(e) if isinstance(e, CacheFileError) else f"{path}: {type(e).__name__}: {e}"
        log.warning("prepared-model cache unusable, rebuilding it: %s", why)
        try:
            path.unlink()
        except OSError:
            pass
        return None
    log.info("loaded prepared model from %s (%s, %.2f s)", path, mode, time.perf_counter() - t0)
    return Cached(config, transformer, tok_meta, h.json.get("fingerprint", ""), path)


# -- management --------------------------------------------------------------------------------------

@dataclass
class Entry:
    path: Path
    nbytes: int
    source: str = ""
    weights: str = ""
    layout: str = ""
    created: float = 0.0
    problem: str = ""                     # why the file is unusable; "" = fine (as far as checked)


def verify(path: Path) -> None:
    """Check the whole file: header, then the crc32 of every blob. Raises CacheFileError."""
    h = read_header(path)
    crc = 0
    with open(path, "rb") as f:
        for s in h.json["blobs"]:
            f.seek(h.data_offset + s["offset"])
            left = s["nbytes"]
            while left:
                chunk = f.read(min(left, 16 << 20))
                if not chunk:
                    raise CacheFileError(f"{path}: truncated data")
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
    if crc != h.data_crc:
        raise CacheFileError(f"{path}: data checksum mismatch")


def entries(check: bool = False) -> list[Entry]:
    """The cache files, newest first. check: verify each file's full checksum (reads them)."""
    out = []
    d = cache_dir()
    for p in sorted(d.glob("*" + SUFFIX)) if d.is_dir() else []:
        try:
            e = Entry(p, p.stat().st_size)
        except OSError:
            continue
        try:
            h = read_header(p)
            k = h.json.get("key", {})
            e.source, e.weights, e.layout = k.get("source", ""), k.get("weights", ""), k.get("layout", "")
            e.created = h.json.get("created", 0.0)
            if check:
                verify(p)
            elif not _source_matches(k):
                e.problem = "stale: the source file changed or is gone"
        except CacheFileError as err:
            e.problem = str(err).removeprefix(f"{p}: ")
        out.append(e)
    return sorted(out, key=lambda e: -e.created)


def _source_matches(k: dict) -> bool:
    try:
        st = os.stat(k.get("source", ""))
    except OSError:
        return False
    return st.st_size == k.get("size") and st.st_mtime_ns == k.get("mtime_ns")


def clear() -> tuple[int, int]:
    """Remove every cache file (and leftover temporary files). -> (files removed, bytes freed)."""
    n = freed = 0
    d = cache_dir()
    for p in list(d.glob("*" + SUFFIX)) + list(d.glob(".tmp-*" + SUFFIX)) if d.is_dir() else []:
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        n += 1
        freed += size
    return n, freed
