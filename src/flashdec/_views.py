"""Typed tensor views: pointer, dtype, shape, strides in elements, device, read-only flag, owner.

A view is what the contract checks and what a backend launches on. It is built from a torch
tensor (read through torch's own accessors: the cheap path), a NumPy array (its array
interface), any DLPack producer (CuPy, JAX, ...) or a raw pointer. Views export DLPack
themselves, so any framework can read them back.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Protocol, Sequence, Union

from . import _dlpack
from ._dtypes import DType
from ._errors import ContractError

__all__ = ["Device", "TensorRef", "TensorMut", "Tensor", "Lengths", "Scale"]


class Tensor(Protocol):
    """What flashdec reads and writes: any DLPack exporter (torch, NumPy, CuPy and JAX arrays,
    flashdec's own :class:`TensorMut`). Torch tensors are read through their own accessors,
    the rest through ``__dlpack__``; the contract (README) says which shapes and dtypes."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...

    def __dlpack_device__(self) -> Any: ...


Lengths = Union[Tensor, Sequence[int]]  # seqlens: an int32 [B] tensor, or host ints
Scale = Union[float, Tensor]            # k_scale / v_scale: one float, or a float32 [H_kv]


class Device(NamedTuple):
    """Where a tensor lives: ``Device("cpu", 0)`` or ``Device("cuda", n)``."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{self.index}"

    @classmethod
    def parse(cls, spec: "Device | str") -> "Device":
        if isinstance(spec, Device):
            return spec
        kind, _, index = str(spec).partition(":")
        return cls(kind, int(index) if index else 0)

    @property
    def dlpack(self) -> tuple[int, int]:
        return (_dlpack.DL_CPU if self.kind == "cpu" else _dlpack.DL_CUDA, self.index)


_DEVICE_FROM_DLPACK = {_dlpack.DL_CPU: "cpu", _dlpack.DL_CUDA: "cuda",
                       _dlpack.DL_CUDA_MANAGED: "cuda", _dlpack.DL_CUDA_HOST: "cpu"}


def _describe(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


class TensorRef:
    """A read-only typed view of a strided tensor.

    ``dtype`` is a :class:`DType`, or a string naming a type flashdec does not compute in (so
    the contract can say what it got). ``strides`` are in elements. ``owner`` is whatever keeps
    the memory alive (the source tensor, a DLPack capsule, or the caller's object).
    """

    __slots__ = ("ptr", "dtype", "shape", "strides", "device", "readonly", "owner")

    def __init__(self, ptr: int, dtype: DType | str, shape: Sequence[int],
                 strides: Sequence[int], device: Device, *, readonly: bool = False,
                 owner: Any = None) -> None:
        self.ptr = int(ptr)
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)
        self.device = device
        self.readonly = readonly
        self.owner = owner
        if len(self.shape) != len(self.strides):
            raise ContractError(f"shape {self.shape} and strides {self.strides} differ in rank")

    # -- factories --------------------------------------------------------------------------
    @classmethod
    def from_pointer(cls, ptr: int, dtype: DType | str, shape: Sequence[int],
                     strides: Sequence[int] | None = None, device: Device | str = "cpu", *,
                     readonly: bool = False, owner: Any = None):
        """A view of raw memory. ``strides`` in elements default to row-major.

        Caution: flashdec cannot know how long ``ptr`` stays valid; pass ``owner`` to keep
        the allocation alive as long as the view.
        """
        dtype = dtype if isinstance(dtype, DType) else DType.parse(dtype)
        shape = tuple(shape)
        if strides is None:
            strides = _dlpack._row_major(shape)
        return cls(ptr, dtype, shape, strides, Device.parse(device), readonly=readonly,
                   owner=owner)

    @classmethod
    def from_object(cls, x: Any, *, name: str = "tensor", stream: int | None = None):
        """A view of a torch tensor, NumPy array or DLPack producer.

        ``name`` is the argument name used in error messages. ``stream`` is the consumer's
        CUDA stream handed to a DLPack producer so its pending work is ordered before ours.
        """
        if isinstance(x, TensorRef):
            return cls._check_kind(x, name)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            return cls._check_kind(_from_torch(cls, x, name), name)
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(x, numpy.ndarray):
            return cls._check_kind(_from_numpy(cls, x, name), name)
        if hasattr(x, "__dlpack__"):
            return cls._check_kind(_from_dlpack(cls, x, name, stream), name)
        raise ContractError(
            f"{name} must be a tensor (torch.Tensor, numpy.ndarray or an object with "
            f"__dlpack__), got {_describe(x)}")

    @classmethod
    def _check_kind(cls, view: "TensorRef", name: str) -> "TensorRef":
        return view

    # -- geometry ---------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def _itemsize(self) -> int:
        """Bytes per element; 1 for a dtype flashdec does not know (its views are only
        checked, never read)."""
        return self.dtype.itemsize if isinstance(self.dtype, DType) else 1

    def __getitem__(self, index: int) -> "TensorRef":
        """The view of ``self[index]`` along the leading axis: same memory and owner, no copy
        (how a stacked ``[N, ...]`` tensor is handed to a backend as N parts)."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"a view is indexed by an int along its leading axis, got "
                            f"{type(index).__name__}")
        if self.ndim == 0 or not 0 <= index < self.shape[0]:
            raise IndexError(f"index {index} is out of range for shape {self.shape}")
        return type(self)(self.ptr + index * self.strides[0] * self._itemsize, self.dtype,
                          self.shape[1:], self.strides[1:], self.device,
                          readonly=self.readonly, owner=self.owner)

    def span_bytes(self) -> tuple[int, int]:
        """[first, last) byte addresses the view can touch; empty for zero elements."""
        return (self.ptr, self.ptr + extent_bytes(self.shape, self.strides, self._itemsize))

    def __repr__(self) -> str:
        dtype = self.dtype.value if isinstance(self.dtype, DType) else self.dtype
        flag = ", readonly" if self.readonly else ""
        return (f"{type(self).__name__}(ptr=0x{self.ptr:x}, dtype={dtype}, shape={self.shape}, "
                f"strides={self.strides}, device={self.device}{flag})")

    # -- DLPack export ----------------------------------------------------------------------
    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device.dlpack

    def __dlpack__(self, *, stream: Any = None, max_version: tuple[int, int] | None = None,
                   dl_device: Any = None, copy: bool | None = None) -> Any:
        """Export this view; ``stream`` is ignored because flashdec's work is already ordered
        on the stream it ran on, which the caller chose."""
        if copy:
            raise BufferError("flashdec views export without copying (copy=True asked)")
        if not isinstance(self.dtype, DType):
            raise BufferError(f"cannot export dtype {self.dtype}")
        versioned = max_version is not None and max_version[0] >= 1
        if self.readonly and not versioned:
            raise BufferError("a read-only view needs a DLPack >= 1.0 consumer")
        return _dlpack.export_capsule(self.ptr, self.dtype.dlpack, self.shape, self.strides,
                                      self.device.dlpack, self.readonly, self, versioned)


class TensorMut(TensorRef):
    """A writable typed view: building one from read-only memory raises ContractError."""

    __slots__ = ()

    @classmethod
    def _check_kind(cls, view: TensorRef, name: str) -> "TensorMut":
        if view.readonly:
            raise ContractError(
                f"{name} is read-only (its producer exported it with the DLPack READ_ONLY "
                f"flag or it is a non-writeable array); it cannot be written to")
        if type(view) is cls:
            return view
        return cls(view.ptr, view.dtype, view.shape, view.strides, view.device,
                   readonly=False, owner=view.owner)


def extent_bytes(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    """Bytes from a view's first element to one past its last (strides >= 0); 0 when empty."""
    if 0 in shape:
        return 0
    return (sum((e - 1) * s for e, s in zip(shape, strides)) + 1) * itemsize


def check_torch_tensor(x: Any, name: str) -> None:
    """Refuse a torch tensor flashdec cannot read or write as memory: not strided, a lazy view
    whose memory holds other values than it reads as (the negative or conjugate bit), tracked
    by autograd, or on a device other than CPU and CUDA. Every path that takes torch tensors
    calls this (views, append_kv)."""
    torch = sys.modules["torch"]
    if x.layout is not torch.strided:
        raise ContractError(f"{name} is a {x.layout} tensor; flashdec reads dense strided "
                            f"memory: pass {name}.to_dense()")
    if x.is_neg():
        raise ContractError(f"{name} is a torch view with the negative bit set (from "
                            f"torch._neg_view or .conj().imag): its memory holds -{name}; pass "
                            f"{name}.resolve_neg() (a copy)")
    if x.is_conj():
        raise ContractError(f"{name} is a torch view with the conjugate bit set (from .conj()): "
                            f"its memory holds the conjugate; pass {name}.resolve_conj() (a "
                            f"copy)")
    if x.requires_grad:
        raise ContractError(f"{name} requires grad; flashdec computes no gradients and its "
                            f"results carry no autograd history: pass {name}.detach() (or "
                            f"make it under torch.no_grad())")
    if x.device.type not in ("cpu", "cuda"):
        raise ContractError(f"{name} is on {x.device}; flashdec reads CPU and CUDA memory")


def _from_torch(cls, x: Any, name: str) -> TensorRef:
    """The view of a torch tensor, built where its data pointer is read (after
    :func:`check_torch_tensor`, so the refusals hold on every path)."""
    check_torch_tensor(x, name)
    dev = x.device
    try:
        ptr, strides = x.data_ptr(), x.stride()
    except RuntimeError as exc:  # tensors without storage (fake, functional, ...)
        raise ContractError(f"{name} has no memory flashdec can read: {exc}") from exc
    return cls(ptr, DType.parse(x.dtype), x.shape, strides, Device(dev.type, dev.index or 0),
               readonly=False, owner=x)


def _from_numpy(cls, x: Any, name: str) -> TensorRef:
    itemsize = x.dtype.itemsize
    strides = []
    for s in x.strides:
        if s % itemsize:
            raise ContractError(f"{name} has byte strides {x.strides} that are not a multiple "
                                f"of its item size {itemsize}")
        strides.append(s // itemsize)
    ptr = x.__array_interface__["data"][0]
    return cls(ptr, DType.parse(x.dtype), x.shape, strides, Device("cpu", 0),
               readonly=not x.flags.writeable, owner=x)


def _from_dlpack(cls, x: Any, name: str, stream: int | None) -> TensorRef:
    try:
        device_type, device_id = x.__dlpack_device__()
        kind = _DEVICE_FROM_DLPACK.get(int(device_type))
        if kind is None:
            raise ContractError(f"{name} lives on DLPack device type {int(device_type)}; "
                                f"flashdec reads CPU and CUDA memory")
        producer_stream = None if kind == "cpu" else (stream if stream is not None else -1)
        try:
            capsule = x.__dlpack__(stream=producer_stream, max_version=_dlpack._VERSION)
        except TypeError:  # a pre-1.0 producer: no max_version keyword
            capsule = x.__dlpack__(stream=producer_stream)
        got = _dlpack.import_capsule(capsule)
    except ContractError:
        raise
    except Exception as exc:  # whatever the producer raises (BufferError, RuntimeError, ...)
        raise ContractError(f"{name} could not be read through DLPack: "
                            f"{exc or type(exc).__name__}") from exc
    return cls(got.ptr, DType.from_dlpack(*got.dtype), got.shape, got.strides,
               Device(_DEVICE_FROM_DLPACK[got.device_type], got.device_id),
               readonly=got.readonly, owner=(x, capsule))
