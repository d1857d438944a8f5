"""Host overhead: wall-clock microseconds per call of flashdec's entry points and of SDPA on a
tiny problem whose GPU time is negligible (:func:`host_overhead`), and its one-line text."""

from __future__ import annotations

import time

from .peers import na_reason
from .rows import SHORT_NAMES

HOST_CALLS = 10_000
HOST_PROBLEM = (1, 8, 8, 16, 64)           # B, H_q, H_kv, K_len, D: GPU time negligible


def host_overhead(calls: int = HOST_CALLS) -> dict:
    """Wall-clock us per call of ``plan.run``, ``flashdec.decode`` (cuda backend, ``out=``
    given) and default-dispatch SDPA on a tiny problem, ``calls`` calls each, one synchronize
    at the end. A failure is an ``na`` entry."""
    import torch
    import torch.nn.functional as F

    import flashdec

    b, hq, hkv, klen, d = HOST_PROBLEM
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, klen, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    q4 = q.unsqueeze(2)

    def plan_run():
        p = flashdec.plan(q, k, v, out, backend="cuda")
        return lambda: p.run(q, k, v, out)

    makers = {
        "plan.run": plan_run,
        "decode": lambda: lambda: flashdec.decode(q, k, v, out, backend="cuda"),
        "sdpa": lambda: lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
    }
    result = {"problem": dict(zip(("batch", "heads", "kv_heads", "kv_len", "head_dim"),
                                  HOST_PROBLEM), dtype="bfloat16"),
              "calls": calls, "us_per_call": {}, "na": {}}
    for name, make in makers.items():
        try:
            fn = make()
            for _ in range(100):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            result["us_per_call"][name] = (time.perf_counter() - t0) / calls * 1e6
        except Exception as exc:
            result["na"][name] = na_reason(exc)
    return result


def host_overhead_text(host: dict | None) -> str:
    """One line of :func:`host_overhead`'s result (``not measured`` for None)."""
    if not host:
        return "not measured"
    parts = [f"{k} {v:.2f} us/call" for k, v in host["us_per_call"].items()]
    parts += [f"{k} n/a ({v})" for k, v in host["na"].items()]
    p = host["problem"]
    return (", ".join(parts) + f"  [{host['calls']} calls, wall clock, B={p['batch']} "
            f"H_q={p['heads']} H_kv={p['kv_heads']} K={p['kv_len']} D={p['head_dim']} "
            f"{SHORT_NAMES.get(p['dtype'], p['dtype'])}]")
