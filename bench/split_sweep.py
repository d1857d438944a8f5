"""Graph-mode time of the cuda backend over num_splits for a few shapes (issue 5 notes)."""

from __future__ import annotations

import math

import torch

import flashdec
from flashdec.bench import L2_ROTATION_BYTES, _time

for shape in [(1, 32, 8, 32768, 128), (64, 32, 8, 2048, 128), (1, 32, 8, 4096, 128)]:
    b, hq, hkv, klen, d = shape
    nbytes = (2 * b * hkv * klen * d + 2 * b * hq * d) * 2
    sets = max(1, math.ceil(L2_ROTATION_BYTES / nbytes))
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    q, k, v = ([mk(b, hq, d) for _ in range(sets)], [mk(b, hkv, klen, d) for _ in range(sets)],
               [mk(b, hkv, klen, d) for _ in range(sets)])
    out = [torch.empty_like(x) for x in q]
    cells = []
    for splits in (None, 1, 2, 4, 8, 16, 32, 64, 128):
        p = flashdec.plan(q[0], k[0], v[0], out[0], backend="cuda", num_splits=splits)
        us = _time(lambda i: p.run(q[i], k[i], v[i], out[i]), sets, graph=True, iters=30)
        cells.append(f"{splits or 'auto'}:{us:.1f}({p._runner.split.num_splits})")
    print(shape, " ".join(cells))
