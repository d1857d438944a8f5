"""The CUDA backend: ``decode.cu`` compiled by NVRTC for the device's own arch, cached on
disk, loaded per device, launched on the caller's stream with one by-value parameter struct.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from typing import Any, Sequence

from ..._contract import DecodeProblem, Layout
from ..._dtypes import DType
from ..._errors import ContractError
from ..._registry import Backend
from ..._views import TensorMut, TensorRef
from . import _driver
from ._kernels import (MAX_HEAD_DIM, MAX_SPLITS, THREADS, VECTOR_BYTES, KernelSpec,
                       choose_kernel, group_tile_for, kernels_for, source, split_layout,
                       workspace_layout)

__all__ = ["CudaBackend", "precompile"]


class DecodeParams(ctypes.Structure):
    """Mirror of ``flashdec::DecodeParams`` in decode.cu (same order, C layout)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("partial_o", ctypes.c_void_p),
        ("partial_ml", ctypes.c_void_p), ("arrivals", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 4),
        ("v_stride", ctypes.c_int64 * 4), ("out_stride", ctypes.c_int64 * 3),
        ("kv_len", ctypes.c_int64), ("split_rows", ctypes.c_int64),
        ("head_dim", ctypes.c_int32), ("group_size", ctypes.c_int32),
        ("num_group_tiles", ctypes.c_int32), ("num_splits", ctypes.c_int32),
        ("scale_log2", ctypes.c_float),
    ]


_LOG2E = 1.4426950408889634

# compiled modules by (spec, arch); loaded functions by (spec, device index)
_compiled: dict[tuple[KernelSpec, str], Any] = {}
_functions: dict[tuple[KernelSpec, int], _driver.Function] = {}
_kernels_lock = threading.Lock()


def _compile(spec: KernelSpec, arch: str):
    from ._compiler import compile_cubin

    key = (spec, arch)
    found = _compiled.get(key)
    if found is None:
        found = compile_cubin(source(), (spec.name_expression,), arch, source_name="decode.cu")
        _compiled[key] = found
    return found


def _function(spec: KernelSpec, device: _driver.DeviceInfo) -> _driver.Function:
    key = (spec, device.index)
    found = _functions.get(key)
    if found is None:
        with _kernels_lock:
            found = _functions.get(key)
            if found is None:
                module = _compile(spec, device.arch)
                found = _driver.load_function(device, module.cubin,
                                              module.symbols[spec.name_expression],
                                              spec.name_expression)
                _functions[key] = found
    return found


def _vector_ok(layout: Layout, vec: int) -> bool:
    """16-byte loads need unit innermost stride and every other stride a multiple of vec."""
    strides = layout[1]
    return strides[-1] == 1 and all(s % vec == 0 for s in strides[:-1])


class _Runner:
    """A prepared problem: kernel(s), split layout, workspace, and the packed params."""

    def __init__(self, problem: DecodeProblem, layouts: Sequence[Layout],
                 num_splits: int | None) -> None:
        self.problem = problem
        self.device = _driver.device_info(problem.device.index)
        vec = VECTOR_BYTES // problem.dtype.itemsize
        k_layout, v_layout = layouts[1], layouts[2]
        self.vector_strides = (problem.head_dim % vec == 0 and _vector_ok(k_layout, vec)
                               and _vector_ok(v_layout, vec))
        self.fast_spec = choose_kernel(problem, fast=True) if self.vector_strides else None
        self.slow_spec = choose_kernel(problem, fast=False)
        spec = self.fast_spec or self.slow_spec
        self.split = split_layout(problem, spec, self.device.num_sms, num_splits)
        # Both specs share a group tile, so one split layout and workspace serve either.
        sizes = workspace_layout(problem, spec, self.split)
        self.workspace_bytes = sum(sizes)
        self._workspace, base = self._allocate(self.workspace_bytes)
        self._arrivals_count = sizes[2] // 4
        self._arrivals_ready = False

        p = DecodeParams()
        p.partial_o = base or None
        p.partial_ml = (base + sizes[0]) if base else None
        p.arrivals = (base + sizes[0] + sizes[1]) if base else None
        q_l, _, _, out_l = layouts
        p.q_stride[:] = q_l[1]
        p.k_stride[:] = k_layout[1]
        p.v_stride[:] = v_layout[1]
        p.out_stride[:] = out_l[1]
        p.kv_len = problem.kv_len
        p.split_rows = self.split.split_rows
        p.head_dim = problem.head_dim
        p.group_size = problem.group_size
        p.num_group_tiles = self.split.num_group_tiles
        p.num_splits = self.split.num_splits
        p.scale_log2 = problem.scale * _LOG2E
        self.params = p
        self._params_array = _driver.params_pointer_array(p)
        self.grid = (self.split.num_splits, problem.num_kv_heads * self.split.num_group_tiles,
                     problem.batch)
        self.fast_fn = _function(self.fast_spec, self.device) if self.fast_spec else None
        self.slow_fn = None if self.fast_spec else _function(self.slow_spec, self.device)

    def _allocate(self, nbytes: int):
        if not nbytes:
            return None, 0
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            buf = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.device.index}")
            return buf, buf.data_ptr()
        buf = _driver.DeviceAllocation(self.device, nbytes)
        return buf, buf.ptr

    def __call__(self, q: TensorRef, k: TensorRef, v: TensorRef, out: TensorMut,
                 stream: int | None) -> None:
        if self.problem.batch == 0:
            return
        stream = stream or 0
        fn = self.fast_fn
        if fn is None or (k.ptr | v.ptr) % VECTOR_BYTES:
            fn = self.slow_fn
            if fn is None:  # a misaligned pointer under a plan made for aligned ones
                fn = self.slow_fn = _function(self.slow_spec, self.device)
        if not self._arrivals_ready and self._arrivals_count:
            _driver.memset32_async(self.device, self.params.arrivals, 0, self._arrivals_count,
                                   stream)
            self._arrivals_ready = True
        p = self.params
        p.q, p.k, p.v, p.out = q.ptr, k.ptr, v.ptr, out.ptr
        _driver.launch(self.device, fn, self.grid, THREADS, stream,
                       ctypes.addressof(self._params_array))


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

    def prepare(self, problem: DecodeProblem, layouts: Sequence[Layout] = (),
                num_splits: int | None = None, **options: Any) -> _Runner:
        if options:
            raise TypeError(f"unknown cuda backend options: {', '.join(options)}")
        if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                       or not 1 <= num_splits <= MAX_SPLITS):
            raise ContractError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
        return _Runner(problem, layouts, num_splits)

    def allocate_output(self, problem: DecodeProblem, like: Any) -> TensorMut:
        """A flashdec-owned device buffer exporting ``__dlpack__`` (read-only producers such
        as JAX cannot be written to; hand the result to ``jax.numpy.from_dlpack``)."""
        device = _driver.device_info(problem.device.index)
        shape = (problem.batch, problem.num_heads, problem.head_dim)
        alloc = _driver.DeviceAllocation(device, math.prod(shape) * problem.dtype.itemsize)
        return TensorMut.from_pointer(alloc.ptr, problem.dtype, shape, device=problem.device,
                                      owner=alloc)


def precompile(dtypes: Sequence[str | DType] = ("float16", "bfloat16", "float32"),
               head_dims: Sequence[int] = (64, 128, 256), group_sizes: Sequence[int] = (1, 2, 4, 8),
               arch: str | None = None) -> int:
    """Compile ahead of time the kernels these problems select, into the disk cache.

    With ``arch`` (e.g. ``"sm_90"``) no GPU is needed; without it, device 0's arch is used.
    Returns the number of kernels compiled or found in the cache.
    """
    if arch is None:
        arch = _driver.device_info(0).arch
    specs = set()
    for dtype in dtypes:
        dt = dtype if isinstance(dtype, DType) else DType(str(dtype).removeprefix("torch."))
        for d in head_dims:
            if not 1 <= d <= MAX_HEAD_DIM:
                raise ContractError(f"head_dims: {d} is outside 1..{MAX_HEAD_DIM}")
            for g in group_sizes:
                specs |= kernels_for(dt, d, group_tile_for(g))
    for spec in specs:
        _compile(spec, arch)
    return len(specs)
