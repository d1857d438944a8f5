"""Graph-mode time of the cuda backend over num_splits (issue 5 notes).

    PYTHONPATH=src python3 bench/split_sweep.py ["B,Hq,Hkv,K,D[,kv_dtype]" ...]
"""

from __future__ import annotations

import sys

import torch

import flashdec
from flashdec.bench import _time, rotation_sets

SHAPES = ["1,32,8,4096,128", "1,32,8,16384,128", "1,32,8,32768,128", "8,32,8,8192,128",
          "16,32,8,1024,128", "1,8,1,65536,128", "1,8,1,262144,128", "4,32,1,65536,128",
          "1,32,32,8192,96", "4,16,8,16384,256", "1,32,8,32768,128,float8_e4m3fn"]
SPLITS = (None, 1, 4, 8, 16, 24, 33, 48, 66, 99, 132, 198, 264, 396, 512)

for text in sys.argv[1:] or SHAPES:
    fields = text.split(",")
    b, hq, hkv, klen, d = map(int, fields[:5])
    kv_t = getattr(torch, fields[5]) if len(fields) > 5 else torch.bfloat16
    scales = {"k_scale": 1.0, "v_scale": 1.0} if kv_t != torch.bfloat16 else {}
    kv_bytes = 2 * b * hkv * klen * d * kv_t.itemsize
    sets = rotation_sets(kv_bytes, kv_bytes)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    q = [mk(b, hq, d) for _ in range(sets)]
    k = [mk(b, hkv, klen, d).to(kv_t) for _ in range(sets)]
    v = [mk(b, hkv, klen, d).to(kv_t) for _ in range(sets)]
    out = [torch.empty_like(x) for x in q]
    cells = []
    for splits in SPLITS:
        p = flashdec.plan(q[0], k[0], v[0], out[0], backend="cuda", num_splits=splits, **scales)
        us = _time(lambda i: p.run(q[i], k[i], v[i], out[i]), sets, graph=True, iters=30)
        d = p.details
        combined = "c" if d["merge"] == "combine kernel" else ""
        cells.append(f"{splits or 'auto'}:{us:.1f}({d['num_splits']}{combined})")
    print(text, f"floor {kv_bytes / 4.2e6:.1f}", " ".join(cells), flush=True)
