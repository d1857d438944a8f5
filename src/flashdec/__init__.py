"""flashdec: FlashDecoding attention for one query token over a KV cache, with GQA.

``Y[b, h] = softmax(scale * Q[b, h] . K[b, h // group]^T) . V[b, h // group]``

The whole public API is listed here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._api import DecodePlan, decode, plan
from ._contract import DecodeProblem
from ._dtypes import DType
from ._errors import (BackendUnavailableError, CompilationError, ContractError, CudaError,
                      FlashDecError, UnsupportedError)
from ._registry import Backend, available_backends, get_backend, register_backend
from ._views import Device, TensorMut, TensorRef
from . import backends as _backends  # registers the built-in backends

__all__ = [
    "__version__",
    "decode",
    "plan",
    "DecodePlan",
    "DecodeProblem",
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
