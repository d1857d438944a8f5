"""CUDA kernels without a GPU: the shipped specializations compile for sm_90 and sm_80 (the
families chosen below) with no spills on the fast paths, the ctypes params struct
matches decode.cu, split layouts are sound."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install 'flashdec[cuda]')")

from flashdec._contract import DecodeProblem  # noqa: E402
from flashdec._dtypes import DType  # noqa: E402
from flashdec._views import Device  # noqa: E402
from flashdec.backends.cuda import DecodeParams, MergeParams, precompile  # noqa: E402
from flashdec._errors import CompilationError  # noqa: E402
from flashdec.backends.cuda._compiler import clear_memory_cache, compile_cubin, nvrtc_version  # noqa: E402
from flashdec.backends.cuda._kernels import (DEFAULT_BANDWIDTH, MAX_FUSED_SPLITS,  # noqa: E402
                                             MAX_SPLITS, BY_LENGTH_MAX_BATCH,
                                             BY_LENGTH_MAX_WORKSPACE, BLOCK_ROWS,
                                             CHUNK_ALIGN, MmaSpec,
                                             choose_kernels, combine_kernel, merge_kernel,
                                             shipped_kernels, source, split_cost,
                                             split_layout, workspace_layout)

FAMILIES = ["float16", "bfloat16", "float32", "float16/float8_e4m3fn", "bfloat16/float8_e4m3fn",
            "float16/float8_e5m2", "bfloat16/float8_e5m2"]


def _family(spec) -> str:
    return spec.dtype.value + ("" if spec.kv_dtype == spec.dtype else "/" + spec.kv_dtype.value)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path))
    clear_memory_cache()


def _resources_of(names: list[str], arch: str) -> dict:
    return compile_cubin(source(), names, arch, source_name="decode.cu").resources()


# sm_90 (H100/H200) compiles every family but float16/float8_e5m2, whose two halves (the
# float16 query path, the e5m2 conversion) float16/float8_e4m3fn and bfloat16/float8_e5m2
# compile already. On sm_80 only the arch-specific code differs (cp.async, ldmatrix,
# mma.sync, 16-byte loads), the same for every 16-bit family: a 16-bit family and an fp8 one
# cover it. CI's time (2 cores) goes mostly here: ~45 s a family.
ARCH_FAMILIES = ([("sm_90", f) for f in FAMILIES if f != "float16/float8_e5m2"]
                 + [("sm_80", f) for f in ("float16", "bfloat16/float8_e4m3fn")])


@pytest.mark.parametrize("arch,family", ARCH_FAMILIES)
def test_every_shipped_kernel_compiles_without_fast_path_spills(arch, family):
    """sm_90 compiles every specialization; sm_80 the ones with arch-specific code (the
    element-wise kernel is plain C++)."""
    specs = [s for s in shipped_kernels() if _family(s) == family and (arch == "sm_90" or s.fast)]
    assert specs
    names = [s.name_expression for s in specs]
    if "/" not in family:
        names.append(merge_kernel(specs[0].dtype))
        names += [combine_kernel(specs[0].dtype, d) for d in (128, 81)]  # float4 and scalar
    # NVRTC holds the GIL: halves of the list compile in parallel processes (CI has 2 cores)
    workers = max(1, min(2, os.cpu_count() or 1))
    chunks = [names[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        resources = {}
        for part in pool.map(_resources_of, chunks, [arch] * workers):
            resources.update(part)
    assert set(resources) == set(names)
    spilling = [f"{s.name_expression}: {resources[s.name_expression]}" for s in specs
                if s.fast and (resources[s.name_expression].spill_stores
                               or resources[s.name_expression].spill_loads)]
    assert not spilling, "fast-path kernels spill:\n" + "\n".join(spilling)


def test_params_structs_and_smem_sizes_match_decode_cu():
    """decode.cu's DecodeParams and MergeParams have the ctypes mirrors' size and field
    offsets, and every MMA kernel's dynamic shared memory is what the host passes."""
    checks = []
    for struct in (DecodeParams, MergeParams):
        cname = f"flashdec::{struct.__name__}"
        checks.append(f"static_assert(sizeof({cname}) == {ctypes.sizeof(struct)}, \"size\");")
        for name, _ in struct._fields_:
            offset = getattr(struct, name).offset
            checks.append(f"static_assert(__builtin_offsetof({cname}, {name}) == {offset}, \"{name}\");")
    for spec in shipped_kernels():
        if isinstance(spec, MmaSpec):
            args = spec.name_expression.split("<", 1)[1].rstrip(">").rsplit(",", 1)[0]  # no CTAS
            checks.append(f"static_assert(flashdec::mma_smem_bytes<{args}>() == {spec.smem_bytes}, "
                          f"\"smem {args}\");")
    text = source() + "\n" + "\n".join(checks) + "\n"
    try:
        compile_cubin(text, [], "sm_90", source_name="layout_check.cu", use_cache=False)
    except CompilationError as exc:
        if '"__builtin_offsetof" is undefined' in exc.log:  # NVRTC 13.0 has no offsetof
            pytest.skip(f"NVRTC {nvrtc_version()} lacks __builtin_offsetof; CI's NVRTC checks this")
        raise


def test_host_constants_match_decode_cu():
    """The host's mirrors of decode.cu's constants: a mismatch would size grids, workspaces
    and batches for another kernel (e.g. sequences past the schedule's reach)."""
    from flashdec.backends.cuda import _kernels as K

    mirrors = {"kThreads": K.THREADS, "kMaxSplits": K.MAX_SPLITS,
               "kMaxFusedSplits": K.MAX_FUSED_SPLITS, "kCombineDims": K.COMBINE_DIMS,
               "kMmaHeads": K.MMA_HEADS, "kBlockRows": K.BLOCK_ROWS,
               "kChunkAlign": K.CHUNK_ALIGN, "kMaxMergeParts": K.MAX_MERGE_PARTS,
               "kThreads * flashdec::kSchedulePer": K.BY_LENGTH_MAX_BATCH}
    checks = [f'static_assert(flashdec::{expr} == {value}, "{expr}");'
              for expr, value in mirrors.items()]
    compile_cubin(source() + "\n" + "\n".join(checks) + "\n", [], "sm_90",
                  source_name="constants_check.cu", use_cache=False)


def test_precompile_with_explicit_arch_needs_no_gpu(tmp_path, monkeypatch):
    from flashdec.backends.cuda import _modules

    monkeypatch.setattr(_modules, "_compiled", {})  # kernels earlier tests compiled
    n = precompile(dtypes=["bfloat16"], head_dims=[128, 72], group_sizes=[4], arch="sm_90")
    assert n == 6  # MMA + element-wise SIMT for D=128, 16-byte + element-wise SIMT for D=72,
    # the float4 combine kernel both share, and merge_states
    assert len(list((tmp_path / "kernels").glob("*.cubin"))) == 6
    assert precompile(dtypes=["bfloat16"], kv_dtypes=["float8_e4m3fn"], head_dims=[128],
                      group_sizes=[8], arch="sm_90") == 4  # MMA, element-wise, combine, merge
    import flashdec

    assert flashdec.precompile(dtypes=["float16"], head_dims=[64], group_sizes=[1],
                               arch="sm_90") == 5  # the public entry point; with the 16-byte
    # SIMT kernel of paged caches whose page size is not a multiple of 16


def _problem(batch, hq, hkv, kv_len, d, dtype=DType.bfloat16, **features):
    return DecodeProblem(batch, hq, hkv, kv_len, d, dtype, 1.0, Device("cuda", 0), **features)


@pytest.mark.parametrize("dtype,kv_dtype,head_dim,vector,expected", [
    ("bfloat16", "bfloat16", 128, True, "mma"), ("float16", "float16", 64, True, "mma"),
    ("bfloat16", "float8_e4m3fn", 256, True, "mma"), ("float16", "float8_e5m2", 192, True, "mma"),
    ("bfloat16", "bfloat16", 128, False, "simt-1"), ("bfloat16", "bfloat16", 80, True, "mma"),
    ("bfloat16", "float8_e4m3fn", 80, True, "mma"), ("float16", "float16", 112, True, "mma"),
    ("bfloat16", "bfloat16", 16, True, "simt-8"), ("bfloat16", "bfloat16", 72, True, "simt-8"),
    ("bfloat16", "bfloat16", 48, True, "simt-8"),
    ("bfloat16", "float8_e4m3fn", 72, True, "simt-1"), ("float32", "float32", 128, True, "simt-4"),
])
def test_kernel_choice(dtype, kv_dtype, head_dim, vector, expected):
    """16-bit Q with aligned rows and D in MMA_HEAD_DIMS takes the MMA kernel;
    the rest the SIMT kernel (16-byte loads where the layout and dtype allow); the fallback
    for a misaligned pointer is always the element-wise kernel of the same group tile."""
    problem = _problem(1, 32, 8, 4096, head_dim, DType(dtype), kv_dtype=DType(kv_dtype))
    fast, slow = choose_kernels(problem, vector_strides=vector)
    got = "mma" if isinstance(fast, MmaSpec) else f"simt-{fast.vec}"
    assert got == expected
    assert slow.vec == 1 and slow.kv_dtype == problem.kv_dtype


def test_split_rule_takes_the_cheapest_layout():
    """The automatic count is the split_cost minimum over every distinct layout, never more
    than one wave of resident CTAs; one split where the batch fills the GPU."""
    for shape in [(1, 32, 8, 32768, 128), (8, 32, 8, 8192, 128), (1, 32, 32, 8192, 128),
                  (1, 8, 1, 262144, 128), (2, 16, 16, 5000, 96)]:
        problem = _problem(*shape)
        spec = choose_kernels(problem, vector_strides=True)[0]
        split = split_layout(problem, spec, num_sms=132)
        assert not split.by_length
        chosen = split_cost(problem, spec, 132, DEFAULT_BANDWIDTH, split.num_splits)
        for other in range(1, min(MAX_SPLITS, problem.kv_len // 128) + 1):
            assert chosen <= split_cost(problem, spec, 132, DEFAULT_BANDWIDTH, other) + 1e-9
        ctas = shape[0] * shape[2] * split.num_group_tiles * split.num_splits
        assert split.num_splits == 1 or ctas <= 132 * spec.ctas_per_sm
    big = _problem(64, 32, 8, 2048, 128)
    assert split_layout(big, choose_kernels(big, True)[0], num_sms=132).num_splits == 1


def _schedule(lengths, layout, leftpad=None):
    """An independent model of decode.cu's schedule(): (splits per sequence, rows per split)
    for live lengths (and left padding) under a by-length layout."""
    lo = [0] * len(lengths) if leftpad is None else leftpad
    rows = sum(max(n - a, 0) for n, a in zip(lengths, lo))
    wide = max(layout.min_rows, -(-rows // layout.target_splits),
               min(-(-rows // layout.few_splits), layout.split_rows))
    chunk = -(-wide // CHUNK_ALIGN) * CHUNK_ALIGN
    counts = [1 if n <= a else -(-(n - a // BLOCK_ROWS * BLOCK_ROWS) // chunk)
              for n, a in zip(lengths, lo)]
    return counts, chunk


@pytest.mark.parametrize("shape", [(16, 32, 8, 32768, 128), (1, 8, 1, 65536, 128),
                                   (64, 32, 8, 4096, 128), (3, 16, 16, 5000, 96),
                                   (BY_LENGTH_MAX_BATCH, 8, 1, 2048, 64), (7, 4, 4, 300, 64)])
def test_splits_by_length_fit_the_grid_and_workspace_for_any_lengths(shape):
    """With seqlens the GPU cuts splits from the live lengths; for lengths uniform, ragged,
    one long among empties, all empty, and left-padded, the splits it makes fit the grid
    (grid_splits per kv head), the partials fit part_capacity, no sequence has more splits
    than its merge takes, and pieces have the aimed size unless the batch is short (then about
    few_splits)."""
    import random

    problem = _problem(*shape, seqlens=True)
    spec = choose_kernels(problem, vector_strides=True)[0]
    layout = split_layout(problem, spec, num_sms=132)
    b, cap = shape[0], shape[3]
    if not layout.by_length:
        assert layout.num_splits == 1 and not layout.by_length
        return
    assert layout.target_splits >= layout.few_splits >= b
    assert layout.num_splits <= (MAX_SPLITS if layout.combine else MAX_FUSED_SPLITS)
    rng = random.Random(sum(shape))
    cases = [([cap] * b, None), ([cap // 2 + 1] * b, None), ([0] * b, None),
             ([rng.randint(0, cap) for _ in range(b)], None), ([cap] + [0] * (b - 1), None),
             ([cap] + [1] * (b - 1), None), ([rng.choice([1, cap]) for _ in range(b)], None)]
    pads = [rng.randint(0, cap) for _ in range(b)]
    cases.append(([max(a, rng.randint(0, cap)) for a in pads], pads))
    cases.append(([cap] * b, [BLOCK_ROWS - 1] * b))
    for _ in range(200):  # random mixes, lengths just past multiples of the piece included
        step = rng.choice([layout.min_rows, layout.split_rows, CHUNK_ALIGN])
        lengths = [min(cap, rng.choice([0, 1, cap, rng.randint(0, cap),
                                        step * rng.randint(1, max(1, cap // step)) + 1]))
                   for _ in range(b)]
        pad = [rng.choice([0, 0, BLOCK_ROWS - 1, rng.randint(0, n)]) for n in lengths]
        cases.append((lengths, pad if rng.random() < 0.3 else None))
    for lengths, leftpad in cases:
        counts, chunk = _schedule(lengths, layout, leftpad)
        assert sum(counts) <= layout.grid_splits
        assert sum(n for n in counts if n > 1) <= layout.part_capacity
        assert max(counts) <= layout.num_splits
        assert chunk >= layout.min_rows and chunk % CHUNK_ALIGN == 0
        live = sum(max(n - a, 0) for n, a in zip(lengths, leftpad or [0] * b))
        if live >= layout.few_splits * layout.split_rows:  # pieces of the aimed size
            assert chunk < max(layout.split_rows, live / layout.target_splits) + CHUNK_ALIGN
        elif chunk > layout.min_rows:  # a short batch: about few_splits pieces
            assert sum(counts) >= min(layout.few_splits, b) / 2


def test_pages_of_one_block_are_cut_into_twice_the_ctas():
    """A paged cache of 16-row pages (each block a random 4 KB read of K and of V) is cut into
    at least two CTAs per SM over a short batch; pages of 32+ rows and a per-sequence cache
    into one (bench/NOTES.md v9 measured both)."""
    def few(**features):
        problem = _problem(1, 32, 8, 32768, 128, seqlens=True, **features)
        return split_layout(problem, choose_kernels(problem, True)[0], num_sms=132).few_splits
    assert few() == few(page_size=64) == 16
    assert few(page_size=16) == 33


def test_seqlens_past_by_length_batch_or_workspace_cut_the_capacity():
    big = _problem(BY_LENGTH_MAX_BATCH + 1, 8, 1, 4096, 128, seqlens=True)
    assert not split_layout(big, choose_kernels(big, True)[0], num_sms=132).by_length
    mha = _problem(BY_LENGTH_MAX_BATCH, 32, 32, 32768, 128, seqlens=True)  # ~GBs of partials
    spec = choose_kernels(mha, True)[0]
    assert not split_layout(mha, spec, num_sms=132).by_length
    engine = _problem(64, 32, 8, 32768, 128, seqlens=True)
    spec = choose_kernels(engine, True)[0]
    layout = split_layout(engine, spec, num_sms=132)
    assert layout.by_length
    assert sum(workspace_layout(engine, spec, layout)) <= BY_LENGTH_MAX_WORKSPACE
    fixed = _problem(4, 8, 1, 4096, 128, seqlens=True)
    layout = split_layout(fixed, choose_kernels(fixed, True)[0], num_sms=132, num_splits=3)
    assert not layout.by_length and layout.num_splits == 3


def test_split_cost_model_follows_the_measured_shape_of_the_h200_sweep():
    """bench/NOTES.md v4's sweep: one CTA per SM beats a partial second one at one KV head
    group (16 splits of (1,32,8,32768) over 24), a full wave beats half a wave for MQA, and
    a batch that fills the GPU splits no further."""
    def cost(shape, splits):
        problem = _problem(*shape)
        return split_cost(problem, choose_kernels(problem, True)[0], 132, DEFAULT_BANDWIDTH,
                          splits)
    assert cost((1, 32, 8, 32768, 128), 16) < cost((1, 32, 8, 32768, 128), 24)
    assert cost((1, 8, 1, 65536, 128), 132) < cost((1, 8, 1, 65536, 128), 66)
    assert cost((16, 32, 8, 1024, 128), 1) < cost((16, 32, 8, 1024, 128), 2)


def test_few_kv_heads_split_past_the_fused_merge_into_the_combine_kernel():
    """B x H_kv = 1: about one split per SM, whose partials are past what the last-CTA merge
    reads quickly, so the combine kernel merges (and always past MAX_FUSED_SPLITS); a batch
    that fills the GPU needs no merge; small per-slot partials stay with the last-CTA
    merge."""
    mqa = _problem(1, 8, 1, 65536, 128)
    spec = choose_kernels(mqa, True)[0]
    split = split_layout(mqa, spec, num_sms=132)
    assert 64 < split.num_splits <= 132 * spec.ctas_per_sm and split.combine
    assert not split_layout(mqa, spec, num_sms=132, num_splits=1).combine
    assert not split_layout(mqa, spec, num_sms=132, num_splits=4).combine  # 16 KB of partials
    assert split_layout(mqa, spec, num_sms=132, num_splits=MAX_FUSED_SPLITS + 1).combine
    big = _problem(64, 32, 8, 2048, 128)
    assert not split_layout(big, choose_kernels(big, True)[0], num_sms=132).combine


@pytest.mark.parametrize("head_dim", [64, 96, 128, 160, 256])
@pytest.mark.parametrize("kv_dtype", [DType.bfloat16, DType.float8_e4m3fn])
def test_mma_residency_is_one_number(head_dim, kv_dtype):
    """The ring is sized for the CTAs per SM the split cost model counts on, and that many
    CTAs' shared memory fits an SM (228 KB, 1 KB reserved per CTA)."""
    problem = _problem(1, 32, 8, 4096, head_dim, kv_dtype=kv_dtype)
    spec = choose_kernels(problem, vector_strides=True)[0]
    assert isinstance(spec, MmaSpec)
    assert spec.ctas_per_sm == (4 if head_dim <= 64 else 2 if head_dim <= 128 else 1)
    assert spec.ctas_per_sm * (spec.smem_bytes + 1024) <= 228 * 1024
    assert spec.stages >= 3


@pytest.mark.parametrize("shape", [(1, 32, 8, 4096, 128), (1, 32, 8, 131072, 128),
                                   (64, 32, 8, 2048, 128), (3, 7, 1, 257, 80), (2, 8, 2, 0, 64),
                                   (1, 64, 1, 5, 256), (256, 32, 8, 512, 128)])
@pytest.mark.parametrize("num_splits", [None, 1, 2, 7, MAX_SPLITS])
def test_split_layout_covers_kv_with_no_empty_split(shape, num_splits):
    problem = _problem(*shape)
    spec = choose_kernels(problem, vector_strides=True)[0]
    split = split_layout(problem, spec, num_sms=132, num_splits=num_splits)
    assert 1 <= split.num_splits <= MAX_SPLITS
    if num_splits is not None:
        assert split.num_splits <= num_splits
    kv_len = problem.kv_len
    if kv_len:
        assert split.num_splits * split.split_rows >= kv_len, "rows left uncovered"
        assert (split.num_splits - 1) * split.split_rows < kv_len, "an empty split"
    sizes = workspace_layout(problem, spec, split)
    assert (sum(sizes) == 0) == (split.num_splits == 1)
