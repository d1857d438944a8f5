"""DLPack through ctypes: read any producer's capsule, and export flashdec views as capsules.

Reading keeps the capsule alive inside the view (its destructor calls the producer's deleter
when the view dies), so no producer memory is freed while a view exists. Exporting lets every
:class:`~flashdec.TensorRef` be handed to ``torch.from_dlpack``, ``cupy.from_dlpack`` or
``jax.dlpack.from_dlpack``; that is how the torch backend reads non-torch inputs and how
flashdec-owned output buffers reach the caller's framework.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, NamedTuple

__all__ = ["Imported", "import_capsule", "export_capsule", "DL_CPU", "DL_CUDA", "DL_CUDA_HOST",
           "DL_CUDA_MANAGED", "FLAG_READ_ONLY"]

DL_CPU, DL_CUDA, DL_CUDA_HOST, DL_CUDA_MANAGED = 1, 2, 3, 13
FLAG_READ_ONLY = 1 << 0
_VERSION = (1, 1)


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_Deleter = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _Version),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _Deleter),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _Tensor),
    ]


_api = ctypes.pythonapi
_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api))
_get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", _api))
_CapsuleDestructor = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)
_new_capsule = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p,
                                 _CapsuleDestructor)(("PyCapsule_New", _api))


class Imported(NamedTuple):
    """The fields of one DLPack tensor, read out of its capsule."""

    ptr: int              # data + byte_offset
    device_type: int
    device_id: int
    dtype: tuple[int, int, int]   # (code, bits, lanes)
    shape: tuple[int, ...]
    strides: tuple[int, ...]      # in elements; row-major when the producer gave NULL
    readonly: bool
    capsule: Any                  # keep alive: its destructor frees the producer's tensor


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def import_capsule(capsule: Any) -> Imported:
    """Read a ``dltensor_versioned`` or legacy ``dltensor`` capsule without consuming it."""
    name = _get_name(capsule)
    if name == b"dltensor_versioned":
        managed = _ManagedVersioned.from_address(_get_pointer(capsule, name))
        if managed.version.major > _VERSION[0]:
            raise BufferError(f"DLPack major version {managed.version.major} is newer than "
                              f"the {_VERSION[0]}.x this flashdec reads")
        readonly = bool(managed.flags & FLAG_READ_ONLY)
    elif name == b"dltensor":
        managed = _Managed.from_address(_get_pointer(capsule, name))
        readonly = False
    else:
        raise BufferError(f"not an unconsumed DLPack capsule (capsule name {name!r})")
    t = managed.dl_tensor
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else _row_major(shape)
    return Imported((t.data or 0) + t.byte_offset, t.device.device_type, t.device.device_id,
                    (t.dtype.code, t.dtype.bits, t.dtype.lanes), shape, strides, readonly,
                    capsule)


# ---- export ---------------------------------------------------------------------------------
# Each exported struct lives in ``_live`` (with its shape/stride arrays and the owner it keeps
# alive) until the consumer calls the deleter. Capsules get no destructor: a consumer that
# rejects a capsule destroys it with its exception pending, and a ctypes callback cannot run
# then (CPython turns the pending error into SystemError). The cost is that a capsule which is
# made and never consumed keeps its owner alive; consumers that accept one always call the
# deleter.
_live: dict[int, tuple[Any, ...]] = {}
_live_lock = threading.Lock()


def _release(address: int) -> None:  # called by the consumer when it is done with the tensor
    with _live_lock:
        _live.pop(address, None)


# Consumers may call the deleter while the interpreter shuts down, after this module's globals
# are gone: the C thunk is pinned with an extra reference so its code pointer stays valid.
_deleter = _Deleter(_release)
_api.Py_IncRef(ctypes.py_object(_deleter))


def export_capsule(ptr: int, dtype: tuple[int, int], shape: tuple[int, ...],
                   strides: tuple[int, ...], device: tuple[int, int], readonly: bool,
                   owner: Any, versioned: bool) -> Any:
    """A new DLPack capsule over ``ptr``; ``owner`` stays alive until the consumer is done."""
    ndim = len(shape)
    shape_arr = (ctypes.c_int64 * max(ndim, 1))(*shape)
    strides_arr = (ctypes.c_int64 * max(ndim, 1))(*strides)
    tensor = _Tensor(ptr or None, _Device(*device), ndim, _DataType(dtype[0], dtype[1], 1),
                     ctypes.cast(shape_arr, ctypes.POINTER(ctypes.c_int64)),
                     ctypes.cast(strides_arr, ctypes.POINTER(ctypes.c_int64)), 0)
    if versioned:
        managed = _ManagedVersioned(_Version(*_VERSION), None, _deleter,
                                    FLAG_READ_ONLY if readonly else 0, tensor)
        name = b"dltensor_versioned"
    else:
        managed = _Managed(tensor, None, _deleter)
        name = b"dltensor"
    address = ctypes.addressof(managed)
    with _live_lock:
        _live[address] = (managed, shape_arr, strides_arr, owner)
    return _new_capsule(address, name, _CapsuleDestructor())
