"""The paged row against its contiguous twin for ncu (both with seqlens), one row and page size:
ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    -k regex:decode -c 2 python3 bench/ncu_paged.py B,Hq,Hkv,K,D,page_size
(launches: contiguous first, then paged)"""

from __future__ import annotations

import sys

import torch

import flashdec
from flashdec.bench.paged import _pool

b, hq, hkv, n, d, ps = (int(x) for x in sys.argv[1].split(","))
q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
out = torch.empty_like(q)
pages = -(-n // ps)
table = torch.randperm(b * pages, device="cuda").view(b, pages).to(torch.int32)
kp, vp = _pool(torch, k, table, ps), _pool(torch, v, table, ps)
seqlens = torch.full((b,), n, dtype=torch.int32, device="cuda")
contiguous = flashdec.plan(q, k, v, out, seqlens=seqlens, backend="cuda")
paged = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=seqlens, backend="cuda")
print("contiguous:", contiguous.details, "\npaged:", paged.details, flush=True)
contiguous.run(q, k, v, out, seqlens=seqlens)
paged.run(q, kp, vp, out, block_table=table, seqlens=seqlens)
torch.cuda.synchronize()
