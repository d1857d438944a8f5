"""Built-in backends, registered in auto-preference order: cuda first, then torch."""

from __future__ import annotations

from .._registry import register_backend


def _cuda():
    from .cuda import CudaBackend
    return CudaBackend()


def _torch():
    from .torch_backend import TorchBackend
    return TorchBackend()


register_backend("cuda", _cuda)
register_backend("torch", _torch)
