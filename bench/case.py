"""One decode shape's inputs for the bench scripts: ``B,Hq,Hkv,K,D[,kv_dtype]``."""

from __future__ import annotations

import torch


def make_case(spec: str) -> tuple:
    """(q, k, v, out, scales) for ``B,Hq,Hkv,K,D[,kv_dtype[,q_dtype]]``: random Q in
    ``q_dtype`` (default bfloat16) and K/V in ``kv_dtype`` (default Q's); ``scales`` holds unit
    k_scale / v_scale for an fp8 cache."""
    fields = spec.split(",")
    b, hq, hkv, klen, d = map(int, fields[:5])
    q_t = getattr(torch, fields[6]) if len(fields) > 6 else torch.bfloat16
    kv_t = getattr(torch, fields[5]) if len(fields) > 5 else q_t
    scales = {"k_scale": 1.0, "v_scale": 1.0} if kv_t != q_t else {}
    q = torch.randn(b, hq, d, device="cuda", dtype=q_t)
    k = torch.randn(b, hkv, klen, d, device="cuda", dtype=q_t).to(kv_t)
    v = torch.randn(b, hkv, klen, d, device="cuda", dtype=q_t).to(kv_t)
    return q, k, v, torch.empty_like(q), scales
