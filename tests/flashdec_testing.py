"""Shared test helpers: backend/device parameters, random problems, the reference check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec.reference import (LSE_TOLERANCE, TOLERANCE, decode_reference, lse_error,
                                relative_error)

DTYPES = ("float16", "bfloat16", "float32")
FP8 = ("float8_e4m3fn", "float8_e5m2")


def _backend_params():
    """(backend, device) pairs; those this machine cannot run are skipped with the reason."""
    avail = flashdec.available_backends()
    params = [pytest.param("torch", "cpu", id="torch-cpu",
                           marks=() if avail["torch"][0] else pytest.mark.skip(avail["torch"][1]))]
    no_gpu = None if torch.cuda.is_available() else "no CUDA GPU on this machine"
    params.append(pytest.param("torch", "cuda", id="torch-cuda",
                               marks=pytest.mark.skip(no_gpu) if no_gpu else ()))
    why = no_gpu or (None if avail["cuda"][0] else avail["cuda"][1])
    params.append(pytest.param("cuda", "cuda", id="cuda",
                               marks=pytest.mark.skip(why) if why else ()))
    return params


BACKENDS = _backend_params()


def randn(shape, dtype, device, gen, scale=1.0):
    """Random normal data (never zeros or constants) in ``dtype`` on ``device``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(
        device=device, dtype=getattr(torch, dtype))


def make_qkv(batch, num_heads, num_kv_heads, kv_len, head_dim, dtype, device, seed=0,
             scale=1.0, kv_dtype=None):
    """Q in ``dtype``; K and V in ``kv_dtype`` (default ``dtype``; an fp8 name rounds the
    random values to fp8)."""
    gen = torch.Generator().manual_seed(seed)
    kv_dtype = kv_dtype or dtype
    q = randn((batch, num_heads, head_dim), dtype, device, gen, scale)
    k = randn((batch, num_kv_heads, kv_len, head_dim), kv_dtype, device, gen, scale)
    v = randn((batch, num_kv_heads, kv_len, head_dim), kv_dtype, device, gen)
    return q, k, v


def poison_unattended(k, v, seqlens=None, window_left=None):
    """Fill the K/V rows no query may read (at or past seqlens[b], before the window) with
    NaN, so a backend that reads them gives NaN."""
    kv_len = k.shape[2]
    for b in range(k.shape[0]):
        length = kv_len if seqlens is None else min(max(int(seqlens[b]), 0), kv_len)
        start = 0 if window_left is None else max(length - 1 - window_left, 0)
        for x in (k, v):
            x[b, :, length:] = float("nan")
            x[b, :, :start] = float("nan")


def to64(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float64)
    return t.detach().to("cpu", torch.float64).numpy()


def poisoned_like(q, value=float("nan")):
    """An output buffer filled with ``value`` so unwritten elements are caught."""
    return torch.full(q.shape, value, dtype=q.dtype, device=q.device)


def poisoned_lse(q):
    """A NaN-filled float32 LSE buffer [B, H_q] for ``q``."""
    return torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)


def assert_close(out, q, k, v, scale=None, dtype=None, *, lse=None, **features):
    """Y (and LSE when given) match the float64 reference of the same rounded inputs (fp8 K/V
    as their fp8 values) within TOLERANCE / LSE_TOLERANCE of Y's dtype. ``features`` are
    ``decode_reference`` keywords; tensors among them are read back to the host."""
    features = {n: to64(x) if isinstance(x, torch.Tensor) else x for n, x in features.items()}
    ref, ref_lse = decode_reference(to64(q), to64(k), to64(v), scale, return_lse=True,
                                    **features)
    got = to64(out)
    dtype = dtype or str(out.dtype).removeprefix("torch.")
    err = relative_error(got, ref)
    tol = TOLERANCE[dtype]
    assert np.isfinite(got).all(), "output has NaN/inf: an element was not written or overflowed"
    assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.3e} ({dtype})"
    if lse is not None:
        got_lse = to64(lse)
        assert not np.isnan(got_lse).any(), "LSE has NaN: an element was not written"
        lse_err = lse_error(got_lse, ref_lse)
        assert lse_err <= LSE_TOLERANCE[dtype], \
            f"LSE error {lse_err:.3e} > tolerance {LSE_TOLERANCE[dtype]:.3e} ({dtype})"
    return err


def run(backend, q, k, v, out=None, *, lse=False, **kwargs):
    """decode with the NaN-poisoned ``out`` (made here when not given); with ``lse``, also a
    NaN-poisoned ``lse_out``, and the result is (Y, LSE)."""
    if out is None:
        out = poisoned_like(q)
    if lse:
        kwargs["lse_out"] = poisoned_lse(q)
    return flashdec.decode(q, k, v, out, backend=backend, **kwargs)
