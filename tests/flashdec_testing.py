"""Shared test helpers: backend/device parameters, random problems, the reference check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec.reference import TOLERANCE, decode_reference, relative_error

DTYPES = ("float16", "bfloat16", "float32")


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
             scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = randn((batch, num_heads, head_dim), dtype, device, gen, scale)
    k = randn((batch, num_kv_heads, kv_len, head_dim), dtype, device, gen, scale)
    v = randn((batch, num_kv_heads, kv_len, head_dim), dtype, device, gen)
    return q, k, v


def to64(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t.astype(np.float64)
    return t.detach().to("cpu", torch.float64).numpy()


def poisoned_like(q, value=float("nan")):
    """An output buffer filled with ``value`` so unwritten elements are caught."""
    return torch.full(q.shape, value, dtype=q.dtype, device=q.device)


def assert_close(out, q, k, v, scale=None, dtype=None):
    """Y matches the float64 reference of the same rounded inputs within TOLERANCE[dtype]."""
    ref = decode_reference(to64(q), to64(k), to64(v), scale)
    got = to64(out)
    dtype = dtype or str(out.dtype).removeprefix("torch.")
    err = relative_error(got, ref)
    tol = TOLERANCE[dtype]
    assert np.isfinite(got).all(), "output has NaN/inf: an element was not written or overflowed"
    assert err <= tol, f"relative error {err:.3e} > tolerance {tol:.3e} ({dtype})"
    return err


def run(backend, q, k, v, out=None, **kwargs):
    """decode with the NaN-poisoned ``out`` (made here when not given)."""
    if out is None:
        out = poisoned_like(q)
    return flashdec.decode(q, k, v, out, backend=backend, **kwargs)
