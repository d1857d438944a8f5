"""decode()'s plan cache: one plan per layout / scalars / backend / stream / thread, reused
with new data, bounded, never shared across threads."""

from __future__ import annotations

import threading

import pytest
import torch

import flashdec
from flashdec import _plan_cache
from flashdec_testing import assert_close, make_qkv, poisoned_like


@pytest.fixture(autouse=True)
def _empty_cache():
    _plan_cache.clear()
    yield
    _plan_cache.clear()


def test_same_layout_reuses_one_plan_with_new_data():
    for seed in (1, 2, 3):
        q, k, v = make_qkv(2, 8, 2, 100, 64, "float32", "cpu", seed=seed)
        assert_close(flashdec.decode(q, k, v, poisoned_like(q), backend="torch"), q, k, v)
    assert _plan_cache.size() == 1


def test_layouts_scalars_and_backend_choice_make_new_plans(monkeypatch):
    q, k, v = make_qkv(2, 8, 2, 100, 64, "float32", "cpu", seed=4)
    flashdec.decode(q, k, v, backend="torch")
    flashdec.decode(q, k[:, :, :50], v[:, :, :50], backend="torch")        # another layout
    flashdec.decode(q, k, v, backend="torch", scale=0.3)                    # another scale
    flashdec.decode(q, k, v, backend="torch", softcap=20.0)                 # another softcap
    monkeypatch.delenv("FLASHDEC_BACKEND", raising=False)
    flashdec.decode(q, k, v)                                                # auto: a new key
    assert _plan_cache.size() == 5
    monkeypatch.setenv("FLASHDEC_BACKEND", "torch")
    flashdec.decode(q, k, v)                                                # = backend="torch"
    assert _plan_cache.size() == 5
    out, lse = flashdec.decode(q, k, v, backend="torch", return_lse=True)  # results differ
    assert lse.shape == (2, 8) and _plan_cache.size() == 6


def test_cache_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(_plan_cache, "PLAN_CACHE_SIZE", 2)
    inputs = [make_qkv(1, 4, 2, n, 32, "float32", "cpu", seed=n) for n in (10, 20, 30)]
    for q, k, v in inputs:
        flashdec.decode(q, k, v, backend="torch")
    assert _plan_cache.size() == 2
    kept = {key[0][1][0] for key in _plan_cache._plans}  # k's shape of each cached plan
    assert kept == {(1, 2, 20, 32), (1, 2, 30, 32)}


def test_threads_get_their_own_plans():
    q, k, v = make_qkv(1, 4, 2, 64, 32, "float32", "cpu", seed=5)
    flashdec.decode(q, k, v, backend="torch")
    worker = threading.Thread(target=lambda: flashdec.decode(q, k, v, backend="torch"))
    worker.start()
    worker.join()
    assert _plan_cache.size() == 2


def test_uncacheable_calls_still_work():
    """Host seqlens as a list and NumPy inputs take the uncached path."""
    q, k, v = make_qkv(2, 4, 2, 64, 32, "float32", "cpu", seed=6)
    out = flashdec.decode(q, k, v, seqlens=[64, 10], backend="torch")
    assert torch.isfinite(out).all()
    flashdec.decode(q.numpy(), k.numpy(), v.numpy(), backend="torch")
    assert _plan_cache.size() == 0


def test_bad_input_is_still_rejected_on_a_cached_layout():
    q, k, v = make_qkv(1, 4, 2, 64, 32, "float32", "cpu", seed=7)
    flashdec.decode(q, k, v, backend="torch")
    with pytest.raises(flashdec.ContractError, match="overlaps"):
        flashdec.decode(q, k, v, q, backend="torch")  # out aliases q


def test_plan_details_and_repr_say_how_it_runs():
    """A plan shows its kernel, split count, merge and workspace as plain values (what tests
    and scripts read instead of private state), in its repr too."""
    q, k, v = make_qkv(2, 8, 2, 100, 64, "float32", "cpu", seed=1)
    p = flashdec.plan(q, k, v, backend="torch")
    details = p.details
    assert details == {"kernel": "torch (SDPA, or fp32 math for softcap and LSE)", "num_splits": 1,
                       "merge": "none", "workspace_bytes": 0}
    details["kernel"] = "changed"
    assert p.details["kernel"] != "changed"  # a copy each time
    assert "kernel='torch (SDPA, or fp32 math for softcap and LSE)'" in repr(p)
    assert "num_splits=1" in repr(p)
