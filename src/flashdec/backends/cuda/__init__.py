"""The CUDA backend: ``decode.cu`` compiled by NVRTC for the device's own arch, cached on
disk, loaded per device, launched on the caller's stream with one by-value parameter struct.

Modules: ``_kernels`` (which specialization serves a problem, its split layout: host
arithmetic only), ``_params`` (the ctypes parameter structs), ``_compiler`` (NVRTC and the
disk cache), ``_modules`` (compiled and loaded kernels), ``_driver`` (the driver calls),
``_launch`` (a prepared problem and its per-call launch), ``_backend`` (the registry's face),
``_precompile``.
"""

from __future__ import annotations

from ._backend import CudaBackend
from ._params import DecodeParams, MergeParams
from ._precompile import precompile

__all__ = ["CudaBackend", "DecodeParams", "MergeParams", "precompile"]
