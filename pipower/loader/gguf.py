"""Load a llama.cpp GGUF file (archs llama, qwen2) into float32 HF-named tensors + a ModelConfig.

Quantized tensors are dequantized once, here, with `gguf.quants.dequantize`; the graph only ever sees
float32. For arch `llama`, llama.cpp's converter permuted the rows of Q and K (and their biases) into its
interleaved RoPE layout; we undo that so the graph applies HF's rotate-half RoPE to HF-ordered rows.
"""
from __future__ import annotations

import logging
import math
import mmap
import re
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

from ..arena import release_free_memory
from ..config import ModelConfig
from ..errors import ModelFileError, UnsupportedModelError
from ..tokenizer.gguf_meta import read_gguf_header
from . import native
from .gguf_file import DEFAULT_ALIGNMENT, TensorInfo, parse_tensor_infos, tensor_bytes
from .validate import check_tensors
from .weights import ModelFiles, new_fingerprint, update_fingerprint

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# F32/F16 are handled inline by gguf.quants; every other type it can dequantize is registered in its table
# (BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ*, TQ*...). Checked up front so an unsupported file fails before work.
SUPPORTED_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16} | set(
    getattr(gguf_quants, "_type_traits", {}))

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
STORE_CHUNK_FLOATS = 1 << 22     # LazyGGUFTensors.stored: rows of at most 16 MiB of float32 at a time


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name; unknown names are returned unchanged (check_tensors then rejects them)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation. w: (out, in) weight or (out,) bias, out = n_head * hd.

    llama.cpp stores, per head, rows [0, hd/2, 1, hd/2+1, ...] (pairs interleaved); HF keeps the two halves.
    """
    out = w.shape[0]
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05), so the
    config matches the HF config.json the GGUF was converted from."""
    return float(str(np.float32(x)))


def _get(md: dict, key: str, path: Path, default=None):
    """md[key]; a missing key without a default is a ModelFileError naming it."""
    if key in md:
        return md[key]
    if default is None:
        raise ModelFileError(f"{path}: GGUF metadata key {key!r} missing")
    return default


MAX_HPARAM = 2**31 - 1          # bound on a count or size hyper-parameter (llama.cpp keeps them in int32)


def _whole(v, key: str, path: Path) -> int:
    """A positive integer hyper-parameter; any other type or value is a damaged file."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_HPARAM:
        raise ModelFileError(f"{path}: bad GGUF metadata value {key} = {v!r}: expected an integer in "
                             f"[1, {MAX_HPARAM}]")
    return v


def _positive(v, key: str, path: Path) -> float:
    """A positive finite real hyper-parameter (epsilon, RoPE base, scaling factor)."""
    if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
        r = _f32(v)
        if math.isfinite(r) and r > 0:            # still, once rounded to float32 as llama.cpp reads it
            return r
    raise ModelFileError(f"{path}: bad GGUF metadata value {key} = {v!r}: expected a positive finite "
                         f"float32 number")


def config_from_gguf(md: dict, infos: dict[str, TensorInfo], path: Path) -> ModelConfig:
    """Translate `{arch}.*` metadata into a ModelConfig under HF key names. Every hyper-parameter is
    checked for type and range, so damaged metadata is a ModelFileError, never a stray exception."""
    arch = _get(md, "general.architecture", path)
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: bad GGUF metadata value general.architecture = {arch!r}: expected a string")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {sorted(SUPPORTED_ARCHS)}")
    if "rope_freqs.weight" in infos:
        # Llama 3.1+ GGUFs carry their RoPE scaling only as this per-frequency tensor, not as metadata
        raise UnsupportedModelError(f"{path}: rope_freqs.weight (Llama 3.1-style RoPE scaling in GGUF) "
                                    "is not supported")

    def key(k, default=None):
        return _get(md, f"{arch}.{k}", path, default)

    def whole(k, default=None):
        return _whole(key(k, default), f"{arch}.{k}", path)

    def positive(k, default=None):
        return _positive(key(k, default), f"{arch}.{k}", path)

    emb = infos.get("token_embd.weight")
    if emb is None:
        raise ModelFileError(f"{path}: GGUF tensor token_embd.weight missing")
    n_layers = whole("block_count")
    if n_layers > len(infos):                     # each layer has several tensors
        raise ModelFileError(f"{path}: bad GGUF metadata value {arch}.block_count = {n_layers}: the file holds "
                             f"only {len(infos)} tensors")
    try:
        D, H = whole("embedding_length"), whole("attention.head_count")
        hd = whole("attention.key_length", max(D // H, 1))
        if whole("attention.value_length", hd) != hd:
            raise UnsupportedModelError(f"{path}: attention.value_length != key_length is not supported")
        rope_dim = whole("rope.dimension_count", hd)
        if rope_dim != hd:
            raise UnsupportedModelError(f"{path}: partial RoPE (rope.dimension_count {rope_dim} != head_dim "
                                        f"{hd}) is not supported")
        cfg = dict(
            architectures=[SUPPORTED_ARCHS[arch]], model_type=arch,
            vocab_size=emb.shape[0] if len(emb.shape) == 2 else len(md.get("tokenizer.ggml.tokens") or []),
            hidden_size=D, intermediate_size=whole("feed_forward_length"),
            num_hidden_layers=n_layers, num_attention_heads=H,
            num_key_value_heads=whole("attention.head_count_kv", H), head_dim=hd, hidden_act="silu",
            max_position_embeddings=whole("context_length"),
            rms_norm_eps=positive("attention.layer_norm_rms_epsilon"),
            rope_theta=positive("rope.freq_base", 10000.0), rope_scaling=_rope_scaling(md, arch, path),
            # llama arch with biases: HF's attention_bias puts them on q, k, v and o
            attention_bias=arch == "llama" and "blk.0.attn_q.bias" in infos,
            tie_word_embeddings="output.weight" not in infos,
            bos_token_id=_token_id(md, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_token_id(md, "tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, ValueError, ZeroDivisionError) as e:   # e.g. a string or per-layer array as a count
        raise ModelFileError(f"{path}: bad GGUF metadata value for {arch}: {e}") from e
    try:
        return ModelConfig.from_dict(cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e


def _token_id(md: dict, key: str) -> int | None:
    """An optional special-token id for the config; a value that is not an integer is ignored here (the
    tokenizer reports it)."""
    v = md.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _rope_scaling(md: dict, arch: str, path: Path) -> dict | None:
    p = f"{arch}.rope.scaling."
    kind = md.get(p + "type")
    factor_key = p + "factor"
    if kind is None and md.get(f"{arch}.rope.scale_linear"):      # older converters
        kind, factor_key = "linear", f"{arch}.rope.scale_linear"
    factor = md.get(factor_key)
    if kind is not None and not isinstance(kind, str):
        raise ModelFileError(f"{path}: bad GGUF metadata value {p}type = {kind!r}: expected a string")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    out = {"rope_type": kind, "factor": 1.0 if factor is None else _positive(factor, factor_key, path)}
    for gkey, hkey in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor")):
        if p + gkey in md:
            out[hkey] = _positive(md[p + gkey], p + gkey, path)
    if p + "original_context_length" in md:
        out["original_max_position_embeddings"] = _whole(md[p + "original_context_length"],
                                                         p + "original_context_length", path)
    return out


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="dequantizing", unit="param", unit_scale=True, file=sys.stderr,
                leave=False, disable=not (enabled and sys.stderr.isatty()))


class LazyGGUFTensors(Mapping):
    """HF name -> float32 tensor, dequantized from the file when it is read (`stored`: straight to a
    compact format, a large matrix in row chunks).

    A model build reads each tensor once and re-stores it compactly (q8...), so the float32 copy of
    the whole model never exists at once: peak memory is the compact model plus one float32 tensor
    (a 70B q8 load needs ~75 GB, not the ~280 GB of float32). Reading a tensor twice dequantizes twice.
    """

    def __init__(self, path: Path, infos, n_head: int, n_kv_head: int, progress: bool):
        self.path = path
        self._infos = {hf_name(t.name): t for t in infos}
        self._n_head, self._n_kv_head = n_head, n_kv_head       # 0: no Q/K un-permutation (not llama)
        self._open = True
        self.n_params = sum(int(np.prod(t.ne)) for t in infos)
        self._bar = _progress(self.n_params, progress)
        self._unread = set(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self):
        return iter(self._infos)

    def __contains__(self, name) -> bool:
        return name in self._infos

    def shape(self, name: str) -> tuple:
        return tuple(self._infos[name].shape)

    def _raw(self, t: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The file bytes of tensor t (or of its rows [r0, r1), 2-D tensors only) as `gguf.quants`
        takes them. Read into a private buffer rather than mapped: pages of a map that the build touched
        would stay in this process's RSS (~ the file size) until the map is dropped."""
        if not self._open:
            raise ModelFileError(f"{self.path}: tensors read after close()")
        if rows is not None:
            r0, r1 = rows
            row_bytes = t.n_bytes // t.shape[0]
            t = TensorInfo(t.name, t.ggml_type, (t.ne[0], r1 - r0), t.offset + r0 * row_bytes,
                           (r1 - r0) * row_bytes)
        buf = np.empty(t.n_bytes, np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(t.offset)
                n = f.readinto(memoryview(buf))
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot read tensor {t.name}: {e}") from e
        if n != t.n_bytes:
            raise ModelFileError(f"{self.path}: truncated GGUF: tensor {t.name} is cut short")
        return tensor_bytes(buf, TensorInfo(t.name, t.ggml_type, t.ne, 0, t.n_bytes))

    def _dequantize(self, t: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
        release_free_memory()       # the last tensor's float32 temporaries, before this one's
        w = gguf_quants.dequantize(self._raw(t, rows), GGMLQuantizationType(t.ggml_type))
        # F32 comes back as a view of the read buffer: no copy needed, it is ours and writable
        return np.asarray(w, dtype=np.float32, order="C")

    def _count(self, name: str, t: TensorInfo) -> None:
        if name in self._unread:
            self._unread.discard(name)
            self._bar.update(int(np.prod(t.ne)))
            if not self._unread:
                self._bar.close()

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._infos[name]
        w = self._dequantize(t)
        if w.shape != t.shape:
            raise ModelFileError(f"{self.path}: tensor {t.name} dequantized to {w.shape}, expected {t.shape}")
        if self._n_head and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            w = unpermute_rows(w, self._n_head if ".q_proj." in name else self._n_kv_head)
        self._count(name, t)
        return w

    def stored(self, name: str, fmt: str):
        """`pipower.model.store(self[name], fmt)` built over row chunks of the file tensor, so the float32
        copy of a large matrix (Qwen2.5-0.5B's embedding: 545 MB, plus gguf's temporaries) never exists
        whole. Bitwise the same: dequantization and every compact format work row by row. q4m from a
        Q4_0 / Q4_1 / Q4_K tensor converts its blocks (pipower.loader.native); fmt "native" picks q4m or
        q8 by the tensor's type (native.native_format)."""
        from ..model import store
        from ..quant import QMatrix
        t = self._infos[name]
        permuted = self._n_head and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name)
        N = t.shape[0] if len(t.shape) == 2 else 0
        rows = max(1, STORE_CHUNK_FLOATS // max(t.ne[0], 1))
        if fmt == "native":
            fmt = native.native_format(t.ggml_type)
        direct = fmt == "q4m" and N and t.ggml_type in native.CONVERTIBLE      # the file's own 4-bit blocks
        if direct and permuted:
            m = native.to_q4m(self._raw(t), t.ggml_type, tuple(t.shape))
            n_head = self._n_head if ".q_proj." in name else self._n_kv_head
            self._count(name, t)
            return QMatrix("q4m", m.shape, *(unpermute_rows(a, n_head) for a in (m.data, m.scales, m.offsets)))
        if not direct and (permuted or N <= rows):
            return store(self[name], fmt)
        out = None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            if direct:
                part = native.to_q4m(self._raw(t, (r0, r1)), t.ggml_type, (r1 - r0, t.shape[1]))
            else:
                w = self._dequantize(t, (r0, r1))
                if w.shape != (r1 - r0, t.shape[1]):
                    raise ModelFileError(f"{self.path}: tensor {t.name} rows dequantized to {w.shape}")
                part = store(w, fmt)
            pieces = (part,) if fmt == "f32" else (part.data, part.scales, part.offsets)
            if out is None:
                out = tuple(None if p is None else np.empty((N, *p.shape[1:]), p.dtype) for p in pieces)
            for o, p in zip(out, pieces):
                if p is not None:
                    o[r0:r1] = p
        self._count(name, t)
        if fmt == "f32":
            return out[0]
        return QMatrix(fmt, tuple(t.shape), *out)

    def close(self) -> None:
        """Close the progress bar; later reads fail (the model build is done)."""
        self._bar.close()
        self._open = False


def load_gguf(path: str | Path, *, progress: bool = True) -> ModelFiles:
    """Open a GGUF model: config, metadata and its tensors under HF names, dequantized to float32
    lazily as they are read (LazyGGUFTensors)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelFileError(f"{path}: GGUF file not found")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path}: empty file, not a GGUF model")
    if size < 24:                      # magic + version + two u64 counts
        raise ModelFileError(f"{path}: truncated GGUF: {size} bytes")
    try:
        header = read_gguf_header(path)
    except struct.error as e:          # short reads inside the metadata parser
        raise ModelFileError(f"{path}: truncated or corrupt GGUF metadata: {e}") from e
    if header.byteorder != "<":
        raise UnsupportedModelError(f"{path}: big-endian GGUF is not supported")
    md = header.metadata
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            infos, data_start = parse_tensor_infos(buf, path, header.tensor_info_offset, header.tensor_count,
                                                   md.get("general.alignment", DEFAULT_ALIGNMENT))
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e}") from e
    by_name = {t.name: t for t in infos}
    config = config_from_gguf(md, by_name, path)
    for t in infos:
        if t.ggml_type not in SUPPORTED_TYPES:
            names = sorted(GGMLQuantizationType(x).name for x in SUPPORTED_TYPES)
            raise UnsupportedModelError(f"{path}: tensor {t.name} has type {t.type_name}, which cannot be "
                                        f"dequantized; supported: {', '.join(names)}")

    # validate names and shapes before the seconds of dequantization (zero-byte stand-in arrays)
    check_tensors(config, {hf_name(t.name): np.broadcast_to(np.float32(0), t.shape) for t in infos}, str(path))

    permute = config.arch == "llama"
    tensors = LazyGGUFTensors(path, infos, config.num_attention_heads if permute else 0,
                              config.num_key_value_heads if permute else 0, progress)
    h = new_fingerprint()
    update_fingerprint(h, path, data_start)
    log.info("opened %s: %s, %d tensors, %.1fM params", path, config.architectures[0], len(tensors),
             tensors.n_params / 1e6)
    return ModelFiles(config, tensors, md, str(path), h.hexdigest())
