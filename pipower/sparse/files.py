"""The one file format of the sparsity tools: safetensors tensors + JSON metadata under the key
"pipower" (with a "format" tag), written atomically and read with typed errors."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..errors import ModelFileError


def save_tensors(path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Write via a .part file and rename: a killed run never leaves a half-written file under `path`."""
    from safetensors.numpy import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"pipower": json.dumps(meta)})
    tmp.replace(path)


@contextlib.contextmanager
def open_tensors(path, file_format: str, what: str):
    """-> (metadata dict, safetensors reader) of a file tagged `file_format`; ModelFileError otherwise
    (missing, truncated, corrupt, or another kind of file). `what` names the file kind in messages."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: {what} file not found")
    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("pipower", "{}"))
            if meta.get("format") != file_format:
                raise ModelFileError(f"{path}: not a pipower {what} file")
            yield meta, f
    except ModelFileError:
        raise
    except Exception as e:  # safetensors raises its own errors for truncated/corrupt files
        raise ModelFileError(f"{path}: cannot read {what} file ({type(e).__name__}: {e})") from e
