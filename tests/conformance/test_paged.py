"""Conformance of the paged KV cache on every backend: K/V pools of pages read through a block
table, against the float64 reference of the contiguous cache the pages stand for.

Pages are shuffled at random in a pool that holds extra pages; every page no sequence owns, and
every row at or past a sequence's length, is NaN, and the table's entries past the pages a
sequence reaches hold ids outside the pool, so a backend that reads any of them gives NaN (or
faults under compute-sanitizer). Outputs are NaN-poisoned before each run.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashdec
from flashdec import ContractError
from flashdec_testing import (BACKENDS, assert_close, make_qkv, poison_unattended, poisoned_like,
                              poisoned_lse)

pytestmark = pytest.mark.parametrize("backend,device", BACKENDS)

RAGGED = [0, 1, 97, 300, 256]  # empty, one key, ragged, full capacity, a page boundary


def paginate(k, v, page_size, seqlens, seed, layout="hnd", extra_pages=3):
    """(k_pages, v_pages, block_table) holding the contiguous k, v [B, H_kv, cap, D] as
    shuffled pages; layout "nhd" stores the pools [num_pages, page_size, H_kv, D] (vLLM's)
    and returns their HND views."""
    batch, heads, cap, dim = k.shape
    max_pages = math.ceil(cap / page_size)
    num_pages = batch * max_pages + extra_pages
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
    pools = []
    for x in (k, v):
        shape = ((num_pages, page_size, heads, dim) if layout == "nhd"
                 else (num_pages, heads, page_size, dim))
        pool = torch.full(shape, float("nan"), dtype=torch.float32, device=x.device).to(x.dtype)
        hnd = pool.permute(0, 2, 1, 3) if layout == "nhd" else pool
        padded = torch.full((batch, heads, max_pages * page_size, dim), float("nan"),
                            dtype=torch.float32, device=x.device).to(x.dtype)
        padded[:, :, :cap] = x
        for b in range(batch):
            for i in range(max_pages):
                hnd[ids[b, i]] = padded[b, :, i * page_size:(i + 1) * page_size]
        pools.append(hnd)
    table = ids.to(torch.int32)
    for b, n in enumerate(seqlens):  # entries past the pages a sequence reaches: never read
        table[b, math.ceil(n / page_size):] = num_pages + 1000 * (b + 1)
    return pools[0], pools[1], table.to(k.device)


def _lengths(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize("page_size", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_paged_matches_the_contiguous_cache(backend, device, page_size, dtype):
    q, k, v = make_qkv(len(RAGGED), 8, 2, 300, 64, dtype, device, seed=page_size)
    poison_unattended(k, v, RAGGED)
    kp, vp, table = paginate(k, v, page_size, RAGGED, seed=page_size)
    out, lse = flashdec.decode(q, kp, vp, poisoned_like(q), block_table=table,
                               seqlens=_lengths(RAGGED, device), lse_out=poisoned_lse(q),
                               backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "seqlens[b] == 0 must give Y = 0"
    assert_close(out, q, k, v, lse=lse, seqlens=RAGGED)


@pytest.mark.parametrize("page_size", [16, 32, 7])
@pytest.mark.parametrize("head_dim,group", [(128, 4), (80, 1), (256, 8)])
def test_paged_vllm_layout_and_head_dims(backend, device, page_size, head_dim, group):
    lengths = [513, 1, 640, 77]
    q, k, v = make_qkv(4, 2 * group, 2, 640, head_dim, "bfloat16", device, seed=head_dim)
    poison_unattended(k, v, lengths)
    kp, vp, table = paginate(k, v, page_size, lengths, seed=3, layout="nhd")
    out = flashdec.decode(q, kp, vp, poisoned_like(q), block_table=table,
                          seqlens=_lengths(lengths, device), backend=backend)
    assert_close(out, q, k, v, seqlens=lengths)


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_paged_fp8_pool_with_every_feature(backend, device, kv_dtype):
    """fp8 pages with per-head scales, softcap, a window, cache_leftpad and LSE together."""
    lengths, leftpad = [700, 35, 1024, 0], [0, 30, 600, 0]
    q, k, v = make_qkv(4, 16, 4, 1024, 128, "bfloat16", device, seed=7, kv_dtype=kv_dtype,
                       scale=2.0)
    poison_unattended(k, v, lengths, window_left=300)
    kp, vp, table = paginate(k, v, 32, lengths, seed=4)
    ks, vs = (torch.rand(4, generator=torch.Generator().manual_seed(s)) + 0.5 for s in (1, 2))
    options = {"num_splits": 7} if backend == "cuda" else {}
    out, lse = flashdec.decode(q, kp, vp, poisoned_like(q), block_table=table,
                               seqlens=_lengths(lengths, device), softcap=20.0, window_left=300,
                               cache_leftpad=_lengths(leftpad, device), k_scale=ks.to(device),
                               v_scale=vs.to(device), lse_out=poisoned_lse(q), backend=backend,
                               **options)
    assert_close(out, q, k, v, lse=lse, seqlens=lengths, softcap=20.0, window_left=300,
                 cache_leftpad=leftpad, k_scale=ks, v_scale=vs)


def test_cache_leftpad_on_a_contiguous_cache(backend, device):
    lengths, leftpad = [300, 300, 120, 300], [0, 299, 20, 300]
    q, k, v = make_qkv(4, 8, 2, 300, 64, "float16", device, seed=8)
    for b, first in enumerate(leftpad):  # left padding holds garbage
        k[b, :, :first] = float("nan")
        v[b, :, :first] = float("nan")
    poison_unattended(k, v, lengths)
    out = flashdec.decode(q, k, v, poisoned_like(q), seqlens=_lengths(lengths, device),
                          cache_leftpad=_lengths(leftpad, device), backend=backend)
    assert torch.equal(out[3], torch.zeros_like(out[3])), "no key past the padding: Y = 0"
    assert_close(out, q, k, v, seqlens=lengths, cache_leftpad=leftpad)


def test_paged_plan_runs_with_new_tables_and_lengths(backend, device):
    """A plan fixes max_pages; each run reads its own table and lengths."""
    plan = None
    for step, lengths in enumerate(([512, 3, 100], [17, 512, 0], [256, 255, 257])):
        q, k, v = make_qkv(3, 8, 2, 512, 64, "bfloat16", device, seed=9 + step)
        poison_unattended(k, v, lengths)
        kp, vp, table = paginate(k, v, 16, lengths, seed=10 + step)
        seqlens = _lengths(lengths, device)
        if plan is None:
            plan = flashdec.plan(q, kp, vp, block_table=table, seqlens=seqlens, backend=backend)
        out = plan.run(q, kp, vp, poisoned_like(q), block_table=table, seqlens=seqlens)
        assert_close(out, q, k, v, seqlens=lengths)


def test_paged_errors_name_the_argument(backend, device):
    q, k, v = make_qkv(2, 8, 2, 64, 32, "float32", device, seed=11)
    kp, vp, table = paginate(k, v, 16, [64, 64], seed=12)
    seqlens = _lengths([64, 64], device)
    with pytest.raises(ContractError, match=r"seqlens is required with block_table"):
        flashdec.decode(q, kp, vp, block_table=table, backend=backend)
    with pytest.raises(ContractError, match=r"block_table has dtype int64; expected int32"):
        flashdec.decode(q, kp, vp, block_table=table.long(), seqlens=seqlens, backend=backend)
    with pytest.raises(ContractError, match=r"block_table must have shape \(2, 4\)"):
        flashdec.decode(q, kp, vp, block_table=table[:1], seqlens=seqlens, backend=backend)
    with pytest.raises(ContractError, match=r"block_table must have rank 2"):
        flashdec.decode(q, kp, vp, block_table=table[0], seqlens=seqlens, backend=backend)
    with pytest.raises(ContractError, match=r"v must have the shape of k"):
        flashdec.decode(q, kp, vp[:, :, :8], block_table=table, seqlens=seqlens,
                        backend=backend)
    with pytest.raises(ContractError, match=r"cache_leftpad has dtype int64"):
        flashdec.decode(q, k, v, seqlens=seqlens, cache_leftpad=seqlens.long(), backend=backend)
    if device == "cpu":  # host values are checked; device values are clamped by the kernel
        bad = table.clone()
        bad[1, 2] = 99
        with pytest.raises(ContractError, match=r"block_table\[1, 2\] is 99, a page sequence 1 "
                                                r"reads .*in \[0, 11\)"):
            flashdec.decode(q, kp, vp, block_table=bad, seqlens=seqlens, backend=backend)
        bad[1, 2] = -1
        with pytest.raises(ContractError, match=r"block_table\[1, 2\] is -1"):
            flashdec.decode(q, kp, vp, block_table=bad, seqlens=seqlens, backend=backend)
        with pytest.raises(ContractError, match=r"cache_leftpad\[0\] is 65"):
            flashdec.decode(q, k, v, seqlens=seqlens, cache_leftpad=_lengths([65, 0], device),
                            backend=backend)
    else:
        with pytest.raises(ContractError, match=r"block_table must be on k's device"):
            flashdec.decode(q, kp, vp, block_table=table.cpu(), seqlens=seqlens,
                            backend=backend)
