"""Which specialization of ``decode.cu`` serves a problem, and the split layout it runs with.

Two kernel families (see decode.cu's header): the MMA kernel for 16-bit Q with 16-bit or fp8
K/V, head_dim in MMA_HEAD_DIMS and 16-byte aligned rows; the SIMT kernel for everything else. Split partials merge in the split kernel's last CTA or in the combine kernel.
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
           "MAX_FUSED_SPLITS", "MAX_HEAD_DIM", "BY_LENGTH_MAX_BATCH", "BY_LENGTH_MAX_WORKSPACE",
           "BLOCK_ROWS", "CHUNK_ALIGN", "MAX_MERGE_PARTS", "VECTOR_BYTES", "source",
           "choose_kernels", "kernels_for", "shipped_kernels", "split_layout",
           "workspace_layout", "merge_kernel", "combine_kernel", "combine_grid", "split_cost"]

THREADS = 128          # kThreads in decode.cu
WARPS = THREADS // 32
MAX_SPLITS = 512       # kMaxSplits in decode.cu: what the combine kernel merges
MAX_FUSED_SPLITS = 128  # kMaxFusedSplits: what the last-CTA merge takes
COMBINE_DIMS = 32      # kCombineDims: head dimensions per combine CTA
MAX_MERGE_PARTS = 32   # kMaxMergeParts in decode.cu
MAX_HEAD_DIM = 256
MMA_HEADS = 16         # kMmaHeads: query heads per MMA group tile (mma M)
BLOCK_ROWS = 16        # kBlockRows: KV rows per warp per ring stage
MAX_SIMT_GROUP_TILE = 8
# head_dims the MMA kernel is shipped for: the decode.cu template takes any multiple of 16 in
# [32, 256]; these are the ones models use (others take the SIMT kernel), so CI compiles and
# checks 48 MMA specializations per arch rather than 90.
MMA_HEAD_DIMS = (64, 80, 96, 112, 128, 160, 192, 256)
VECTOR_BYTES = 16
MIN_SPLIT_ROWS = 128   # below this a split's fixed costs (Q load, merge) outweigh its rows
# With seqlens (up to BY_LENGTH_MAX_BATCH sequences), splits are cut on the GPU from the live
# lengths (decode.cu's schedule()): pieces of about BY_LENGTH_SPLIT_BYTES of K and V (a few
# us of streaming, so that the CTA scheduler balances ragged lengths over several waves), at
# least BY_LENGTH_FEW_PER_SM per SM over the batch (a short batch still fills the GPU; the
# split cost model's choice for one length; BY_LENGTH_FEW_PER_SM_SMALL_PAGES for pages of
# fewer than two 16-row blocks, whose blocks are random 4 KB reads that want more CTAs in
# flight) and at most BY_LENGTH_MOST_PER_SM (the grid).
# Every CTA reads the batch's lengths first (kSchedulePer = 4 per thread); past that a batch
# is several waves of CTAs already, and the capacity is cut instead.
BY_LENGTH_SPLIT_BYTES = 2 << 20
BY_LENGTH_FEW_PER_SM = 1.0
BY_LENGTH_FEW_PER_SM_SMALL_PAGES = 2.0
BY_LENGTH_MOST_PER_SM = 4.0
BY_LENGTH_MAX_BATCH = 4 * 128
BY_LENGTH_MAX_ROWS = 1 << 30  # schedule() counts rows in int32
# Past this much workspace (large batches of many KV heads: partials are per head tile) the
# capacity is cut instead: such a batch is many waves of CTAs already.
BY_LENGTH_MAX_WORKSPACE = 64 << 20
CHUNK_ALIGN = 64       # kChunkAlign: a split cut by length is a multiple of these rows
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
    def bytes_in_flight(self) -> int:
        """K/V bytes a CTA keeps requested: STAGES - 1 ring blocks per warp."""
        return (WARPS * (self.stages - 1) * 2 * BLOCK_ROWS * self.head_dim
                * self.kv_dtype.itemsize)

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: MmaSmem<...>::kBytes in decode.cu (a CI test checks)."""
        tiles = _mma_tiles(self.kv_dtype, self.head_dim)
        ring = WARPS * self.stages * 2 * tiles.block_bytes
        merge = THREADS * 16 + (MAX_FUSED_SPLITS + 1) * MMA_HEADS * 4 + 16  # MergeSmem<16>, padded
        state = WARPS * MMA_HEADS * (tiles.dim + 2) * 4 + merge
        return tiles.q_bytes + max(ring, state)


@dataclass(frozen=True)
class _MmaTiles:
    """The MMA kernel's shared-memory tiles (MmaSmem in decode.cu)."""

    dim: int          # dimensions the MMAs cover: head_dim, rounded up to 32 for fp8 K/V
    q_bytes: int      # the 16-head Q tile
    block_bytes: int  # one 16-row block of K or V


def _tile_pitch(chunks: int) -> int:
    """tile_pitch<C>() in decode.cu: 16-byte chunks a tile row takes in shared memory."""
    return chunks if chunks % 4 == 0 else chunks + 1


def _mma_tiles(kv_dtype: DType, head_dim: int) -> _MmaTiles:
    dim = head_dim if kv_dtype.itemsize == 2 else -(-head_dim // 32) * 32
    q_bytes = MMA_HEADS * _tile_pitch(dim // 8) * 16
    block_bytes = BLOCK_ROWS * _tile_pitch(dim * kv_dtype.itemsize // 16) * 16
    return _MmaTiles(dim, q_bytes, block_bytes)


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

    @property
    def bytes_in_flight(self) -> int:
        """K/V bytes a CTA has requested at once: one tile of rows in registers."""
        return self.rows_per_tile * 2 * self.tpr * self.nch * self.vec * self.kv_dtype.itemsize


KernelSpec = MmaSpec | SimtSpec


def _mma_ctas_per_sm(head_dim: int) -> int:
    """Resident CTAs per SM the ring is sized for, and the split layout counts on: four up to
    head_dim 64, two up to 128 (each with a ring of 3+ stages: measured faster than three
    CTAs of 2 stages on one-split batches, bench/NOTES.md v4), one above, where the
    accumulators of a 16-head tile take most of the registers."""
    return 4 if head_dim <= 64 else 2 if head_dim <= 128 else 1


def _mma(dtype: DType, kv_dtype: DType, head_dim: int) -> MmaSpec:
    """The MMA kernel with as many ring stages as its CTAs-per-SM budget allows (2..8)."""
    ctas = _mma_ctas_per_sm(head_dim)
    tiles = _mma_tiles(kv_dtype, head_dim)
    stage = WARPS * 2 * tiles.block_bytes
    stages = max(2, min(8, (SMEM_PER_SM // ctas - SMEM_RESERVED - tiles.q_bytes) // stage))
    return MmaSpec(dtype, kv_dtype, head_dim, stages, ctas)


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
    return dtype in MMA_DTYPES and head_dim in MMA_HEAD_DIMS


def _select(dtype: DType, kv: DType, d: int, group_size: int, vector_strides: bool,
            mma: bool = True) -> tuple[KernelSpec, SimtSpec]:
    slow = _simt(dtype, kv, 1, d, _simt_group_tile(group_size))
    if vector_strides and mma and _mma_fits(dtype, d):
        return _mma(dtype, kv, d), slow
    vec = VECTOR_BYTES // dtype.itemsize
    if vector_strides and kv == dtype and d % vec == 0:
        return _simt(dtype, kv, vec, d, slow.group_tile), slow
    return slow, slow


def choose_kernels(problem: DecodeProblem, vector_strides: bool) -> tuple[KernelSpec, SimtSpec]:
    """(kernel for 16-byte aligned K/V pointers, element-wise kernel for any pointer).

    ``vector_strides``: K and V have unit innermost stride and every other stride a multiple
    of 16 bytes, so aligned base pointers make every row 16-byte aligned. A paged cache takes
    the tensor-core kernel only with pages of a whole number of its 16-row blocks (a block
    then lies in one page); other page sizes take the CUDA-core kernel, which finds each
    row's page.
    """
    return _select(problem.dtype, problem.kv_dtype, problem.head_dim, problem.group_size,
                   vector_strides, mma=problem.page_size is None
                   or problem.page_size % BLOCK_ROWS == 0)


def kernels_for(dtype: DType, kv_dtype: DType, head_dim: int, group_size: int) -> set[KernelSpec]:
    """Every kernel a problem of this shape can select (any layout, any pointer, any page
    size): the choices with vector strides hold the element-wise kernel every other layout
    takes."""
    return {spec for mma in (True, False)
            for spec in _select(dtype, kv_dtype, head_dim, group_size, True, mma=mma)}


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


def combine_kernel(dtype: DType, head_dim: int) -> str:
    """Name expression of combine_kernel for Y of ``dtype``: float4 columns when head_dim
    allows."""
    return f"flashdec::combine_kernel<{dtype.ctype}, {4 if head_dim % 4 == 0 else 1}>"


COMBINE_ABOVE_BYTES = 16 * 1024  # partial bytes per slot above which the combine kernel merges


@dataclass(frozen=True)
class SplitLayout:
    """How the KV rows are cut. By capacity (``target_splits`` 0): ``num_splits`` chunks of
    ``split_rows`` (none empty) per sequence. By length (``target_splits`` > 0, with
    seqlens): the GPU cuts the live rows into pieces of about ``split_rows`` rows, at least
    about ``few_splits`` and at most about ``target_splits`` per (kv_head, group tile), none
    under ``min_rows`` rows, at most ``num_splits`` per sequence; ``grid_splits`` CTAs per
    (kv_head, tile) cover any lengths (decode.cu's schedule()). ``combine``: the combine
    kernel (not the split kernel's last CTA) merges the splits."""

    num_splits: int
    split_rows: int
    num_group_tiles: int
    combine: bool = False
    target_splits: int = 0
    few_splits: int = 0
    min_rows: int = 0
    grid_splits: int = 0
    part_capacity: int = 0   # by length: partials per (kv_head, tile), see schedule()

    @property
    def by_length(self) -> bool:
        return self.target_splits > 0


def _merges_apart(problem: DecodeProblem, spec: KernelSpec, num_splits: int) -> bool:
    """The last CTA of a slot reads all of the slot's partials through one CTA's loads; past
    MAX_FUSED_SPLITS splits, or COMBINE_ABOVE_BYTES of partials, the combine kernel spreads
    that over (slot, head, dimension chunk) CTAs instead."""
    if num_splits <= 1:
        return False
    heads = min(spec.group_tile, problem.group_size)
    return (num_splits > MAX_FUSED_SPLITS
            or num_splits * heads * problem.head_dim * 4 > COMBINE_ABOVE_BYTES)


# The split rule's cost model (us, bytes): each constant is measured on the H200 in
# bench/NOTES.md v4 (split sweeps and per-CTA timelines); device numbers come from DeviceInfo.
LATENCY_US = 1.5         # a K/V request's round trip under load (first block 1.7 us after issue)
WAVE_US = 3.0            # per wave of CTAs: start, first round trip, epilogue
SM_SHARE = 1.1           # an SM streams at most this multiple of its fair share of bandwidth
MMA_ROWS_PER_US = 85.0 * 128  # rows x head dims a 16-head MMA CTA consumes per us (fp8: the cap)
FUSED_MERGE_US, FUSED_MERGE_BYTES_PER_US = 0.5, 50e3   # the last CTA of a slot
COMBINE_US, COMBINE_BYTES_PER_US = 1.0, 25e3           # per combine CTA, CTAs in parallel
DEFAULT_BANDWIDTH = 4.0e12  # bytes/s the cost model assumes when the device's is unknown
SUSTAINED_DRAM_FRACTION = 0.82  # of the DRAM peak a decode streams (H200: 4.0 of 4.9 TB/s)


def split_cost(problem: DecodeProblem, spec: KernelSpec, num_sms: int, bandwidth: float,
               num_splits: int) -> float:
    """Modelled us of one launch with ``num_splits`` splits (launch overhead left out): waves
    of CTAs, each streaming its rows at the rate its bytes in flight allow (capped by its
    math and its SM's share of bandwidth, the busiest SM setting the pace), never faster than
    HBM, plus the split merge."""
    tiles = math.ceil(problem.group_size / spec.group_tile)
    base = problem.batch * problem.num_kv_heads * tiles
    rows = math.ceil(problem.kv_len / num_splits)
    ctas = base * num_splits
    resident = num_sms * spec.ctas_per_sm
    waves = math.ceil(ctas / resident)
    per_sm = math.ceil(min(ctas, resident) / num_sms)
    row_bytes = 2 * problem.head_dim * problem.kv_dtype.itemsize
    cta_rate = spec.bytes_in_flight / LATENCY_US
    if isinstance(spec, MmaSpec):
        cta_rate = min(cta_rate, MMA_ROWS_PER_US / problem.head_dim * row_bytes)
    cta_bytes = rows * row_bytes
    # An SM's HBM bytes: the group tiles of a split read the same rows, the later ones in L2.
    sm_hbm_rate = SM_SHARE * bandwidth * 1e-6 / num_sms
    wave_us = max(cta_bytes / cta_rate, per_sm * cta_bytes / tiles / sm_hbm_rate)
    hbm_us = problem.batch * problem.num_kv_heads * problem.kv_len * row_bytes / (bandwidth * 1e-6)
    stream_us = max(waves * wave_us, hbm_us)
    merge_us = 0.0
    if num_splits > 1:
        heads = min(spec.group_tile, problem.group_size)
        slot_bytes = num_splits * heads * problem.head_dim * 4
        if _merges_apart(problem, spec, num_splits):
            chunks = math.ceil(problem.head_dim / COMBINE_DIMS)
            combine_ctas = base * heads * chunks
            merge_us = COMBINE_US + slot_bytes * base / min(
                combine_ctas * COMBINE_BYTES_PER_US, bandwidth * 1e-6)
        else:
            merge_us = FUSED_MERGE_US + slot_bytes / FUSED_MERGE_BYTES_PER_US
    return waves * WAVE_US + stream_us + merge_us


def split_layout(problem: DecodeProblem, spec: KernelSpec, num_sms: int,
                 num_splits: int | None = None,
                 bandwidth: float = DEFAULT_BANDWIDTH) -> SplitLayout:
    """The split layout of a problem. With ``seqlens`` (and at most BY_LENGTH_MAX_BATCH
    sequences, no ``num_splits``): cut by length on the GPU (:func:`_by_length`). Otherwise
    the capacity is cut into the split count with the lowest :func:`split_cost`, every split
    a whole number of CTA tiles and at least MIN_SPLIT_ROWS rows; ``num_splits``
    (1..MAX_SPLITS) overrides the count. ``bandwidth``: bytes/s the device streams (the
    runner passes its DRAM peak x SUSTAINED_DRAM_FRACTION). Depends on sizes only, never on
    live ``seqlens`` values, so a captured graph stays valid. The search evaluates every
    distinct count (under a millisecond), once per plan."""
    tiles = math.ceil(problem.group_size / spec.group_tile)
    kv_len = problem.kv_len
    base = problem.batch * problem.num_kv_heads * tiles
    if kv_len == 0 or base == 0:
        return SplitLayout(1, max(kv_len, 1), tiles)
    if (problem.seqlens and num_splits is None and problem.batch <= BY_LENGTH_MAX_BATCH
            and kv_len < BY_LENGTH_MAX_ROWS):
        layout = _by_length(problem, spec, num_sms, tiles)
        if layout is not None:
            return layout
    if num_splits is None:
        most = max(1, min(MAX_SPLITS, kv_len // MIN_SPLIT_ROWS))
        best = None
        for wanted in range(1, most + 1):
            rows = math.ceil(math.ceil(kv_len / wanted) / spec.rows_per_tile) * spec.rows_per_tile
            count = math.ceil(kv_len / rows)
            if count != wanted:
                continue  # the same layout as a smaller count
            cost = split_cost(problem, spec, num_sms, bandwidth, count)
            if best is None or cost < best[0]:
                best = (cost, rows)
        rows = best[1]
    else:
        rows = math.ceil(kv_len / num_splits)
    count = math.ceil(kv_len / rows)
    if count > MAX_SPLITS:
        rows = math.ceil(kv_len / MAX_SPLITS)
        count = math.ceil(kv_len / rows)
    return SplitLayout(count, rows, tiles, _merges_apart(problem, spec, count))


def _by_length(problem: DecodeProblem, spec: KernelSpec, num_sms: int,
               tiles: int) -> SplitLayout | None:
    """The bounds schedule() in decode.cu cuts within on the GPU (see BY_LENGTH_SPLIT_BYTES),
    at least one split per sequence, pieces of at least MIN_SPLIT_ROWS rows and few enough
    that no sequence has more than its merge takes; the grid and the partials sized by
    schedule()'s bounds. None when those partials would take more than
    BY_LENGTH_MAX_WORKSPACE."""
    per_head = problem.num_kv_heads * tiles
    small_pages = problem.page_size is not None and problem.page_size < 2 * BLOCK_ROWS
    few_per_sm = BY_LENGTH_FEW_PER_SM_SMALL_PAGES if small_pages else BY_LENGTH_FEW_PER_SM
    few = max(problem.batch, int(few_per_sm * num_sms / per_head))
    target = max(few, math.ceil(BY_LENGTH_MOST_PER_SM * num_sms / per_head))
    combine = _merges_apart(problem, spec, math.ceil(few / problem.batch) + 1)
    most = MAX_SPLITS if combine else MAX_FUSED_SPLITS
    reach = problem.kv_len + BLOCK_ROWS - 1  # a live range and its alignment
    min_rows = _round_up(max(MIN_SPLIT_ROWS, math.ceil(reach / most)), CHUNK_ALIGN)
    if reach <= min_rows:  # one split per sequence whatever the lengths
        return SplitLayout(1, problem.kv_len, tiles)
    row_bytes = 2 * problem.head_dim * problem.kv_dtype.itemsize
    piece = _round_up(max(1, BY_LENGTH_SPLIT_BYTES // row_bytes), CHUNK_ALIGN)
    # schedule()'s bounds count W / chunk: at most `target` (chunk >= W / target), and, W
    # being at most B * kv_len, at most `few` below few pieces of `piece` rows, else at most
    # B * kv_len / piece (chunk >= piece). Splits < W / chunk + 2B; partials < 2.62 W / chunk.
    pieces = min(target, max(few, math.ceil(problem.batch * problem.kv_len / piece)))
    if 3 * target + 2 * problem.batch >= 1 << 21:  # past the 21-bit counts of schedule()'s scan
        return None
    layout = SplitLayout(math.ceil(reach / min_rows), piece, tiles, combine,
                         target_splits=target, few_splits=few, min_rows=min_rows,
                         grid_splits=pieces + 2 * problem.batch,
                         part_capacity=21 * pieces // 8 + 1)
    if sum(workspace_layout(problem, spec, layout)) > BY_LENGTH_MAX_WORKSPACE:
        return None
    return layout


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def combine_grid(problem: DecodeProblem, spec: KernelSpec,
                 split: SplitLayout) -> tuple[int, int, int]:
    """combine_kernel's grid: (tile, head in tile), kv_head, (batch, dimension chunk)."""
    chunks = math.ceil(problem.head_dim / COMBINE_DIMS)
    return (split.num_group_tiles * spec.group_tile, problem.num_kv_heads, problem.batch * chunks)


def workspace_layout(problem: DecodeProblem, spec: KernelSpec, split: SplitLayout):
    """Byte sizes of (partial_o, partial_ml, arrivals, slot_info) as decode.cu indexes them;
    zeros when one split writes Y directly."""
    if split.num_splits == 1:
        return 0, 0, 0, 0
    slots = problem.batch * problem.num_kv_heads * split.num_group_tiles
    if split.by_length:
        parts = problem.num_kv_heads * split.num_group_tiles * split.part_capacity
    else:
        parts = slots * split.num_splits
    info = slots * 2 * 4 if split.by_length and split.combine else 0
    per_part = parts * spec.group_tile
    return per_part * problem.head_dim * 4, per_part * 2 * 4, slots * 4, info
