"""A decode problem prepared for the GPU: its kernel, split layout, workspace and packed
parameter struct (``Launch``), and the runner a plan calls every token (``Runner``)."""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any, Callable

from ..._contract import DecodeArgs, DecodeProblem, Layout
from ..._views import TensorRef
from . import _driver
from ._kernels import (DEFAULT_BANDWIDTH, SUSTAINED_DRAM_FRACTION, THREADS, VECTOR_BYTES,
                       KernelSpec, MmaSpec, choose_kernels, combine_grid, combine_kernel,
                       split_layout, workspace_layout)
from ._modules import load_kernel
from ._params import LOG2E, DecodeParams

__all__ = ["Runner", "Launch"]


def _vector_ok(layout: Layout) -> bool:
    """16-byte row loads need unit innermost stride and every other stride a whole number of
    16-byte units."""
    strides, itemsize = layout[1], layout[2].itemsize
    return strides[-1] == 1 and all(s * itemsize % VECTOR_BYTES == 0 for s in strides[:-1])


def _rows_are_chunks(layout: Layout) -> bool:
    """Every row of the last axis is whole 16-byte chunks at 16-byte strides (given a 16-byte
    aligned base pointer, which the kernel checks): Q's tile loads by cp.async."""
    return _vector_ok(layout) and layout[0][-1] * layout[2].itemsize % VECTOR_BYTES == 0


def _device_buffer(device: _driver.DeviceInfo, nbytes: int) -> tuple[Any, int]:
    """(owner, pointer) of ``nbytes`` of device memory: torch's caching allocator when torch
    is loaded, else cuMemAlloc."""
    if not nbytes:
        return None, 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        buf = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device.index}")
        return buf, buf.data_ptr()
    buf = _driver.DeviceAllocation(device, nbytes)
    return buf, buf.ptr


class Launch:
    """One kernel with its split layout, workspace and packed parameter struct, and how its
    splits merge (in the kernel's last CTA, or in the combine kernel launched next)."""

    def __init__(self, runner: "Runner", spec: KernelSpec, num_splits: int | None) -> None:
        problem, device = runner.problem, runner.device
        self.spec = spec
        self.split = split_layout(problem, spec, device.num_sms, num_splits,
                                  bandwidth=runner.bandwidth)
        sizes = workspace_layout(problem, spec, self.split)
        self.workspace_bytes = sum(sizes)
        self._workspace, base = _device_buffer(device, self.workspace_bytes)
        self.arrivals_count = sizes[2] // 4
        self.arrivals_ready = False
        p = self.params = DecodeParams()
        ctypes.memmove(ctypes.addressof(p), ctypes.addressof(runner.base_params),
                       ctypes.sizeof(p))  # the fields every launch of this problem shares
        if base:
            p.partial_o, p.partial_ml, p.arrivals, p.slot_info = (
                base + sum(sizes[:i]) if sizes[i] else 0 for i in range(4))
        split = self.split
        p.split_rows = split.split_rows
        p.num_group_tiles = split.num_group_tiles
        p.num_splits = split.num_splits
        p.group_tile = spec.group_tile
        p.combine = int(split.combine)
        p.batch, p.num_kv_heads = problem.batch, problem.num_kv_heads
        if split.by_length:
            p.target_splits, p.few_splits = split.target_splits, split.few_splits
            p.min_chunk, p.part_capacity = split.min_rows, split.part_capacity
        self.params_array = _driver.params_pointer_array(p)
        self.params_address = ctypes.addressof(self.params_array)
        if split.by_length:  # CTAs enumerate the whole batch's splits (decode.cu's schedule())
            grid = (split.grid_splits * problem.num_kv_heads * split.num_group_tiles, 1, 1)
        else:
            grid = (split.num_splits * split.num_group_tiles, problem.num_kv_heads, problem.batch)
        fn = load_kernel(spec.name_expression, device, spec.smem_bytes)
        self.kernel = _driver.LaunchEx(device, fn, grid, THREADS)
        self.combine = None  # the split merge as a launch of its own (split.combine)
        if self.split.combine:
            self.combine = _driver.LaunchEx(
                device, load_kernel(combine_kernel(problem.dtype, problem.head_dim), device),
                combine_grid(problem, spec, self.split), THREADS, dependent=True)

    def issue(self, stream: int, params_address: int) -> None:
        """Launch the kernel (and the combine kernel after it) with the parameter struct
        whose ``void*[1]`` is at ``params_address``."""
        self.kernel.run(stream, params_address)
        if self.combine is not None:
            self.combine.run(stream, params_address)


def _point(p: DecodeParams, ptrs: DecodeArgs, seqlens: int | None) -> None:
    """Write a call's data pointers into a parameter struct."""
    p.q, p.k, p.v, p.out = ptrs.q, ptrs.k, ptrs.v, ptrs.out
    p.lse, p.k_scale, p.v_scale, p.seqlens = ptrs.lse, ptrs.k_scale, ptrs.v_scale, seqlens
    p.block_table, p.leftpad = ptrs.block_table, ptrs.cache_leftpad


def _set_strides(array: Any, layout: Layout | None) -> None:
    if layout is not None:
        array[:] = layout[1]


class Runner:
    """A prepared problem: the kernel for aligned pointers (and, made on first need, the
    element-wise one for misaligned pointers), each with its split layout and workspace."""

    def __init__(self, problem: DecodeProblem, layouts: DecodeArgs, num_splits: int | None) -> None:
        self.problem = problem
        self.device = _driver.device_info(problem.device.index)
        self.num_splits = num_splits
        peak = self.device.dram_bytes_per_s
        self.bandwidth = SUSTAINED_DRAM_FRACTION * peak if peak else DEFAULT_BANDWIDTH
        p = self.base_params = DecodeParams()
        for name in ("q", "k", "v", "out", "lse"):
            _set_strides(getattr(p, f"{name}_stride"), getattr(layouts, name))
        for name in ("seqlens", "k_scale", "v_scale"):
            layout = getattr(layouts, name)
            if layout is not None:
                setattr(p, f"{name}_stride", layout[1][0])
        if layouts.cache_leftpad is not None:
            p.leftpad_stride = layouts.cache_leftpad[1][0]
        if problem.paged:
            p.block_table_stride[:] = layouts.block_table[1]
            p.page_size, p.num_pages = problem.page_size, problem.num_pages
            size = problem.page_size
            p.page_shift = size.bit_length() - 1 if size & (size - 1) == 0 else -1
        p.q_vector = int(_rows_are_chunks(layouts.q))
        p.kv_len = problem.kv_len
        p.head_dim = problem.head_dim
        p.group_size = problem.group_size
        window = problem.window_left
        p.window_left = -1 if window is None or window >= problem.kv_len else window
        if problem.softcap is None:
            p.qk_scale, p.softcap_log2 = problem.scale * LOG2E, 0.0
        else:
            p.qk_scale, p.softcap_log2 = problem.scale / problem.softcap, problem.softcap * LOG2E
        p.k_scale_value = 1.0 if problem.k_scale is None else problem.k_scale
        p.v_scale_value = 1.0 if problem.v_scale is None else problem.v_scale

        seqlens = layouts.seqlens
        self.host_seqlens = seqlens is not None and seqlens[3].kind == "cpu"
        if self.host_seqlens:  # copied to this plan's device buffer on every run
            self._seqlens_buf, self.seqlens_ptr = _device_buffer(self.device, 4 * max(problem.batch, 1))
            p.seqlens_stride = 1

        vector = _vector_ok(layouts.k) and _vector_ok(layouts.v)
        fast, self.slow_spec = choose_kernels(problem, vector)
        self.fast = Launch(self, fast, num_splits)
        self.slow = self.fast if fast == self.slow_spec else None

    @property
    def workspace_bytes(self) -> int:
        return self.fast.workspace_bytes + (self.slow.workspace_bytes if self.slow not in
                                            (None, self.fast) else 0)

    def describe(self) -> dict[str, Any]:
        """The launch for 16-byte aligned K/V pointers (a misaligned view takes the
        element-wise kernel, ``fallback_kernel``, with its own layout)."""
        launch, split = self.fast, self.fast.split
        merge = ("none" if split.num_splits == 1 else "combine kernel" if split.combine
                 else "last CTA")
        return {"kernel": launch.spec.name_expression.removeprefix("flashdec::"),
                "tensor_cores": isinstance(launch.spec, MmaSpec),
                "splits": ("by length: pieces of ~{} rows, {}..{} per kv head{}, <= {} a sequence"
                           .format(split.split_rows, split.few_splits, split.target_splits,
                                   " and tile" if split.num_group_tiles > 1 else "",
                                   split.num_splits)
                           if split.by_length else "by capacity"),
                "num_splits": split.num_splits, "split_rows": split.split_rows,
                "merge": merge, "q_tile": "cp.async" if launch.params.q_vector else "loads",
                "workspace_bytes": self.workspace_bytes,
                "fallback_kernel": self.slow_spec.name_expression.removeprefix("flashdec::")}

    def __call__(self, args: DecodeArgs, stream: int | None) -> None:
        host = self.host_seqlens and args.seqlens is not None
        if host:
            self._upload_seqlens(args.seqlens, stream or 0)
        self.run_pointers(self.pointers_of(args), stream, host_seqlens=host)

    @staticmethod
    def pointers_of(args: DecodeArgs) -> DecodeArgs:
        """The data pointers of views, by name (None where absent)."""
        return DecodeArgs(*(None if x is None else x.ptr for x in args))

    def _launch_for(self, ptrs: DecodeArgs, stream: int) -> Launch:
        """The launch for these pointers (the element-wise kernel for a misaligned K/V view
        under an aligned plan, made on first need), its arrival counters zeroed on first use
        (the kernel leaves them zero)."""
        launch = self.fast
        if (ptrs.k | ptrs.v) % VECTOR_BYTES:
            launch = self.slow
            if launch is None:
                launch = self.slow = Launch(self, self.slow_spec, self.num_splits)
        if not launch.arrivals_ready and launch.arrivals_count:
            _driver.memset32_async(self.device, launch.params.arrivals, 0,
                                   launch.arrivals_count, stream)
            launch.arrivals_ready = True
        return launch

    def run_pointers(self, ptrs: DecodeArgs, stream: int | None,
                     host_seqlens: bool = False) -> None:
        """Launch on the data pointers of tensors of the planned layouts: the whole per-call
        host work of a plan."""
        if self.problem.batch == 0:
            return
        stream = stream or 0
        launch = self._launch_for(ptrs, stream)
        _point(launch.params, ptrs, self.seqlens_ptr if host_seqlens else ptrs.seqlens)
        launch.issue(stream, launch.params_address)

    def bind(self, args: DecodeArgs, stream: int | None) -> Callable[[], None]:
        """A call that re-runs this problem on ``args`` on ``stream``: the replay of a CUDA
        graph of the launches, captured now (their parameters copied into it), or, with host
        seqlens (uploaded per call), a plain run."""
        if self.problem.batch == 0:
            return lambda: None
        if self.host_seqlens and args.seqlens is not None:
            return functools.partial(self, args, stream)
        stream = stream or 0
        ptrs = self.pointers_of(args)
        launch = self._launch_for(ptrs, stream)
        params = DecodeParams()
        ctypes.memmove(ctypes.addressof(params), ctypes.addressof(launch.params),
                       ctypes.sizeof(params))
        _point(params, ptrs, ptrs.seqlens)
        array = _driver.params_pointer_array(params)
        graph = _driver.Graph(self.device,
                              lambda capture: launch.issue(capture, ctypes.addressof(array)))
        return graph.replay_on(stream)

    def _upload_seqlens(self, seqlens: TensorRef, stream: int) -> None:
        import numpy

        # read as check_host_seqlens reads it (any stride, stride 0 included)
        values = numpy.ascontiguousarray(numpy.from_dlpack(seqlens), dtype=numpy.int32)
        self._host_copy = values  # alive until the copy has run (pageable: copied at once)
        _driver.copy_to_device_async(self.device, self.seqlens_ptr, values.ctypes.data,
                                     values.nbytes, stream)
