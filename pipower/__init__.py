"""pipower: LLM inference that exploits activation sparsity (a Python re-implementation of PowerInfer).

    import pipower
    m = pipower.load("smollm2-135m")          # known name, GGUF file, or HF directory
    print(m.chat([{"role": "user", "content": "What is the capital of France?"}]))
"""
from __future__ import annotations

import logging

from .api import Model, TextStream, load
from .config import ModelConfig
from .errors import (BackendError, ContextLengthError, FetchError, HashMismatchError, InvalidArgumentError,
                     ModelFileError, PipowerError, ShapeMismatchError, TokenizerError, UnsupportedModelError)
from .fetcher import KNOWN_MODELS, fetch
from .info import info

__version__ = "0.1.0"
__all__ = ["load", "fetch", "info", "Model", "ModelConfig", "TextStream", "KNOWN_MODELS", "PipowerError",
           "BackendError", "ContextLengthError", "FetchError", "HashMismatchError", "InvalidArgumentError",
           "ModelFileError", "ShapeMismatchError", "TokenizerError", "UnsupportedModelError", "__version__"]

# A library logs; the application decides where logs go.
logging.getLogger(__name__).addHandler(logging.NullHandler())
