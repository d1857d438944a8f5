"""GPU-only behaviour of the cuda backend: frameworks, streams, graphs, devices, splits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import flashdec
from flashdec_testing import assert_close, make_qkv, poisoned_like, to64

_why = ("no CUDA GPU on this machine" if not torch.cuda.is_available()
        else flashdec.available_backends()["cuda"][1] or None)
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


def test_numpy_input_rejected_with_clear_error():
    q, k, v = (to64(t).astype(np.float32) for t in make_qkv(1, 4, 2, 8, 16, "float32", "cpu"))
    with pytest.raises(flashdec.UnsupportedError, match="cuda backend runs on cuda"):
        flashdec.decode(q, k, v, backend="cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_num_splits_overrides_agree(dtype):
    q, k, v = make_qkv(2, 32, 8, 5000, 128, dtype, "cuda", seed=1)
    outs = []
    for splits in (1, 2, 13, 128):
        outs.append(flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=splits))
        assert_close(outs[-1], q, k, v)
    again = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=13)
    assert torch.equal(again.view(torch.int16 if dtype != "float32" else torch.int32),
                       outs[2].view(torch.int16 if dtype != "float32" else torch.int32))


@pytest.mark.parametrize("dtype,kv_dtype", [("bfloat16", "bfloat16"), ("float16", "float8_e4m3fn"),
                                           ("float32", "float32")])
@pytest.mark.parametrize("splits", [None, 40, 129, 512])
def test_combine_kernel_merges_many_splits_deterministically(dtype, kv_dtype, splits):
    """Few KV heads: the default layout has about a split per SM, so the combine kernel merges
    (also at 40 splits of a 16-head tile, past COMBINE_ABOVE_BYTES, and past MAX_FUSED_SPLITS);
    rows of a split past seqlens and a window are skipped; bitwise equal on a second run."""
    q, k, v = make_qkv(1, 16, 1, 70000, 128, dtype, "cuda", seed=splits or 3)
    scales = {}
    if kv_dtype != dtype:
        k, v = k.to(getattr(torch, kv_dtype)), v.to(getattr(torch, kv_dtype))
        scales = {"k_scale": 0.5, "v_scale": 2.0}
    lse = torch.full((1, 16), float("nan"), device="cuda")
    p = flashdec.plan(q, k, v, backend="cuda", num_splits=splits, lse_out=lse, **scales)
    details = p.details
    assert details["merge"] == "combine kernel"
    assert details["num_splits"] > (64 if splits is None else 1)
    out, lse = p.run(q, k, v, poisoned_like(q), lse_out=lse)
    _check(out, lse, _reference(q, k, v, **scales))
    again, _ = p.run(q, k, v, poisoned_like(q), lse_out=torch.empty_like(lse))
    assert torch.equal(again.view(torch.uint8), out.view(torch.uint8))
    seqlens = torch.tensor([33333], dtype=torch.int32, device="cuda")
    y = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=splits,
                        seqlens=seqlens, window_left=20000, **scales)
    assert_close(y, q, k[:, :, 13332:33333], v[:, :, 13332:33333], **scales)


@pytest.mark.parametrize("head_dim", [80, 96, 112, 160])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float8_e5m2"])
def test_mma_kernel_serves_head_dims_not_multiples_of_64(head_dim, kv_dtype):
    """head_dims that are multiples of 16 but not of 64 take the tensor-core kernel (fp8
    rounds the MMA width up to 32 with zero padding) and match the reference, with one split
    and with several."""
    q, k, v = make_qkv(2, 12, 2, 1500, head_dim, "bfloat16", "cuda", seed=head_dim)
    scales = {}
    if kv_dtype != "bfloat16":
        k, v = k.to(getattr(torch, kv_dtype)), v.to(getattr(torch, kv_dtype))
        scales = {"k_scale": 1.0, "v_scale": 1.0}
    for splits in (1, 7):
        p = flashdec.plan(q, k, v, backend="cuda", num_splits=splits, **scales)
        assert p.details["tensor_cores"], p
        assert_close(p.run(q, k, v, poisoned_like(q)), q, k, v, **scales)


def test_q_tile_by_plain_loads_when_rows_are_not_16_byte_chunks():
    """Q strided by an odd number of elements cannot be copied by cp.async: the plan says so
    (q_vector 0) and the MMA kernel loads it element-wise, with the same result."""
    q_wide, k, v = make_qkv(2, 16, 4, 900, 128, "bfloat16", "cuda", seed=5)
    q_odd = torch.empty(2, 16, 131, dtype=torch.bfloat16, device="cuda")[..., :128]
    q_odd.copy_(q_wide)
    fast = flashdec.plan(q_wide, k, v, backend="cuda")
    slow = flashdec.plan(q_odd, k, v, backend="cuda")
    assert fast.details["q_tile"] == "cp.async" and slow.details["q_tile"] == "loads"
    a, b = fast.run(q_wide, k, v, poisoned_like(q_wide)), slow.run(q_odd, k, v, poisoned_like(q_wide))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert_close(b, q_wide, k, v)


@pytest.mark.parametrize("bad", [0, 513, 2.0, True, "4"])
def test_bad_num_splits(bad):
    q, k, v = make_qkv(1, 8, 2, 64, 64, "bfloat16", "cuda")
    with pytest.raises((flashdec.ContractError, TypeError), match="num_splits"):
        flashdec.decode(q, k, v, backend="cuda", num_splits=bad)


def test_torch_side_stream_and_explicit_streams():
    q, k, v = make_qkv(2, 16, 4, 3000, 128, "bfloat16", "cuda", seed=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda")
    side.synchronize()
    assert_close(out, q, k, v)
    for stream in (side, side.cuda_stream):  # object with __cuda_stream__, and an int handle
        out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", stream=stream)
        side.synchronize()
        assert_close(out, q, k, v)


def test_cuda_graph_capture_replays_with_new_data():
    q, k, v = make_qkv(2, 32, 8, 4096, 128, "bfloat16", "cuda", seed=3)
    out = poisoned_like(q)
    p = flashdec.plan(q, k, v, out, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        p.run(q, k, v, out)  # first run outside capture: kernel load, workspace zeroing
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        p.run(q, k, v, out)
    for seed in (4, 5, 6):
        q2, k2, v2 = make_qkv(2, 32, 8, 4096, 128, "bfloat16", "cuda", seed=seed)
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, q2, k2, v2)


def test_misaligned_pointer_under_an_aligned_plan_takes_the_safe_path():
    d, n = 128, 2 * 2 * 700 * 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    buf_k = torch.randn(n + 8, device="cuda", dtype=torch.bfloat16, generator=gen)
    buf_v = torch.randn(n + 8, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 8, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    shape = (2, 2, 700, d)
    p = flashdec.plan(q, buf_k[:n].view(shape), buf_v[:n].view(shape), backend="cuda")
    k, v = buf_k[1:n + 1].view(shape), buf_v[3:n + 3].view(shape)
    assert k.data_ptr() % 16
    out = p.run(q, k, v, poisoned_like(q))
    assert_close(out, q, k, v)


def test_bound_decode_of_a_misaligned_view_replays_the_safe_kernel():
    n, shape = 2 * 2 * 300 * 64, (2, 2, 300, 64)
    gen = torch.Generator(device="cuda").manual_seed(12)
    buf_k = torch.randn(n + 8, device="cuda", dtype=torch.bfloat16, generator=gen)
    buf_v = torch.randn(n + 8, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    plan = flashdec.plan(q, buf_k[:n].view(shape), buf_v[:n].view(shape), backend="cuda")
    k, v = buf_k[1:n + 1].view(shape), buf_v[3:n + 3].view(shape)
    assert k.data_ptr() % 16
    bound = plan.bind(q, k, v, poisoned_like(q))
    for seed in (1, 2):
        buf_k.copy_(torch.randn(buf_k.shape, generator=torch.Generator().manual_seed(seed)))
        bound.result.fill_(float("nan"))
        assert_close(bound(), q, k, v)


def test_cupy_inputs():
    cupy = pytest.importorskip("cupy")
    q, k, v = make_qkv(2, 16, 4, 999, 64, "float16", "cuda", seed=8)
    cq, ck, cv = (cupy.from_dlpack(t) for t in (q, k, v))
    torch.cuda.synchronize()
    y = flashdec.decode(cq, ck, cv, backend="cuda")
    cupy.cuda.runtime.deviceSynchronize()
    assert_close(torch.from_dlpack(y), q, k, v)
    out = cupy.full(cq.shape, cupy.nan, dtype=cq.dtype)
    flashdec.decode(cq, ck, cv, out)
    cupy.cuda.runtime.deviceSynchronize()
    assert_close(torch.from_dlpack(out), q, k, v)


def test_jax_inputs_give_a_dlpack_output():
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees no GPU")
    q, k, v = make_qkv(1, 8, 2, 777, 128, "bfloat16", "cpu", seed=9)
    jq, jk, jv = (jnp.asarray(to64(t).astype(np.float32)).astype(jnp.bfloat16) for t in (q, k, v))
    jq.block_until_ready()
    y = flashdec.decode(jq, jk, jv)
    torch.cuda.synchronize()
    jy = jnp.from_dlpack(y)
    result = np.asarray(jy.astype(jnp.float32))
    ref_inputs = [np.asarray(x.astype(jnp.float32)) for x in (jq, jk, jv)]
    assert_close(torch.from_numpy(result).to(torch.bfloat16), *[torch.from_numpy(x) for x in ref_inputs],
                 dtype="bfloat16")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    q, k, v = make_qkv(2, 16, 4, 2000, 128, "bfloat16", "cuda:1", seed=10)
    out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda")
    torch.cuda.synchronize(1)
    assert_close(out, q, k, v)


def test_aligned_16bit_problems_take_the_mma_kernel():
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        q, k, v = make_qkv(1, 32, 8, 1024, 128, "bfloat16", "cuda", seed=11)
        k, v = k.to(kv_dtype), v.to(kv_dtype)
        scales = {} if kv_dtype == torch.bfloat16 else {"k_scale": 1.0, "v_scale": 1.0}
        p = flashdec.plan(q, k, v, backend="cuda", **scales)
        assert p.details["tensor_cores"], p


def _reference(q, k, v, **features):
    from flashdec.reference import decode_reference

    seqlens = features.pop("seqlens", None)
    if seqlens is not None:
        features["seqlens"] = np.asarray(seqlens.cpu())
    return decode_reference(to64(q), to64(k), to64(v), return_lse=True, **features)


def _check(out, lse, ref):
    from flashdec.reference import LSE_TOLERANCE, TOLERANCE, relative_error

    y_ref, lse_ref = ref
    err = relative_error(to64(out), y_ref)
    assert err <= TOLERANCE[str(out.dtype).removeprefix("torch.")], err
    got = lse.double().cpu().numpy()
    assert np.array_equal(np.isneginf(got), np.isneginf(lse_ref)), "empty rows must give -inf"
    finite = np.isfinite(lse_ref)
    tol = LSE_TOLERANCE[str(out.dtype).removeprefix("torch.")] * np.maximum(1.0, np.abs(lse_ref[finite]))
    assert (np.abs(got[finite] - lse_ref[finite]) <= tol).all()


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float8_e4m3fn"])
def test_cuda_graph_replays_with_new_seqlens(kv_dtype):
    """The split layout depends on sizes only: a captured graph stays right when the
    contents of seqlens (and of the per-head scales) change between replays."""
    batch, hq, hkv, cap, d = 4, 32, 8, 6000, 128
    q, k, v = make_qkv(batch, hq, hkv, cap, d, "bfloat16", "cuda", seed=12)
    k, v = k.to(getattr(torch, kv_dtype)), v.to(getattr(torch, kv_dtype))
    seqlens = torch.tensor([cap, 1, 0, 3333], dtype=torch.int32, device="cuda")
    features = {}
    if kv_dtype != "bfloat16":
        features = {"k_scale": torch.rand(hkv, device="cuda") + 0.5,
                    "v_scale": torch.rand(hkv, device="cuda") + 0.5}
    out, lse = poisoned_like(q), torch.full((batch, hq), float("nan"), device="cuda")
    p = flashdec.plan(q, k, v, out, seqlens=seqlens, lse_out=lse, window_left=4000,
                      backend="cuda", **features)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        p.run(q, k, v, out, seqlens=seqlens, lse_out=lse, **features)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        p.run(q, k, v, out, seqlens=seqlens, lse_out=lse, **features)
    for lengths in ([0, 5999, 6000, 17], [4096, 4097, 1, 2], [6000] * 4, [0] * 4):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        for s in features.values():
            s.copy_(torch.rand(hkv, device="cuda") + 0.5)
        out.fill_(float("nan")), lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, lse, _reference(q, k, v, seqlens=seqlens, window_left=4000,
                                    **{n: s.cpu().numpy() for n, s in features.items()}))


@pytest.mark.parametrize("hq,hkv,merge", [(32, 8, "last CTA"), (16, 1, "combine kernel")])
def test_splits_by_length_follow_the_lengths_at_every_replay(hq, hkv, merge):
    """With seqlens the GPU cuts the splits from the live lengths (and left padding) of each
    run: one captured graph replayed over ragged, one-long-among-empties, full, empty and
    left-padded batches, merged in the last CTA or by the combine kernel, each right against
    float64 and bitwise equal when replayed again."""
    batch, cap, d = 24, 9000, 128
    q, k, v = make_qkv(batch, hq, hkv, cap, d, "bfloat16", "cuda", seed=hq)
    seqlens = torch.full((batch,), cap, dtype=torch.int32, device="cuda")
    leftpad = torch.zeros(batch, dtype=torch.int32, device="cuda")
    out, lse = poisoned_like(q), torch.full((batch, hq), float("nan"), device="cuda")
    p = flashdec.plan(q, k, v, out, seqlens=seqlens, cache_leftpad=leftpad, lse_out=lse,
                      backend="cuda")
    assert p.details["splits"].startswith("by length") and p.details["merge"] == merge, p
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        p.run(q, k, v, out, seqlens=seqlens, cache_leftpad=leftpad, lse_out=lse)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        p.run(q, k, v, out, seqlens=seqlens, cache_leftpad=leftpad, lse_out=lse)
    rng = np.random.default_rng(hq)
    ragged = rng.integers(0, cap + 1, batch)
    pads = rng.integers(0, cap // 2, batch)
    for lengths, pad in ((ragged, 0 * ragged), ([cap] + [0] * (batch - 1), [0] * batch),
                         ([1] * (batch - 1) + [cap], [0] * batch), ([cap] * batch, [0] * batch),
                         ([0] * batch, [0] * batch), (np.maximum(ragged, pads), pads),
                         ([cap] * batch, [15] * batch)):
        seqlens.copy_(torch.tensor(np.asarray(lengths), dtype=torch.int32))
        leftpad.copy_(torch.tensor(np.asarray(pad), dtype=torch.int32))
        out.fill_(float("nan")), lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, lse, _reference(q, k, v, seqlens=seqlens, cache_leftpad=np.asarray(pad)))
        first = out.clone()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), first.view(torch.int16))


@pytest.mark.parametrize("page_size", [16, 24])
def test_cuda_graph_replays_with_new_block_tables(page_size):
    """A captured paged plan reads its table and lengths at replay: new tables (pages moved
    around the pool) and new lengths between replays, on the tensor-core kernel (16) and the
    CUDA-core one (24)."""
    batch, hq, hkv, max_pages, d = 3, 16, 4, 40, 128
    num_pages = batch * max_pages + 5
    gen = torch.Generator(device="cuda").manual_seed(21)
    kp = torch.randn(num_pages, hkv, page_size, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    vp = torch.randn_like(kp)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    table = torch.zeros(batch, max_pages, dtype=torch.int32, device="cuda")
    seqlens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    out = poisoned_like(q)
    p = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=seqlens, backend="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        p.run(q, kp, vp, out, block_table=table, seqlens=seqlens)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        p.run(q, kp, vp, out, block_table=table, seqlens=seqlens)
    cap = max_pages * page_size
    for seed, lengths in ((1, [cap, 1, 0]), (2, [17, cap - 3, 500]), (3, [cap] * 3)):
        ids = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
        table.copy_(ids[: batch * max_pages].view(batch, max_pages).to(torch.int32))
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, q, kp, vp, seqlens=lengths, block_table=table.cpu().numpy())


def test_device_seqlens_are_clamped_to_capacity():
    q, k, v = make_qkv(3, 8, 2, 700, 64, "bfloat16", "cuda", seed=13)
    seqlens = torch.tensor([-5, 10**6, 300], dtype=torch.int32, device="cuda")
    out, lse = flashdec.decode(q, k, v, poisoned_like(q), seqlens=seqlens, return_lse=True,
                               backend="cuda")
    clamped = torch.tensor([0, 700, 300], dtype=torch.int32)
    _check(out, lse, _reference(q, k, v, seqlens=clamped))


def test_merge_kernel_matches_one_decode():
    q, k, v = make_qkv(2, 32, 8, 5000, 128, "bfloat16", "cuda", seed=14)
    cuts = [0, 1, 1200, 1200, 4999, 5000]
    parts = [flashdec.decode(q, k[:, :, a:b], v[:, :, a:b], poisoned_like(q), return_lse=True,
                             backend="cuda") for a, b in zip(cuts, cuts[1:])]
    y, lse = flashdec.merge_states([o for o, _ in parts], [s for _, s in parts], backend="cuda")
    _check(y, lse, _reference(q, k, v))


def test_cached_decode_checks_only_overlap_and_stays_correct():
    """decode's plan-cache hit skips the layout checks (its key matched them) but not the
    overlap check, and a changed layout misses the cache instead of reusing the plan."""
    q, k, v = make_qkv(1, 16, 4, 700, 128, "bfloat16", "cuda", seed=11)
    for seed in (11, 12):  # second call: a cache hit with new data
        q, k, v = make_qkv(1, 16, 4, 700, 128, "bfloat16", "cuda", seed=seed)
        assert_close(flashdec.decode(q, k, v, poisoned_like(q), backend="cuda"), q, k, v)
        assert_close(flashdec.decode(q, k, v, backend="cuda"), q, k, v)
    with pytest.raises(flashdec.ContractError, match="overlap"):
        flashdec.decode(q, k, v, q, backend="cuda")  # Y written over Q
    wide = torch.zeros(1, 4, 700, 256, dtype=k.dtype, device="cuda")
    wide[..., :128] = k
    assert_close(flashdec.decode(q, wide[..., :128], v, poisoned_like(q), backend="cuda"),
                 q, k, v)  # new strides: a new plan


def test_plan_run_fast_path_falls_back_to_named_errors():
    """plan.run's torch fast path hands every mismatch to the general path, which names it."""
    q, k, v = make_qkv(2, 16, 4, 300, 128, "bfloat16", "cuda", seed=13)
    lengths = torch.tensor([300, 17], dtype=torch.int32, device="cuda")
    plan = flashdec.plan(q, k, v, seqlens=lengths, backend="cuda")
    out = plan.run(q, k, v, poisoned_like(q), seqlens=lengths)
    assert_close(out, q, k, v, seqlens=lengths)
    lse = torch.empty(2, 16, dtype=torch.float32, device="cuda")
    with pytest.raises(flashdec.ContractError, match="lse_out was not planned"):
        plan.run(q, k, v, seqlens=lengths, lse_out=lse)
    with pytest.raises(flashdec.ContractError, match="seqlens is missing"):
        plan.run(q, k, v)
    with pytest.raises(flashdec.ContractError, match="does not match the plan"):
        plan.run(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, seqlens=lengths)
    with pytest.raises(flashdec.ContractError, match="overlap"):
        plan.run(q, k, v, q, seqlens=lengths)
