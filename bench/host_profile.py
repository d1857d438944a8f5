"""Where the host time of plan.run and decode goes on a tiny problem (cProfile)."""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

import flashdec

q = torch.randn(1, 8, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
out = torch.empty_like(q)
p = flashdec.plan(q, k, v, out, backend="cuda")
for name, fn in (("plan.run", lambda: p.run(q, k, v, out)),
                 ("decode", lambda: flashdec.decode(q, k, v, out, backend="cuda"))):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5000):
        fn()
    torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - t) / 5000 * 1e6:.2f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
