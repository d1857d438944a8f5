"""Context- and tensor-parallel decode over torch.distributed: gloo on the CPU with 2 and 3
processes (and NCCL with the cuda backend where 2 GPUs exist), each rank holding a ragged shard
of every sequence (one rank with no keys for some sequence), against a single-process decode of
the whole sequence, in float32 and bfloat16 (the exchanged partial Y is in q's dtype); every
rank's result bitwise equal to rank 0's."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashdec
from flashdec import ContractError
from flashdec.distributed import context_parallel_decode, head_shard
from flashdec_testing import assert_close, make_qkv

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

LENGTHS = [300, 5, 0, 257]  # per sequence: full, short, empty, ragged
WINDOW = 100


def _shard_bounds(world: int, length: int) -> list[tuple[int, int]]:
    """Uneven contiguous shards of [0, length): rank r gets a growing share (rank 0 may get
    nothing of a short sequence)."""
    weights = [r + 1 for r in range(world)]
    cuts, acc = [0], 0
    for w in weights:
        acc += w
        cuts.append(length * acc // sum(weights))
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def _worker(rank: int, world: int, store: str, results: str, backend: str, dtype: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        device = "cpu"
        if backend == "nccl":
            device = f"cuda:{rank}"
            torch.cuda.set_device(device)
        q, k, v = make_qkv(len(LENGTHS), 8, 2, max(LENGTHS), 32, dtype, "cpu", seed=1)
        shards = [_shard_bounds(world, n)[rank] for n in LENGTHS]
        cap = max(hi - lo for lo, hi in shards) or 1
        k_shard = torch.zeros(len(LENGTHS), 2, cap, 32, dtype=q.dtype)
        v_shard = torch.zeros_like(k_shard)
        for b, (lo, hi) in enumerate(shards):
            k_shard[b, :, : hi - lo] = k[b, :, lo:hi]
            v_shard[b, :, : hi - lo] = v[b, :, lo:hi]
            k_shard[b, :, hi - lo:] = float("nan")  # past the shard's keys: never read
            v_shard[b, :, hi - lo:] = float("nan")
        seqlens = torch.tensor([hi - lo for lo, hi in shards], dtype=torch.int32)
        # a window over the whole sequence: a per-shard left offset
        leftpad = torch.tensor([max(0, min(hi - lo, n - 1 - WINDOW - lo)) if hi > lo else 0
                                for (lo, hi), n in zip(shards, LENGTHS)], dtype=torch.int32)
        q, k_shard, v_shard, seqlens, leftpad = (x.to(device) for x in (q, k_shard, v_shard,
                                                                        seqlens, leftpad))
        y, lse = context_parallel_decode(q, k_shard, v_shard, seqlens=seqlens, softcap=20.0,
                                         cache_leftpad=leftpad, return_lse=True)
        torch.save({"y": y.cpu(), "lse": lse.cpu()}, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _backends():
    """gloo on CPUs always; NCCL (the cuda backend) where this machine has the GPUs."""
    yield pytest.param("gloo", 2, "float32", id="gloo-2-float32")
    yield pytest.param("gloo", 3, "float32", id="gloo-3-float32")
    yield pytest.param("gloo", 2, "bfloat16", id="gloo-2-bfloat16")
    enough = dist.is_nccl_available() and torch.cuda.device_count() >= 2
    for dtype in ("float32", "bfloat16"):
        yield pytest.param("nccl", 2, dtype, id=f"nccl-2-{dtype}",
                           marks=() if enough else pytest.mark.skip("needs 2 CUDA GPUs and NCCL"))


@pytest.mark.parametrize("backend,world,dtype", list(_backends()))
def test_context_parallel_matches_one_process(backend, world, dtype, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path), backend, dtype),
             nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for other in got[1:]:  # identical on every rank
        assert torch.equal(other["y"], got[0]["y"]) and torch.equal(other["lse"], got[0]["lse"])
    q, k, v = make_qkv(len(LENGTHS), 8, 2, max(LENGTHS), 32, dtype, "cpu", seed=1)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32)
    want, want_lse = flashdec.decode(q, k, v, seqlens=seqlens, softcap=20.0,
                                     window_left=WINDOW, return_lse=True)
    assert got[0]["y"].dtype == q.dtype
    assert_close(got[0]["y"], q, k, v, lse=got[0]["lse"], seqlens=LENGTHS, softcap=20.0,
                 window_left=WINDOW)
    # against one process: within rounding of the dtype (bf16: the partial Y is rounded once
    # more before the merge)
    atol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    assert torch.allclose(got[0]["y"].float(), want.float(), atol=atol)
    assert torch.equal(torch.isinf(got[0]["lse"]), torch.isinf(want_lse))


def test_head_shard_keeps_groups_together():
    q, k, v = make_qkv(2, 32, 8, 64, 16, "float32", "cpu", seed=2)
    whole = flashdec.decode(q, k, v)
    parts = []
    for rank in range(4):
        q_heads, kv_heads = head_shard(32, 8, 4, rank)
        parts.append(flashdec.decode(q[:, q_heads], k[:, kv_heads], v[:, kv_heads]))
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert head_shard(32, 8, 4, 1) == (slice(8, 16), slice(2, 4))
    with pytest.raises(ContractError, match="cannot be split evenly over 3 ranks"):
        head_shard(32, 8, 3, 0)
    with pytest.raises(ContractError, match=r"rank must be an int in \[0, 4\)"):
        head_shard(32, 8, 4, 4)


def test_context_parallel_needs_an_initialised_group():
    q, k, v = make_qkv(1, 4, 4, 10, 16, "float32", "cpu", seed=3)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(ContractError, match="init_process_group"):
        context_parallel_decode(q, k, v)
    with pytest.raises(ContractError, match="out= is not taken"):
        context_parallel_decode(q, k, v, out=torch.empty_like(q))


def test_packed_state_pads_a_row_size_off_16_bytes(tmp_path):
    """bf16 Y of 2 x 3 x 18 elements is 216 bytes, LSE 24: the LSE starts at the next 16-byte
    boundary past Y, and Y still reads back as [B, H_q, D] (one process: the gather copies)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        q, k, v = make_qkv(2, 3, 1, 40, 18, "bfloat16", "cpu", seed=4)
        y, lse = context_parallel_decode(q, k, v, return_lse=True)
        want, want_lse = flashdec.decode(q, k, v, return_lse=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(y, want) and torch.allclose(lse, want_lse)
