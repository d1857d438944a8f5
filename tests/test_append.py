"""``flashdec.append_kv``: one token per sequence written into a contiguous or a paged cache.

Every case fills the cache with random values, writes, and compares the whole underlying
buffer (also memory outside a strided view) with a reference written by plain Python loops
in float64 (fp8: ``torch.tensor(x / s).clamp(-max, max).to(fp8)``, compared bit for bit), so
rows other than the written ones are checked unchanged. Then every typed error, one test per
check; clamping of device values through the index helper (and on a GPU when there is one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec import ContractError
from flashdec._append import _targets

B, H, C, D = 3, 2, 8, 5          # contiguous cache [B, H, C, D]
P, S, MAXP = 10, 4, 3            # pools [P, H, S, D], block_table [B, MAXP]
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device "
                            "positions and tables, clamping, CUDA graphs)")


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0, device="cpu"):
    """Random normal values (never zeros or constants)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return x.to(device=device, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def reference(base, view_of, targets, new):
    """float64 copy of ``base`` with ``view_of(copy)[i0, :, i2, :] = new[b]`` for each
    ``(b, i0, i2)`` in ``targets``: plain loops, nothing shared with the code under test."""
    expected = base.to(torch.float64)
    view = view_of(expected)
    for b, i0, i2 in targets:
        for h in range(new.shape[1]):
            view[i0, h, i2, :] = new[b, h].to(torch.float64)
    return expected


def assert_same(got, expected):
    np.testing.assert_array_equal(got.to(torch.float64).numpy(), expected.numpy())


def contiguous_targets(positions):
    return [(b, b, int(p)) for b, p in enumerate(positions)]


def paged_targets(positions, table):
    return [(b, int(table[b, int(p) // S]), int(p) % S) for b, p in enumerate(positions)]


# Cache layouts: (base shape, view of the base as [B or P, H, C or S, D]).
LAYOUTS = {
    "bhcd": ((B, H, C, D), lambda x: x),
    "nhd-permuted": ((B, C, H, D), lambda x: x.permute(0, 2, 1, 3)),
    "capacity-prefix": ((B, H, C + 3, D + 2), lambda x: x[:, :, :C, :D]),
}
POOL_LAYOUTS = {
    "pool-hnd": ((P, H, S, D), lambda x: x),
    "pool-vllm": ((P, S, H, D), lambda x: x.permute(0, 2, 1, 3)),
    "pool-strided": ((P + 1, H + 1, S, D + 1), lambda x: x[1:, 1:, :, :D]),
}


def table_for_pools():
    """Distinct pages in random order: sequence b owns pages table[b, :]."""
    ids = torch.randperm(P, generator=torch.Generator().manual_seed(3))[:B * MAXP]
    return ids.reshape(B, MAXP).to(torch.int32)


POSITIONS = [5, 0, 7]            # contiguous: every position in [0, C)
PAGED_POSITIONS = [6, 3, 11]     # paged: columns 1, 0, 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("as_", ["tensor", "list", "numpy", "tuple"])
def test_contiguous_cache(dtype, layout, as_):
    shape, view_of = LAYOUTS[layout]
    k_base, v_base = rand(*shape, dtype=dtype, seed=1), rand(*shape, dtype=dtype, seed=2)
    k_new, v_new = rand(B, H, D, dtype=dtype, seed=3), rand(B, H, D, dtype=dtype, seed=4)
    positions = {"tensor": torch.tensor(POSITIONS, dtype=torch.int32), "list": POSITIONS,
                 "numpy": np.array(POSITIONS, dtype=np.int64), "tuple": tuple(POSITIONS)}[as_]
    k_ref = reference(k_base, view_of, contiguous_targets(POSITIONS), k_new)
    v_ref = reference(v_base, view_of, contiguous_targets(POSITIONS), v_new)
    k_ptr = k_base.data_ptr()
    assert flashdec.append_kv(view_of(k_base), view_of(v_base), k_new, v_new,
                              positions=positions) is None
    assert k_base.data_ptr() == k_ptr
    assert_same(k_base, k_ref)
    assert_same(v_base, v_ref)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", list(POOL_LAYOUTS))
@pytest.mark.parametrize("as_", ["tensor", "list"])
def test_paged_pools(dtype, layout, as_):
    shape, view_of = POOL_LAYOUTS[layout]
    k_base, v_base = rand(*shape, dtype=dtype, seed=5), rand(*shape, dtype=dtype, seed=6)
    k_new, v_new = rand(B, H, D, dtype=dtype, seed=7), rand(B, H, D, dtype=dtype, seed=8)
    table = table_for_pools()
    positions = (torch.tensor(PAGED_POSITIONS, dtype=torch.int32) if as_ == "tensor"
                 else PAGED_POSITIONS)
    targets = paged_targets(PAGED_POSITIONS, table)
    k_ref = reference(k_base, view_of, targets, k_new)
    v_ref = reference(v_base, view_of, targets, v_new)
    flashdec.append_kv(view_of(k_base), view_of(v_base), k_new, v_new, positions=positions,
                       block_table=table)
    assert_same(k_base, k_ref)
    assert_same(v_base, v_ref)


def test_paged_strided_block_table_and_unused_bad_entries():
    """A non-contiguous table; entries no sequence writes may be anything (even -1)."""
    k, v = rand(P, H, S, D, seed=9), rand(P, H, S, D, seed=10)
    k_new, v_new = rand(B, H, D, seed=11), rand(B, H, D, seed=12)
    wide = torch.full((B, 2 * MAXP), -1, dtype=torch.int32)
    wide[:, ::2] = table_for_pools()
    table = wide[:, ::2]
    assert not table.is_contiguous()
    targets = paged_targets(PAGED_POSITIONS, table)
    k_ref = reference(k, lambda x: x, targets, k_new)
    flashdec.append_kv(k, v, k_new, v_new, positions=PAGED_POSITIONS, block_table=table)
    assert_same(k, k_ref)


def fp8_expected(x, scale, fp8):
    """The brief's reference: x / s in float64, saturated, then torch's fp8 rounding."""
    s = scale.to(torch.float64)[None, :, None] if isinstance(scale, torch.Tensor) else scale
    return torch.tensor((x.to(torch.float64) / s).numpy()).clamp(
        -FP8_MAX[fp8], FP8_MAX[fp8]).to(getattr(torch, fp8))


@pytest.mark.parametrize("fp8", list(FP8_MAX))
@pytest.mark.parametrize("new_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("scales", ["float", "per-head"])
@pytest.mark.parametrize("paged", [False, True])
def test_fp8_cache(fp8, new_dtype, scales, paged):
    big = FP8_MAX[fp8] / 4  # some values saturate
    k_new = rand(B, H, D, dtype=new_dtype, scale=big, seed=13)
    v_new = rand(B, H, D, dtype=new_dtype, scale=big, seed=14)
    if scales == "float":
        k_scale, v_scale = float(np.float32(0.37)), 0.5
    else:
        k_scale = torch.tensor([0.37, 1.5], dtype=torch.float32)
        v_scale = torch.tensor([2.0, 0.125], dtype=torch.float32)
    if paged:
        shape, table, positions = (P, S, H, D), table_for_pools(), PAGED_POSITIONS
        view_of = POOL_LAYOUTS["pool-vllm"][1]
        targets = paged_targets(positions, table)
    else:
        shape, table, positions = (B, H, C, D), None, POSITIONS
        view_of = LAYOUTS["bhcd"][1]
        targets = contiguous_targets(positions)
    k_base = rand(*shape, scale=50, seed=15).to(getattr(torch, fp8))
    v_base = rand(*shape, scale=50, seed=16).to(getattr(torch, fp8))
    expected = []
    for base, new, scale in ((k_base, k_new, k_scale), (v_base, v_new, v_scale)):
        ref = base.clone()
        stored = fp8_expected(new, scale, fp8)
        for b, i0, i2 in targets:
            view_of(ref)[i0, :, i2, :] = stored[b]
        expected.append(ref)
    flashdec.append_kv(view_of(k_base), view_of(v_base), k_new, v_new, positions=positions,
                       block_table=table, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(k_base.view(torch.uint8), expected[0].view(torch.uint8))
    assert torch.equal(v_base.view(torch.uint8), expected[1].view(torch.uint8))


@pytest.mark.parametrize("fp8", list(FP8_MAX))
def test_fp8_saturation_rounding_and_nan(fp8):
    """x / s at the format's max and past it (saturated, also +-inf), ties (rounded to
    nearest even), NaN kept; per-head scales of powers of two so x / s is exact."""
    top = FP8_MAX[fp8]
    # e4m3fn: 1 + 1/16 is a tie of 1 (even) and 1.125; 1 + 3/16 a tie of 1.125 and 1.25
    # (even). e5m2: 1 + 1/8 a tie of 1 (even) and 1.25; 1 + 3/8 a tie of 1.25 and 1.5 (even).
    step = 1 / 8 if fp8 == "float8_e4m3fn" else 1 / 4
    values = [top, -top, 2 * top, -3 * top, float("inf"), float("-inf"), 1 + step / 2,
              1 + 1.5 * step, float("nan"), 0.0]
    rounded = [top, -top, top, -top, top, -top, 1.0, 1 + 2 * step, float("nan"), 0.0]
    scale = torch.tensor([0.5, 4.0], dtype=torch.float32)
    x = torch.tensor(values, dtype=torch.float32)
    k_new = torch.stack([x * 0.5, x * 4.0])[None]          # [1, H=2, D=10]
    v_new = k_new.clone()
    k = rand(1, 2, 3, len(values), scale=10).to(getattr(torch, fp8))
    v = k.clone()
    flashdec.append_kv(k, v, k_new, v_new, positions=[1], k_scale=scale, v_scale=scale)
    for h in range(2):
        got = k[0, h, 1].to(torch.float64).numpy()
        np.testing.assert_array_equal(got, np.array(rounded))
        brief = fp8_expected(k_new, scale, fp8)[0, h]
        assert torch.equal(k[0, h, 1].view(torch.uint8), brief.view(torch.uint8))
    assert torch.equal(k.view(torch.uint8), v.view(torch.uint8))


def test_scale_on_a_cache_of_new_dtype():
    """Without fp8 a scale is optional; given, the cache stores x / scale (decode reads
    k_scale * K)."""
    k, v = rand(B, H, C, D, dtype="float16", seed=17), rand(B, H, C, D, dtype="float16", seed=18)
    k_new, v_new = rand(B, H, D, dtype="float16", seed=19), rand(B, H, D, dtype="float16", seed=20)
    k_ref = reference(k, lambda x: x, contiguous_targets(POSITIONS),
                      (k_new.to(torch.float64) / 3.0).to(torch.float16))
    flashdec.append_kv(k, v, k_new, v_new, positions=POSITIONS, k_scale=3.0)
    assert_same(k, k_ref)


def test_new_rows_read_from_the_cache_itself():
    """k_new may be a view of the cache: it is read before the cache is written."""
    k, v = rand(B, H, C, D, seed=21), rand(B, H, C, D, seed=22)
    k_new, v_new = k[:, :, 5], v[:, :, 0]
    k_ref = reference(k, lambda x: x, contiguous_targets([0, 0, 0]), k_new.clone())
    v_ref = reference(v, lambda x: x, contiguous_targets([0, 0, 0]), v_new.clone())
    flashdec.append_kv(k, v, k_new, v_new, positions=[0, 0, 0])
    assert_same(k, k_ref)
    assert_same(v, v_ref)


def test_empty_batch_and_inference_mode():
    k = torch.randn(0, H, C, D)
    flashdec.append_kv(k, k.clone(), torch.randn(0, H, D), torch.randn(0, H, D), positions=[])
    with torch.inference_mode():
        k, v = rand(B, H, C, D, seed=23), rand(B, H, C, D, seed=24)
        k_new, v_new = rand(B, H, D, seed=25), rand(B, H, D, seed=26)
        k_ref = reference(k, lambda x: x, contiguous_targets(POSITIONS), k_new)
        flashdec.append_kv(k, v, k_new, v_new, positions=POSITIONS)
        assert_same(k, k_ref)


def test_appended_paged_cache_decodes_like_a_contiguous_one():
    """Tokens appended one step at a time into pools (table from a page list) and into a
    contiguous cache: decode (torch backend) gives the same result on both."""
    page_size, steps = 3, 7
    counts = [3, 1, 2]                      # pages per sequence; lengths 7, 3, 5 after steps
    lengths = [7, 3, 5]
    pages = torch.randperm(12, generator=torch.Generator().manual_seed(4))[:sum(counts)]
    indptr = np.concatenate([[0], np.cumsum(counts)])
    last = [n - (c - 1) * page_size for n, c in zip(lengths, counts)]
    table, seqlens = flashdec.block_table_from_page_list(
        torch.tensor(indptr), pages, torch.tensor(last), page_size)
    assert seqlens.tolist() == lengths
    k_pool, v_pool = rand(12, page_size, H, D, seed=27), rand(12, page_size, H, D, seed=28)
    k_flat, v_flat = rand(B, H, 9, D, seed=29), rand(B, H, 9, D, seed=30)
    for t in range(steps):
        k_new, v_new = rand(B, H, D, seed=100 + t), rand(B, H, D, seed=200 + t)
        pos = [min(t, n - 1) for n in lengths]  # finished sequences rewrite their last row
        flashdec.append_kv(k_pool.permute(0, 2, 1, 3), v_pool.permute(0, 2, 1, 3), k_new,
                           v_new, positions=torch.tensor(pos, dtype=torch.int32),
                           block_table=table)
        flashdec.append_kv(k_flat, v_flat, k_new, v_new, positions=pos)
    q = rand(B, 2 * H, D, seed=31)
    y_paged = flashdec.decode(q, k_pool.permute(0, 2, 1, 3), v_pool.permute(0, 2, 1, 3),
                              block_table=table, seqlens=seqlens, backend="torch")
    y_flat = flashdec.decode(q, k_flat, v_flat, seqlens=seqlens, backend="torch")
    torch.testing.assert_close(y_paged, y_flat, rtol=1e-6, atol=1e-6)


def test_a_failed_check_writes_nothing():
    k, v = rand(B, H, C, D, seed=32), rand(B, H, C, D, seed=33)
    k0, v0 = k.clone(), v.clone()
    with pytest.raises(ContractError, match=r"positions\[2\] is 8"):
        flashdec.append_kv(k, v, rand(B, H, D), rand(B, H, D), positions=[0, 1, 8])
    assert torch.equal(k, k0) and torch.equal(v, v0)


# ---------------------------------------------------------------------------------------
# Clamping of device values (out-of-range positions and page ids are never read on the host)


def test_index_helper_clamps_positions():
    pos = torch.tensor([-5, 3, 8, 1000], dtype=torch.int64)
    first, third = _targets(torch, pos, None, C, 0, 0)
    assert first.tolist() == [0, 1, 2, 3]
    assert third.tolist() == [0, 3, C - 1, C - 1]


def test_index_helper_clamps_page_ids():
    table = torch.tensor([[5, -2], [99, 1], [0, 3]], dtype=torch.int32)
    pos = torch.tensor([1 * S + 2, 0 * S + 3, 100], dtype=torch.int64)  # capacity 2 * S
    pages, rows = _targets(torch, pos, table, 2 * S, S, P)
    assert pages.tolist() == [0, P - 1, 3]       # -2 -> 0, 99 -> P - 1, column 1 of row 2
    assert rows.tolist() == [2, 3, S - 1]        # position 100 -> 2 * S - 1


@no_gpu
def test_gpu_positions_and_pages_are_clamped():
    k, v = rand(B, H, C, D, device="cuda", seed=34), rand(B, H, C, D, device="cuda", seed=35)
    k_new, v_new = rand(B, H, D, device="cuda", seed=36), rand(B, H, D, device="cuda", seed=37)
    pos = torch.tensor([-3, 2, 50], dtype=torch.int32, device="cuda")
    k_ref = reference(k.cpu(), lambda x: x, contiguous_targets([0, 2, C - 1]), k_new.cpu())
    flashdec.append_kv(k, v, k_new, v_new, positions=pos)
    assert_same(k.cpu(), k_ref)

    pools = rand(P, H, S, D, device="cuda", seed=38), rand(P, H, S, D, device="cuda", seed=39)
    table = torch.tensor([[4, 5, 6], [-1, 0, 0], [1, 2, 70]], dtype=torch.int32)
    pos = [S + 1, 2, 3 * S + 9]  # host positions are checked; the device table is clamped
    with pytest.raises(ContractError, match=r"positions\[2\] is 21"):
        flashdec.append_kv(*pools, k_new, v_new, positions=pos, block_table=table.cuda())
    pos = torch.tensor([S + 1, 2, 3 * S + 9], dtype=torch.int32, device="cuda")
    k_ref = reference(pools[0].cpu(), lambda x: x, [(0, 5, 1), (1, 0, 2), (2, P - 1, S - 1)],
                      k_new.cpu())
    flashdec.append_kv(*pools, k_new, v_new, positions=pos, block_table=table.cuda())
    assert_same(pools[0].cpu(), k_ref)


@no_gpu
@pytest.mark.parametrize("fp8", [None, "float8_e4m3fn"])
def test_gpu_cuda_graph_replays_with_new_positions(fp8):
    """Captured with device positions, table and scales; replayed with new contents."""
    dtype = getattr(torch, fp8) if fp8 else torch.bfloat16
    k = rand(P, S, H, D, seed=40).to(device="cuda", dtype=dtype)
    v = rand(P, S, H, D, seed=41).to(device="cuda", dtype=dtype)
    k_view, v_view = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    k_new = torch.empty(B, H, D, dtype=torch.bfloat16, device="cuda")
    v_new = torch.empty_like(k_new)
    pos = torch.zeros(B, dtype=torch.int32, device="cuda")
    table = table_for_pools().cuda()
    scales = dict(k_scale=torch.tensor([0.5, 2.0], device="cuda"), v_scale=0.25) if fp8 else {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # a host sync would raise
    try:
        with torch.cuda.stream(stream):  # warm up (allocator, lazy init) off the capture
            flashdec.append_kv(k_view, v_view, k_new, v_new, positions=pos, block_table=table,
                               **scales)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flashdec.append_kv(k_view, v_view, k_new, v_new, positions=pos, block_table=table,
                           **scales)
    for step, positions in enumerate(([6, 3, 11], [0, 1, 2], [7, 0, 8])):
        k_new.copy_(rand(B, H, D, dtype="bfloat16", seed=300 + step))
        v_new.copy_(rand(B, H, D, dtype="bfloat16", seed=400 + step))
        pos.copy_(torch.tensor(positions, dtype=torch.int32))
        k_before, v_before = k.cpu().clone(), v.cpu().clone()
        graph.replay()
        torch.cuda.synchronize()
        k_ref, v_ref = k_before.clone(), v_before.clone()
        k_fresh = k_before.clone()
        v_fresh = v_before.clone()
        flashdec.append_kv(k_fresh.permute(0, 2, 1, 3), v_fresh.permute(0, 2, 1, 3),
                           k_new.cpu(), v_new.cpu(), positions=positions,
                           block_table=table.cpu(),
                           **{n: (s.cpu() if isinstance(s, torch.Tensor) else s)
                              for n, s in scales.items()})
        if fp8:
            assert torch.equal(k.cpu().view(torch.uint8), k_fresh.view(torch.uint8))
            assert torch.equal(v.cpu().view(torch.uint8), v_fresh.view(torch.uint8))
        else:
            for b, i0, i2 in paged_targets(positions, table.cpu()):
                k_ref[i0, i2] = k_new[b].cpu()
                v_ref[i0, i2] = v_new[b].cpu()
            assert torch.equal(k.cpu(), k_ref) and torch.equal(v.cpu(), v_ref)


# ---------------------------------------------------------------------------------------
# Typed errors: one case per check; each builds valid arguments and breaks one thing.


def valid(paged=False, fp8=None):
    dtype = getattr(torch, fp8) if fp8 else torch.float32
    shape = (P, H, S, D) if paged else (B, H, C, D)
    args = dict(k_cache=rand(*shape, seed=50).to(dtype), v_cache=rand(*shape, seed=51).to(dtype),
                k_new=rand(B, H, D, seed=52), v_new=rand(B, H, D, seed=53),
                positions=PAGED_POSITIONS if paged else POSITIONS)
    if paged:
        args["block_table"] = table_for_pools()
    if fp8:
        args.update(k_scale=0.5, v_scale=torch.tensor([0.5, 0.25]))
    return args


def call(args):
    return flashdec.append_kv(args.pop("k_cache"), args.pop("v_cache"), args.pop("k_new"),
                              args.pop("v_new"), **args)


def overlapping(x):
    return x.as_strided(x.shape, (H * C * D, C * D, 1, 1))


ERRORS = {
    # name: (paged, fp8, mutation of the valid arguments, message pattern)
    "cache-numpy": (False, None, lambda a: a.update(k_cache=a["k_cache"].numpy()),
                    r"append_kv takes torch tensors \(CPU or CUDA\); k_cache is a "
                    r"numpy\.ndarray"),
    "new-list": (False, None, lambda a: a.update(v_new=a["v_new"].tolist()),
                 r"append_kv takes torch tensors.*v_new is a builtins\.list"),
    "table-numpy": (True, None, lambda a: a.update(block_table=a["block_table"].numpy()),
                    r"block_table must be a torch tensor \(append_kv takes torch tensors\), "
                    r"got numpy\.ndarray"),
    "cache-requires-grad": (False, None,
                            lambda a: a.update(k_cache=a["k_cache"].requires_grad_()),
                            r"k_cache requires grad.*pass k_cache\.detach\(\)"),
    "new-requires-grad": (False, None, lambda a: a.update(v_new=a["v_new"].requires_grad_()),
                          r"v_new requires grad.*pass v_new\.detach\(\)"),
    "scale-requires-grad": (False, "float8_e5m2",
                            lambda a: a.update(v_scale=a["v_scale"].requires_grad_()),
                            r"v_scale requires grad"),
    "sparse": (False, None, lambda a: a.update(k_new=a["k_new"].to_sparse()),
               r"k_new is a torch\.sparse_coo tensor; flashdec reads dense strided memory"),
    "meta-device": (False, None, lambda a: a.update(v_cache=a["v_cache"].to("meta")),
                    r"v_cache is on meta; flashdec reads CPU and CUDA memory"),
    "negative-bit": (False, None, lambda a: a.update(k_cache=torch._neg_view(a["k_cache"])),
                     r"k_cache is a torch view with the negative bit set"),
    "cache-rank": (False, None, lambda a: a.update(k_cache=a["k_cache"][0]),
                   r"k_cache must have rank 4 \[batch, num_kv_heads, capacity, head_dim\], got "
                   r"rank 3"),
    "pool-rank": (True, None, lambda a: a.update(v_cache=a["v_cache"][None]),
                  r"v_cache must have rank 4 \[num_pages, num_kv_heads, page_size, head_dim\] "
                  r"\(a paged pool, with block_table\), got rank 5"),
    "new-rank": (False, None, lambda a: a.update(k_new=a["k_new"][:, None]),
                 r"k_new must have rank 3 \[batch, num_kv_heads, head_dim\], got rank 4"),
    "v-new-rank": (False, None, lambda a: a.update(v_new=a["v_new"][0]),
                   r"v_new must have rank 3 .* got rank 2"),
    "new-dtype": (False, None, lambda a: a.update(k_new=a["k_new"].double(),
                                                  v_new=a["v_new"].double()),
                  r"k_new has dtype float64; supported dtypes: float16, bfloat16, float32"),
    "new-fp8-dtype": (False, "float8_e4m3fn",
                      lambda a: a.update(k_new=a["k_new"].to(torch.float8_e4m3fn)),
                      r"k_new has dtype float8_e4m3fn; supported dtypes"),
    "v-new-dtype": (False, None, lambda a: a.update(v_new=a["v_new"].half()),
                    r"v_new has dtype float16 but k_new has float32: k_new and v_new must share "
                    r"one dtype"),
    "cache-dtype": (False, None, lambda a: a.update(k_cache=a["k_cache"].half(),
                                                    v_cache=a["v_cache"].half()),
                    r"k_cache has dtype float16 but k_new has float32: the cache must have "
                    r"k_new's dtype or an fp8 dtype"),
    "v-cache-dtype": (False, "float8_e4m3fn",
                      lambda a: a.update(v_cache=a["v_cache"].to(torch.float8_e5m2)),
                      r"v_cache has dtype float8_e5m2 but k_cache has float8_e4m3fn: k_cache "
                      r"and v_cache must share one dtype"),
    "v-new-shape": (False, None, lambda a: a.update(v_new=a["v_new"][:, :, :-1]),
                    r"v_new must have the shape of k_new \(3, 2, 5\), got \(3, 2, 4\)"),
    "v-cache-shape": (False, None, lambda a: a.update(v_cache=a["v_cache"][:, :, :-1]),
                      r"v_cache must have the shape of k_cache \(3, 2, 8, 5\), got "
                      r"\(3, 2, 7, 5\)"),
    "batch": (False, None, lambda a: a.update(k_cache=a["k_cache"][:2], v_cache=a["v_cache"][:2]),
              r"k_cache has batch 2 \(shape \(2, 2, 8, 5\)\) but k_new has batch 3"),
    "heads": (False, None, lambda a: a.update(k_new=a["k_new"][:, :1], v_new=a["v_new"][:, :1]),
              r"k_cache has num_kv_heads 2 \(shape \(3, 2, 8, 5\)\) but k_new has 1"),
    "head-dim": (False, None, lambda a: a.update(k_new=a["k_new"][..., :4],
                                                 v_new=a["v_new"][..., :4]),
                 r"k_cache has head_dim 5 .* but k_new has 4"),
    "pool-heads": (True, None, lambda a: a.update(k_cache=a["k_cache"][:, :1],
                                                  v_cache=a["v_cache"][:, :1]),
                   r"k_cache has num_kv_heads 1 \(shape \(10, 1, 4, 5\)\) but k_new has 2"),
    "pool-head-dim": (True, None, lambda a: a.update(k_cache=a["k_cache"][..., :3],
                                                     v_cache=a["v_cache"][..., :3]),
                      r"k_cache has head_dim 3 \(shape \(10, 2, 4, 3\)\) but k_new has 5"),
    "table-rank": (True, None, lambda a: a.update(block_table=a["block_table"][0]),
                   r"block_table must have rank 2 \[batch, max_pages\], got rank 1"),
    "table-dtype": (True, None, lambda a: a.update(block_table=a["block_table"].long()),
                    r"block_table has dtype int64; expected int32"),
    "table-rows": (True, None, lambda a: a.update(block_table=a["block_table"][:2]),
                   r"block_table must have shape \(3, max_pages\) \[batch, max_pages\] \(one "
                   r"row per sequence of k_new\), got \(2, 3\)"),
    "inference-tensor": (False, None, lambda a: a.update(k_cache=_inference(a["k_cache"])),
                         r"k_cache is read-only here: it is an inference tensor"),
    "stride-0": (False, None, lambda a: a.update(
        v_cache=a["v_cache"][:, :, :1].expand(B, H, C, D)),
        r"v_cache has stride 0 on an axis of extent 8 .*race on the same memory"),
    "overlapping-strides": (False, None, lambda a: a.update(k_cache=overlapping(a["k_cache"])),
                            r"k_cache has overlapping strides \(80, 40, 1, 1\) for shape "
                            r"\(3, 2, 8, 5\): two of its elements share memory"),
    "same-cache": (False, None, lambda a: a.update(v_cache=a["k_cache"]),
                   r"v_cache is the same memory as k_cache"),
    "fp8-no-k-scale": (False, "float8_e4m3fn", lambda a: a.update(k_scale=None),
                       r"k_scale is required with an fp8 cache \(float8_e4m3fn\): pass a float "
                       r"or a float32 tensor \[num_kv_heads\]"),
    "fp8-no-v-scale": (True, "float8_e5m2", lambda a: a.update(v_scale=None),
                       r"v_scale is required with an fp8 cache \(float8_e5m2\)"),
    "scale-negative": (False, "float8_e4m3fn", lambda a: a.update(k_scale=-1.0),
                       r"k_scale must be finite and > 0, got -1\.0"),
    "scale-zero": (False, "float8_e4m3fn", lambda a: a.update(k_scale=0),
                   r"k_scale must be finite and > 0, got 0\.0"),
    "scale-nan": (False, "float8_e4m3fn", lambda a: a.update(k_scale=float("nan")),
                  r"k_scale must be finite and > 0, got nan"),
    "scale-inf": (False, None, lambda a: a.update(v_scale=float("inf")),
                  r"v_scale must be finite and > 0, got inf"),
    "scale-type": (False, "float8_e4m3fn", lambda a: a.update(k_scale="0.5"),
                   r"k_scale must be a finite real number > 0 or a float32 tensor "
                   r"\[num_kv_heads\], got str '0\.5'"),
    "scale-bool": (False, "float8_e4m3fn", lambda a: a.update(k_scale=True),
                   r"k_scale must be a finite real number > 0 .* got bool True"),
    "scale-tiny": (False, "float8_e4m3fn", lambda a: a.update(k_scale=1e-40),
                   r"k_scale must be in \[2\*\*-126, 2\*\*126\] .* got 1e-40"),
    "scale-tensor-dtype": (False, "float8_e4m3fn",
                           lambda a: a.update(v_scale=a["v_scale"].double()),
                           r"v_scale has dtype float64; expected float32"),
    "scale-tensor-shape": (False, "float8_e4m3fn",
                           lambda a: a.update(v_scale=torch.tensor([0.5, 0.5, 0.5])),
                           r"v_scale must have shape \(2,\) \[num_kv_heads\], got \(3,\)"),
    "scale-tensor-value": (False, "float8_e4m3fn",
                           lambda a: a.update(v_scale=torch.tensor([0.5, 0.0])),
                           r"v_scale\[1\] is 0\.0; every scale must be finite and > 0"),
    "scale-tensor-nan": (False, "float8_e4m3fn",
                         lambda a: a.update(v_scale=torch.tensor([float("nan"), 1.0])),
                         r"v_scale\[0\] is nan; every scale must be finite and > 0"),
    "positions-dtype": (False, None, lambda a: a.update(positions=torch.tensor(POSITIONS)),
                        r"positions has dtype int64; expected int32"),
    "positions-shape": (False, None, lambda a: a.update(
        positions=torch.tensor([POSITIONS], dtype=torch.int32)),
        r"positions must have shape \(3,\) \[batch\], got \(1, 3\)"),
    "positions-length": (False, None, lambda a: a.update(positions=[1, 2]),
                         r"positions must hold 3 ints \(one per sequence of k_new\), got 2"),
    "positions-floats": (False, None, lambda a: a.update(positions=[1.0, 2.0, 3.0]),
                         r"positions must be an int32 tensor \[batch\] or a flat sequence of "
                         r"ints, got list of float64 with shape \(3,\)"),
    "positions-nested": (False, None, lambda a: a.update(positions=np.zeros((3, 1), np.int32)),
                         r"positions must be .* flat sequence of ints, got ndarray of int32 "
                         r"with shape \(3, 1\)"),
    "positions-str": (False, None, lambda a: a.update(positions="123"),
                      r"positions must be an int32 tensor \[batch\] or a host sequence of ints, "
                      r"got str"),
    "positions-none": (False, None, lambda a: a.update(positions=None),
                       r"positions must be .* got NoneType"),
    "positions-range": (False, None, lambda a: a.update(positions=[0, 8, 1]),
                        r"positions\[1\] is 8; every position must be in \[0, 8\) \(k_cache's "
                        r"capacity, axis 2\)"),
    "positions-negative": (False, None, lambda a: a.update(
        positions=torch.tensor([0, 1, -1], dtype=torch.int32)),
        r"positions\[2\] is -1; every position must be in \[0, 8\)"),
    "positions-paged-range": (True, None, lambda a: a.update(positions=[0, 12, 1]),
                              r"positions\[1\] is 12; every position must be in \[0, 12\) "
                              r"\(block_table's capacity, max_pages \* page_size = 3 \* 4\)"),
    "page-id-range": (True, None, lambda a: a["block_table"].__setitem__((1, 0), P),
                      r"block_table\[1, 0\] is 10, the page positions\[1\] = 3 writes to; page "
                      r"ids must be in \[0, 10\) \(k_cache's num_pages\)"),
    "page-id-negative": (True, None, lambda a: a["block_table"].__setitem__((2, 2), -1),
                         r"block_table\[2, 2\] is -1, the page positions\[2\] = 11 writes to"),
    "no-capacity": (False, None, lambda a: a.update(k_cache=a["k_cache"][:, :, :0],
                                                    v_cache=a["v_cache"][:, :, :0]),
                    r"there is no position to write: k_cache's capacity, axis 2 is 0"),
    "no-table-columns": (True, None, lambda a: a.update(block_table=a["block_table"][:, :0]),
                         r"there is no position to write: block_table's capacity, max_pages \* "
                         r"page_size = 0 \* 4 is 0"),
    "no-pages": (True, None, lambda a: a.update(k_cache=a["k_cache"][:0],
                                                v_cache=a["v_cache"][:0]),
                 r"k_cache holds no page \(num_pages, axis 0 of a paged pool, is 0\)"),
}


def _inference(x):
    with torch.inference_mode():
        return x.clone()


@pytest.mark.parametrize("case", list(ERRORS))
def test_typed_error(case):
    paged, fp8, mutate, message = ERRORS[case]
    args = valid(paged, fp8)
    caches = [args["k_cache"], args["v_cache"]]
    before = [x.clone() for x in caches]
    mutate(args)
    with pytest.raises(ContractError, match=message):
        call(args)
    for x, x0 in zip(caches, before):  # nothing was written: the random values are all there
        assert torch.equal(x.detach().view(torch.uint8), x0.view(torch.uint8))


@no_gpu
@pytest.mark.parametrize("name", ["v_cache", "k_new", "block_table", "k_scale", "positions"])
def test_typed_error_device(name):
    args = valid(paged=True, fp8="float8_e4m3fn")
    args["positions"] = torch.tensor(PAGED_POSITIONS, dtype=torch.int32)
    args["k_scale"] = torch.tensor([0.5, 0.5])
    for n in ("k_cache", "v_cache", "k_new", "v_new", "block_table", "k_scale", "v_scale",
              "positions"):
        if n != name:
            args[n] = args[n].cuda()
    message = {"v_cache": r"v_cache is on cpu but k_cache is on cuda:0: the caches, k_new, "
                          r"v_new, block_table and scale tensors must be on one device",
               "k_new": r"k_new is on cpu but k_cache is on cuda:0",
               "block_table": r"block_table is on cpu but k_cache is on cuda:0: block_table "
                              r"must be on the pools' device",
               "k_scale": r"k_scale is on cpu; a scale tensor must be on the cache's device "
                          r"\(cuda:0\)"}.get(name)
    if name == "positions":  # host positions with a GPU cache are allowed (and checked)
        call(args)
        args = valid()
        args["positions"] = torch.tensor(POSITIONS, dtype=torch.int32, device="cuda")
        message = r"positions is on cuda:0; it must be on the cache's device \(cpu\) or in " \
                  r"host memory"
    with pytest.raises(ContractError, match=message):
        call(args)
