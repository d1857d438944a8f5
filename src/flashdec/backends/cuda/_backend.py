"""The cuda backend's face to the registry: availability, what it supports, ``prepare``
(a ``Runner``), device buffers for read-only producers, and ``merge_states``."""

from __future__ import annotations

import ctypes
import math
from typing import Any, Sequence

from ..._contract import BackendOptions, DecodeArgs, DecodeProblem, MergeProblem
from ..._dtypes import DType
from ..._registry import Backend
from ..._views import Device, TensorMut, TensorRef
from . import _driver
from ._kernels import MAX_HEAD_DIM, MAX_MERGE_PARTS, THREADS, merge_kernel
from ._launch import Runner
from ._modules import load_kernel
from ._params import MergeParams

__all__ = ["CudaBackend"]


class CudaBackend(Backend):
    """NVRTC-compiled split-K FlashDecoding kernels for CUDA tensors."""

    name = "cuda"
    device_kinds = ("cuda",)

    def is_available(self) -> tuple[bool, str]:
        try:
            _driver.init()
            from . import _compiler  # noqa: F401  (NVRTC and headers must load)
            _compiler.cuda_include_dir()
        except Exception as exc:
            return False, str(exc)
        return True, ""

    def supports(self, problem: DecodeProblem) -> str | None:
        why = super().supports(problem)
        if why is None and problem.head_dim > MAX_HEAD_DIM:
            why = f"the cuda backend supports head_dim <= {MAX_HEAD_DIM}, got {problem.head_dim}"
        return why

    def prepare(self, problem: DecodeProblem, layouts: DecodeArgs,
                options: BackendOptions = BackendOptions()) -> Runner:
        """``options.num_splits`` (checked by the frontend against MAX_SPLITS, which is this
        backend's too) overrides the cost model's split count."""
        return Runner(problem, layouts, options.num_splits)

    def allocate_buffer(self, device: Device, shape: tuple[int, ...], dtype: DType,
                        like: Any) -> TensorMut:
        """A flashdec-owned device buffer exporting ``__dlpack__`` (read-only producers such
        as JAX cannot be written to; hand the result to ``jax.numpy.from_dlpack``)."""
        info = _driver.device_info(device.index)
        alloc = _driver.DeviceAllocation(info, math.prod(shape) * dtype.itemsize)
        return TensorMut.from_pointer(alloc.ptr, dtype, shape, device=device, owner=alloc)

    def supports_merge(self, problem: MergeProblem) -> str | None:
        why = super().supports_merge(problem)
        if why is None and problem.num_parts > MAX_MERGE_PARTS:
            why = (f"the cuda merge_states kernel takes at most {MAX_MERGE_PARTS} parts, got "
                   f"{problem.num_parts}")
        return why

    def merge(self, problem: MergeProblem, outputs: Sequence[TensorRef], lses: Sequence[TensorRef],
              out: TensorMut, lse_out: TensorMut, stream: int | None) -> None:
        if problem.batch * problem.num_heads == 0:
            return
        device = _driver.device_info(problem.device.index)
        p = MergeParams()
        for i, (o, lse) in enumerate(zip(outputs, lses)):
            p.o[i], p.lse[i] = o.ptr, lse.ptr
            p.o_stride[i][:] = o.strides
            p.lse_stride[i][:] = lse.strides
        p.out, p.lse_out = out.ptr, lse_out.ptr
        p.out_stride[:] = out.strides
        p.lse_out_stride[:] = lse_out.strides
        p.num_parts, p.num_heads, p.head_dim = problem.num_parts, problem.num_heads, problem.head_dim
        fn = load_kernel(merge_kernel(problem.dtype), device)
        array = _driver.params_pointer_array(p)
        _driver.launch(device, fn, (problem.batch * problem.num_heads, 1, 1), THREADS, stream or 0,
                       ctypes.addressof(array))
