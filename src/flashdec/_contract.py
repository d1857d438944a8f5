"""The decode and merge contracts: ranks, shapes, dtypes, devices, strides, aliasing, scalars.

``Q [B, H_q, D]``, ``K/V [B, H_kv, K_len, D]`` (physical layout), ``Y [B, H_q, D]``,
``kv_head = q_head // (H_q // H_kv)``. The serving features add an int32 ``seqlens [B]``
(K_len is then the capacity), float32 ``k_scale``/``v_scale [H_kv]`` tensors (or floats),
a float32 ``LSE [B, H_q]`` output, ``softcap``, ``window_left``, an int32 ``cache_leftpad [B]``
(keys before it are not attended) and a paged cache: K/V pools ``[num_pages, H_kv,
page_size, D]`` read through an int32 ``block_table [B, max_pages]`` (key j of sequence b is
row ``j % page_size`` of page ``block_table[b, j // page_size]``). Every check raises
:class:`ContractError` naming the argument, what was expected and what was given, before any
work is launched.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Mapping, NamedTuple, Sequence

from ._dtypes import DType
from ._errors import ContractError
from ._views import Device, TensorMut, TensorRef

__all__ = ["DecodeProblem", "DecodeArgs", "MergeProblem", "BackendOptions", "COMPUTE_DTYPES",
           "KV_DTYPES_FP8", "MAX_SPLITS", "FP32_RANGE", "ARG_NAMES", "validate", "validate_merge",
           "check_aliasing", "check_distinct_elements", "check_host_seqlens", "check_host_values",
           "check_no_overlap", "check_rank", "Layout", "layouts"]

COMPUTE_DTYPES = (DType.float16, DType.bfloat16, DType.float32)
KV_DTYPES_FP8 = (DType.float8_e4m3fn, DType.float8_e5m2)
_NAMES = ", ".join(d.value for d in COMPUTE_DTYPES)
_FP8_NAMES = ", ".join(d.value for d in KV_DTYPES_FP8)
# The most chunks a decode's KV sequence may be cut into (``num_splits``): what the cuda
# backend's combine kernel merges (its kMaxSplits; a test checks the two agree).
MAX_SPLITS = 512
# Magnitudes a real parameter (scale, softcap, k_scale, v_scale, and scale / softcap) may take:
# the kernels compute in float32 and fold log2(e) into the scale, so a value must stay a normal
# float32 with room for that factor (1e39 is finite in Python but inf in float32).
FP32_RANGE = (2.0**-126, 2.0**126)


class _ResultShapes:
    """Shapes of Y and LSE: one definition for both problems and every allocator."""

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.num_heads, self.head_dim)

    @property
    def lse_shape(self) -> tuple[int, int]:
        return (self.batch, self.num_heads)


@dataclass(frozen=True)
class DecodeProblem(_ResultShapes):
    """One decode step's sizes, dtypes, device, softmax scale and serving features.

    ``kv_len`` is K's extent: the cache capacity when ``seqlens`` is set (an int32 [B] tensor
    then comes with every run); for a paged cache (``page_size`` set) it is the block table's
    capacity, max_pages * page_size, and K/V are pools of ``num_pages`` pages. ``k_scale``/``v_scale`` are floats fixed at plan time, or None
    when a float32 [H_kv] tensor comes with every run. ``kv_dtype`` None means ``dtype``.
    """

    batch: int
    num_heads: int
    num_kv_heads: int
    kv_len: int
    head_dim: int
    dtype: DType
    scale: float
    device: Device
    kv_dtype: DType | None = None
    softcap: float | None = None
    window_left: int | None = None
    seqlens: bool = False
    k_scale: float | None = 1.0
    v_scale: float | None = 1.0
    return_lse: bool = False
    page_size: int | None = None   # paged: K/V are pools of pages read through a block table
    num_pages: int | None = None
    leftpad: bool = False          # an int32 cache_leftpad [B] comes with every run

    def __post_init__(self) -> None:
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.dtype)

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def kv_bytes(self) -> int:
        """Bytes of K plus V at capacity: the traffic a decode cannot avoid."""
        return (2 * self.batch * self.num_kv_heads * self.kv_len * self.head_dim
                * self.kv_dtype.itemsize)

    @classmethod
    def from_views(cls, q: TensorRef, k: TensorRef, v: TensorRef, out: TensorMut | None = None,
                   scale: float | None = None) -> "DecodeProblem":
        """Validate views against the contract and describe the problem (no features)."""
        return validate(DecodeArgs(q, k, v, out), scale=scale)


class DecodeArgs(NamedTuple):
    """The tensors of one decode call as views (``Backend.prepare`` gets their
    :class:`Layout` instead); None where an argument is absent."""

    q: TensorRef
    k: TensorRef
    v: TensorRef
    out: TensorMut
    seqlens: TensorRef | None = None
    k_scale: TensorRef | None = None
    v_scale: TensorRef | None = None
    lse: TensorMut | None = None
    block_table: TensorRef | None = None
    cache_leftpad: TensorRef | None = None


# The user's argument name for each DecodeArgs field, for error messages.
ARG_NAMES = DecodeArgs(*(f if f != "lse" else "lse_out" for f in DecodeArgs._fields))


@dataclass(frozen=True)
class MergeProblem(_ResultShapes):
    """``num_parts`` attention states of the same queries over disjoint key sets."""

    num_parts: int
    batch: int
    num_heads: int
    head_dim: int
    dtype: DType
    device: Device


@dataclass(frozen=True)
class BackendOptions:
    """The backend options of ``decode`` and ``plan`` (their ``**options``), parsed once by
    the frontend so that every backend sees the same checked values and a typo is the same
    error whichever backend runs.

    ``num_splits``: how many chunks the KV sequence is cut into, 1..MAX_SPLITS; None lets the
    backend choose. The cuda backend honours it; the torch backend computes in one piece
    whatever it says.
    """

    num_splits: int | None = None

    @classmethod
    def parse(cls, options: Mapping[str, object]) -> "BackendOptions":
        """The options of a call's ``**options``; ContractError for an unknown name or a bad
        value."""
        if not options:
            return _NO_OPTIONS
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ContractError(f"unknown backend option {name}={options[name]!r}{hint}; "
                                    f"valid options: {', '.join(known)}")
        num_splits = options.get("num_splits")
        if num_splits is not None and (isinstance(num_splits, bool)
                                       or not isinstance(num_splits, Integral)
                                       or not 1 <= num_splits <= MAX_SPLITS):
            raise ContractError(f"num_splits must be an int in [1, {MAX_SPLITS}] or None, got "
                                f"{type(num_splits).__name__} {num_splits!r}")
        return cls(None if num_splits is None else int(num_splits))


_NO_OPTIONS = BackendOptions()


class Layout(tuple):
    """(shape, strides, dtype, device) of a view: what a plan checks on every run."""

    __slots__ = ()

    @staticmethod
    def of(view: TensorRef) -> "Layout":
        return Layout((view.shape, view.strides, view.dtype, view.device))


def layouts(args: DecodeArgs) -> DecodeArgs:
    """The Layout of every present view in ``args``."""
    return DecodeArgs(*(None if view is None else Layout.of(view) for view in args))


def _fmt_dtype(dtype: DType | str) -> str:
    return dtype.value if isinstance(dtype, DType) else str(dtype)


def check_rank(name: str, view: TensorRef, rank: int, axes: str) -> None:
    if view.ndim != rank:
        raise ContractError(f"{name} must have rank {rank} {axes}, got rank {view.ndim} with "
                            f"shape {view.shape}")


def _check_strides(name: str, view: TensorRef) -> None:
    if any(s < 0 for s in view.strides):
        raise ContractError(f"{name} has negative strides {view.strides}; flashdec needs "
                            f"strides >= 0 (make a copy with positive strides)")


def _check_output(name: str, view: TensorRef) -> None:
    """An output is writable and its elements are distinct memory."""
    if view.readonly:
        raise ContractError(f"{name} is read-only; pass a writable {name} or {name}=None")
    check_distinct_elements(name, tuple(view.shape), tuple(view.strides))


def check_distinct_elements(name: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """Each element of a tensor that is written is its own memory: no stride 0 on an axis of
    extent > 1, no axes that overlap."""
    reach = 0  # elements spanned by the axes taken so far, in stride order
    for stride, extent in sorted((s, e) for e, s in zip(shape, strides) if e > 1):
        if stride == 0:
            raise ContractError(f"{name} has stride 0 on an axis of extent {extent} (strides "
                                f"{strides}, shape {shape}): writes to its elements would "
                                f"race on the same memory")
        if stride <= reach:
            raise ContractError(f"{name} has overlapping strides {strides} for shape "
                                f"{shape}: two of its elements share memory")
        reach += stride * (extent - 1)


def _check_tensor(name: str, view: TensorRef, dtype: DType, shape: tuple[int, ...], axes: str,
                  devices: tuple[Device, ...], device_rule: str) -> None:
    """dtype, shape and device of an auxiliary tensor (lengths, scales, LSE)."""
    if view.dtype != dtype:
        raise ContractError(f"{name} has dtype {_fmt_dtype(view.dtype)}; expected "
                            f"{dtype.value}")
    if view.shape != shape:
        raise ContractError(f"{name} must have shape {shape} {axes}, got {view.shape}")
    if view.device not in devices:
        raise ContractError(f"{name} is on {view.device}; {device_rule}")
    _check_strides(name, view)


def check_no_overlap(name: str, out: TensorRef, others: dict[str, TensorRef | None]) -> None:
    """An output must not share memory with anything the kernel reads or writes besides it."""
    lo, hi = out.span_bytes()
    if lo == hi:
        return
    for other, view in others.items():
        if view is None:
            continue
        a, b = view.span_bytes()
        if a != b and view.device == out.device and a < hi and lo < b:
            raise ContractError(f"{name} overlaps {other} in memory ({name} bytes "
                                f"[0x{lo:x}, 0x{hi:x}), {other} bytes [0x{a:x}, 0x{b:x})); "
                                f"give {name} its own buffer")


def check_aliasing(args: DecodeArgs) -> None:
    """Y and LSE overlap no input and not each other."""
    named = dict(zip(ARG_NAMES, args))
    inputs = {n: named[n] for n in ARG_NAMES if n not in (ARG_NAMES.out, ARG_NAMES.lse)}
    if args.out is not None:
        check_no_overlap(ARG_NAMES.out, args.out, inputs)
    if args.lse is not None:
        check_no_overlap(ARG_NAMES.lse, args.lse, inputs | {ARG_NAMES.out: args.out})


def check_host_seqlens(seqlens: TensorRef | None, kv_len: int) -> None:
    """Lengths in host memory are checked against the capacity on every call; lengths in
    device memory are not read here (the kernel clamps them to [0, kv_len])."""
    if seqlens is None or seqlens.device.kind != "cpu" or seqlens.numel == 0:
        return
    import numpy

    values = numpy.from_dlpack(seqlens)
    bad = (values < 0) | (values > kv_len)
    if bad.any():
        b = int(bad.argmax())
        raise ContractError(f"seqlens[{b}] is {int(values[b])}; every length must be in "
                            f"[0, {kv_len}] (k's kv_len, the cache capacity)")


def _host_values(view: TensorRef | None) -> object:
    """The values of a non-empty view in host memory as a NumPy array, else None."""
    if view is None or view.device.kind != "cpu" or view.numel == 0:
        return None
    import numpy

    return numpy.from_dlpack(view)


def check_host_values(args: DecodeArgs, kv_len: int) -> None:
    """What can be checked without a device sync: ``seqlens`` (see check_host_seqlens),
    ``cache_leftpad`` in [0, kv_len], the block-table entries of the pages each sequence's
    length reaches (in [0, num_pages)) and scale tensors (finite and > 0, as float scales
    are), each where it lies in host memory. Tensors in device memory are read by the kernel
    at run time, unchecked (lengths, offsets and page ids clamped into range there)."""
    import numpy

    check_host_seqlens(args.seqlens, kv_len)
    leftpad = _host_values(args.cache_leftpad)
    if leftpad is not None:
        bad = (leftpad < 0) | (leftpad > kv_len)
        if bad.any():
            b = int(bad.argmax())
            raise ContractError(f"cache_leftpad[{b}] is {int(leftpad[b])}; every offset must "
                                f"be in [0, {kv_len}] (the cache capacity)")
    table = _host_values(args.block_table)
    lengths = _host_values(args.seqlens)
    if table is not None and lengths is not None:
        num_pages, page_size = args.k.shape[0], args.k.shape[2]
        needed = (numpy.clip(lengths.astype(numpy.int64), 0, kv_len) + page_size - 1) // page_size
        used = numpy.arange(table.shape[1])[None, :] < needed[:, None]
        bad = used & ((table < 0) | (table >= num_pages))
        if bad.any():
            b, i = (int(x) for x in numpy.unravel_index(int(bad.argmax()), bad.shape))
            raise ContractError(f"block_table[{b}, {i}] is {int(table[b, i])}, a page sequence "
                                f"{b} reads (seqlens[{b}] = {int(lengths[b])}); page ids must be "
                                f"in [0, {num_pages}) (k's num_pages)")
    for name, view in ((ARG_NAMES.k_scale, args.k_scale), (ARG_NAMES.v_scale, args.v_scale)):
        values = _host_values(view)
        if values is None:
            continue
        with numpy.errstate(invalid="ignore"):
            bad = ~(numpy.isfinite(values) & (values > 0))
        if bad.any():
            g = int(bad.argmax())
            raise ContractError(f"{name}[{g}] is {float(values[g])}; every scale must be "
                                f"finite and > 0")


def _real(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ContractError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ContractError(f"{name} must be finite, got {result}")
    _check_fp32_magnitude(name, result)
    return result


def _check_fp32_magnitude(name: str, value: float) -> None:
    if abs(value) > FP32_RANGE[1]:
        raise ContractError(f"{name} must be at most 2**126 ({FP32_RANGE[1]:.3g}) in magnitude "
                            f"(the kernels compute in float32), got {value:g}")


def _positive_real(name: str, value: object, what: str) -> float:
    result = _real(name, value, what)
    if result <= 0:
        raise ContractError(f"{name} must be > 0, got {result}")
    if result < FP32_RANGE[0]:
        raise ContractError(f"{name} must be at least 2**-126 ({FP32_RANGE[0]:.3g}, the "
                            f"smallest normal float32: the kernels compute in float32), got "
                            f"{result:g}")
    return result


def resolve_scale(scale: object, head_dim: int) -> float:
    """``scale`` as a finite float; ``None`` means ``1 / sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _real("scale", scale, "a finite real number or None")


def _resolve_softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    return _positive_real("softcap", softcap, "a finite real number > 0 or None")


def _resolve_window(window_left: object, kv_len: int) -> int | None:
    """``window_left`` as an int; any value >= kv_len reaches every key, so it is kept as
    kv_len (a window of 2**64 is valid and must not overflow a backend's int64)."""
    if window_left is None:
        return None
    if isinstance(window_left, bool) or not isinstance(window_left, Integral):
        raise ContractError(f"window_left must be an int >= 0 or None, got "
                            f"{type(window_left).__name__} {window_left!r}")
    if window_left < 0:
        raise ContractError(f"window_left must be >= 0 (keys j >= L - 1 - window_left are "
                            f"attended), got {window_left}")
    return min(int(window_left), kv_len)


def _resolve_kv_scale(name: str, value: object, tensor: TensorRef | None,
                      kv_dtype: DType) -> float | None:
    """The float a plan fixes, or None when a per-run tensor carries the scale."""
    if tensor is not None:
        return None
    if value is None:
        if kv_dtype.is_fp8:
            raise ContractError(f"{name} is required with fp8 k and v ({kv_dtype.value}): "
                                f"pass a float or a float32 tensor [num_kv_heads]")
        return 1.0
    return _positive_real(name, value, "a finite real number > 0 or a float32 tensor "
                                       "[num_kv_heads]")


def _check_dtypes(args: DecodeArgs) -> None:
    """q and out share a compute dtype; k and v share q's dtype or one fp8 dtype."""
    q = args.q
    if q.dtype not in COMPUTE_DTYPES:
        hint = (" (fp8 is for k and v only, with q in float16 or bfloat16)"
                if q.dtype in KV_DTYPES_FP8 else "")
        raise ContractError(f"q has dtype {_fmt_dtype(q.dtype)}; supported dtypes: "
                            f"{_NAMES}{hint}")
    if args.out is not None and args.out.dtype != q.dtype:
        raise ContractError(f"out has dtype {_fmt_dtype(args.out.dtype)} but q has "
                            f"{q.dtype.value}: q and out must share one dtype")
    for name, view in (("k", args.k), ("v", args.v)):
        if view.dtype == q.dtype:
            continue
        if view.dtype not in KV_DTYPES_FP8:
            raise ContractError(f"{name} has dtype {_fmt_dtype(view.dtype)} but q has "
                                f"{q.dtype.value}: k and v must have q's dtype or one fp8 "
                                f"dtype ({_FP8_NAMES})")
        if q.dtype == DType.float32:
            raise ContractError(f"{name} has dtype {view.dtype.value} but q has float32: fp8 "
                                f"k and v need q and out in float16 or bfloat16")
    if args.v.dtype != args.k.dtype:
        raise ContractError(f"v has dtype {_fmt_dtype(args.v.dtype)} but k has "
                            f"{_fmt_dtype(args.k.dtype)}: k and v must share one dtype")


def validate(args: DecodeArgs, *, scale: object = None, softcap: object = None,
             window_left: object = None, k_scale: object = None, v_scale: object = None,
             return_lse: bool = False) -> DecodeProblem:
    """Check every rule of the contract; return the problem they describe.

    ``args.out`` and ``args.lse`` may be None (allocated after validation). ``k_scale`` and
    ``v_scale`` are the float scales; a scale tensor comes in ``args`` instead.
    """
    q, k, v, out = args.q, args.k, args.v, args.out
    table = args.block_table
    kv_axes = ("[num_pages, num_kv_heads, page_size, head_dim] (a paged pool, with block_table)"
               if table is not None else "[batch, num_kv_heads, kv_len, head_dim]")
    check_rank("q", q, 3, "[batch, num_heads, head_dim]")
    check_rank("k", k, 4, kv_axes)
    check_rank("v", v, 4, kv_axes)
    if out is not None:
        check_rank("out", out, 3, "[batch, num_heads, head_dim]")

    _check_dtypes(args)
    for name, view in (("k", k), ("v", v), ("out", out)):
        if view is not None and view.device != q.device:
            raise ContractError(f"{name} is on {view.device} but q is on {q.device}: q, k, v "
                                f"and out must be on one device")

    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, kv_len, _ = k.shape
    page_size = num_pages = None
    if num_heads < 1:
        raise ContractError(f"q must have at least one head, got shape {q.shape}")
    if num_kv_heads < 1:
        raise ContractError(f"k must have at least one KV head, got shape {k.shape}")
    if head_dim < 1:
        raise ContractError(f"head_dim must be >= 1, got q shape {q.shape}")
    if table is not None:
        num_pages, page_size = k.shape[0], k.shape[2]
        kv_len = _check_block_table(table, batch, num_pages, page_size, k.device)
        if args.seqlens is None:
            raise ContractError("seqlens is required with block_table: the table's rows past "
                                "a sequence's pages are never read, so its length must be given")
    elif k.shape[0] != batch:
        raise ContractError(f"k has batch {k.shape[0]} (shape {k.shape}) but q has batch "
                            f"{batch} (shape {q.shape})")
    if k.shape[3] != head_dim:
        raise ContractError(f"k has head_dim {k.shape[3]} (shape {k.shape}) but q has head_dim "
                            f"{head_dim} (shape {q.shape})")
    if v.shape != k.shape:
        raise ContractError(f"v must have the shape of k {k.shape}, got {v.shape}")
    if num_heads % num_kv_heads:
        raise ContractError(f"q's num_heads {num_heads} must be a multiple of k's num_kv_heads "
                            f"{num_kv_heads}")
    if out is not None and out.shape != q.shape:
        raise ContractError(f"out must have the shape of q {q.shape}, got {out.shape}")

    if args.seqlens is not None:
        _check_tensor("seqlens", args.seqlens, DType.int32, (batch,), "[batch]",
                      (k.device, Device("cpu")),
                      f"seqlens must be on k's device ({k.device}) or on the CPU")
    for name, view in (("k_scale", args.k_scale), ("v_scale", args.v_scale)):
        if view is not None:
            _check_tensor(name, view, DType.float32, (num_kv_heads,), "[num_kv_heads]",
                          (k.device,), f"a scale tensor must be on k's device ({k.device})")
    if args.cache_leftpad is not None:
        _check_tensor("cache_leftpad", args.cache_leftpad, DType.int32, (batch,), "[batch]",
                      (k.device,), f"cache_leftpad must be on k's device ({k.device})")
    if args.lse is not None:
        _check_tensor("lse_out", args.lse, DType.float32, (batch, num_heads),
                      "[batch, num_heads]", (q.device,), f"it must be on q's device ({q.device})")

    for name, view in (("q", q), ("k", k), ("v", v), ("out", out)):
        if view is not None:
            _check_strides(name, view)
    for name, view in (("out", out), ("lse_out", args.lse)):
        if view is not None:
            _check_output(name, view)
    check_aliasing(args)
    check_host_values(args, kv_len)

    scale = resolve_scale(scale, head_dim)
    softcap = _resolve_softcap(softcap)
    if softcap is not None:  # the scores are scale * q.k / softcap before the tanh
        _check_fp32_magnitude("scale / softcap", scale / softcap)
    return DecodeProblem(
        batch, num_heads, num_kv_heads, kv_len, head_dim, q.dtype, scale, q.device,
        kv_dtype=k.dtype, softcap=softcap, window_left=_resolve_window(window_left, kv_len),
        seqlens=args.seqlens is not None,
        k_scale=_resolve_kv_scale("k_scale", k_scale, args.k_scale, k.dtype),
        v_scale=_resolve_kv_scale("v_scale", v_scale, args.v_scale, k.dtype),
        return_lse=bool(return_lse) or args.lse is not None, page_size=page_size,
        num_pages=num_pages, leftpad=args.cache_leftpad is not None)


# Key positions are int32 on the device (seqlens, cache_leftpad): a paged cache's capacity
# must fit.
MAX_PAGED_KV_LEN = 2**31 - 1


def _check_block_table(table: TensorRef, batch: int, num_pages: int, page_size: int,
                       device: Device) -> int:
    """A block table's dtype, shape, device and strides against the pools; returns the
    capacity it addresses (max_pages * page_size)."""
    check_rank("block_table", table, 2, "[batch, max_pages]")
    _check_tensor("block_table", table, DType.int32, (batch, table.shape[1]),
                  "[batch, max_pages] (one row per query)", (device,),
                  f"block_table must be on k's device ({device})")
    if page_size < 1:
        raise ContractError("k's page_size (axis 2 of a paged pool) must be >= 1, got 0")
    if num_pages < 1 and batch:
        raise ContractError("k holds no page (num_pages, axis 0 of a paged pool, is 0)")
    kv_len = table.shape[1] * page_size
    if kv_len > MAX_PAGED_KV_LEN:
        raise ContractError(f"block_table addresses {table.shape[1]} pages of {page_size} keys "
                            f"= {kv_len} positions; at most {MAX_PAGED_KV_LEN} (int32 positions)")
    return kv_len


def _check_host_lse(name: str, view: TensorRef) -> None:
    """An LSE in host memory is not +inf: no sum of exponentials of finite scores is infinite,
    and the merge weighs such a part by exp(inf - inf) = NaN. LSEs in device memory are read by
    the kernel unchecked (a +inf there gives NaN in its row)."""
    if view.device.kind != "cpu" or view.numel == 0:
        return
    import numpy

    values = numpy.from_dlpack(view)
    bad = values == numpy.inf
    if bad.any():
        b, h = (int(i) for i in numpy.unravel_index(int(bad.argmax()), values.shape))
        raise ContractError(f"{name}[{b}, {h}] is +inf; an LSE is finite, -inf (no keys) or "
                            f"NaN")


def validate_merge(outputs: Sequence[TensorRef], lses: Sequence[TensorRef],
                   out: TensorRef | None, lse_out: TensorRef | None) -> MergeProblem:
    """Check N partial states ``outputs[i] [B, H, D]`` with ``lses[i] [B, H]`` float32, and
    the optional outputs; return the merge they describe."""
    if not outputs:
        raise ContractError("outputs must hold at least one part (N >= 1), got none")
    if len(lses) != len(outputs):
        raise ContractError(f"lses holds {len(lses)} parts but outputs holds {len(outputs)}: "
                            f"one LSE per partial output")
    first = outputs[0]
    check_rank("outputs[0]", first, 3, "[batch, num_heads, head_dim]")
    if first.dtype not in COMPUTE_DTYPES:
        raise ContractError(f"outputs[0] has dtype {_fmt_dtype(first.dtype)}; supported "
                            f"dtypes: {_NAMES}")
    device = first.device
    same_device = f"every part must be on the device of outputs[0] ({device})"
    for i, part in enumerate(outputs):
        _check_tensor(f"outputs[{i}]", part, first.dtype, first.shape,
                      "[batch, num_heads, head_dim] like outputs[0]", (device,), same_device)
    lse_shape = first.shape[:2]
    for i, part in enumerate(lses):
        _check_tensor(f"lses[{i}]", part, DType.float32, lse_shape,
                      "[batch, num_heads] of outputs", (device,), same_device)
    finals = (("out", out, first.dtype, first.shape, "[batch, num_heads, head_dim]"),
              ("lse_out", lse_out, DType.float32, lse_shape, "[batch, num_heads]"))
    parts = {f"outputs[{i}]": p for i, p in enumerate(outputs)}
    parts |= {f"lses[{i}]": p for i, p in enumerate(lses)}
    for name, view, dtype, shape, axes in finals:
        if view is None:
            continue
        _check_tensor(name, view, dtype, shape, axes, (device,), f"it must be on {device}")
        _check_output(name, view)
        check_no_overlap(name, view, parts)
    if out is not None and lse_out is not None:
        check_no_overlap("lse_out", lse_out, {"out": out})
    for i, part in enumerate(lses):
        _check_host_lse(f"lses[{i}]", part)
    batch, num_heads, head_dim = first.shape
    return MergeProblem(len(outputs), batch, num_heads, head_dim, first.dtype, device)
