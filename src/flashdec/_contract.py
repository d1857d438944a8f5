"""The decode contract: ranks, shapes, dtypes, devices, strides, aliasing, scale.

``Q [B, H_q, D]``, ``K/V [B, H_kv, K_len, D]`` (physical layout), ``Y [B, H_q, D]``,
``kv_head = q_head // (H_q // H_kv)``. Every check raises :class:`ContractError` naming the
argument, what was expected and what was given, before any work is launched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from ._dtypes import DType
from ._errors import ContractError
from ._views import Device, TensorMut, TensorRef

__all__ = ["DecodeProblem", "COMPUTE_DTYPES", "validate", "check_no_overlap", "Layout"]

COMPUTE_DTYPES = (DType.float16, DType.bfloat16, DType.float32)
_NAMES = ", ".join(d.value for d in COMPUTE_DTYPES)


@dataclass(frozen=True)
class DecodeProblem:
    """One decode step's sizes, dtype, device and softmax scale."""

    batch: int
    num_heads: int
    num_kv_heads: int
    kv_len: int
    head_dim: int
    dtype: DType
    scale: float
    device: Device

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes(self) -> int:
        """Bytes of K plus V: the traffic a decode cannot avoid."""
        return 2 * self.batch * self.num_kv_heads * self.kv_len * self.head_dim * self.dtype.itemsize

    @classmethod
    def from_views(cls, q: TensorRef, k: TensorRef, v: TensorRef, out: TensorMut | None = None,
                   scale: float | None = None) -> "DecodeProblem":
        """Validate views against the contract and describe the problem."""
        return validate(q, k, v, out, scale)


class Layout(tuple):
    """(shape, strides, dtype, device) of a view: what a plan checks on every run."""

    __slots__ = ()

    @staticmethod
    def of(view: TensorRef) -> "Layout":
        return Layout((view.shape, view.strides, view.dtype, view.device))


def _fmt_dtype(dtype: DType | str) -> str:
    return dtype.value if isinstance(dtype, DType) else str(dtype)


def _check_rank(name: str, view: TensorRef, rank: int, axes: str) -> None:
    if view.ndim != rank:
        raise ContractError(f"{name} must have rank {rank} {axes}, got rank {view.ndim} with "
                            f"shape {view.shape}")


def _check_strides(name: str, view: TensorRef) -> None:
    if any(s < 0 for s in view.strides):
        raise ContractError(f"{name} has negative strides {view.strides}; flashdec needs "
                            f"strides >= 0 (make a copy with positive strides)")


def _check_output_strides(view: TensorRef) -> None:
    """The output's elements must be distinct memory: no stride 0, no overlapping axes."""
    reach = 0  # elements spanned by the axes taken so far, in stride order
    for stride, extent in sorted((s, e) for e, s in zip(view.shape, view.strides) if e > 1):
        if stride == 0:
            raise ContractError(f"out has stride 0 on an axis of extent {extent} (strides "
                                f"{view.strides}, shape {view.shape}): threads would race "
                                f"writing the same element")
        if stride <= reach:
            raise ContractError(f"out has overlapping strides {view.strides} for shape "
                                f"{view.shape}: two output elements share memory")
        reach += stride * (extent - 1)


def check_no_overlap(out: TensorRef, others: dict[str, TensorRef]) -> None:
    """Y must not share memory with any input (the kernel reads them while writing Y)."""
    lo, hi = out.span_bytes()
    if lo == hi:
        return
    for name, view in others.items():
        a, b = view.span_bytes()
        if a != b and view.device == out.device and a < hi and lo < b:
            raise ContractError(f"out overlaps {name} in memory (out bytes [0x{lo:x}, 0x{hi:x}), "
                                f"{name} bytes [0x{a:x}, 0x{b:x})); write Y to its own buffer")


def resolve_scale(scale: object, head_dim: int) -> float:
    """``scale`` as a finite float; ``None`` means ``1 / sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise ContractError(f"scale must be a finite real number or None, got "
                            f"{type(scale).__name__} {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ContractError(f"scale must be finite, got {value}")
    return value


def validate(q: TensorRef, k: TensorRef, v: TensorRef, out: TensorRef | None,
             scale: object = None) -> DecodeProblem:
    """Check every rule of the contract; return the problem they describe."""
    _check_rank("q", q, 3, "[batch, num_heads, head_dim]")
    _check_rank("k", k, 4, "[batch, num_kv_heads, kv_len, head_dim]")
    _check_rank("v", v, 4, "[batch, num_kv_heads, kv_len, head_dim]")
    if out is not None:
        _check_rank("out", out, 3, "[batch, num_heads, head_dim]")
    views = {"q": q, "k": k, "v": v} | ({"out": out} if out is not None else {})

    if q.dtype not in COMPUTE_DTYPES:
        raise ContractError(f"q has dtype {_fmt_dtype(q.dtype)}; supported dtypes: {_NAMES}")
    for name, view in views.items():
        if view.dtype != q.dtype:
            raise ContractError(f"{name} has dtype {_fmt_dtype(view.dtype)} but q has "
                                f"{q.dtype.value}: q, k, v and out must share one dtype")
        if view.device != q.device:
            raise ContractError(f"{name} is on {view.device} but q is on {q.device}: all "
                                f"tensors must be on one device")

    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, kv_len, _ = k.shape
    if num_heads < 1:
        raise ContractError(f"q must have at least one head, got shape {q.shape}")
    if num_kv_heads < 1:
        raise ContractError(f"k must have at least one KV head, got shape {k.shape}")
    if head_dim < 1:
        raise ContractError(f"head_dim must be >= 1, got q shape {q.shape}")
    if k.shape[0] != batch:
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

    for name, view in views.items():
        _check_strides(name, view)
    if out is not None:
        if out.readonly:
            raise ContractError("out is read-only; pass a writable output or out=None")
        _check_output_strides(out)
        check_no_overlap(out, {"q": q, "k": k, "v": v})

    return DecodeProblem(batch, num_heads, num_kv_heads, kv_len, head_dim, q.dtype,
                         resolve_scale(scale, head_dim), q.device)
