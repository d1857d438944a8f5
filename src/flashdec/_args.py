"""The argument bundle of a decode call: the user's tensors as one :class:`DecodeArgs`, built
once at the entry of ``decode`` / ``plan`` / ``run`` and passed down whole; their views; and
the results (Y, LSE) flashdec allocates when the caller passes none."""

from __future__ import annotations

import sys
from typing import Any

from ._contract import ARG_NAMES, DecodeArgs, DecodeProblem, Layout, MergeProblem
from ._dlpack import _row_major
from ._dtypes import DType
from ._errors import ContractError
from ._registry import Backend
from ._streams import dlpack_stream
from ._views import Device, TensorMut, TensorRef

__all__ = ["bundle", "is_tensor", "view", "views", "new_result", "complete", "row_major"]

_OUTPUTS = (ARG_NAMES.out, ARG_NAMES.lse)


def bundle(q: Any, k: Any, v: Any, out: Any, seqlens: Any, k_scale: Any, v_scale: Any,
           lse_out: Any, block_table: Any, cache_leftpad: Any) -> DecodeArgs:
    """The call's arguments, in :class:`DecodeArgs` order (no checks: ~0.2 us)."""
    return tuple.__new__(DecodeArgs, (q, k, v, out, seqlens, k_scale, v_scale, lse_out,
                                      block_table, cache_leftpad))


def is_tensor(x: Any) -> bool:
    return isinstance(x, TensorRef) or hasattr(x, "__dlpack__")


def view(x: Any, name: str, stream: int | None, writable: bool = False) -> TensorRef | None:
    if x is None:
        return None
    return (TensorMut if writable else TensorRef).from_object(x, name=name, stream=stream)


def _host_lengths(seqlens: Any) -> Any:
    """Lengths given as a host sequence, as a NumPy int32 array (range-checked later)."""
    import numpy

    values = numpy.asarray(seqlens)
    if values.size and (values.ndim != 1 or values.dtype.kind not in "iu"):
        raise ContractError(f"seqlens must be an int32 tensor [batch] or a flat sequence of "
                            f"ints, got {type(seqlens).__name__} of {values.dtype} with shape "
                            f"{values.shape}")
    limits = numpy.iinfo(numpy.int32)
    if values.size and not limits.min <= values.min() <= values.max() <= limits.max:
        raise ContractError(f"seqlens values must fit int32, got values from {values.min()} to "
                            f"{values.max()}")
    return values.astype(numpy.int32).reshape(-1)


def views(given: DecodeArgs, stream: int | None) -> tuple[DecodeArgs, dict[str, Any]]:
    """Views of every tensor argument, in argument order (so the first bad one is named), and
    the float scales (None where absent or given as a tensor): the one place that decides
    whether a scale is a float or a tensor."""
    dl_stream = dlpack_stream(stream)
    if given.seqlens is not None and not is_tensor(given.seqlens):
        given = given._replace(seqlens=_host_lengths(given.seqlens))
    scalars = {}
    for name in ("k_scale", "v_scale"):
        value = getattr(given, name)
        if value is not None and not is_tensor(value):
            scalars[name] = value
            given = given._replace(**{name: None})
        else:
            scalars[name] = None
    made = [TensorRef.from_object(x, name=name, stream=dl_stream)
            for x, name in zip(given[:3], ARG_NAMES[:3])]
    made += [view(x, name, dl_stream, writable=name in _OUTPUTS)
             for x, name in zip(given[3:], ARG_NAMES[3:])]
    return DecodeArgs(*made), scalars


def new_result(backend: Backend, problem: DecodeProblem | MergeProblem, like: Any,
               lse: bool) -> Any:
    """Y (or LSE) the caller left to flashdec: a tensor like ``like`` for torch and NumPy,
    else the backend's buffer. The one place results are allocated."""
    shape = problem.lse_shape if lse else problem.out_shape
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(like, torch.Tensor):
        return torch.empty(shape, dtype=torch.float32 if lse else like.dtype, device=like.device)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(like, numpy.ndarray):
        return numpy.empty(shape, dtype=numpy.float32 if lse else like.dtype)
    return (backend.allocate_lse if lse else backend.allocate_output)(problem, like)


def complete(backend: Backend, problem: DecodeProblem, args: DecodeArgs, given: DecodeArgs,
             stream: int | None) -> tuple[DecodeArgs, Any]:
    """Allocate the Y and LSE the caller did not pass; return the completed views and what
    the call returns (Y, or (Y, LSE))."""
    dl_stream = dlpack_stream(stream)
    out, lse_out = given.out, given.lse
    if out is None:
        out = new_result(backend, problem, given.q, lse=False)
        args = args._replace(out=TensorMut.from_object(out, name="out", stream=dl_stream))
    if problem.return_lse and lse_out is None:
        lse_out = new_result(backend, problem, given.q, lse=True)
        args = args._replace(lse=TensorMut.from_object(lse_out, name="lse_out",
                                                       stream=dl_stream))
    return args, ((out, lse_out) if problem.return_lse else out)


def row_major(shape: tuple[int, ...], dtype: DType, device: Device) -> Layout:
    """The layout of a result flashdec allocates."""
    return Layout((shape, _row_major(shape), dtype, device))
