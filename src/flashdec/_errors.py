"""The error types flashdec raises. Every one derives from :class:`FlashDecError`."""

from __future__ import annotations

__all__ = [
    "FlashDecError",
    "ContractError",
    "UnsupportedError",
    "BackendUnavailableError",
    "CompilationError",
    "CudaError",
    "CacheError",
]


class FlashDecError(Exception):
    """Base class of every error flashdec raises on purpose."""


class ContractError(FlashDecError, ValueError):
    """An argument breaks the decode contract (shape, rank, stride, dtype, device, aliasing).

    Raised before any work is launched; the message names the argument, what was
    expected and what was given.
    """


class UnsupportedError(FlashDecError):
    """The chosen backend cannot run this (valid) problem; the message says which can."""


class BackendUnavailableError(FlashDecError):
    """A backend cannot load on this machine (no GPU, no driver, no NVRTC...)."""


class CompilationError(FlashDecError):
    """NVRTC rejected a kernel source; ``log`` holds the compiler's log."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n--- NVRTC log ---\n{log}" if log else message)
        self.log = log


class CudaError(FlashDecError):
    """A CUDA driver call failed; ``result`` is the CUresult name."""

    def __init__(self, message: str, result: str = "") -> None:
        super().__init__(message)
        self.result = result


class CacheError(FlashDecError):
    """The kernel cache cannot be written (``precompile``, whose whole point is the cache);
    the message names the directory and the operating system's reason."""
