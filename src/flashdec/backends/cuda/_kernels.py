"""Which specialization of ``decode.cu`` serves a problem, and the split layout it runs with.

Everything here is host arithmetic with no driver calls, so CI can enumerate and compile every
shipped specialization without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

from ..._contract import DecodeProblem
from ..._dtypes import DType

__all__ = ["KernelSpec", "SplitLayout", "THREADS", "MAX_SPLITS", "MAX_HEAD_DIM", "source",
           "choose_kernel", "kernels_for", "shipped_kernels", "split_layout", "workspace_layout"]

THREADS = 128          # kThreads in decode.cu
MAX_SPLITS = 128       # kMaxSplits in decode.cu
MAX_HEAD_DIM = 256
MAX_GROUP_TILE = 8     # query heads one CTA serves; larger groups take several tiles
VECTOR_BYTES = 16
CTAS_PER_SM = 4        # resident 128-thread CTAs per SM a split layout aims to fill
MIN_SPLIT_ROWS = 128   # below this a split's fixed costs (Q load, merge) outweigh its rows


def source() -> str:
    return resources.files(__package__).joinpath("decode.cu").read_text()


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class KernelSpec:
    """One template instantiation of ``flashdec::decode_kernel``."""

    dtype: DType
    vec: int        # elements per load: 16 bytes (fast path) or 1 (any stride / alignment)
    tpr: int        # lanes per KV row
    nch: int        # chunks of `vec` elements per lane
    group_tile: int
    rows: int       # KV rows per thread group per tile

    @property
    def name_expression(self) -> str:
        return (f"flashdec::decode_kernel<{self.dtype.ctype}, {self.vec}, {self.tpr}, "
                f"{self.nch}, {self.group_tile}, {self.rows}>")

    @property
    def fast(self) -> bool:
        return self.vec > 1

    @property
    def rows_per_tile(self) -> int:
        """KV rows the whole CTA consumes per loop iteration."""
        return THREADS // self.tpr * self.rows


def _make(dtype: DType, vec: int, head_dim: int, group_tile: int) -> KernelSpec:
    chunks = math.ceil(head_dim / vec)
    tpr = min(32, _pow2_at_least(chunks))
    nch = math.ceil(chunks / tpr)
    rows = 2 if group_tile * nch * vec >= 64 else 4  # keeps registers <= 255 with no spills
    return KernelSpec(dtype, vec, tpr, nch, group_tile, rows)


def group_tile_for(group_size: int) -> int:
    return min(MAX_GROUP_TILE, _pow2_at_least(group_size))


def choose_kernel(problem: DecodeProblem, fast: bool) -> KernelSpec:
    vec = VECTOR_BYTES // problem.dtype.itemsize if fast else 1
    return _make(problem.dtype, vec, problem.head_dim, group_tile_for(problem.group_size))


def kernels_for(dtype: DType, head_dim: int, group_tile: int) -> set[KernelSpec]:
    """The element-wise kernel for this problem shape, plus the 16-byte one when D allows it."""
    vec = VECTOR_BYTES // dtype.itemsize
    specs = {_make(dtype, 1, head_dim, group_tile)}
    if head_dim % vec == 0:
        specs.add(_make(dtype, vec, head_dim, group_tile))
    return specs


def shipped_kernels() -> list[KernelSpec]:
    """Every specialization a problem can select: per dtype, head_dim bucket and group tile."""
    specs = set()
    for dtype in (DType.float16, DType.bfloat16, DType.float32):
        for gt in (1, 2, 4, 8):
            for d in range(1, MAX_HEAD_DIM + 1):
                specs |= kernels_for(dtype, d, gt)
    return sorted(specs, key=lambda s: (s.dtype.value, s.vec, s.tpr, s.nch, s.group_tile))


@dataclass(frozen=True)
class SplitLayout:
    """How the KV sequence is cut: ``num_splits`` chunks of ``split_rows`` (none empty)."""

    num_splits: int
    split_rows: int
    num_group_tiles: int


def split_layout(problem: DecodeProblem, spec: KernelSpec, num_sms: int,
                 num_splits: int | None = None) -> SplitLayout:
    """Splits so that the grid fills about CTAS_PER_SM waves of the GPU, with every split
    at least two tiles long; ``num_splits`` (1..MAX_SPLITS) overrides the count."""
    tiles = math.ceil(problem.group_size / spec.group_tile)
    kv_len = problem.kv_len
    if kv_len == 0:
        return SplitLayout(1, 1, tiles)
    if num_splits is None:
        base = problem.batch * problem.num_kv_heads * tiles
        wanted = max(1, math.ceil(num_sms * CTAS_PER_SM / max(base, 1)))
        min_rows = max(2 * spec.rows_per_tile, MIN_SPLIT_ROWS)
        wanted = min(wanted, MAX_SPLITS, max(1, kv_len // min_rows))
        rows = math.ceil(kv_len / wanted)
        rows = math.ceil(rows / spec.rows_per_tile) * spec.rows_per_tile
    else:
        rows = math.ceil(kv_len / num_splits)
    return SplitLayout(math.ceil(kv_len / rows), rows, tiles)


def workspace_layout(problem: DecodeProblem, spec: KernelSpec, split: SplitLayout):
    """Byte sizes of (partial_o, partial_ml, arrivals) as decode.cu indexes them; zeros when
    one split writes Y directly."""
    if split.num_splits == 1:
        return 0, 0, 0
    slots = problem.batch * problem.num_kv_heads * split.num_group_tiles
    per_split = slots * split.num_splits * spec.group_tile
    return per_split * problem.head_dim * 4, per_split * 2 * 4, slots * 4
