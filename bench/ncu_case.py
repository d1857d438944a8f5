"""One decode shape run a few times, for ncu: PYTHONPATH=src python3 bench/ncu_case.py B,Hq,Hkv,K,D[,kv_dtype] [num_splits]"""

from __future__ import annotations

import sys

import torch

import flashdec

fields = sys.argv[1].split(",")
b, hq, hkv, klen, d = map(int, fields[:5])
kv_t = getattr(torch, fields[5]) if len(fields) > 5 else torch.bfloat16
splits = int(sys.argv[2]) if len(sys.argv) > 2 else None
scales = {"k_scale": 1.0, "v_scale": 1.0} if kv_t != torch.bfloat16 else {}
q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, klen, d, device="cuda", dtype=torch.bfloat16).to(kv_t)
v = torch.randn(b, hkv, klen, d, device="cuda", dtype=torch.bfloat16).to(kv_t)
out = torch.empty_like(q)
p = flashdec.plan(q, k, v, out, backend="cuda", num_splits=splits, **scales)
for _ in range(3):
    p.run(q, k, v, out)
torch.cuda.synchronize()
print(p._runner.fast.spec, p._runner.fast.split)
