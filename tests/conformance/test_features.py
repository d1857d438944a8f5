"""Conformance of the serving features on every backend: per-sequence lengths, sliding window,
softcap, fp8 KV with scales, LSE, their combinations, and plans whose lengths change per run.

K/V rows that no query may read are filled with NaN, so a backend that reads them gives NaN.
Outputs and LSE are NaN-poisoned before each run and compared with the float64 reference of
the same (fp8-rounded) inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec_testing import (BACKENDS, DTYPES, FP8, assert_close, make_qkv, poison_unattended,
                              poisoned_like, poisoned_lse, run, to64)

pytestmark = pytest.mark.parametrize("backend,device", BACKENDS)

CAPACITY = 300
RAGGED = [0, 1, CAPACITY, 137, 256]  # empty, one row, full capacity, two others


def _lengths(values, form, device):
    """seqlens as an int32 tensor on the device, or as a host list."""
    if form == "host":
        return list(values)
    return torch.tensor(values, dtype=torch.int32, device=device)


def _scales(form, num_kv_heads, device, seed):
    """(k_scale, v_scale): floats, or float32 [H_kv] tensors with a different value per head."""
    if form == "float":
        return 0.75, 1.5
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.rand(num_kv_heads, generator=gen) * 1.5 + 0.25).to(device)
                 for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["device", "host"])
def test_ragged_seqlens(backend, device, dtype, form):
    q, k, v = make_qkv(len(RAGGED), 8, 2, CAPACITY, 64, dtype, device, seed=20)
    poison_unattended(k, v, RAGGED)
    out, lse = run(backend, q, k, v, seqlens=_lengths(RAGGED, form, device), lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "seqlens[b] == 0 must give Y = 0"
    assert torch.all(lse[0] == float("-inf")), "seqlens[b] == 0 must give LSE = -inf"
    assert_close(out, q, k, v, lse=lse, seqlens=RAGGED)


def test_device_seqlens_are_clamped(backend, device):
    if device == "cpu":
        pytest.skip("CPU lengths are host lengths: checked, not clamped (see test_bad_inputs)")
    q, k, v = make_qkv(3, 8, 2, 200, 64, "bfloat16", device, seed=21)
    seqlens = torch.tensor([-5, 250, 2**31 - 1], dtype=torch.int32, device=device)
    out, lse = run(backend, q, k, v, seqlens=seqlens, lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])), "a negative length is clamped to 0"
    assert_close(out, q, k, v, lse=lse, seqlens=[0, 200, 200])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window_left", [0, 7, 100, 1000])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "seqlens"])
def test_sliding_window(backend, device, dtype, window_left, ragged):
    """Windows shorter and longer than the sequence, alone and with per-sequence lengths."""
    lengths = [CAPACITY, 17, 0, 250] if ragged else None
    q, k, v = make_qkv(4, 8, 2, CAPACITY, 64, dtype, device, seed=22 + window_left)
    poison_unattended(k, v, lengths, window_left)
    seqlens = None if lengths is None else _lengths(lengths, "device", device)
    out, lse = run(backend, q, k, v, window_left=window_left, seqlens=seqlens, lse=True)
    assert_close(out, q, k, v, lse=lse, window_left=window_left, seqlens=lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap_with_large_logits(backend, device, dtype, softcap):
    q, k, v = make_qkv(2, 8, 2, 1000, 128, dtype, device, seed=23, scale=3.5)
    logits = to64(q).reshape(2, 2, 4, 128) @ to64(k).swapaxes(-1, -2) / np.sqrt(128)
    assert np.abs(logits).max() > 40, "the raw logits must be large for the cap to matter"
    out, lse = run(backend, q, k, v, softcap=softcap, lse=True)
    assert_close(out, q, k, v, lse=lse, softcap=softcap)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("scales", ["float", "tensor"])
def test_fp8_kv(backend, device, kv_dtype, dtype, scales):
    q, k, v = make_qkv(2, 16, 4, 700, 128, dtype, device, seed=24, kv_dtype=kv_dtype)
    k_scale, v_scale = _scales(scales, 4, device, seed=25)
    out, lse = run(backend, q, k, v, k_scale=k_scale, v_scale=v_scale, lse=True)
    assert_close(out, q, k, v, lse=lse, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_fp8_head_dims_and_groups(backend, device, kv_dtype, head_dim, group):
    q, k, v = make_qkv(2, 2 * group, 2, 333, head_dim, "bfloat16", device,
                       seed=head_dim + group, kv_dtype=kv_dtype)
    k_scale, v_scale = _scales("tensor", 2, device, seed=group)
    out = run(backend, q, k, v, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, q, k, v, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scales", ["float", "tensor"])
def test_scales_with_unquantized_kv(backend, device, dtype, scales):
    q, k, v = make_qkv(2, 8, 2, 300, 64, dtype, device, seed=26)
    k_scale, v_scale = _scales(scales, 2, device, seed=27)
    out = run(backend, q, k, v, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, q, k, v, k_scale=k_scale, v_scale=v_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_len", [0, 1, 700])
def test_return_lse(backend, device, dtype, kv_len):
    q, k, v = make_qkv(3, 8, 2, kv_len, 64, dtype, device, seed=28)
    out, lse = flashdec.decode(q, k, v, poisoned_like(q), return_lse=True, backend=backend)
    assert lse.dtype == torch.float32 and lse.shape == (3, 8) and lse.device == q.device
    assert_close(out, q, k, v, lse=lse)
    if kv_len == 0:
        assert torch.all(lse == float("-inf")), "K_len == 0 must give LSE = -inf"
    lse_out = poisoned_lse(q)
    out2, lse2 = run(backend, q, k, v, lse_out=lse_out)  # lse_out alone asks for LSE
    assert lse2 is lse_out
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_strided_lse_out_written_in_full_and_only_there(backend, device):
    q, k, v = make_qkv(3, 8, 2, 500, 64, "float32", device, seed=29)
    sentinel = 12.5
    big = torch.full((8, 3, 5), sentinel, dtype=torch.float32, device=device)
    lse_out = big.permute(1, 0, 2)[:, :, 2]  # [3, 8], strides (5, 15)
    lse_out.fill_(float("nan"))
    _, lse = run(backend, q, k, v, lse_out=lse_out)
    assert_close(run(backend, q, k, v), q, k, v, lse=lse)
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, :, 2] = False
    assert torch.all(big[mask] == sentinel), "elements outside LSE were written"


COMBINATIONS = [("float32", None), ("bfloat16", None), ("float16", "float8_e4m3fn"),
                ("bfloat16", "float8_e5m2")]


@pytest.mark.parametrize("dtype,kv_dtype", COMBINATIONS)
@pytest.mark.parametrize("entry", ["decode", "plan"])
def test_all_features_together(backend, device, dtype, kv_dtype, entry):
    """seqlens + window + softcap + per-head scales (+ fp8) + LSE, repeatable bit for bit."""
    lengths, window_left, softcap = [0, 1000, 613, 1], 200, 20.0
    q, k, v = make_qkv(4, 16, 4, 1000, 128, dtype, device, seed=30, scale=2.0,
                       kv_dtype=kv_dtype)
    poison_unattended(k, v, lengths, window_left)
    k_scale, v_scale = _scales("tensor", 4, device, seed=31)
    tensors = dict(seqlens=_lengths(lengths, "device", device), k_scale=k_scale,
                   v_scale=v_scale)
    if entry == "decode":
        results = [run(backend, q, k, v, lse=True, window_left=window_left, softcap=softcap,
                       **tensors) for _ in range(2)]
    else:
        p = flashdec.plan(q, k, v, window_left=window_left, softcap=softcap, return_lse=True,
                          backend=backend, **tensors)
        results = [p.run(q, k, v, poisoned_like(q), lse_out=poisoned_lse(q), **tensors)
                   for _ in range(2)]
    (out, lse), (out2, lse2) = results
    assert_close(out, q, k, v, lse=lse, seqlens=lengths, window_left=window_left,
                 softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "a repeated run differs"


@pytest.mark.parametrize("form", ["device", "host"])
def test_plan_reuse_with_changing_seqlens(backend, device, form):
    """The same plan (and, for a device tensor, the same tensor with new contents, as a
    captured CUDA graph sees it) runs correctly as the lengths change."""
    q, k, v = make_qkv(3, 16, 4, 900, 128, "bfloat16", device, seed=32)
    seqlens = _lengths([900, 0, 450], form, device)
    p = flashdec.plan(q, k, v, seqlens=seqlens, return_lse=True, backend=backend)
    for lengths in ([900, 0, 450], [1, 899, 0], [300, 300, 900]):
        if form == "device":
            seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        else:
            seqlens = list(lengths)
        out, lse = p.run(q, k, v, poisoned_like(q), seqlens=seqlens, lse_out=poisoned_lse(q))
        assert_close(out, q, k, v, lse=lse, seqlens=lengths)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("window_left", [None, 2500])
def test_long_cache(backend, device, kv_dtype, window_left):
    """K_len 5000: long enough that the cuda backend splits it; ragged lengths and LSE."""
    lengths = [5000, 3111]
    q, k, v = make_qkv(2, 32, 8, 5000, 128, "bfloat16", device, seed=33, kv_dtype=kv_dtype)
    poison_unattended(k, v, lengths, window_left)
    scales = dict(k_scale=0.5, v_scale=2.0) if kv_dtype in FP8 else {}
    out, lse = run(backend, q, k, v, seqlens=_lengths(lengths, "device", device),
                   window_left=window_left, lse=True, **scales)
    assert_close(out, q, k, v, lse=lse, seqlens=lengths, window_left=window_left, **scales)
