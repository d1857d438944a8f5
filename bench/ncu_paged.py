"""The paged row against its contiguous twin for ncu (both with seqlens), one row and page size:
ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    -k regex:decode -c 2 python3 bench/ncu_paged.py B,Hq,Hkv,K,D,page_size
(launches: contiguous first, then paged)"""

from __future__ import annotations

import sys

import torch

import flashdec
from flashdec.bench.paged import paged_copy, row_case

*dims, ps = (int(x) for x in sys.argv[1].split(","))
q, k, v, out, seqlens, gen = row_case(torch, tuple(dims), 0)
table, kp, vp = paged_copy(torch, k, v, ps, gen)
contiguous = flashdec.plan(q, k, v, out, seqlens=seqlens, backend="cuda")
paged = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=seqlens, backend="cuda")
print("contiguous:", contiguous.details, "\npaged:", paged.details, flush=True)
contiguous.run(q, k, v, out, seqlens=seqlens)
paged.run(q, kp, vp, out, block_table=table, seqlens=seqlens)
torch.cuda.synchronize()
