"""Plans with and without seqlens (by length vs no seqlens) for ncu, one row:
ncu --clock-control none --metrics gpu__time_duration.sum -k regex:decode \
    python3 bench/ncu_by_length.py B,Hq,Hkv,K,D[,live]"""

from __future__ import annotations

import sys

import torch

import flashdec

b, hq, hkv, n, d, *live = (int(x) for x in sys.argv[1].split(","))
q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
out = torch.empty_like(q)
seqlens = torch.full((b,), live[0] if live else n, dtype=torch.int32, device="cuda")
plain = flashdec.plan(q, k, v, out, backend="cuda")
by_length = flashdec.plan(q, k, v, out, seqlens=seqlens, backend="cuda")
print("none:", plain.details, "\nby length:", by_length.details, flush=True)
for _ in range(3):
    plain.run(q, k, v, out)
    by_length.run(q, k, v, out, seqlens=seqlens)
torch.cuda.synchronize()
