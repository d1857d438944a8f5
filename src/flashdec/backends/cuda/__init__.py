"""The CUDA backend (NVRTC-compiled kernels launched through cuda-python)."""

from __future__ import annotations

from ..._registry import Backend

__all__ = ["CudaBackend"]


class CudaBackend(Backend):
    name = "cuda"
    device_kinds = ("cuda",)

    def is_available(self) -> tuple[bool, str]:
        return False, "not built yet"
