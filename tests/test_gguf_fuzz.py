"""Damaged GGUF headers and metadata: every one loads (and works) or raises a PipowerError, never another
exception, a crash, a hang or unbounded memory (issue #15).

The base files are tiny writer-made GGUFs (helpers_models.write_tiny_gguf) with a real tokenizer: the
byte-level BPE vocabulary with merges, control tokens and a chat template, and a SentencePiece variant
(the same file with tokenizer.ggml.model 'llama', scores and <0xXX> byte tokens). Each damaged copy is
loaded in a fresh process (tests/gguf_fuzz_worker.py: fork per file, RLIMIT_AS, an alarm). Damage is
of two kinds: bytes (truncations, value types, array counts, string lengths, header counts, random
flips) and values rewritten through a small GGUF serializer (wrong types, huge counts, bad merges, bad
token types, wrong array lengths, out-of-range ids, broken hyper-parameters).
"""
from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from helpers_models import write_tiny_gguf

WORKER = Path(__file__).with_name("gguf_fuzz_worker.py")
ACCEPTABLE = {"ok", "pipower"}

# ---- a minimal GGUF (de)serializer that keeps value types and byte offsets ----------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
        F64: "d"}


@dataclass
class KV:
    key: str
    vtype: int
    value: object
    etype: int | None = None                   # element type of an array
    at: dict = field(default_factory=dict)     # byte offsets: 'key_len', 'type', 'count', 'str_len', 'end'


@dataclass
class GGUF:
    version: int
    n_tensors: int
    kvs: list
    infos: bytes                               # the tensor info records, as they were
    data: bytes                                # the tensor data section, as it was
    alignment: int = 32
    at: dict = field(default_factory=dict)     # 'n_tensors', 'n_kv', 'infos', 'data' offsets

    def get(self, key):
        return next(kv for kv in self.kvs if kv.key == key)


def _read(buf: bytes, pos: int, vtype: int, at: dict | None = None):
    if vtype in _FMT:
        size = struct.calcsize(_FMT[vtype])
        return struct.unpack_from("<" + _FMT[vtype], buf, pos)[0], pos + size
    if vtype == STR:
        if at is not None:
            at["str_len"] = pos
        n = struct.unpack_from("<Q", buf, pos)[0]
        return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
    etype, n = struct.unpack_from("<IQ", buf, pos)
    if at is not None:
        at["count"] = pos + 4
    pos += 12
    out = []
    for _ in range(n):
        v, pos = _read(buf, pos, etype)
        out.append(v)
    return (etype, out), pos


def parse(buf: bytes) -> GGUF:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, kvs = 24, []
    for _ in range(n_kv):
        at = {"key_len": pos}
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        at["type"] = pos
        vtype = struct.unpack_from("<I", buf, pos)[0]
        value, pos = _read(buf, pos + 4, vtype, at)
        at["end"] = pos
        etype = None
        if vtype == ARR:
            etype, value = value
        kvs.append(KV(key, vtype, value, etype, at))
    infos_at = pos
    for _ in range(n_tensors):
        n = struct.unpack_from("<Q", buf, pos)[0]
        pos += 8 + n
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        pos += 4 + 8 * n_dims + 4 + 8
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    data_at = -(-pos // align) * align
    return GGUF(version, n_tensors, kvs, buf[infos_at:pos], buf[data_at:], align,
                {"n_tensors": 8, "n_kv": 16, "infos": infos_at, "data": data_at})


def _write(vtype: int, value, etype=None) -> bytes:
    if vtype in _FMT:
        return struct.pack("<" + _FMT[vtype], value)
    if vtype == STR:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    return struct.pack("<IQ", etype, len(value)) + b"".join(_write(etype, v) for v in value)


def serialize(g: GGUF) -> bytes:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", g.version, g.n_tensors, len(g.kvs)))
    for kv in g.kvs:
        out += _write(STR, kv.key) + struct.pack("<I", kv.vtype) + _write(kv.vtype, kv.value, kv.etype)
    out += g.infos
    out += b"\0" * (-len(out) % g.alignment)
    return bytes(out + g.data)


# ---- the base files ------------------------------------------------------------------------------------

def spm_variant(g: GGUF) -> GGUF:
    """The same model with a SentencePiece vocabulary: '▁' pieces, <0xXX> byte tokens, scores."""
    n = len(g.get("tokenizer.ggml.tokens").value)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = ["\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "an", "on", "\u2581", "e", "t", "h", "a", "n",
             "o", "r", "i", "l", "H", "W", "d", "w", "!"]
    tokens += words[:n - len(tokens)]
    types += [1] * (len(tokens) - len(types))
    tokens += [f"<extra_{i}>" for i in range(n - len(tokens))]
    types += [4] * (n - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    kvs = [kv for kv in g.kvs if kv.key not in ("tokenizer.ggml.merges", "tokenizer.ggml.pre")]
    new = {"tokenizer.ggml.model": KV("tokenizer.ggml.model", STR, "llama"),
           "tokenizer.ggml.tokens": KV("tokenizer.ggml.tokens", ARR, tokens, STR),
           "tokenizer.ggml.token_type": KV("tokenizer.ggml.token_type", ARR, types, I32),
           "tokenizer.ggml.bos_token_id": KV("tokenizer.ggml.bos_token_id", U32, 1),
           "tokenizer.ggml.eos_token_id": KV("tokenizer.ggml.eos_token_id", U32, 2)}
    kvs = [new.pop(kv.key, kv) for kv in kvs]
    kvs.append(KV("tokenizer.ggml.scores", ARR, scores, F32))
    kvs.append(KV("tokenizer.ggml.unknown_token_id", U32, 0))
    kvs.extend(new.values())
    return replace(g, kvs=kvs)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{'bpe': bytes, 'spm': bytes} of two tiny GGUFs that load and work."""
    d = tmp_path_factory.mktemp("gguf_fuzz_base")
    bpe = write_tiny_gguf(d / "bpe.gguf").read_bytes()
    g = parse(bpe)
    assert serialize(g) == bpe, "the test's serializer must reproduce the writer's file byte for byte"
    return {"bpe": bpe, "spm": serialize(spm_variant(g))}


# ---- mutations -----------------------------------------------------------------------------------------

def _patch(buf: bytes, at: int, raw: bytes) -> bytes:
    return buf[:at] + raw + buf[at + len(raw):]


def byte_mutations(buf: bytes) -> dict[str, bytes]:
    """Damage at the byte level, at the places a parser trusts: lengths, counts, type codes, the end."""
    g = parse(buf)
    out = {}
    for v in (0, 1, 4, 0xFFFF, 0x03000000):
        out[f"version={v:#x}"] = _patch(buf, 4, struct.pack("<I", v))
    for name in ("n_tensors", "n_kv"):
        at = g.at[name]
        n = struct.unpack_from("<Q", buf, at)[0]
        for v in (0, n - 1, n + 1, 2**31, 2**63, 2**64 - 1):
            out[f"{name}={v}"] = _patch(buf, at, struct.pack("<Q", v % 2**64))
    for cut in sorted({24, 30, g.at["infos"] - 1, g.at["infos"], g.at["infos"] + 9, g.at["data"] - 1,
                       g.at["data"] + 5, len(buf) - 1, *(kv.at["type"] + 2 for kv in g.kvs[::3])}):
        out[f"truncated at {cut}"] = buf[:cut]
    for kv in g.kvs:
        for t in (U8, STR, ARR, F64, 13, 0xFFFFFFFF) + ((U64,) if kv.vtype != U64 else (I8,)):
            if t != kv.vtype:
                out[f"{kv.key}: type {t}"] = _patch(buf, kv.at["type"], struct.pack("<I", t))
        out[f"{kv.key}: key length 2**63"] = _patch(buf, kv.at["key_len"], struct.pack("<Q", 2**63))
        if "count" in kv.at:
            n = len(kv.value)
            for v in (0, n - 1, n + 1, 2**32 + n, 2**63, 2**64 - 1):
                out[f"{kv.key}: count {v}"] = _patch(buf, kv.at["count"], struct.pack("<Q", max(v, 0)))
            if kv.etype is not None:
                for t in (U8, STR, ARR, I64, 13):
                    if t != kv.etype:
                        out[f"{kv.key}: element type {t}"] = _patch(buf, kv.at["count"] - 4, struct.pack("<I", t))
        if "str_len" in kv.at:
            n = struct.unpack_from("<Q", buf, kv.at["str_len"])[0]
            for v in (n - 1, n + 1, 2**63):
                out[f"{kv.key}: string length {v}"] = _patch(buf, kv.at["str_len"], struct.pack("<Q", max(v, 0)))
    return out


def random_flips(buf: bytes, n: int, seed: int) -> dict[str, bytes]:
    """n copies, each with 1-8 random bytes of the header (metadata + tensor infos) overwritten."""
    rng, end, out = random.Random(seed), parse(buf).at["data"], {}
    for i in range(n):
        b = bytearray(buf)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(4, end)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        out[f"flips seed {seed} #{i}"] = bytes(b)
    return out


def _set(g: GGUF, key: str, vtype: int, value, etype=None) -> bytes:
    kvs = [kv for kv in g.kvs if kv.key != key]
    if vtype is not None:
        kvs.append(KV(key, vtype, value, etype))
    return serialize(replace(g, kvs=kvs))


def value_mutations(buf: bytes) -> dict[str, bytes]:
    """Well-formed files whose values are wrong: types, ranges, lengths, vocabularies."""
    g = parse(buf)
    arch = g.get("general.architecture").value
    toks = g.get("tokenizer.ggml.tokens").value
    types = g.get("tokenizer.ggml.token_type").value
    out = {}

    def put(name, key, vtype, value=None, etype=None):
        out[name] = _set(g, key, vtype, value, etype)

    # the vocabulary
    put("tokens empty", "tokenizer.ggml.tokens", ARR, [], STR)
    put("tokens as ints", "tokenizer.ggml.tokens", ARR, list(range(len(toks))), I32)
    put("tokens one short", "tokenizer.ggml.tokens", ARR, toks[:-1], STR)
    put("tokens one long", "tokenizer.ggml.tokens", ARR, toks + ["zz"], STR)
    put("tokens all the same", "tokenizer.ggml.tokens", ARR, ["a"] * len(toks), STR)
    put("tokens with empty strings", "tokenizer.ggml.tokens", ARR, [""] * 10 + toks[10:], STR)
    put("tokens invalid UTF-8", "tokenizer.ggml.tokens", ARR, [b"\xff\xfe"] + toks[1:], STR)
    put("tokens as one string", "tokenizer.ggml.tokens", STR, "abc")
    put("tokens missing", "tokenizer.ggml.tokens", None)
    put("token types 99", "tokenizer.ggml.token_type", ARR, [99] * len(types), I32)
    put("token types -1", "tokenizer.ggml.token_type", ARR, [-1] * len(types), I32)
    put("token types all control", "tokenizer.ggml.token_type", ARR, [3] * len(types), I32)
    put("token types one short", "tokenizer.ggml.token_type", ARR, types[:-1], I32)
    put("token types empty", "tokenizer.ggml.token_type", ARR, [], I32)
    put("token types as strings", "tokenizer.ggml.token_type", ARR, [str(t) for t in types], STR)
    put("token types as floats", "tokenizer.ggml.token_type", ARR, [float(t) for t in types], F32)
    put("token types as bools", "tokenizer.ggml.token_type", ARR, [True] * len(types), BOOL)
    put("token types scalar", "tokenizer.ggml.token_type", U32, 1)
    put("token types missing", "tokenizer.ggml.token_type", None)
    put("tokenizer model bert", "tokenizer.ggml.model", STR, "bert")
    put("tokenizer model int", "tokenizer.ggml.model", U32, 7)
    put("tokenizer model empty", "tokenizer.ggml.model", STR, "")
    put("tokenizer model missing", "tokenizer.ggml.model", None)
    for name in ("bos", "eos", "unknown", "eot", "eom", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        put(f"{name} id huge", key, U64, 2**63 + 5)
        put(f"{name} id -1", key, I32, -1)
        put(f"{name} id string", key, STR, "1")
        put(f"{name} id float", key, F32, 1.5)
        put(f"{name} id array", key, ARR, [1, 2], U32)
    put("add_bos string", "tokenizer.ggml.add_bos_token", STR, "yes")
    put("add_bos u32 5", "tokenizer.ggml.add_bos_token", U32, 5)
    put("add_bos array", "tokenizer.ggml.add_bos_token", ARR, [True], BOOL)
    put("add_space_prefix string", "tokenizer.ggml.add_space_prefix", STR, "no")
    put("chat template int", "tokenizer.chat_template", U32, 3)
    put("chat template broken", "tokenizer.chat_template", STR, "{% for m in messages %}{{ m.content ")
    put("chat template raises", "tokenizer.chat_template", STR, "{{ raise_exception('no') }}")
    put("chat template undefined", "tokenizer.chat_template", STR, "{{ messages[5].content.upper() }}")
    put("chat template empty", "tokenizer.chat_template", STR, "")
    if any(kv.key == "tokenizer.ggml.merges" for kv in g.kvs):
        merges = g.get("tokenizer.ggml.merges").value
        put("merge names a missing token", "tokenizer.ggml.merges", ARR, merges + ["\u0120 zzz"], STR)
        put("merge result not in vocab", "tokenizer.ggml.merges", ARR, merges + ["q z"], STR)
        put("merge without a space", "tokenizer.ggml.merges", ARR, ["abc"] + merges, STR)
        put("merge with two spaces", "tokenizer.ggml.merges", ARR, ["a b c"] + merges, STR)
        put("merge empty string", "tokenizer.ggml.merges", ARR, [""] + merges, STR)
        put("merges as ints", "tokenizer.ggml.merges", ARR, [1, 2, 3], U32)
        put("merges scalar", "tokenizer.ggml.merges", STR, "\u0120 t")
        put("merges duplicated", "tokenizer.ggml.merges", ARR, merges + merges, STR)
        put("merges missing", "tokenizer.ggml.merges", None)
        put("pre unknown", "tokenizer.ggml.pre", STR, "no-such-pre")
        put("pre int", "tokenizer.ggml.pre", U32, 1)
        put("pre array", "tokenizer.ggml.pre", ARR, ["default"], STR)
        put("pre missing", "tokenizer.ggml.pre", None)
    if any(kv.key == "tokenizer.ggml.scores" for kv in g.kvs):
        scores = g.get("tokenizer.ggml.scores").value
        put("scores one short", "tokenizer.ggml.scores", ARR, scores[:-1], F32)
        put("scores NaN", "tokenizer.ggml.scores", ARR, [math.nan] * len(scores), F32)
        put("scores inf", "tokenizer.ggml.scores", ARR, [math.inf, -math.inf] * (len(scores) // 2)
            + [0.0] * (len(scores) % 2), F32)
        put("scores as strings", "tokenizer.ggml.scores", ARR, ["1"] * len(scores), STR)
        put("scores as ints", "tokenizer.ggml.scores", ARR, [1] * len(scores), I32)
        put("scores missing", "tokenizer.ggml.scores", None)
        no_bytes = ["x"] + toks[1:]
        put("no byte tokens", "tokenizer.ggml.token_type", ARR, [1] * len(no_bytes), I32)
        put("byte type on a non-byte piece", "tokenizer.ggml.token_type", ARR, [6] * len(types), I32)
    # the architecture and its hyper-parameters
    put("architecture int", "general.architecture", U32, 1)
    put("architecture array", "general.architecture", ARR, ["llama"], STR)
    put("architecture gptj", "general.architecture", STR, "gptj")
    put("architecture empty", "general.architecture", STR, "")
    put("architecture missing", "general.architecture", None)
    for v, t in ((0, U32), (3, U32), (2**40, U64), (-32, I32), ("32", STR), (32.0, F32)):
        put(f"alignment {v!r}", "general.alignment", t, v)
    ints = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
            "rope.scaling.original_context_length")
    for k in ints:
        key = f"{arch}.{k}"
        for v, t in ((0, U32), (1, U32), (3, U32), (2**31, U32), (2**63, U64), (-1, I32), (2.5, F32),
                     (math.inf, F64), (math.nan, F32), ("8", STR), (True, BOOL)):
            put(f"{k} = {v!r} ({t})", key, t, v)
        put(f"{k} per layer", key, ARR, [16], U32)
        put(f"{k} missing", key, None)
    for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor", "rope.scale_linear"):
        key = f"{arch}.{k}"
        for v, t in ((0.0, F32), (-1.0, F32), (math.nan, F32), (math.inf, F32), (1e-45, F32), (1e300, F64),
                     ("1e-5", STR), (7, U32)):
            put(f"{k} = {v!r} ({t})", key, t, v)
        put(f"{k} missing", key, None)
    for v, t in (("linear", STR), ("yarn", STR), ("llama3", STR), ("none", STR), (5, U32), ("", STR)):
        put(f"rope scaling type {v!r}", f"{arch}.rope.scaling.type", t, v)
    return out


def _run(files: dict[str, bytes], tmp_path: Path, timeout: int, good: bytes | None = None) -> list[dict]:
    """Each file loaded in its own forked process by the worker; `good` warms the worker up first."""
    names = {}
    for i, (name, data) in enumerate(files.items()):
        p = tmp_path / f"m{i:04d}.gguf"
        p.write_bytes(data)
        names[str(p)] = name
    listing = tmp_path / "files.json"
    listing.write_text(json.dumps(list(names)))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PIPOWER_HOME": str(tmp_path / "home")}
    args = [sys.executable, str(WORKER), str(listing)]
    if good is not None:
        (tmp_path / "good.gguf").write_bytes(good)
        args.append(str(tmp_path / "good.gguf"))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(WORKER.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(files), proc.stderr[-3000:]
    for r in results:
        r["name"] = names[r["path"]]
    return results


def _check(results: list[dict]) -> None:
    bad = [r for r in results if r["outcome"] not in ACCEPTABLE]
    report = "\n\n".join(f"[{r['outcome']}] {r['name']}: {r['detail']}" for r in bad[:15])
    assert not bad, f"{len(bad)} of {len(results)} damaged files did not end in a PipowerError:\n{report}"


def test_bad_merge_is_a_tokenizer_error(bases, tmp_path):
    """The issue's case, in process: a merge naming a token missing from the vocabulary made `tokenizers`
    raise its bare Exception ('Error while initializing BPE: Token ... out of vocabulary')."""
    from pipower.errors import TokenizerError
    from pipower.tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata
    path = tmp_path / "m.gguf"
    path.write_bytes(bases["bpe"])
    meta = read_gguf_metadata(path)
    for bad in ("\u0120 zzz", "q z", "a b c"):
        with pytest.raises(TokenizerError, match="not in the vocabulary"):
            tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.merges": meta["tokenizer.ggml.merges"] + [bad]})
    for bad in ("nospace", ""):
        with pytest.raises(TokenizerError, match="malformed BPE merge"):
            tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.merges": meta["tokenizer.ggml.merges"] + [bad]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.token_type has 299 entries for 300 tokens"):
        tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"][:-1]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens is an array of 300 .int."):
        tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.tokens": list(range(300))})


def test_deeply_nested_arrays_are_a_model_file_error(tmp_path):
    from pipower.errors import ModelFileError
    from pipower.tokenizer import read_gguf_metadata
    body = struct.pack("<IQ", ARR, 1) * 5000 + struct.pack("<IQ", U8, 0)     # Python's recursion limit: 1000
    path = tmp_path / "nested.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _write(STR, "k") + struct.pack("<I", ARR) + body)
    with pytest.raises(ModelFileError, match="nested"):
        read_gguf_metadata(path)


def test_bases_load_and_work(bases, tmp_path):
    results = _run(bases, tmp_path, timeout=120)
    assert [r["outcome"] for r in results] == ["ok", "ok"], results


@pytest.mark.parametrize("vocab", ["bpe", "spm"])
def test_damaged_values(bases, tmp_path, vocab):
    files = value_mutations(bases[vocab])
    _check(_run(files, tmp_path, timeout=600, good=bases[vocab]))


def test_damaged_bytes(bases, tmp_path):
    files = {f"bpe {k}": v for k, v in byte_mutations(bases["bpe"]).items()}
    files.update({f"spm {k}": v for k, v in random_flips(bases["spm"], 40, seed=1).items()})
    files.update({f"bpe {k}": v for k, v in random_flips(bases["bpe"], 40, seed=2).items()})
    _check(_run(files, tmp_path, timeout=600, good=bases["bpe"]))


@pytest.mark.slow
def test_damaged_bytes_sweep(bases, tmp_path):
    files = {f"spm {k}": v for k, v in byte_mutations(bases["spm"]).items()}
    for seed in range(3, 8):
        for vocab in ("bpe", "spm"):
            files.update({f"{vocab} {k}": v for k, v in random_flips(bases[vocab], 200, seed=seed).items()})
    _check(_run(files, tmp_path, timeout=3000, good=bases["bpe"]))
