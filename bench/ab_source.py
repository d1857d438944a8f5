"""A/B of the kernels: decode.cu as it is against another version of it (the same
DecodeParams; e.g. `git show REV:src/flashdec/backends/cuda/decode.cu > old.cu`), on the rows
splits by length serve: graph us of plans built from each source in one process, interleaved,
twice, the mean of the two; the paged ragged row against its uniform twin for each.
PYTHONPATH=src python3 bench/ab_source.py OTHER.cu"""

from __future__ import annotations

import random
import statistics
import sys

import torch

import flashdec
from flashdec.backends.cuda import _modules
from flashdec.bench.paged import RAGGED_ROW, ragged_case
from flashdec.bench.timing import median_us

# (B, H_q, H_kv, cache K_len, D), lengths: "full", "ramp" (0..K shuffled) or "random" mixes
ROWS = (((8, 32, 8, 8192, 128), "full"), ((8, 32, 8, 8192, 128), "ramp"),
        ((1, 32, 8, 32768, 128), "full"), ((16, 32, 8, 16384, 128), "ramp"),
        ((16, 32, 8, 10000, 128), "full"), ((2, 32, 8, 20000, 128), "full"),
        ((64, 32, 8, 32768, 128), "random"), ((200, 32, 8, 8192, 128), "random"),
        ((32, 32, 8, 32768, 128), "zipf"), ((256, 8, 1, 4096, 128), "ramp"),
        ((4, 32, 8, 512, 128), "full"))


def _lengths(kind: str, b: int, n: int) -> torch.Tensor:
    rng = random.Random(b * n)
    if kind == "full":
        values = [n] * b
    elif kind == "ramp":
        values = [round(i * n / max(1, b - 1)) for i in range(b)]
        rng.shuffle(values)
    elif kind == "random":
        values = [rng.randrange(1, n + 1) for _ in range(b)]
    else:  # a few long, most short
        values = [min(n, int(100 * rng.paretovariate(1.0))) for _ in range(b)]
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def _built_from(text: str | None, build):
    """build() with the kernels compiled from `text` (None: decode.cu as it is)."""
    shipped = _modules.source
    _modules._compiled.clear()
    _modules._functions.clear()
    if text is not None:
        _modules.source = lambda: text
    try:
        return build()
    finally:
        _modules.source = shipped
        _modules._compiled.clear()
        _modules._functions.clear()


def _time(calls: dict) -> dict:
    times = {name: [] for name in calls}
    for _ in range(2):
        for name, fn in calls.items():
            times[name].append(median_us(lambda i: fn(), 1, True))
    return {name: statistics.fmean(t) for name, t in times.items()}


def _pair(other: str, q, k, v, out, **kw) -> dict:
    def build():
        p = flashdec.plan(q, k, v, out, backend="cuda", **kw)
        return lambda: p.run(q, k, v, out, **kw)
    return _time({"this": _built_from(None, build), "other": _built_from(other, build)})


def main() -> None:
    other = open(sys.argv[1]).read()
    q, kp, vp, table, out, lengths, mean = ragged_case(torch)
    res = {}
    for kind, values in (("ragged", lengths), ("uniform", torch.full((q.shape[0],), mean))):
        res[kind] = _pair(other, q, kp, vp, out, block_table=table,
                          seqlens=values.to(device="cuda", dtype=torch.int32))
        print(f"paged {RAGGED_ROW} {kind:8s}  this {res[kind]['this']:7.1f}  "
              f"other {res[kind]['other']:7.1f}", flush=True)
    print("paged ragged / uniform: " + "  ".join(
        f"{name} {res['ragged'][name] / res['uniform'][name]:.3f}" for name in ("this", "other")))
    del kp, vp
    for (b, hq, hkv, n, d), kind in ROWS:
        gen = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        us = _pair(other, q, k, v, torch.empty_like(q), seqlens=_lengths(kind, b, n))
        print(f"{b},{hq},{hkv},{n},{d} {kind:7s}  this {us['this']:7.1f}  other "
              f"{us['other']:7.1f}  this/other {us['this'] / us['other']:.3f}", flush=True)


if __name__ == "__main__":
    main()
