"""Typed errors. Every error pipower raises derives from PipowerError, so apps catch one class.

The library never prints or exits; the CLI turns these into one line on stderr and a non-zero exit.
"""


class PipowerError(Exception):
    """Base class of every error the library raises on purpose."""


class ModelFileError(PipowerError):
    """A model file is missing, truncated, corrupt or has the wrong magic. The message names the file."""


class UnsupportedModelError(PipowerError):
    """The file is readable but describes something pipower does not run (architecture, tensor type...)."""


class ShapeMismatchError(ModelFileError):
    """A tensor's shape disagrees with the model config."""


class TokenizerError(PipowerError):
    """No tokenizer, or a tokenizer that cannot be built from the metadata."""


class FetchError(PipowerError):
    """A known model could not be fetched (unknown name, download failed)."""


class HashMismatchError(FetchError):
    """A fetched file's SHA-256 differs from the pinned one; the file is not kept."""


class ContextLengthError(PipowerError):
    """The prompt (plus requested tokens) does not fit in the model's context."""


class BackendError(PipowerError):
    """A requested backend is not available (extension not built, no GPU...)."""


class DeviceUnavailableError(BackendError):
    """A GPU engine was asked for, but CuPy or a CUDA device is missing (the message says which)."""


class DeviceMemoryError(PipowerError, MemoryError):
    """An allocation would take device memory past the budget (the VRAM budget is a hard limit)."""


class InvalidArgumentError(PipowerError, ValueError):
    """A call argument is out of range or inconsistent (empty prompt, negative temperature...)."""
