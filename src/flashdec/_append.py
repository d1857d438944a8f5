"""``append_kv``: write one new token's K and V per sequence into a contiguous or a paged KV
cache, in place, with torch ops (CPU or CUDA; CUDA-graph capturable with device positions).

The cache layouts are decode's: a contiguous cache ``[B, H_kv, capacity, D]`` or pools
``[num_pages, H_kv, page_size, D]`` read through an int32 ``block_table [B, max_pages]``
(key j of sequence b is row ``j % page_size`` of page ``block_table[b, j // page_size]``),
any strides. An fp8 cache stores ``x / scale``, so that decode's ``k_scale[g] * K`` reads
back ``x``. Every check raises :class:`ContractError` naming the argument, what was expected
and what was given, before anything is written.
"""

from __future__ import annotations

import math
import sys
from numbers import Real
from typing import Any, Sequence

from ._contract import FP32_RANGE, check_distinct_elements
from ._dtypes import DType
from ._errors import ContractError
from ._views import check_torch_tensor

__all__ = ["append_kv"]

_NEW_DTYPES = (DType.float16, DType.bfloat16, DType.float32)
_FP8_MAX = {DType.float8_e4m3fn: 448.0, DType.float8_e5m2: 57344.0}


def append_kv(k_cache: Any, v_cache: Any, k_new: Any, v_new: Any, *,
              positions: Any, block_table: Any = None, k_scale: Any = None,
              v_scale: Any = None) -> None:
    """Write one token per sequence into the cache, in place: ``K[b, h, p_b, :] = k_new[b, h]``
    and ``V[b, h, p_b, :] = v_new[b, h]`` with ``p_b = positions[b]``, for every head ``h``.

    With ``block_table``, K and V are pools of pages and key position ``p_b`` of sequence
    ``b`` is row ``p_b % page_size`` of page ``block_table[b, p_b // page_size]``: that row
    is written. An fp8 cache stores ``x / scale`` (``scale`` = ``k_scale[h]`` for K,
    ``v_scale[h]`` for V), computed in float32, saturated to the format's largest finite
    value (float8_e4m3fn 448, float8_e5m2 57344; +-inf saturates too) and rounded to nearest
    even; NaN stays NaN. :func:`decode` then reads K back as ``k_scale[g] * K``. Nothing
    else in the cache changes.

    Torch tensors only (CPU or CUDA), written through views of the caches, never a copy:
    any strides, e.g. an NHD cache ``[B, capacity, H_kv, D]`` or vLLM's pools
    ``[num_pages, page_size, H_kv, D]`` passed as ``.permute(0, 2, 1, 3)``. With
    ``positions`` (and ``block_table``) on the GPU the call reads nothing on the host (no
    sync, no data-dependent shape), so it can be captured in a CUDA graph that replays with
    the tensors' new contents. Values on the GPU are not checked: a position outside
    ``[0, capacity)`` is clamped into it and a page id outside ``[0, num_pages)`` likewise
    (memory-safe; that sequence's write then lands on the clamped row). Values in host
    memory are checked (ContractError).

    Parameters
    ----------
    k_cache, v_cache : torch.Tensor
        A contiguous cache ``[B, H_kv, capacity, D]`` or, with ``block_table``, pools
        ``[num_pages, H_kv, page_size, D]``; one shape, one dtype: k_new's, or float8_e4m3fn
        / float8_e5m2. Writable: not requiring grad, not an inference tensor outside
        ``torch.inference_mode()``, no two elements sharing memory.
    k_new, v_new : torch.Tensor [B, H_kv, D]
        float16, bfloat16 or float32 (one dtype), on the cache's device, any strides.
    positions : int32 tensor [B] or a host sequence / NumPy array of B ints
        The key position each sequence writes. On the cache's device (read by the ops,
        clamped into ``[0, capacity)``), or in host memory (a list, a NumPy array, a CPU
        tensor; checked to lie in ``[0, capacity)`` and copied to the device on every call,
        which a CUDA graph cannot capture).
    block_table : int32 tensor [B, max_pages] on the cache's device, optional
        A paged cache; capacity is ``max_pages * page_size``. In host memory (a CPU cache)
        the page each sequence writes is checked to be in ``[0, num_pages)``; on the GPU it
        is clamped into that range.
    k_scale, v_scale : float > 0 or float32 tensor [H_kv] on the cache's device, optional
        Required with an fp8 cache. With a cache of k_new's dtype they are optional (default
        1) and, when given, the cache stores ``x / scale`` rounded to its dtype, as decode
        reads it. Floats, and tensors in host memory, are checked to be finite and > 0
        (floats: in [2**-126, 2**126], as decode's); a tensor on the GPU is read unchecked.

    Raises
    ------
    ContractError
        A bad argument; nothing was written.

    Notes
    -----
    Two sequences that write the same cache row (a shared page, or clamped device values)
    race: one of the writes wins, unspecified which.
    """
    torch = _torch_of(k_cache, v_cache, k_new, v_new)
    paged = block_table is not None
    cache_axes = ("[num_pages, num_kv_heads, page_size, head_dim] (a paged pool, with "
                  "block_table)" if paged else "[batch, num_kv_heads, capacity, head_dim]")
    named = {"k_cache": k_cache, "v_cache": v_cache, "k_new": k_new, "v_new": v_new}
    for name, x in named.items():
        _check_torch(torch, name, x)
    for name in ("k_cache", "v_cache"):
        _check_rank(name, named[name], 4, cache_axes)
    for name in ("k_new", "v_new"):
        _check_rank(name, named[name], 3, "[batch, num_kv_heads, head_dim]")

    new_dtype = DType.parse(k_new.dtype)
    kv_dtype = DType.parse(k_cache.dtype)
    _check_dtypes(new_dtype, DType.parse(v_new.dtype), kv_dtype, DType.parse(v_cache.dtype))

    device = k_cache.device
    for name, x in named.items():
        if x.device != device:
            raise ContractError(f"{name} is on {x.device} but k_cache is on {device}: the "
                                f"caches, k_new, v_new, block_table and scale tensors must be "
                                f"on one device")

    batch, num_kv_heads, head_dim = k_new.shape
    if v_new.shape != k_new.shape:
        raise ContractError(f"v_new must have the shape of k_new {tuple(k_new.shape)}, got "
                            f"{tuple(v_new.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ContractError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                            f"got {tuple(v_cache.shape)}")
    if not paged and k_cache.shape[0] != batch:
        raise ContractError(f"k_cache has batch {k_cache.shape[0]} (shape "
                            f"{tuple(k_cache.shape)}) but k_new has batch {batch} (shape "
                            f"{tuple(k_new.shape)})")
    if k_cache.shape[1] != num_kv_heads:
        raise ContractError(f"k_cache has num_kv_heads {k_cache.shape[1]} (shape "
                            f"{tuple(k_cache.shape)}) but k_new has {num_kv_heads} (shape "
                            f"{tuple(k_new.shape)})")
    if k_cache.shape[3] != head_dim:
        raise ContractError(f"k_cache has head_dim {k_cache.shape[3]} (shape "
                            f"{tuple(k_cache.shape)}) but k_new has {head_dim} (shape "
                            f"{tuple(k_new.shape)})")

    if paged:
        _check_torch(torch, "block_table", block_table)
        _check_rank("block_table", block_table, 2, "[batch, max_pages]")
        _check_dtype("block_table", block_table, DType.int32)
        if block_table.shape[0] != batch:
            raise ContractError(f"block_table must have shape ({batch}, max_pages) [batch, "
                                f"max_pages] (one row per sequence of k_new), got "
                                f"{tuple(block_table.shape)}")
        if block_table.device != device:
            raise ContractError(f"block_table is on {block_table.device} but k_cache is on "
                                f"{device}: block_table must be on the pools' device")
        num_pages, page_size = k_cache.shape[0], k_cache.shape[2]
        capacity = block_table.shape[1] * page_size
        where = (f"block_table's capacity, max_pages * page_size = {block_table.shape[1]} * "
                 f"{page_size}")
    else:
        num_pages, page_size = 0, 0
        capacity = k_cache.shape[2]
        where = "k_cache's capacity, axis 2"

    for name in ("k_cache", "v_cache"):
        _check_writable(torch, name, named[name])
    if (k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr()
            and k_cache.stride() == v_cache.stride()):
        raise ContractError("v_cache is the same memory as k_cache (same pointer and strides); "
                            "K and V need their own caches")

    scales = [_scale(torch, name, value, kv_dtype, num_kv_heads, device)
              for name, value in (("k_scale", k_scale), ("v_scale", v_scale))]
    pos, host = _positions(torch, positions, batch, device)

    if batch and capacity < 1:
        raise ContractError(f"there is no position to write: {where} is 0")
    if paged and batch and num_pages < 1:
        raise ContractError("k_cache holds no page (num_pages, axis 0 of a paged pool, is 0)")
    if host is not None:  # values in host memory (a CPU cache, or host positions): checked
        _check_host_positions(host, capacity, where)
        if paged and block_table.device.type == "cpu":
            _check_host_pages(block_table, host, page_size, num_pages)
        if pos is None:
            pos = torch.tensor(host, dtype=torch.int64)
    pos = pos.to(device=device, dtype=torch.int64)  # a copy only for host positions

    targets = _targets(torch, pos, block_table, capacity, page_size, num_pages)
    rows = [_encoded(torch, x, kv_dtype, scale, (k_cache, v_cache))
            for x, scale in ((k_new, scales[0]), (v_new, scales[1]))]
    _write(torch, k_cache, targets, rows[0])
    _write(torch, v_cache, targets, rows[1])


def _targets(torch: Any, positions: Any, block_table: Any, capacity: int, page_size: int,
             num_pages: int) -> tuple[Any, Any]:
    """The axis-0 and axis-2 indices (int64 [B]) of the rows append_kv writes: ``(b, p_b)`` in
    a contiguous cache, ``(page, row)`` in pools. ``positions`` (int64 [B] on the cache's
    device) is clamped into ``[0, capacity)`` and page ids into ``[0, num_pages)``: tensor
    arithmetic only, no host sync, so an out-of-range device value writes a clamped row
    instead of stray memory (host values were checked before, so clamping keeps them)."""
    pos = positions.clamp(0, max(capacity - 1, 0))
    if block_table is None:
        return torch.arange(pos.shape[0], device=pos.device), pos
    column = torch.div(pos, page_size, rounding_mode="floor")
    page = block_table.gather(1, column[:, None])[:, 0].to(torch.int64)
    return page.clamp(0, max(num_pages - 1, 0)), pos - column * page_size


def _write(torch: Any, cache: Any, targets: tuple[Any, Any], rows: Any) -> None:
    """``cache[t0[b], h, t2[b], :] = rows[b, h, :]`` for every head h, by ``index_put_`` on
    the cache itself (any strides; fp8 through a byte view of the same memory)."""
    first, third = targets
    heads = torch.arange(cache.shape[1], device=cache.device)
    if DType.parse(cache.dtype).is_fp8:  # index_put_ of fp8 is not in every torch build
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.index_put_((first[:, None], heads[None, :], third[:, None]), rows)


def _encoded(torch: Any, x: Any, kv_dtype: DType, scale: Any, caches: tuple[Any, ...]) -> Any:
    """``x`` as the cache stores it: ``x / scale`` in float32, saturated for fp8, rounded to
    the cache's dtype; without a scale ``x`` itself (copied when it shares memory with a
    cache, so the writes never read what they overwrite)."""
    if scale is None:
        return x.clone() if any(_overlap(x, c) for c in caches) else x
    y = x.to(torch.float32) / scale
    if kv_dtype.is_fp8:
        limit = _FP8_MAX[kv_dtype]
        y = y.clamp(-limit, limit)  # NaN propagates through clamp
    return y.to(getattr(torch, kv_dtype.value))


def _overlap(a: Any, b: Any) -> bool:
    """Whether the byte spans of two tensors on one device intersect (metadata only)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    spans = []
    for x in (a, b):
        lo = x.data_ptr()
        spans.append((lo, lo + (sum((e - 1) * s for e, s in zip(x.shape, x.stride())) + 1)
                      * x.element_size()))
    return spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def _torch_of(*tensors: Any) -> Any:
    """The torch module, when every one of ``tensors`` is a torch tensor."""
    torch = sys.modules.get("torch")
    for name, x in zip(("k_cache", "v_cache", "k_new", "v_new"), tensors):
        if torch is None or not isinstance(x, torch.Tensor):
            raise ContractError(f"append_kv takes torch tensors (CPU or CUDA); {name} is a "
                                f"{type(x).__module__}.{type(x).__qualname__}")
    return torch


def _check_torch(torch: Any, name: str, x: Any) -> None:
    """A torch tensor that flashdec can read and write as memory (check_torch_tensor)."""
    if not isinstance(x, torch.Tensor):
        raise ContractError(f"{name} must be a torch tensor (append_kv takes torch tensors), "
                            f"got {type(x).__module__}.{type(x).__qualname__}")
    check_torch_tensor(x, name)


def _check_rank(name: str, x: Any, rank: int, axes: str) -> None:
    if x.dim() != rank:
        raise ContractError(f"{name} must have rank {rank} {axes}, got rank {x.dim()} with "
                            f"shape {tuple(x.shape)}")


def _name(dtype: DType | str) -> str:
    return dtype.value if isinstance(dtype, DType) else str(dtype)


def _check_dtype(name: str, x: Any, dtype: DType) -> None:
    given = DType.parse(x.dtype)
    if given != dtype:
        raise ContractError(f"{name} has dtype {_name(given)}; expected {dtype.value}")


def _check_dtypes(new: DType | str, v_new: DType | str, kv: DType | str,
                  v_kv: DType | str) -> None:
    """k_new and v_new share a compute dtype; the caches share it or one fp8 dtype."""
    if new not in _NEW_DTYPES:
        names = ", ".join(d.value for d in _NEW_DTYPES)
        raise ContractError(f"k_new has dtype {_name(new)}; supported dtypes: {names}")
    if v_new != new:
        raise ContractError(f"v_new has dtype {_name(v_new)} but k_new has {_name(new)}: k_new "
                            f"and v_new must share one dtype")
    if kv != new and kv not in _FP8_MAX:
        raise ContractError(f"k_cache has dtype {_name(kv)} but k_new has {_name(new)}: the "
                            f"cache must have k_new's dtype or an fp8 dtype (float8_e4m3fn, "
                            f"float8_e5m2)")
    if v_kv != kv:
        raise ContractError(f"v_cache has dtype {_name(v_kv)} but k_cache has {_name(kv)}: "
                            f"k_cache and v_cache must share one dtype")


def _check_writable(torch: Any, name: str, cache: Any) -> None:
    """The cache can be written in place and each of its elements is its own memory."""
    if cache.is_inference() and not torch.is_inference_mode_enabled():
        raise ContractError(f"{name} is read-only here: it is an inference tensor (made under "
                            f"torch.inference_mode()), which torch writes in place only inside "
                            f"torch.inference_mode(); call append_kv there")
    check_distinct_elements(name, tuple(cache.shape), tuple(cache.stride()))


def _scale(torch: Any, name: str, value: Any, kv_dtype: DType, num_kv_heads: int,
           device: Any) -> Any:
    """The divisor of the stored values as a float32 tensor on the cache's device that
    broadcasts against ``[B, H_kv, D]``, or None (store as is). A float becomes a 0-dim
    device tensor (a fill, no copy from the host), so the division is an IEEE float32
    division on every device (CUDA would otherwise multiply by a host scalar's reciprocal)."""
    if value is None:
        if kv_dtype.is_fp8:
            raise ContractError(f"{name} is required with an fp8 cache ({kv_dtype.value}): "
                                f"pass a float or a float32 tensor [num_kv_heads]")
        return None
    if isinstance(value, torch.Tensor):
        _check_torch(torch, name, value)
        _check_dtype(name, value, DType.float32)
        if tuple(value.shape) != (num_kv_heads,):
            raise ContractError(f"{name} must have shape ({num_kv_heads},) [num_kv_heads], "
                                f"got {tuple(value.shape)}")
        if value.device != device:
            raise ContractError(f"{name} is on {value.device}; a scale tensor must be on the "
                                f"cache's device ({device})")
        if value.device.type == "cpu" and value.numel():
            bad = ~(torch.isfinite(value) & (value > 0))
            if bool(bad.any()):
                g = int(bad.to(torch.uint8).argmax())
                raise ContractError(f"{name}[{g}] is {float(value[g])}; every scale must be "
                                    f"finite and > 0")
        return value[None, :, None]
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ContractError(f"{name} must be a finite real number > 0 or a float32 tensor "
                            f"[num_kv_heads], got {type(value).__name__} {value!r}")
    result = float(value)
    if not (math.isfinite(result) and result > 0):
        raise ContractError(f"{name} must be finite and > 0, got {result}")
    if not FP32_RANGE[0] <= result <= FP32_RANGE[1]:
        raise ContractError(f"{name} must be in [2**-126, 2**126] (decode reads it as a normal "
                            f"float32), got {result:g}")
    return torch.full((), result, dtype=torch.float32, device=device)


def _positions(torch: Any, positions: Any, batch: int, device: Any) -> tuple[Any, Any]:
    """``(tensor, host)``: the given tensor or None, and the B positions as Python ints when
    they lie in host memory (a CPU tensor, a sequence, a NumPy array), else None."""
    if isinstance(positions, torch.Tensor):
        _check_torch(torch, "positions", positions)
        _check_dtype("positions", positions, DType.int32)
        if tuple(positions.shape) != (batch,):
            raise ContractError(f"positions must have shape ({batch},) [batch], got "
                                f"{tuple(positions.shape)}")
        if positions.device != device and positions.device.type != "cpu":
            raise ContractError(f"positions is on {positions.device}; it must be on the cache's "
                                f"device ({device}) or in host memory")
        host = positions.tolist() if positions.device.type == "cpu" else None
        return positions, host
    import numpy

    if isinstance(positions, (str, bytes)) or not isinstance(positions,
                                                             (Sequence, numpy.ndarray)):
        raise ContractError(f"positions must be an int32 tensor [batch] or a host sequence of "
                            f"ints, got {type(positions).__name__}")
    try:
        values = numpy.asarray(positions)
    except (ValueError, TypeError) as exc:
        raise ContractError(f"positions must be an int32 tensor [batch] or a flat sequence of "
                            f"ints: {exc}") from exc
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ContractError(f"positions must be an int32 tensor [batch] or a flat sequence of "
                            f"ints, got {type(positions).__name__} of {values.dtype} with shape "
                            f"{values.shape}")
    if values.shape != (batch,):
        raise ContractError(f"positions must hold {batch} ints (one per sequence of k_new), "
                            f"got {values.shape[0]}")
    return None, [int(p) for p in values.tolist()]


def _check_host_positions(host: list[int], capacity: int, where: str) -> None:
    for b, p in enumerate(host):
        if not 0 <= p < capacity:
            raise ContractError(f"positions[{b}] is {p}; every position must be in "
                                f"[0, {capacity}) ({where})")


def _check_host_pages(block_table: Any, host: list[int], page_size: int,
                      num_pages: int) -> None:
    """The page each sequence writes (its position already checked) is in the pools."""
    for b, p in enumerate(host):
        column = p // page_size
        page = int(block_table[b, column])
        if not 0 <= page < num_pages:
            raise ContractError(f"block_table[{b}, {column}] is {page}, the page positions[{b}] "
                                f"= {p} writes to; page ids must be in [0, {num_pages}) "
                                f"(k_cache's num_pages)")
