"""merge_states on every backend: cutting K into disjoint chunks, decoding each with LSE and
merging reproduces the single decode (the float64 reference of the whole cache), in stacked
and sequence form; empty parts, NaN and determinism.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec.reference import TOLERANCE, merge_reference, relative_error
from flashdec_testing import (BACKENDS, DTYPES, assert_close, make_qkv, poisoned_like,
                              poisoned_lse, randn, run, to64)

pytestmark = pytest.mark.parametrize("backend,device", BACKENDS)

CAPACITY = 600
PARTS = (1, 8, 2, 5, 3, 7)  # one count per seed: 1..8 with both ends


def _chunks(rng, kv_len, parts):
    """``parts`` contiguous chunks covering [0, kv_len); a repeated cut gives an empty chunk."""
    cuts = np.sort(rng.integers(0, kv_len + 1, size=parts - 1)).tolist()
    if parts >= 3:
        cuts[1] = cuts[0]  # at least one zero-length chunk
    bounds = [0, *cuts, kv_len]
    return list(zip(bounds[:-1], bounds[1:]))


def _stack(parts, form):
    if form == "sequence":
        return parts
    if form == "stacked":
        return torch.stack(parts)
    return torch.stack(parts, dim=1).transpose(0, 1)  # stacked, not contiguous


def merge(backend, outputs, lses, like):
    """merge_states into NaN-poisoned outputs shaped for ``like`` (a [B, H, D] tensor)."""
    return flashdec.merge_states(outputs, lses, out=poisoned_like(like),
                                 lse_out=poisoned_lse(like), backend=backend)


@pytest.mark.parametrize("seed", range(len(PARTS)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["stacked", "stacked-strided", "sequence"])
def test_merge_of_chunks_matches_the_whole(backend, device, seed, dtype, form):
    """Each chunk is decoded with the lengths that fall into it (so some parts are empty for
    some batch entries), and the merge equals the decode of the whole ragged cache."""
    rng = np.random.default_rng(seed)
    lengths = np.array([0, CAPACITY, *rng.integers(1, CAPACITY, size=2)])
    q, k, v = make_qkv(len(lengths), 8, 2, CAPACITY, 64, dtype, device, seed=40 + seed)
    ys, lses = [], []
    for start, stop in _chunks(rng, CAPACITY, PARTS[seed]):
        part_lengths = np.clip(lengths - start, 0, stop - start)
        seqlens = torch.tensor(part_lengths, dtype=torch.int32, device=device)
        y, lse = run(backend, q, k[:, :, start:stop], v[:, :, start:stop], seqlens=seqlens,
                     lse=True)
        ys.append(y)
        lses.append(lse)
    out, lse = merge(backend, _stack(ys, form), _stack(lses, form), q)
    assert_close(out, q, k, v, lse=lse, seqlens=lengths)
    ref, _ = merge_reference([to64(y) for y in ys], [to64(s) for s in lses])
    assert relative_error(to64(out), ref) <= TOLERANCE[dtype]
    assert torch.equal(out[0], torch.zeros_like(out[0])), "a row empty in every part gives Y = 0"
    assert torch.all(lse[0] == float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_random_states(backend, device, dtype):
    """States that no decode produced (LSEs spread over +-40) against merge_reference."""
    gen = torch.Generator().manual_seed(50)
    ys = randn((5, 3, 4, 32), dtype, device, gen)
    lses = randn((5, 3, 4), "float32", device, gen, scale=20.0)
    lses[2, 1] = float("-inf")  # one empty part for batch entry 1
    out, lse = merge(backend, ys, lses, ys[0])
    ref, ref_lse = merge_reference(to64(ys), to64(lses))
    assert relative_error(to64(out), ref) <= TOLERANCE[dtype]
    assert relative_error(to64(lse), ref_lse) <= 1e-6


def test_merge_all_parts_empty(backend, device):
    gen = torch.Generator().manual_seed(51)
    ys = randn((3, 2, 4, 16), "float32", device, gen)  # ignored: their weight is 0
    lses = torch.full((3, 2, 4), float("-inf"), device=device)
    out, lse = merge(backend, ys, lses, ys[0])
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.all(lse == float("-inf"))


def test_merge_empty_part_adds_nothing_even_nan(backend, device):
    """A part with LSE = -inf has weight 0: whatever its Y holds (here NaN) must not leak."""
    gen = torch.Generator().manual_seed(56)
    ys = randn((3, 2, 4, 16), "float32", device, gen)
    lses = randn((3, 2, 4), "float32", device, gen, scale=3.0)
    ys[1, 0, 2] = float("nan")
    lses[1, 0, 2] = float("-inf")
    out, lse = merge(backend, ys, lses, ys[0])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, ref_lse = merge_reference(to64(ys), to64(lses))
    assert relative_error(to64(out), ref) <= TOLERANCE["float32"]
    assert relative_error(to64(lse), ref_lse) <= 1e-6


def test_merge_nan_propagates(backend, device):
    gen = torch.Generator().manual_seed(52)
    ys = randn((3, 2, 4, 16), "float32", device, gen)
    lses = randn((3, 2, 4), "float32", device, gen, scale=3.0)
    ys[1, 0, 2, 5] = float("nan")
    lses[2, 1, 3] = float("nan")
    out, lse = merge(backend, ys, lses, ys[0])
    ref, ref_lse = merge_reference(to64(ys), to64(lses))
    got, got_lse = to64(out), to64(lse)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isnan(got_lse), np.isnan(ref_lse))
    assert np.isnan(got[0, 2, 5]) and np.isnan(got[1, 3]).all() and np.isnan(got_lse[1, 3])
    finite = ~np.isnan(ref)
    assert np.abs(got[finite] - ref[finite]).max() <= 1e-5 * np.abs(ref[finite]).max()


def test_merge_is_bitwise_repeatable(backend, device):
    gen = torch.Generator().manual_seed(53)
    ys = randn((7, 4, 8, 128), "bfloat16", device, gen)
    lses = randn((7, 4, 8), "float32", device, gen, scale=10.0)
    first = merge(backend, ys, lses, ys[0])
    second = merge(backend, ys, lses, ys[0])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_allocates_results_like_the_inputs(backend, device, dtype):
    gen = torch.Generator().manual_seed(54)
    ys = [randn((2, 4, 16), dtype, device, gen) for _ in range(2)]
    lses = [randn((2, 4), "float32", device, gen) for _ in range(2)]
    out, lse = flashdec.merge_states(ys, lses, backend=backend)
    assert (out.dtype, out.shape, out.device) == (ys[0].dtype, (2, 4, 16), ys[0].device)
    assert (lse.dtype, lse.shape, lse.device) == (torch.float32, (2, 4), ys[0].device)
    out_given, lse_given = poisoned_like(ys[0]), poisoned_lse(ys[0])
    got = flashdec.merge_states(ys, lses, out=out_given, lse_out=lse_given, backend=backend)
    assert got[0] is out_given and got[1] is lse_given
    assert torch.equal(out_given, out) and torch.equal(lse_given, lse)


def test_merge_numpy(backend, device):
    if device != "cpu":
        pytest.skip("NumPy arrays live on the CPU")
    rng = np.random.default_rng(55)
    ys = rng.standard_normal((3, 2, 4, 16)).astype(np.float32)
    lses = (rng.standard_normal((3, 2, 4)) * 4).astype(np.float32)
    out, lse = flashdec.merge_states(ys, lses, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32
    ref, ref_lse = merge_reference(ys, lses)
    assert relative_error(out, ref) <= TOLERANCE["float32"]
    assert relative_error(lse, ref_lse) <= TOLERANCE["float32"]
