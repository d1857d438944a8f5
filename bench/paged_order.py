"""Where a paged decode's extra time goes: contiguous cache (without and with seqlens: the
split rule cuts finer splits with them) vs pools read through a table in order, in random order, and in random order from a head-major pool ([H_kv, num_pages,
page_size, D] seen as [num_pages, H_kv, page_size, D]: each KV head's pages in its own slice
of memory); graph us, interleaved, twice. PYTHONPATH=src python3 bench/paged_order.py"""

from __future__ import annotations

import statistics
import sys

import torch

import flashdec
from flashdec.bench.timing import median_us


def pool_of(x, table, page_size, head_major):
    b, h, n, d = x.shape
    pages = x.view(b, h, n // page_size, page_size, d).permute(0, 2, 1, 3, 4).reshape(-1, h, page_size, d)
    if head_major:
        pool = torch.empty(h, pages.shape[0], page_size, d, dtype=x.dtype, device=x.device).permute(1, 0, 2, 3)
    else:
        pool = torch.empty_like(pages)
    pool[table.reshape(-1).long()] = pages
    return pool


def main(shape: str, page_size: int) -> None:
    b, hq, hkv, n, d = map(int, shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    pages = b * n // page_size
    seqlens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    calls = {}
    out = torch.empty_like(q)
    p = flashdec.plan(q, k, v, out)
    calls["contiguous"] = lambda: p.run(q, k, v, out)
    ps = flashdec.plan(q, k, v, out, seqlens=seqlens)
    calls["contiguous + seqlens"] = lambda: ps.run(q, k, v, out, seqlens=seqlens)
    for name, order, head_major in (("in order", torch.arange(pages, device="cuda"), False),
                                    ("random", torch.randperm(pages, device="cuda", generator=gen), False),
                                    ("random, head-major pool", torch.randperm(pages, device="cuda", generator=gen), True)):
        table = order.view(b, -1).to(torch.int32)
        kp, vp = pool_of(k, table, page_size, head_major), pool_of(v, table, page_size, head_major)
        pp = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=seqlens)
        calls[name] = (lambda pp=pp, kp=kp, vp=vp, table=table:
                       pp.run(q, kp, vp, out, block_table=table, seqlens=seqlens))
    times = {name: [] for name in calls}
    for _ in range(2):
        for name, fn in calls.items():
            times[name].append(median_us(lambda i: fn(), 1, True))
    base = statistics.fmean(times["contiguous"])
    print(f"## {shape} page {page_size}")
    for name, t in times.items():
        print(f"  {name:26s} {t[0]:8.1f} {t[1]:8.1f}  x{statistics.fmean(t) / base:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
