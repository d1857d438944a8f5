"""How finely to split when seqlens are given: graph us of plans with seqlens at the split
count chosen without them (factor 1), twice it (2) and the shipped choice (auto: factor
RAGGED_SPLIT_FACTOR), on uniform and on ragged lengths (0..K shuffled); interleaved, twice.
PYTHONPATH=src python3 bench/ragged_factor.py"""

from __future__ import annotations

import statistics

import torch

import flashdec
from flashdec.bench.timing import median_us

ROWS = ((8, 32, 8, 8192, 128), (32, 32, 8, 2048, 128), (1, 32, 8, 32768, 128),
        (16, 32, 8, 16384, 128), (64, 32, 8, 4096, 128), (256, 8, 1, 4096, 128))


def main() -> None:
    for b, hq, hkv, n, d in ROWS:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        base = flashdec.plan(q, k, v, out).details["num_splits"]
        for kind in ("uniform", "ragged"):
            if kind == "uniform":
                lengths = torch.full((b,), n, dtype=torch.int32)
            else:
                lengths = torch.linspace(0, n, b).round().to(torch.int32)
                lengths = lengths[torch.randperm(b, generator=torch.Generator().manual_seed(1))]
            seqlens = lengths.cuda()
            calls = {}
            for label, splits in (("x1", base), ("x2", min(512, 2 * base)), ("auto", None)):
                p = flashdec.plan(q, k, v, out, seqlens=seqlens, num_splits=splits)
                label = f"{label} ({p.details['num_splits']})"
                calls[label] = (lambda p=p: p.run(q, k, v, out, seqlens=seqlens))
            times = {name: [] for name in calls}
            for _ in range(2):
                for name, fn in calls.items():
                    times[name].append(median_us(lambda i: fn(), 1, True))
            print(f"{b},{hq},{hkv},{n},{d} {kind:8s} " + "  ".join(
                f"{name} {statistics.fmean(t):7.1f}" for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
