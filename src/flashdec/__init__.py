"""flashdec: FlashDecoding attention for one query token over a KV cache, with GQA.

``Y[b, h] = softmax(scale * Q[b, h] . K[b, h // group]^T) . V[b, h // group]``, with the
serving features inference engines need: per-sequence lengths, LSE output and
``merge_states``, logit softcap, sliding window, fp8 KV cache.

The whole public API is listed here.
"""

from __future__ import annotations

__version__ = "0.1.0"

import sys as _sys
from typing import Sequence

from ._api import BoundDecode, DecodePlan, decode, merge_states, plan
from ._append import append_kv
from ._contract import BackendOptions, DecodeArgs, DecodeProblem, MergeProblem
from ._dtypes import DType
from ._errors import (BackendUnavailableError, CacheError, CompilationError, ContractError,
                      CudaError, FlashDecError, UnsupportedError)
from ._registry import Backend, available_backends, get_backend, register_backend
from ._views import Device, Tensor, TensorMut, TensorRef
from .paging import block_table_from_page_list
from . import backends as _backends  # registers the built-in backends

if "torch" in _sys.modules:  # flashdec::decode, for torch.compile (else on first compile)
    try:
        from . import _torch_op  # noqa: F401
    except (ImportError, AttributeError):  # a torch without torch.library.custom_op (< 2.4)
        pass


def precompile(dtypes: Sequence[str | DType] = ("float16", "bfloat16", "float32"),
               head_dims: Sequence[int] = (64, 128, 256),
               group_sizes: Sequence[int] = (1, 2, 4, 8),
               kv_dtypes: Sequence[str | DType] | None = None, arch: str | None = None, *,
               progress: bool = False) -> int:
    """Compile the cuda backend's kernels into the disk cache ahead of time, so serving never
    waits on a first compile (about 1 s per kernel).

    Every kernel a decode of each (dtype, kv_dtype, head_dim, group_size) can select (any
    layout), the split-combine kernels and the ``merge_states`` kernel of each dtype. Every
    argument is checked before anything compiles. Needs cuda-python and NVRTC; a GPU only
    when ``arch`` is None.

    Parameters
    ----------
    dtypes : sequence of float16, bfloat16, float32
        Q and Y dtypes (names, :class:`DType`, torch or NumPy dtypes).
    head_dims : sequence of int in 1..256
    group_sizes : sequence of int >= 1
        Query heads per KV head (1 = MHA).
    kv_dtypes : sequence of dtypes, optional
        K/V dtypes; default each dtype itself. ``["float8_e4m3fn"]`` for an fp8 cache (fp8
        pairs with float16 and bfloat16 Q only; each kv dtype must pair with one of dtypes).
    arch : str, optional
        ``"sm_90"``, ``"sm_90a"``, ``"sm_100"``...: sm_80 or newer, one NVRTC supports. Default
        device 0's.
    progress : bool
        One line per kernel on stderr.

    Returns
    -------
    int
        Kernels now in the cache (compiled, or found there).

    Raises
    ------
    ContractError
        A bad argument (nothing was compiled).
    CacheError
        The cache directory (``FLASHDEC_CACHE_DIR``) cannot be written.
    BackendUnavailableError, CompilationError
        No cuda-python / NVRTC (or no GPU with ``arch=None``); NVRTC rejected a kernel.
    """
    try:
        from .backends.cuda import precompile as cuda_precompile
    except ImportError as exc:
        raise BackendUnavailableError(f"precompile needs the cuda backend: {exc}; pip install "
                                      f"'flashdec[cuda]'") from exc
    return cuda_precompile(dtypes=dtypes, head_dims=head_dims, group_sizes=group_sizes,
                           kv_dtypes=kv_dtypes, arch=arch, progress=progress)


__all__ = [
    "__version__",
    "decode",
    "precompile",
    "plan",
    "DecodePlan",
    "BoundDecode",
    "merge_states",
    "append_kv",
    "block_table_from_page_list",
    "DecodeProblem",
    "DecodeArgs",
    "BackendOptions",
    "MergeProblem",
    "DType",
    "Device",
    "TensorRef",
    "TensorMut",
    "Tensor",
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
    "CacheError",
]
