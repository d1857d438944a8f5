"""A/B of the kernels: decode.cu as it is against other versions of it (the same
DecodeParams; e.g. `git show REV:src/flashdec/backends/cuda/decode.cu > old.cu`): graph us of
plans built from each source in one process, interleaved, twice, the mean of the two, on the
bench's paged rows (page 16 and 64, and their contiguous twins), the paged ragged row against
its uniform twin, and contiguous rows with seqlens (splits by length).
PYTHONPATH=src python3 bench/ab_source.py OTHER.cu [OTHER.cu ...]"""

from __future__ import annotations

import random
import sys

import torch

import flashdec
from flashdec.backends.cuda import _modules
from flashdec.bench.paged import PAGED_ROWS, RAGGED_ROW, paged_copy, ragged_case, row_case
from flashdec.bench.timing import interleaved_us

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


def _variants(sources: dict, calls: dict) -> dict:
    """(source name, call name) -> call: every call of `calls` (name -> (q, k, v, out, kw))
    planned with the kernels of every source."""
    def build(q, k, v, out, kw):
        p = flashdec.plan(q, k, v, out, backend="cuda", **kw)
        return lambda: p.run(q, k, v, out, **kw)
    return {(src, name): _built_from(text, lambda a=args: build(*a))
            for src, text in sources.items() for name, args in calls.items()}


def _line(label: str, us: dict, sources: dict, name: str) -> str:
    this = us[("this", name)]
    return f"{label:34s} this {this:7.1f}" + "".join(
        f"  {src} {us[(src, name)]:7.1f} ({this / us[(src, name)]:.3f})"
        for src in sources if src != "this")


def main() -> None:
    sources = {"this": None}
    sources.update({path.rsplit("/", 1)[-1]: open(path).read() for path in sys.argv[1:]})
    print("this/other in parentheses", flush=True)
    for b, hq, hkv, n, d, _ in PAGED_ROWS:
        q, k, v, out, seqlens, gen = row_case(torch, (b, hq, hkv, n, d), n)
        calls = {"contiguous": (q, k, v, out, {"seqlens": seqlens})}
        for ps in (16, 64):
            table, kp, vp = paged_copy(torch, k, v, ps, gen)
            calls[f"page {ps}"] = (q, kp, vp, out, {"block_table": table, "seqlens": seqlens})
        us = interleaved_us(_variants(sources, calls))
        for name in calls:
            print(_line(f"{b},{hq},{hkv},{n},{d} {name}", us, sources, name), flush=True)
        del calls
    q, kp, vp, table, out, lengths, mean = ragged_case(torch)
    calls = {kind: (q, kp, vp, out, {"block_table": table,
                                      "seqlens": values.to(device="cuda", dtype=torch.int32)})
             for kind, values in (("ragged", lengths), ("uniform", torch.full_like(lengths, mean)))}
    us = interleaved_us(_variants(sources, calls))
    for name in calls:
        print(_line(f"paged {RAGGED_ROW[:4]} {name}", us, sources, name), flush=True)
    print("paged ragged / uniform: " + "  ".join(
        f"{src} {us[(src, 'ragged')] / us[(src, 'uniform')]:.3f}" for src in sources))
    del kp, vp, calls
    for (b, hq, hkv, n, d), kind in ROWS:
        q, k, v, out, _, _ = row_case(torch, (b, hq, hkv, n, d), n)
        calls = {kind: (q, k, v, out, {"seqlens": _lengths(kind, b, n)})}
        us = interleaved_us(_variants(sources, calls))
        print(_line(f"{b},{hq},{hkv},{n},{d} {kind}", us, sources, kind), flush=True)


if __name__ == "__main__":
    main()
