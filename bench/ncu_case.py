"""One decode shape run a few times, for ncu: PYTHONPATH=src python3 bench/ncu_case.py B,Hq,Hkv,K,D[,kv_dtype] [num_splits]"""

from __future__ import annotations

import sys

import torch

import flashdec
from case import make_case

q, k, v, out, scales = make_case(sys.argv[1])
splits = int(sys.argv[2]) if len(sys.argv) > 2 else None
p = flashdec.plan(q, k, v, out, backend="cuda", num_splits=splits, **scales)
for _ in range(3):
    p.run(q, k, v, out)
torch.cuda.synchronize()
print(p)
