"""Splits by length (seqlens given) against splits by capacity, and the piece size: graph us
of plans over uniform lengths (every sequence full) and ragged ones (0..K shuffled), and of
the paged ragged row (lengths 1..K against every sequence at their mean, separate K and V
pools); interleaved, twice, the mean of the two. Variants: "capacity" = the layout seqlens
got before the schedule by length (the capacity split count without seqlens, cut twice as
fine), "none" = no seqlens at all (uniform rows only), "len M" = by length with pieces of M MB
(BY_LENGTH_SPLIT_BYTES).
PYTHONPATH=src python3 bench/by_length.py [MB,...]"""

from __future__ import annotations

import sys

import torch

import flashdec
from flashdec.backends.cuda import _kernels
from flashdec.bench.paged import RAGGED_ROW, ragged_case, row_case
from flashdec.bench.timing import interleaved_us

ROWS = ((8, 32, 8, 8192, 128), (32, 32, 8, 2048, 128), (1, 32, 8, 32768, 128),
        (16, 32, 8, 16384, 128), (64, 32, 8, 4096, 128), (256, 8, 1, 4096, 128),
        (1, 8, 1, 131072, 128), (4, 32, 8, 512, 128),
        (4, 32, 8, 32768, 128, 512), (32, 32, 8, 32768, 128, 4096))  # [, live lengths]


def _plans(q, k, v, out, seqlens, waves, extra, with_none):
    """name -> call for the variants of one row."""
    calls = {}
    if with_none:
        p0 = flashdec.plan(q, k, v, out, backend="cuda", **extra)
        calls["none"] = lambda: p0.run(q, k, v, out, **extra)
    most = _kernels.BY_LENGTH_MAX_BATCH
    _kernels.BY_LENGTH_MAX_BATCH = 0  # the capacity rule's count for this problem
    base = flashdec.plan(q, k, v, out, seqlens=seqlens, backend="cuda", **extra)
    base = base.details["num_splits"]
    _kernels.BY_LENGTH_MAX_BATCH = most
    pc = flashdec.plan(q, k, v, out, seqlens=seqlens, num_splits=min(512, 2 * base),
                       backend="cuda", **extra)
    calls["capacity"] = lambda: pc.run(q, k, v, out, seqlens=seqlens, **extra)
    for w in waves:
        _kernels.BY_LENGTH_SPLIT_BYTES = int(w * (1 << 20))
        p = flashdec.plan(q, k, v, out, seqlens=seqlens, backend="cuda", **extra)
        calls[f"len {w:g}"] = (lambda p=p: p.run(q, k, v, out, seqlens=seqlens, **extra))
    return calls


def _line(label, us):
    return label + "  " + "  ".join(f"{n} {t:7.1f}" for n, t in us.items())


def main() -> None:
    waves = [float(w) for w in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 2, 4]
    shipped = _kernels.BY_LENGTH_SPLIT_BYTES
    q, kp, vp, table, out, lengths, mean = ragged_case(torch)
    b = q.shape[0]
    res = {}
    for kind, values in (("ragged", lengths), ("uniform", torch.full((b,), mean))):
        seqlens = values.to(device="cuda", dtype=torch.int32)
        res[kind] = interleaved_us(_plans(q, kp, vp, out, seqlens, waves,
                                          {"block_table": table}, False))
        print(_line(f"paged {RAGGED_ROW} {kind:8s}", res[kind]), flush=True)
    print("paged ragged / uniform: " + "  ".join(
        f"{name} {res['ragged'][name] / res['uniform'][name]:.3f}" for name in res["ragged"]))
    del kp, vp
    for b, hq, hkv, n, d, *live in ROWS:
        live = live[0] if live else n
        q, k, v, out, _, _ = row_case(torch, (b, hq, hkv, n, d), n)
        for kind in ("uniform", "ragged"):
            if kind == "uniform":
                values = torch.full((b,), live, dtype=torch.int32)
            else:
                values = torch.linspace(0, live, b).round().to(torch.int32)
                values = values[torch.randperm(b, generator=torch.Generator().manual_seed(1))]
            full = kind == "uniform" and live == n
            us = interleaved_us(_plans(q, k, v, out, values.cuda(), waves, {}, full))
            print(_line(f"{b},{hq},{hkv},{n},{d} live {live} {kind:8s}", us), flush=True)
    _kernels.BY_LENGTH_SPLIT_BYTES = shipped


if __name__ == "__main__":
    main()
