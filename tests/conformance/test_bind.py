"""DecodePlan.bind on every backend: a bound decode re-reads its tensors' current contents on
every call (the cuda backend replays a CUDA graph captured at bind time), returns the bound
result, and is checked once, at bind, as run is.

Each step writes new, random data into the bound tensors in place, NaN-poisons the outputs,
calls, and compares with the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import flashdec
from flashdec import ContractError
from flashdec_testing import (BACKENDS, assert_close, make_qkv, poison_unattended,
                              poisoned_like, poisoned_lse)

pytestmark = pytest.mark.parametrize("backend,device", BACKENDS)


def _refill(seed, *tensors):
    """New random contents for each tensor, in place (its own dtype)."""
    gen = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype))


@pytest.mark.parametrize("num_splits", [None, 3, 200])
def test_bound_decode_reads_current_contents(backend, device, num_splits):
    """Three steps, new Q/K/V each step; LSE too. 200 splits takes the combine kernel on cuda,
    3 the last-CTA merge."""
    q, k, v = make_qkv(2, 8, 2, 1000, 64, "bfloat16", device, seed=1)
    out, lse = poisoned_like(q), poisoned_lse(q)
    options = {} if num_splits is None or backend == "torch" else {"num_splits": num_splits}
    plan = flashdec.plan(q, k, v, out, lse_out=lse, backend=backend, **options)
    bound = plan.bind(q, k, v, out, lse_out=lse)
    for step in range(3):
        _refill(10 + step, q, k, v)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        got = bound()
        assert got[0] is out and got[1] is lse
        assert_close(out, q, k, v, lse=lse)


@pytest.mark.parametrize("where", ["device", "host"])
def test_bound_decode_reads_new_lengths(backend, device, where):
    """seqlens rewritten in place between calls: device lengths are read by the replay, a
    host tensor's by the run each call uploads."""
    if where == "device" and device == "cpu":
        pytest.skip("CPU lengths are host lengths")
    capacity = 300
    q, k, v = make_qkv(3, 8, 2, capacity, 64, "float16", device, seed=2)
    seqlens = torch.tensor([capacity, 1, 0], dtype=torch.int32,
                           device=device if where == "device" else "cpu")
    bound = flashdec.plan(q, k, v, seqlens=seqlens, backend=backend).bind(q, k, v,
                                                                          seqlens=seqlens)
    for lengths in ([capacity, 1, 0], [17, capacity, 250], [0, 129, 64]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        _refill(sum(lengths), k, v)
        poison_unattended(k, v, lengths)
        bound.result.fill_(float("nan"))
        assert_close(bound(), q, k, v, seqlens=lengths)


def test_bound_decode_allocates_its_result_once(backend, device):
    q, k, v = make_qkv(1, 4, 4, 64, 32, "float32", device, seed=3)
    plan = flashdec.plan(q, k, v, backend=backend)
    bound = plan.bind(q, k, v)
    first = bound()
    assert bound() is first and first.shape == q.shape and first.device == q.device
    assert_close(first, q, k, v)
    assert "BoundDecode(" in repr(bound) and bound.plan is plan


def test_bind_checks_as_run_does(backend, device):
    q, k, v = make_qkv(1, 8, 2, 64, 32, "float32", device, seed=4)
    plan = flashdec.plan(q, k, v, k_scale=2.0, backend=backend)
    with pytest.raises(ContractError, match=r"\bk does not match the plan"):
        plan.bind(q, k[:, :, :32], v)
    with pytest.raises(ContractError, match=r"k_scale must be a per-run tensor or None in bind"):
        plan.bind(q, k, v, k_scale=2.0)
    with pytest.raises(ContractError, match=r"\bout\b.*overlap|overlap.*\bq\b"):
        plan.bind(q, k, v, q)


def test_bound_decode_keeps_its_tensors_while_the_plan_runs_others(backend, device):
    """A bound decode's pointers are its own: plan.run with other tensors in between (the
    cuda backend rewrites the plan's parameter struct there) changes nothing it reads."""
    q, k, v = make_qkv(2, 8, 2, 500, 64, "bfloat16", device, seed=5)
    q2, k2, v2 = make_qkv(2, 8, 2, 500, 64, "bfloat16", device, seed=6)
    plan = flashdec.plan(q, k, v, backend=backend)
    bound = plan.bind(q, k, v, poisoned_like(q))
    assert_close(plan.run(q2, k2, v2, poisoned_like(q)), q2, k2, v2)
    bound.result.fill_(float("nan"))
    assert_close(bound(), q, k, v)
