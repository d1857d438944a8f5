"""The CUDA backend: ``decode.cu`` compiled by NVRTC for the device's own arch, cached on
disk, loaded per device, launched on the caller's stream with one by-value parameter struct.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from typing import Any, Sequence

from ..._contract import BackendOptions, DecodeArgs, DecodeProblem, Layout, MergeProblem
from ..._dtypes import DType
from ..._errors import ContractError
from ..._registry import Backend
from ..._views import Device, TensorMut, TensorRef
from . import _driver
from ._kernels import (DEFAULT_BANDWIDTH, MAX_HEAD_DIM, MAX_MERGE_PARTS,
                       SUSTAINED_DRAM_FRACTION, THREADS, VECTOR_BYTES, KernelSpec, MmaSpec,
                       choose_kernels, combine_grid, combine_kernel, kernels_for, kv_dtypes_for,
                       merge_kernel, source, split_layout, workspace_layout)

__all__ = ["CudaBackend", "precompile"]

_LOG2E = 1.4426950408889634


class DecodeParams(ctypes.Structure):
    """Mirror of ``flashdec::DecodeParams`` in decode.cu (same order, C layout)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("seqlens", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
        ("partial_o", ctypes.c_void_p), ("partial_ml", ctypes.c_void_p),
        ("arrivals", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 4),
        ("v_stride", ctypes.c_int64 * 4), ("out_stride", ctypes.c_int64 * 3),
        ("lse_stride", ctypes.c_int64 * 2), ("seqlens_stride", ctypes.c_int64),
        ("k_scale_stride", ctypes.c_int64), ("v_scale_stride", ctypes.c_int64),
        ("kv_len", ctypes.c_int64), ("split_rows", ctypes.c_int64),
        ("window_left", ctypes.c_int64),
        ("head_dim", ctypes.c_int32), ("group_size", ctypes.c_int32),
        ("num_group_tiles", ctypes.c_int32), ("num_splits", ctypes.c_int32),
        ("group_tile", ctypes.c_int32), ("combine", ctypes.c_int32),
        ("q_vector", ctypes.c_int32),
        ("qk_scale", ctypes.c_float), ("softcap_log2", ctypes.c_float),
        ("k_scale_value", ctypes.c_float), ("v_scale_value", ctypes.c_float),
    ]


class MergeParams(ctypes.Structure):
    """Mirror of ``flashdec::MergeParams`` in decode.cu."""

    _fields_ = [
        ("o", ctypes.c_void_p * MAX_MERGE_PARTS), ("lse", ctypes.c_void_p * MAX_MERGE_PARTS),
        ("o_stride", (ctypes.c_int64 * 3) * MAX_MERGE_PARTS),
        ("lse_stride", (ctypes.c_int64 * 2) * MAX_MERGE_PARTS),
        ("out", ctypes.c_void_p), ("lse_out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64 * 3), ("lse_out_stride", ctypes.c_int64 * 2),
        ("num_parts", ctypes.c_int32), ("num_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
    ]


# compiled modules by (name expression, arch); loaded functions by (name expression, device)
_compiled: dict[tuple[str, str], Any] = {}
_functions: dict[tuple[str, int], _driver.Function] = {}
_kernels_lock = threading.Lock()


def _compile(name_expression: str, arch: str):
    from ._compiler import compile_cubin

    key = (name_expression, arch)
    found = _compiled.get(key)
    if found is None:
        found = compile_cubin(source(), (name_expression,), arch, source_name="decode.cu")
        _compiled[key] = found
    return found


def _function(name_expression: str, device: _driver.DeviceInfo,
              dynamic_smem: int = 0) -> _driver.Function:
    key = (name_expression, device.index)
    found = _functions.get(key)
    if found is None:
        with _kernels_lock:
            found = _functions.get(key)
            if found is None:
                module = _compile(name_expression, device.arch)
                found = _driver.load_function(device, module.cubin,
                                              module.symbols[name_expression], name_expression,
                                              dynamic_smem)
                _functions[key] = found
    return found


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


class _Launch:
    """One kernel with its split layout, workspace and packed parameter struct, and how its
    splits merge (in the kernel's last CTA, or in the combine kernel launched next)."""

    def __init__(self, runner: "_Runner", spec: KernelSpec, num_splits: int | None) -> None:
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
            p.partial_o, p.partial_ml, p.arrivals = base, base + sizes[0], base + sizes[0] + sizes[1]
        p.split_rows = self.split.split_rows
        p.num_group_tiles = self.split.num_group_tiles
        p.num_splits = self.split.num_splits
        p.group_tile = spec.group_tile
        p.combine = int(self.split.combine)
        self.params_array = _driver.params_pointer_array(p)
        self.params_address = ctypes.addressof(self.params_array)
        grid = (self.split.num_splits * self.split.num_group_tiles, problem.num_kv_heads,
                problem.batch)
        fn = _function(spec.name_expression, device, spec.smem_bytes)
        self.kernel = _driver.LaunchEx(device, fn, grid, THREADS)
        self.combine = None  # the split merge as a launch of its own (split.combine)
        if self.split.combine:
            self.combine = _driver.LaunchEx(
                device, _function(combine_kernel(problem.dtype, problem.head_dim), device),
                combine_grid(problem, spec, self.split), THREADS, dependent=True)


def _set_strides(array: Any, layout: Layout | None) -> None:
    if layout is not None:
        array[:] = layout[1]


class _Runner:
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
        p.q_vector = int(_rows_are_chunks(layouts.q))
        p.kv_len = problem.kv_len
        p.head_dim = problem.head_dim
        p.group_size = problem.group_size
        window = problem.window_left
        p.window_left = -1 if window is None or window >= problem.kv_len else window
        if problem.softcap is None:
            p.qk_scale, p.softcap_log2 = problem.scale * _LOG2E, 0.0
        else:
            p.qk_scale, p.softcap_log2 = problem.scale / problem.softcap, problem.softcap * _LOG2E
        p.k_scale_value = 1.0 if problem.k_scale is None else problem.k_scale
        p.v_scale_value = 1.0 if problem.v_scale is None else problem.v_scale

        seqlens = layouts.seqlens
        self.host_seqlens = seqlens is not None and seqlens[3].kind == "cpu"
        if self.host_seqlens:  # copied to this plan's device buffer on every run
            self._seqlens_buf, self.seqlens_ptr = _device_buffer(self.device, 4 * max(problem.batch, 1))
            p.seqlens_stride = 1

        vector = _vector_ok(layouts.k) and _vector_ok(layouts.v)
        fast, self.slow_spec = choose_kernels(problem, vector)
        self.fast = _Launch(self, fast, num_splits)
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
                "num_splits": split.num_splits, "split_rows": split.split_rows,
                "merge": merge, "q_tile": "cp.async" if launch.params.q_vector else "loads",
                "workspace_bytes": self.workspace_bytes,
                "fallback_kernel": self.slow_spec.name_expression.removeprefix("flashdec::")}

    def __call__(self, args: DecodeArgs, stream: int | None) -> None:
        host = self.host_seqlens and args.seqlens is not None
        if host:
            self._upload_seqlens(args.seqlens, stream or 0)
        self.run_pointers(tuple(None if x is None else x.ptr for x in args), stream,
                          host_seqlens=host)

    def run_pointers(self, ptrs: tuple, stream: int | None, host_seqlens: bool = False) -> None:
        """Launch on data pointers (q, k, v, out, seqlens, k_scale, v_scale, lse) of the
        planned layouts: the whole per-call host work of a plan."""
        if self.problem.batch == 0:
            return
        stream = stream or 0
        q, k, v, out, seqlens, k_scale, v_scale, lse = ptrs
        launch = self.fast
        if (k | v) % VECTOR_BYTES:  # a misaligned view under an aligned plan
            launch = self.slow
            if launch is None:
                launch = self.slow = _Launch(self, self.slow_spec, self.num_splits)
        if not launch.arrivals_ready and launch.arrivals_count:
            _driver.memset32_async(self.device, launch.params.arrivals, 0,
                                   launch.arrivals_count, stream)
            launch.arrivals_ready = True
        p = launch.params
        p.q, p.k, p.v, p.out, p.lse, p.k_scale, p.v_scale = q, k, v, out, lse, k_scale, v_scale
        p.seqlens = self.seqlens_ptr if host_seqlens else seqlens
        launch.kernel(stream, launch.params_address)
        if launch.combine is not None:
            launch.combine(stream, launch.params_address)

    def _upload_seqlens(self, seqlens: TensorRef, stream: int) -> None:
        import numpy

        # read as check_host_seqlens reads it (any stride, stride 0 included)
        values = numpy.ascontiguousarray(numpy.from_dlpack(seqlens), dtype=numpy.int32)
        self._host_copy = values  # alive until the copy has run (pageable: copied at once)
        _driver.copy_to_device_async(self.device, self.seqlens_ptr, values.ctypes.data,
                                     values.nbytes, stream)


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
                options: BackendOptions = BackendOptions()) -> _Runner:
        """``options.num_splits`` (checked by the frontend against MAX_SPLITS, which is this
        backend's too) overrides the cost model's split count."""
        return _Runner(problem, layouts, options.num_splits)

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
        fn = _function(merge_kernel(problem.dtype), device)
        array = _driver.params_pointer_array(p)
        _driver.launch(device, fn, (problem.batch * problem.num_heads, 1, 1), THREADS, stream or 0,
                       ctypes.addressof(array))


# -- precompile -------------------------------------------------------------------------------
_MIN_ARCH = 80  # the kernels' cp.async and bf16 MMAs need sm_80 or newer


def _listed(name: str, values: Any) -> list:
    """``values`` as a non-empty list; a str (which would iterate its characters) or a scalar
    is refused."""
    if isinstance(values, (str, bytes, DType)) or not hasattr(values, "__iter__"):
        raise ContractError(f"{name} must be a sequence, got {type(values).__name__} "
                            f"{values!r} (write [{values!r}] for one)")
    listed = list(values)
    if not listed:
        raise ContractError(f"{name} is empty: nothing to compile")
    return listed


def _dtypes(name: str, values: Any, allowed: Sequence[DType]) -> list[DType]:
    found = []
    for value in _listed(name, values):
        try:
            dtype = DType.parse(value)
        except (TypeError, ValueError):
            dtype = None
        if dtype not in allowed:
            raise ContractError(f"{name}: {value!r} is not one of "
                                f"{', '.join(d.value for d in allowed)}")
        found.append(dtype)
    return found


def _ints(name: str, values: Any, low: int, high: int | None) -> list[int]:
    found = []
    for value in _listed(name, values):
        if (isinstance(value, bool) or not hasattr(value, "__index__")
                or value < low or (high is not None and value > high)):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ContractError(f"{name}: each must be an int {bound}, got "
                                f"{type(value).__name__} {value!r}")
        found.append(int(value))
    return found


def _check_arch(arch: Any) -> None:
    """``arch`` names an architecture this NVRTC compiles and the kernels run on."""
    import re

    match = re.fullmatch(r"sm_(\d+)([af]?)", arch) if isinstance(arch, str) else None
    if match is None:
        raise ContractError(f"arch must look like 'sm_90' or 'sm_90a', got "
                            f"{type(arch).__name__} {arch!r}")
    from cuda.bindings import nvrtc

    from ._compiler import nvrtc_version

    version = nvrtc_version()  # BackendUnavailableError when NVRTC cannot load
    _, supported = nvrtc.nvrtcGetSupportedArchs()
    number, suffix = int(match.group(1)), match.group(2)
    usable = [n for n in supported if n >= _MIN_ARCH]
    if (number not in usable or (suffix == "a" and number < 90)
            or (suffix == "f" and number < 100)):
        raise ContractError(
            f"arch {arch!r} is not one flashdec compiles for with NVRTC "
            f"{version[0]}.{version[1]}: sm_N with N in {', '.join(map(str, usable))} (an 'a' "
            f"suffix from sm_90, 'f' from sm_100)")


def precompile(*, dtypes: Sequence[str | DType], head_dims: Sequence[int],
               group_sizes: Sequence[int], kv_dtypes: Sequence[str | DType] | None = None,
               arch: str | None = None, progress: bool = False) -> int:
    """:func:`flashdec.precompile` (which documents it and holds the defaults): check every
    argument, then that the cache can be written, then compile each kernel into it."""
    import tempfile
    import time

    from ... import _env
    from ..._contract import COMPUTE_DTYPES, KV_DTYPES_FP8
    from ..._errors import CacheError
    from . import _compiler

    q_dtypes = _dtypes("dtypes", dtypes, COMPUTE_DTYPES)
    kv_given = None if kv_dtypes is None else _dtypes("kv_dtypes", kv_dtypes,
                                                      COMPUTE_DTYPES + KV_DTYPES_FP8)
    dims = _ints("head_dims", head_dims, 1, MAX_HEAD_DIM)
    groups = _ints("group_sizes", group_sizes, 1, None)
    pairs = [(dtype, kv) for dtype in q_dtypes
             for kv in ([dtype] if kv_given is None else kv_given) if kv in kv_dtypes_for(dtype)]
    for kv in kv_given or ():
        if not any(kv == pair[1] for pair in pairs):
            raise ContractError(
                f"kv_dtypes: {kv.value} pairs with none of dtypes "
                f"({', '.join(d.value for d in q_dtypes)}): K and V have Q's dtype, or an fp8 "
                f"dtype with float16 or bfloat16 Q")
    if arch is None:
        arch = _driver.device_info(0).arch
    _check_arch(arch)

    directory = _env.cache_dir() / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise CacheError(f"precompile cannot write the kernel cache in {directory} ({exc}); "
                         f"set {_env.ENV_CACHE_DIR} to a writable directory") from exc

    names = {merge_kernel(dtype) for dtype in q_dtypes}
    for dtype, kv in pairs:
        for d in dims:
            names.add(combine_kernel(dtype, d))
            for g in groups:
                names |= {spec.name_expression for spec in kernels_for(dtype, kv, d, g)}
    ordered = sorted(names)
    for i, name in enumerate(ordered, 1):
        start = time.perf_counter()
        module = _compile(name, arch)
        entry = directory / f"{module.key}.cubin"
        if not entry.is_file():  # compiled by this process before the cache moved, or lost
            _compiler._store(directory, module)
            if not entry.is_file():
                raise CacheError(f"precompile could not write {entry}: the kernel cache in "
                                 f"{directory} is not writable")
        if progress:
            print(f"flashdec precompile: [{i}/{len(ordered)}] {name} for {arch} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return len(ordered)
