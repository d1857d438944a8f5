"""Paged cache (page 16 and 64) vs its contiguous twin (both with seqlens, splits by length),
and the ragged paged row vs its uniform twin, under other choices of bytes in flight: graph
us, interleaved, twice, the mean of the two. Variants: the tensor-core kernel's residency
(CTAs per SM its ring is sized for: 2 x 3 stages shipped at head_dim 128, 1 x 6) and
_kernels.BY_LENGTH_FEW_PER_SM (CTAs per SM a batch is cut into at least).
PYTHONPATH=src python3 bench/paged_inflight.py"""

from __future__ import annotations

import torch

import flashdec
from flashdec.backends.cuda import _kernels
from flashdec.bench.paged import PAGED_ROWS, paged_copy, ragged_case, row_case
from flashdec.bench.timing import interleaved_us

VARIANTS = {"shipped": (None, 1.0), "1 CTA x 6": (1, 1.0), "2/SM": (None, 2.0),
            "1 CTA x 6, 2/SM": (1, 2.0)}


def _plans(make) -> dict:
    """name -> call for every variant, make(tag) returning {tag: call}."""
    shipped = (_kernels._mma_ctas_per_sm, _kernels.BY_LENGTH_FEW_PER_SM)
    calls = {}
    for name, (ctas, few) in VARIANTS.items():
        if ctas is not None:
            _kernels._mma_ctas_per_sm = lambda head_dim, c=ctas: c
        _kernels.BY_LENGTH_FEW_PER_SM = few
        try:
            calls.update({f"{name}|{tag}": fn for tag, fn in make().items()})
        finally:
            _kernels._mma_ctas_per_sm, _kernels.BY_LENGTH_FEW_PER_SM = shipped
    return calls


def _report(label: str, us: dict, a: str, b: str) -> None:
    print(f"{label} ({b} / {a}): " + "  ".join(
        f"{name} {us[f'{name}|{a}']:.1f}/{us[f'{name}|{b}']:.1f} "
        f"({us[f'{name}|{b}'] / us[f'{name}|{a}']:.3f})" for name in VARIANTS), flush=True)


def main() -> None:
    for b, hq, hkv, n, d, _ in PAGED_ROWS:
        q, k, v, out, seqlens, gen = row_case(torch, (b, hq, hkv, n, d), n)
        for ps in (16, 64):
            table, kp, vp = paged_copy(torch, k, v, ps, gen)

            def make():
                pc = flashdec.plan(q, k, v, out, seqlens=seqlens, backend="cuda")
                pp = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=seqlens,
                                   backend="cuda")
                return {"contiguous": lambda: pc.run(q, k, v, out, seqlens=seqlens),
                        "paged": lambda: pp.run(q, kp, vp, out, block_table=table,
                                                seqlens=seqlens)}
            _report(f"{b},{hq},{hkv},{n},{d} page {ps}", interleaved_us(_plans(make)),
                    "contiguous", "paged")
            del kp, vp
        calls = _plans(lambda: {"none": lambda p=flashdec.plan(q, k, v, out, backend="cuda"):
                                p.run(q, k, v, out)})
        us = interleaved_us(calls)
        print(f"{b},{hq},{hkv},{n},{d} no seqlens: " + "  ".join(
            f"{name} {us[f'{name}|none']:.1f}" for name in VARIANTS), flush=True)
    q, kp, vp, table, out, lengths, mean = ragged_case(torch)
    ragged = lengths.to(device="cuda", dtype=torch.int32)
    uniform = torch.full_like(ragged, mean)

    def make():
        pr = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=ragged, backend="cuda")
        pu = flashdec.plan(q, kp, vp, out, block_table=table, seqlens=uniform, backend="cuda")
        return {"uniform": lambda: pu.run(q, kp, vp, out, block_table=table, seqlens=uniform),
                "ragged": lambda: pr.run(q, kp, vp, out, block_table=table, seqlens=ragged)}
    _report("ragged paged row", interleaved_us(_plans(make)), "uniform", "ragged")


if __name__ == "__main__":
    main()
