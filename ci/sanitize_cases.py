"""Cases for compute-sanitizer memcheck: strided, ragged-length, small-D, misaligned and
multi-split problems on the cuda backend, and the serving features (device seqlens that stop
reads inside a sequence, windows, softcap, fp8 KV, LSE, merge), each checked against the
reference. K/V allocations that end exactly at seqlens prove no row past a sequence's end
is read."""

from __future__ import annotations

import sys

import numpy as np
import torch

sys.path.insert(0, "tests")
from flashdec_testing import assert_close, make_qkv, poisoned_like, randn, to64  # noqa: E402

import flashdec  # noqa: E402
from flashdec import DType, TensorRef  # noqa: E402
from flashdec.reference import TOLERANCE, decode_reference, relative_error  # noqa: E402


def _out_beside(q, views):
    """A poisoned Y outside every view's declared span (which reaches past its allocation,
    where the driver may place a new one): candidates that land inside are kept alive until
    one lands outside, so the driver cannot hand the same address back."""
    held = []
    while True:
        out = poisoned_like(q)
        a, b = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
        if all(b <= lo or a >= hi for lo, hi in (view.span_bytes() for view in views)):
            return out
        held.append(out)


def _exact_allocation_cases(cases: int) -> int:
    """K and V hold exactly seqlens rows (their own cudaMalloc: run with
    PYTORCH_NO_CUDA_MEMORY_CACHING=1) but are seen through a view of a larger capacity, so
    memcheck reports any read of a row at or past the sequence's end."""
    gen = torch.Generator().manual_seed(1)
    hkv, cap = 2, 1024
    for dtype, kv_dtype in (("bfloat16", "bfloat16"), ("float16", "float8_e5m2"),
                            ("float32", "float32")):
        for d in (64, 128, 80, 112):
            for n in (1, 37, 1000):
                kv_t = getattr(torch, kv_dtype)
                # Q and Y first: K's declared span reaches past its allocation, and Y must not
                # fall there (flashdec rejects an output overlapping an input's span)
                q = randn((1, 8, d), dtype, "cuda", gen)
                # NHD rows [n, hkv, d], viewed as [1, hkv, cap, d]
                k = randn((n, hkv, d), dtype, "cuda", gen).to(kv_t)
                v = randn((n, hkv, d), dtype, "cuda", gen).to(kv_t)
                views = [TensorRef.from_pointer(t.data_ptr(), DType(kv_dtype), (1, hkv, cap, d),
                                                (0, d, hkv * d, 1), "cuda:0", owner=t)
                         for t in (k, v)]
                outs = [_out_beside(q, views) for _ in range(3)]
                seqlens = torch.tensor([n], dtype=torch.int32, device="cuda")
                scales = {} if kv_dtype == dtype else {"k_scale": 0.7, "v_scale": 1.3}
                k_live, v_live = (t.permute(1, 0, 2).unsqueeze(0) for t in (k, v))
                for splits, out in zip((None, 1, 5), outs):
                    out = flashdec.decode(q, *views, out, seqlens=seqlens,
                                          backend="cuda", num_splits=splits, **scales)
                    ref = decode_reference(to64(q), to64(k_live), to64(v_live), **scales)
                    err = relative_error(to64(out), ref)
                    assert err <= TOLERANCE[dtype], (dtype, kv_dtype, d, n, splits, err)
                    cases += 1
    return cases


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for dtype in ("bfloat16", "float16", "float32"):
        for (b, hq, hkv, klen, d) in [(1, 8, 2, 1, 1), (2, 7, 1, 37, 3), (3, 16, 2, 1000, 80),
                                      (1, 32, 8, 4099, 128), (2, 4, 4, 513, 256), (1, 8, 1, 0, 64),
                                      (2, 40, 2, 777, 64)]:
            q, k, v = make_qkv(b, hq, hkv, klen, d, dtype, "cuda", seed=cases)
            for splits in (None, 1, 3):
                out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=splits)
                assert_close(out, q, k, v)
                cases += 1
        # capacity prefix, NHD permute, non-unit innermost stride, misaligned base pointer
        k_cache = randn((2, 4, 700, 64), dtype, "cuda", gen)
        v_cache = randn((2, 4, 700, 64), dtype, "cuda", gen)
        q = randn((2, 8, 64), dtype, "cuda", gen)
        for k, v in [(k_cache[:, :, :333], v_cache[:, :, :333]),
                     (k_cache.reshape(2, 700, 4, 64).permute(0, 2, 1, 3),
                      v_cache.reshape(2, 700, 4, 64).permute(0, 2, 1, 3)),
                     (k_cache[..., ::2], v_cache[..., ::2]),
                     (k_cache.flatten()[1:1 + 2 * 4 * 600 * 32].view(2, 4, 600, 32),
                      v_cache.flatten()[3:3 + 2 * 4 * 600 * 32].view(2, 4, 600, 32))]:
            qq = q[..., : k.shape[-1]]
            out = flashdec.decode(qq, k, v, poisoned_like(qq), backend="cuda")
            assert_close(out, qq, k, v)
            cases += 1
    # features together: window, softcap, per-head fp8 scales, LSE
    for kv_dtype in ("bfloat16", "float8_e4m3fn"):
        q, k, v = make_qkv(3, 16, 4, 3000, 128, "bfloat16", "cuda", seed=99, scale=3.0)
        k, v = k.to(getattr(torch, kv_dtype)), v.to(getattr(torch, kv_dtype))
        ks, vs = torch.rand(4, device="cuda") + 0.5, torch.rand(4, device="cuda") + 0.5
        seqlens = torch.tensor([3000, 2, 1500], dtype=torch.int32, device="cuda")
        out, lse = flashdec.decode(q, k, v, poisoned_like(q), seqlens=seqlens, window_left=700,
                                   softcap=30.0, k_scale=ks, v_scale=vs, return_lse=True,
                                   backend="cuda")
        ref, _ = decode_reference(to64(q), to64(k), to64(v), seqlens=np.array([3000, 2, 1500]),
                                  window_left=700, softcap=30.0, k_scale=ks.cpu().numpy(),
                                  v_scale=vs.cpu().numpy(), return_lse=True)
        assert relative_error(to64(out), ref) <= TOLERANCE["bfloat16"]
        parts = [flashdec.decode(q, k[:, :, a:b], v[:, :, a:b], poisoned_like(q), return_lse=True,
                                 k_scale=ks, v_scale=vs, backend="cuda")
                 for a, b in ((0, 1000), (1000, 1000), (1000, 3000))]
        flashdec.merge_states([o for o, _ in parts], [s for _, s in parts], backend="cuda")
        cases += 2
    cases = _combine_cases(cases)
    cases = _exact_allocation_cases(cases)
    cases = _paged_cases(cases)
    cases = _by_length_cases(cases)
    torch.cuda.synchronize()
    print(f"{cases} sanitizer cases passed")
    return 0


def _combine_cases(cases: int) -> int:
    """Few KV heads with many splits: the combine kernel merges (up to MAX_SPLITS), with
    seqlens and a window that leave most splits empty; and a bound plan's graph replay."""
    for dtype, kv_dtype, d in (("bfloat16", "bfloat16", 128), ("float16", "float8_e4m3fn", 96),
                               ("float32", "float32", 80)):
        q, k, v = make_qkv(1, 8, 1, 40000, d, dtype, "cuda", seed=cases)
        scales = {}
        if kv_dtype != dtype:
            k, v = k.to(getattr(torch, kv_dtype)), v.to(getattr(torch, kv_dtype))
            scales = {"k_scale": 0.5, "v_scale": 2.0}
        for splits in (None, 300):
            out, lse = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda",
                                       num_splits=splits, return_lse=True, **scales)
            assert_close(out, q, k, v, lse=lse, **scales)
            seqlens = torch.tensor([12345], dtype=torch.int32, device="cuda")
            out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=splits,
                                  seqlens=seqlens, window_left=999, **scales)
            assert_close(out, q, k[:, :, 11345:12345], v[:, :, 11345:12345], **scales)
            # the same launches replayed from a CUDA graph (DecodePlan.bind), new lengths
            bound = flashdec.plan(q, k, v, poisoned_like(q), seqlens=seqlens, backend="cuda",
                                  num_splits=splits, **scales).bind(
                                      q, k, v, poisoned_like(q), seqlens=seqlens)
            for n in (40000, 7):
                seqlens.fill_(n)
                bound.result.fill_(float("nan"))
                assert_close(bound(), q, k[:, :, :n], v[:, :, :n], **scales)
            cases += 4
    return cases


def _paged_cases(cases: int) -> int:
    """Paged pools that are their own allocations (exactly num_pages pages), read through
    tables whose entries past each sequence's pages are far outside the pool, and whose used
    entries include ids out of range (-1, num_pages, 2**31 - 1: clamped into the pool by the
    kernel, so memcheck must stay silent); tensor-core (page 16, 64) and CUDA-core (page 7)
    kernels, 16-bit and fp8 pools, a window and left padding that start mid-block."""
    import math

    gen = torch.Generator().manual_seed(3)
    for kv_dtype, page_size, d in (("bfloat16", 16, 128), ("float8_e4m3fn", 64, 80),
                                   ("bfloat16", 7, 64)):
        lengths = [1000, 1, 333, 0]
        batch, hkv, max_pages = len(lengths), 2, math.ceil(1000 / page_size)
        num_pages = sum(math.ceil(n / page_size) for n in lengths)
        kv_t = getattr(torch, kv_dtype)
        kp = randn((num_pages, hkv, page_size, d), "bfloat16", "cuda", gen).to(kv_t)
        vp = randn((num_pages, hkv, page_size, d), "bfloat16", "cuda", gen).to(kv_t)
        table = torch.full((batch, max_pages), 2**31 - 1, dtype=torch.int32)
        ids = torch.randperm(num_pages, generator=gen).tolist()
        for b, n in enumerate(lengths):
            for i in range(math.ceil(n / page_size)):
                table[b, i] = ids.pop()
        q = randn((batch, 8, d), "bfloat16", "cuda", gen)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        scales = {"k_scale": 0.5, "v_scale": 2.0} if kv_dtype != "bfloat16" else {}
        features = {"window_left": 301, "cache_leftpad": torch.tensor(
            [37, 0, 5, 0], dtype=torch.int32, device="cuda")}
        for splits in (None, 3):
            for extra in ({}, features):
                out = flashdec.decode(q, kp, vp, poisoned_like(q), block_table=table.cuda(),
                                      seqlens=seqlens, num_splits=splits, backend="cuda",
                                      **scales, **extra)
                ref_extra = {k: (to64(x) if isinstance(x, torch.Tensor) else x)
                             for k, x in extra.items()}
                ref = decode_reference(to64(q), to64(kp), to64(vp), seqlens=lengths,
                                       block_table=table.numpy(), **scales, **ref_extra)
                assert relative_error(to64(out), ref) <= TOLERANCE["bfloat16"]
                cases += 1
        bad = table.clone()
        bad[0, 0], bad[0, 1], bad[2, 0] = -1, num_pages, 2**31 - 1  # clamped, never outside
        flashdec.decode(q, kp, vp, poisoned_like(q), block_table=bad.cuda(), seqlens=seqlens,
                        backend="cuda", **scales)
        cases += 1
    return cases


def _by_length_cases(cases: int) -> int:
    """Splits cut on the GPU from the lengths: batches whose sequences spread over several
    threads of the schedule (300, and the largest, 512), ragged and empty lengths, merged in
    the last CTA (GQA) and by the combine kernel (MQA); every partial and spare CTA stays
    inside the workspace (its own allocation under memcheck)."""
    gen = torch.Generator().manual_seed(4)
    for batch, hq, hkv, cap in ((300, 8, 2, 600), (512, 4, 1, 300), (3, 16, 1, 9000)):
        q, k, v = make_qkv(batch, hq, hkv, cap, 64, "bfloat16", "cuda", seed=batch)
        lengths = torch.randint(0, cap + 1, (batch,), generator=gen)
        lengths[::7] = 0
        lengths[1] = cap
        plan = flashdec.plan(q, k, v, seqlens=lengths.to("cuda", torch.int32), backend="cuda")
        assert plan.details["splits"].startswith("by length"), plan.details
        out = plan.run(q, k, v, poisoned_like(q), seqlens=lengths.to("cuda", torch.int32))
        assert_close(out, q, k, v, seqlens=lengths.tolist())
        cases += 1
    return cases


def racecheck() -> int:
    """A few launches of each shared-memory protocol for compute-sanitizer racecheck (slow):
    the MMA ring with the last-CTA merge and with the combine kernel, fp8 with padded tiles,
    Q by plain loads, the SIMT kernel, the schedule by length."""
    runs = [((2, 32, 8, 3000, 128, "bfloat16"), 8), ((1, 8, 1, 20000, 128, "bfloat16"), None),
            ((2, 16, 2, 2000, 80, "float16"), 5), ((2, 8, 2, 1000, 64, "float32"), 3)]
    for (b, hq, hkv, klen, d, dtype), splits in runs:
        q, k, v = make_qkv(b, hq, hkv, klen, d, dtype, "cuda", seed=d)
        out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", num_splits=splits)
        assert_close(out, q, k, v)
    q, k, v = make_qkv(2, 16, 2, 2000, 80, "bfloat16", "cuda", seed=3, kv_dtype="float8_e4m3fn")
    out = flashdec.decode(q, k, v, poisoned_like(q), backend="cuda", k_scale=1.0, v_scale=1.0)
    assert_close(out, q, k, v)
    q, k, v = make_qkv(6, 32, 8, 3000, 128, "bfloat16", "cuda", seed=7)
    lengths = [3000, 0, 1, 1700, 2999, 64]  # splits cut on the GPU from these (schedule())
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    assert_close(flashdec.decode(q, k, v, poisoned_like(q), seqlens=seqlens, backend="cuda"),
                 q, k, v, seqlens=lengths)
    wide = torch.empty(2, 16, 136, dtype=torch.bfloat16, device="cuda")[..., :128]
    q, k, v = make_qkv(2, 16, 4, 900, 128, "bfloat16", "cuda", seed=5)
    wide.copy_(q)
    assert_close(flashdec.decode(wide, k, v, poisoned_like(q), backend="cuda"), q, k, v)
    torch.cuda.synchronize()
    print(f"{len(runs) + 3} racecheck cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(racecheck() if sys.argv[1:] == ["--racecheck"] else main())
