"""The conformance suite: every backend available here against a float64 reference.

Each test runs per (backend, device) pair from ``BACKENDS``; pairs this machine cannot run
are skipped with the reason. Outputs are poisoned with NaN before each run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec_testing import (BACKENDS, DTYPES, assert_close, make_qkv, poisoned_like, randn,
                              run, to64)

pytestmark = pytest.mark.parametrize("backend,device", BACKENDS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 8, 32, 64, 80, 96, 112, 128, 160, 192, 256])
def test_head_dims(backend, device, dtype, head_dim):
    q, k, v = make_qkv(1, 8, 2, 257, head_dim, dtype, device, seed=head_dim)
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 4), (8, 2), (7, 1), (16, 2),
                                                    (16, 1), (32, 8)])
def test_group_sizes(backend, device, dtype, num_heads, num_kv_heads):
    q, k, v = make_qkv(2, num_heads, num_kv_heads, 300, 64, dtype, device, seed=num_heads)
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_len", [0, 1, 2, 255, 256, 257, 1000, 4096])
def test_batch_and_kv_len(backend, device, dtype, batch, kv_len):
    q, k, v = make_qkv(batch, 8, 2, kv_len, 128, dtype, device, seed=kv_len)
    out = run(backend, q, k, v)
    if kv_len == 0:
        assert torch.equal(out, torch.zeros_like(out)), "K_len == 0 must give Y = 0"
    assert_close(out, q, k, v)


def test_empty_batch(backend, device):
    q, k, v = make_qkv(0, 8, 2, 16, 64, "float16", device)
    out = flashdec.decode(q, k, v, backend=backend)
    assert out.shape == (0, 8, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_capacity_cache_prefix(backend, device, dtype):
    """K/V are the first kv_len rows of a larger preallocated cache."""
    q, k_cache, v_cache = make_qkv(2, 8, 2, 1024, 128, dtype, device, seed=1)
    k, v = k_cache[:, :, :700], v_cache[:, :, :700]
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nhd_cache_through_permute(backend, device, dtype):
    """A [B, K_len, H_kv, D] cache seen as [B, H_kv, K_len, D] by permute, no copy."""
    gen = torch.Generator().manual_seed(2)
    k_nhd = randn((2, 513, 4, 64), dtype, device, gen)
    v_nhd = randn((2, 513, 4, 64), dtype, device, gen)
    q = randn((2, 16, 64), dtype, device, gen)
    k, v = k_nhd.permute(0, 2, 1, 3), v_nhd.permute(0, 2, 1, 3)
    assert not k.is_contiguous()
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_from_fused_qkv(backend, device, dtype):
    """Q sliced out of a fused [B, (H_q + 2 H_kv) * D] projection output."""
    batch, hq, hkv, d = 3, 8, 2, 128
    gen = torch.Generator().manual_seed(3)
    qkv = randn((batch, (hq + 2 * hkv) * d), dtype, device, gen)
    q = qkv[:, : hq * d].view(batch, hq, d)
    _, k, v = make_qkv(batch, hq, hkv, 333, d, dtype, device, seed=4)
    assert q.stride(0) == (hq + 2 * hkv) * d
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_inputs(backend, device, dtype):
    """Stride 0: one K/V shared by every batch entry, one Q row shared by every head."""
    gen = torch.Generator().manual_seed(5)
    k = randn((1, 2, 300, 64), dtype, device, gen).expand(3, 2, 300, 64)
    v = randn((1, 2, 300, 64), dtype, device, gen).expand(3, 2, 300, 64)
    q = randn((3, 1, 64), dtype, device, gen).expand(3, 8, 64)
    assert k.stride(0) == 0 and q.stride(1) == 0
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_non_unit_innermost_stride(backend, device, dtype, head_dim):
    gen = torch.Generator().manual_seed(6)
    k = randn((2, 2, 200, 2 * head_dim), dtype, device, gen)[..., ::2]
    v = randn((2, 2, 200, 3 * head_dim), dtype, device, gen)[..., ::3]
    q = randn((2, 4, 2 * head_dim), dtype, device, gen)[..., 1::2]
    assert k.stride(-1) == 2 and v.stride(-1) == 3 and q.stride(-1) == 2
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_output_written_in_full_and_only_there(backend, device, dtype):
    """Y is a strided window of a larger buffer: every Y element is written, nothing else."""
    q, k, v = make_qkv(3, 8, 2, 500, 64, dtype, device, seed=7)
    sentinel = 12.5
    big = torch.full((3, 10, 80), sentinel, dtype=q.dtype, device=device)
    out = big[:, 1:9, 8:72]
    out.fill_(float("nan"))
    run(backend, q, k, v, out)
    assert_close(out, q, k, v)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 1:9, 8:72] = False
    assert torch.all(big[mask] == sentinel), "elements outside Y were written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.03, 0.3, 2.0])
def test_custom_scale(backend, device, dtype, scale):
    q, k, v = make_qkv(2, 8, 4, 400, 64, dtype, device, seed=8)
    assert_close(run(backend, q, k, v, scale=scale), q, k, v, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_len", [100, 3000])
def test_peaky_softmax(backend, device, dtype, kv_len):
    """Large logits (|score| up to ~100): the max-subtraction must be right."""
    q, k, v = make_qkv(2, 8, 2, kv_len, 128, dtype, device, seed=9, scale=3.5)
    assert_close(run(backend, q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_repeatable(backend, device, dtype):
    q, k, v = make_qkv(3, 32, 8, 4096, 128, dtype, device, seed=10)
    first = run(backend, q, k, v).clone()
    second = run(backend, q, k, v)
    assert torch.equal(first.view(torch.uint8 if dtype != "float32" else torch.int32),
                       second.view(torch.uint8 if dtype != "float32" else torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_q_propagates_to_its_head_only(backend, device, dtype):
    q, k, v = make_qkv(2, 8, 2, 300, 64, dtype, device, seed=11)
    q[1, 5, 17] = float("nan")
    out = run(backend, q, k, v, poisoned_like(q, 7.0))
    assert torch.isnan(out[1, 5]).all(), "NaN in Q must reach every element of its head"
    finite = torch.ones(out.shape[:2], dtype=torch.bool)
    finite[1, 5] = False
    assert torch.isfinite(out[finite]).all(), "NaN leaked into other heads"
    q_clean = q.clone()
    q_clean[1, 5] = 0.5
    ref_out = out.clone()
    ref_out[1, 5] = run(backend, q_clean, k, v)[1, 5]
    assert_close(ref_out, q_clean, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_plan_reuse_with_new_data(backend, device, dtype):
    q, k, v = make_qkv(2, 16, 4, 640, 128, dtype, device, seed=12)
    p = flashdec.plan(q, k, v, backend=backend)
    assert p.backend.name == backend
    for seed in (13, 14):
        q2, k2, v2 = make_qkv(2, 16, 4, 640, 128, dtype, device, seed=seed)
        out = p.run(q2, k2, v2, poisoned_like(q2))
        assert_close(out, q2, k2, v2)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_numpy_inputs(backend, device, dtype):
    if device != "cpu":
        pytest.skip("NumPy arrays live on the CPU")
    q, k, v = (to64(t).astype(dtype) for t in make_qkv(2, 8, 2, 129, 64, dtype, "cpu", seed=15))
    out = flashdec.decode(q, k, v, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype)
    assert_close(out, q, k, v, dtype=dtype)
