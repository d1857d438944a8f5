"""flashdec: FlashDecoding attention for one query token over a KV cache, with GQA.

``Y[b, h] = softmax(scale * Q[b, h] . K[b, h // group]^T) . V[b, h // group]``, with the
serving features inference engines need: per-sequence lengths, LSE output and
``merge_states``, logit softcap, sliding window, fp8 KV cache.

The whole public API is listed here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._api import DecodePlan, decode, merge_states, plan
from ._contract import DecodeArgs, DecodeProblem, MergeProblem
from ._dtypes import DType
from ._errors import (BackendUnavailableError, CompilationError, ContractError, CudaError,
                      FlashDecError, UnsupportedError)
from ._registry import Backend, available_backends, get_backend, register_backend
from ._views import Device, TensorMut, TensorRef
from . import backends as _backends  # registers the built-in backends


def precompile(*args, **kwargs) -> int:
    """Compile the cuda backend's kernels into the disk cache ahead of time; see
    :func:`flashdec.backends.cuda.precompile` (``dtypes``, ``head_dims``, ``group_sizes``,
    ``kv_dtypes``, ``arch``). Needs cuda-python and NVRTC, not a GPU when ``arch`` is given."""
    try:
        from .backends.cuda import precompile as cuda_precompile
    except ImportError as exc:
        raise BackendUnavailableError(f"precompile needs the cuda backend: {exc}; pip install "
                                      f"'flashdec[cuda]'") from exc
    return cuda_precompile(*args, **kwargs)


__all__ = [
    "__version__",
    "decode",
    "precompile",
    "plan",
    "DecodePlan",
    "merge_states",
    "DecodeProblem",
    "DecodeArgs",
    "MergeProblem",
    "DType",
    "Device",
    "TensorRef",
    "TensorMut",
    "available_backends",
    "get_backend",
    "register_backend",
    "Backend",
    "FlashDecError",
    "ContractError",
    "UnsupportedError",
    "BackendUnavailableError",
    "CompilationError",
    "CudaError",
]
