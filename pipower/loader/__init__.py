"""Weight loaders: a HF directory or a GGUF file -> ModelFiles (ModelConfig + float32 HF-named tensors).

Known model names ("smollm2-135m") are resolved to a path by the caller through `pipower.fetch` first.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelFileError
from .gguf import load_gguf
from .hf_dir import load_hf_dir
from .validate import check_tensors, expected_shapes
from .weights import ModelFiles

__all__ = ["ModelFiles", "load_model_files", "load_gguf", "load_hf_dir", "expected_shapes", "check_tensors"]


def load_model_files(source: str | Path, *, progress: bool = True) -> ModelFiles:
    """Dispatch on what `source` is: a directory -> HF loader, a file with GGUF magic -> GGUF loader."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_hf_dir(path, progress=progress)
    if not path.exists():
        raise ModelFileError(f"{path}: no such model file or directory (and not a known model name)")
    if path.suffix == ".safetensors" or path.name == "model.safetensors.index.json":
        raise ModelFileError(f"{path}: a safetensors file alone has no config; pass the directory that "
                             f"holds it and config.json ({path.parent})")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e}") from e
    if magic == b"GGUF":
        return load_gguf(path, progress=progress)
    what = "empty file" if not magic else f"unknown file format (magic {magic!r})"
    raise ModelFileError(f"{path}: {what}; expected a GGUF file or a Hugging Face model directory")
