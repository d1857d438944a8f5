"""Which specialization of ``decode.cu`` serves a problem, and the split layout it runs with.

Two kernel families (see decode.cu's header): the MMA kernel for 16-bit Q with 16-bit or fp8
K/V, head_dim a multiple of 64 and 16-byte aligned rows; the SIMT kernel for everything else.
Everything here is host arithmetic with no driver calls, so CI can enumerate and compile
every shipped specialization without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

from ..._contract import DecodeProblem
from ..._dtypes import DType

__all__ = ["MmaSpec", "SimtSpec", "KernelSpec", "SplitLayout", "THREADS", "MAX_SPLITS",
           "MAX_HEAD_DIM", "MAX_MERGE_PARTS", "VECTOR_BYTES", "source", "choose_kernels",
           "kernels_for", "shipped_kernels", "split_layout", "workspace_layout", "merge_kernel"]

THREADS = 128          # kThreads in decode.cu
WARPS = THREADS // 32
MAX_SPLITS = 128       # kMaxSplits in decode.cu
MAX_MERGE_PARTS = 32   # kMaxMergeParts in decode.cu
MAX_HEAD_DIM = 256
MMA_HEADS = 16         # kMmaHeads: query heads per MMA group tile (mma M)
BLOCK_ROWS = 16        # kBlockRows: KV rows per warp per ring stage
MAX_SIMT_GROUP_TILE = 8
VECTOR_BYTES = 16
MIN_SPLIT_ROWS = 128   # below this a split's fixed costs (Q load, merge) outweigh its rows
RAGGED_SPLIT_FACTOR = 4  # with seqlens: splits of a quarter the size (empty ones exit at once)
SMEM_PER_SM = 228 * 1024   # sm_80 / sm_90 shared memory per SM (227 KB at most per CTA)
SMEM_RESERVED = 2 * 1024   # per CTA: the 1 KB the driver reserves, and slack
MMA_DTYPES = (DType.float16, DType.bfloat16)
FP8_DTYPES = (DType.float8_e4m3fn, DType.float8_e5m2)


def source() -> str:
    return resources.files(__package__).joinpath("decode.cu").read_text()


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class MmaSpec:
    """One instantiation of ``flashdec::decode_mma_kernel<T, KV, D, STAGES, CTAS>``."""

    dtype: DType
    kv_dtype: DType
    head_dim: int
    stages: int
    ctas_per_sm: int   # resident CTAs per SM the ring is sized for (__launch_bounds__)

    fast = True
    group_tile = MMA_HEADS
    rows_per_tile = WARPS * BLOCK_ROWS   # rows the CTA consumes per ring step

    @property
    def name_expression(self) -> str:
        return (f"flashdec::decode_mma_kernel<{self.dtype.ctype}, {self.kv_dtype.ctype}, "
                f"{self.head_dim}, {self.stages}, {self.ctas_per_sm}>")

    @property
    def split_ctas_per_sm(self) -> int:
        """CTAs per SM a split layout aims for: two where they fit (measured on H100 in
        bench/NOTES.md: one or two per SM stream equally at one KV head, two are faster with
        batches; more only add partials)."""
        return min(2, self.ctas_per_sm)

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: MmaSmem<...>::kBytes in decode.cu (a CI test checks)."""
        d, kv = self.head_dim, self.kv_dtype.itemsize
        ring = WARPS * self.stages * 2 * BLOCK_ROWS * d * kv
        merge = THREADS * 16 + (MAX_SPLITS + 1) * MMA_HEADS * 4 + 16  # MergeSmem<16>, padded
        state = WARPS * MMA_HEADS * (d + 2) * 4 + merge
        return MMA_HEADS * d * 2 + max(ring, state)


@dataclass(frozen=True)
class SimtSpec:
    """One instantiation of ``flashdec::decode_simt_kernel<T, KV, VEC, TPR, NCH, GT, ROWS>``."""

    dtype: DType
    kv_dtype: DType
    vec: int        # elements per load: 16 bytes (fast path) or 1 (any stride / alignment)
    tpr: int        # lanes per KV row
    nch: int        # chunks of `vec` elements per lane
    group_tile: int
    rows: int       # KV rows per thread group per tile

    smem_bytes = 0  # static shared memory only

    @property
    def name_expression(self) -> str:
        return (f"flashdec::decode_simt_kernel<{self.dtype.ctype}, {self.kv_dtype.ctype}, "
                f"{self.vec}, {self.tpr}, {self.nch}, {self.group_tile}, {self.rows}>")

    @property
    def fast(self) -> bool:
        return self.vec > 1

    @property
    def rows_per_tile(self) -> int:
        return THREADS // self.tpr * self.rows

    @property
    def ctas_per_sm(self) -> int:
        """min_ctas_per_sm<GT, VEC, NCH>() in decode.cu."""
        return 2 if self.vec == 1 or self.group_tile * self.vec * self.nch >= 32 else 3

    split_ctas_per_sm = 4  # register-tiled CTAs hide latency only in numbers


KernelSpec = MmaSpec | SimtSpec


def _mma_ctas_per_sm(kv_dtype: DType, head_dim: int) -> int:
    """More resident warps hide more of each warp's per-block latency; the ring (at least two
    stages a warp) bounds how many CTAs fit. fp8 K/V at D=128 take two, whose register budget
    keeps Q's fragments in registers (decode.cu's kQRegs)."""
    if head_dim > 128:
        return 1
    if head_dim <= 64:
        return 4
    return 2 if kv_dtype.itemsize == 1 else 3


def _mma(dtype: DType, kv_dtype: DType, head_dim: int) -> MmaSpec:
    """The MMA kernel with as many ring stages as its CTAs-per-SM budget allows (2..8)."""
    d, kv = head_dim, kv_dtype.itemsize
    ctas = _mma_ctas_per_sm(kv_dtype, d)
    fixed = MMA_HEADS * d * 2
    stage = WARPS * 2 * BLOCK_ROWS * d * kv
    stages = max(2, min(8, (SMEM_PER_SM // ctas - SMEM_RESERVED - fixed) // stage))
    return MmaSpec(dtype, kv_dtype, d, stages, ctas)


def _simt(dtype: DType, kv_dtype: DType, vec: int, head_dim: int, group_tile: int) -> SimtSpec:
    """16-byte chunks spread over the fewest power-of-two lanes that cover a row; the
    element-wise path always uses a whole warp per row (fewer specializations to ship)."""
    chunks = math.ceil(head_dim / vec)
    tpr = min(32, _pow2_at_least(chunks)) if vec > 1 else 32
    nch = math.ceil(chunks / tpr)
    rows = 2 if group_tile * nch * vec >= 64 else 4  # keeps registers <= 255 with no spills
    return SimtSpec(dtype, kv_dtype, vec, tpr, nch, group_tile, rows)


def _simt_group_tile(group_size: int) -> int:
    return min(MAX_SIMT_GROUP_TILE, _pow2_at_least(group_size))


def _mma_fits(dtype: DType, head_dim: int) -> bool:
    return dtype in MMA_DTYPES and head_dim % 64 == 0 and head_dim <= MAX_HEAD_DIM


def _select(dtype: DType, kv: DType, d: int, group_size: int,
            vector_strides: bool) -> tuple[KernelSpec, SimtSpec]:
    slow = _simt(dtype, kv, 1, d, _simt_group_tile(group_size))
    if vector_strides and _mma_fits(dtype, d):
        return _mma(dtype, kv, d), slow
    vec = VECTOR_BYTES // dtype.itemsize
    if vector_strides and kv == dtype and d % vec == 0:
        return _simt(dtype, kv, vec, d, slow.group_tile), slow
    return slow, slow


def choose_kernels(problem: DecodeProblem, vector_strides: bool) -> tuple[KernelSpec, SimtSpec]:
    """(kernel for 16-byte aligned K/V pointers, element-wise kernel for any pointer).

    ``vector_strides``: K and V have unit innermost stride and every other stride a multiple
    of 16 bytes, so aligned base pointers make every row 16-byte aligned.
    """
    return _select(problem.dtype, problem.kv_dtype, problem.head_dim, problem.group_size,
                   vector_strides)


def kernels_for(dtype: DType, kv_dtype: DType, head_dim: int, group_size: int) -> set[KernelSpec]:
    """Every kernel a problem of this shape can select (any layout, any pointer): the choice
    with vector strides holds the element-wise kernel every other layout takes."""
    return set(_select(dtype, kv_dtype, head_dim, group_size, vector_strides=True))


def kv_dtypes_for(dtype: DType) -> tuple[DType, ...]:
    return (dtype, *FP8_DTYPES) if dtype in MMA_DTYPES else (dtype,)


def shipped_kernels() -> list[KernelSpec]:
    """Every specialization a problem can select: per dtype pair, head_dim and group tile."""
    specs: set[KernelSpec] = set()
    for dtype in (DType.float16, DType.bfloat16, DType.float32):
        for kv in kv_dtypes_for(dtype):
            for group in (1, 2, 4, 8):
                for d in range(1, MAX_HEAD_DIM + 1):
                    specs |= kernels_for(dtype, kv, d, group)
    return sorted(specs, key=lambda s: s.name_expression)


def merge_kernel(dtype: DType) -> str:
    """Name expression of merge_states_kernel for outputs of ``dtype``."""
    return f"flashdec::merge_states_kernel<{dtype.ctype}>"


@dataclass(frozen=True)
class SplitLayout:
    """How the KV capacity is cut: ``num_splits`` chunks of ``split_rows`` (none empty)."""

    num_splits: int
    split_rows: int
    num_group_tiles: int


def split_layout(problem: DecodeProblem, spec: KernelSpec, num_sms: int,
                 num_splits: int | None = None) -> SplitLayout:
    """As many splits as fill one wave of ``split_ctas_per_sm`` CTAs per SM (more with
    ``seqlens``), every split at least MIN_SPLIT_ROWS rows and a whole number of CTA tiles;
    ``num_splits`` (1..MAX_SPLITS) overrides the count. Depends on the capacity K_len only,
    never on live ``seqlens`` values, so a captured graph stays valid."""
    tiles = math.ceil(problem.group_size / spec.group_tile)
    kv_len = problem.kv_len
    base = problem.batch * problem.num_kv_heads * tiles
    if kv_len == 0 or base == 0:
        return SplitLayout(1, max(kv_len, 1), tiles)
    if num_splits is None:
        # One wave of CTAs: every split runs at once, so time follows the longest split.
        wanted = max(1, num_sms * spec.split_ctas_per_sm // base)
        if problem.seqlens:  # live lengths vary: smaller splits let the short ones balance out
            wanted *= RAGGED_SPLIT_FACTOR
        wanted = max(1, min(wanted, MAX_SPLITS, kv_len // MIN_SPLIT_ROWS))
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
