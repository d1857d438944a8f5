"""flashdec's torch backend on the CPU against torch SDPA, one decode step of a small model
(SmolLM2-135M: 9 query / 3 KV heads, D=64) at 64 and 2048 keys, fp32, one thread: us per call
of SDPA, plan.run, decode(out=), and plan.run with seqlens, a window, a softcap; interleaved,
best of rounds. PYTHONPATH=src python3 bench/cpu_decode.py"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import flashdec


def best_us(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    for kv_len in (64, 2048):
        q = torch.randn(1, 9, 64)
        k, v = torch.randn(1, 3, kv_len, 64), torch.randn(1, 3, kv_len, 64)
        out = torch.empty_like(q)
        lengths = torch.tensor([kv_len], dtype=torch.int32)
        plain = flashdec.plan(q, k, v, out)
        ragged = flashdec.plan(q, k, v, out, seqlens=lengths)
        window = flashdec.plan(q, k, v, out, seqlens=lengths, window_left=kv_len - 1)
        capped = flashdec.plan(q, k, v, out, softcap=30.0)
        q4 = q.unsqueeze(2)
        calls = {"sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
                 "plan.run": lambda: plain.run(q, k, v, out),
                 "decode(out=)": lambda: flashdec.decode(q, k, v, out),
                 "seqlens": lambda: ragged.run(q, k, v, out, seqlens=lengths),
                 "seqlens+window": lambda: window.run(q, k, v, out, seqlens=lengths),
                 "softcap": lambda: capped.run(q, k, v, out)}
        n = 1000 if kv_len <= 64 else 100
        times = {name: float("inf") for name in calls}
        for _ in range(3):  # interleaved rounds: this host is shared
            for name, fn in calls.items():
                times[name] = min(times[name], best_us(fn, n))
        sdpa = times["sdpa"]
        print(f"K={kv_len}: " + ", ".join(f"{name} {us:.1f} us ({us / sdpa:.2f}x)"
                                          for name, us in times.items()), flush=True)


if __name__ == "__main__":
    main()
