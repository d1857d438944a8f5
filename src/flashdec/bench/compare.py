"""Comparisons within one result: flashdec's speedup over its best peer in a row
(:func:`speedup`), geometric means of those over the rows (:func:`geomeans`), and rows paired
with their twins (fp16 vs bf16, fp8 KV vs 16-bit, ragged vs uniform, D != 128 vs D=128 at the
same KV bytes: :func:`twins`, :func:`head_dim_orphans`)."""

from __future__ import annotations

import math
from typing import Iterable

from .peers import RIVALS
from .rows import SHORT_NAMES, Shape
from .timing import MODES


def geomean(values: Iterable[float]) -> float | None:
    """Geometric mean of positive values; None for none."""
    logs = [math.log(x) for x in values if x and x > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def impl_us(row: dict, name: str, mode: str) -> float | None:
    """Median us of implementation ``name`` in ``mode`` in a row record; None if not measured."""
    cell = (row["impls"].get(name) or {}).get(mode) or {}
    return cell.get("us")


def speedup(row: dict, mode: str, peers: Iterable[str] = RIVALS) -> float | None:
    """Best peer's time over flashdec's in ``mode`` (> 1: flashdec is faster; peers: SDPA,
    Triton and FlexDecoding, not the torch reference backend); None if either is missing."""
    mine = impl_us(row, "flashdec", mode)
    theirs = [t for t in (impl_us(row, p, mode) for p in peers) if t]
    return min(theirs) / mine if mine and theirs else None


def geomeans(rows: list[dict], peers: Iterable[str]) -> dict:
    """Per mode: the geometric mean, count and minimum of :func:`speedup` over ``peers``."""
    peers = tuple(peers)
    out = {}
    for mode in MODES:
        ratios = [s for s in (speedup(r, mode, peers) for r in rows) if s]
        out[mode] = {"geomean": geomean(ratios), "rows": len(ratios),
                     "min": min(ratios) if ratios else None}
    return out


def _twin_candidates(s: dict) -> list[tuple[str, str]]:
    """``(what, twin row name)`` for a row's shape record: its one dtype / ragged twin (fp16
    vs bf16, fp8 KV vs 16-bit, ragged vs uniform with the same valid KV) and, for D != 128,
    the D=128 row of the same variant at the same KV bytes (K * D / 128 rows, when whole)."""
    dims = (s["batch"], s["heads"], s["kv_heads"], s["kv_len"], s["head_dim"])
    dt, kvdt, ragged = s["dtype"], s["kv_dtype"], s["ragged"]
    out = []
    if ragged:
        out.append(("ragged vs uniform",
                    Shape.name_of(dims[:3] + (s["kv_len"] // 2, dims[4]), dt, kvdt, False)))
    elif kvdt != dt:
        out.append(("fp8 KV vs " + SHORT_NAMES[dt], Shape.name_of(dims, dt, dt, False)))
    elif dt == "float16":
        out.append(("fp16 vs bf16", Shape.name_of(dims, "bfloat16", "bfloat16", False)))
    if s["head_dim"] != 128 and s["kv_len"] * s["head_dim"] % 128 == 0:
        dims_128 = dims[:3] + (s["kv_len"] * s["head_dim"] // 128, 128)
        out.append((f"D={s['head_dim']} vs D=128", Shape.name_of(dims_128, dt, kvdt, ragged)))
    return out


def twins(result: dict, impl: str = "flashdec", mode: str = "graph") -> list[dict]:
    """Rows paired with their twin (fp16 vs bf16, fp8 KV vs bf16, ragged vs uniform with the
    same valid KV, D != 128 vs D=128 at the same KV bytes and variant): time and %-of-copy
    ratios. Pairs where either side has no time in ``mode`` are left out."""
    rows = {r["name"]: r for r in result["rows"]}
    pairs = []
    for r in result["rows"]:
        for what, tname in _twin_candidates(r["shape"]):
            twin = rows.get(tname)
            a, b = impl_us(r, impl, mode), twin and impl_us(twin, impl, mode)
            if not (twin and a and b):
                continue
            pa = r["impls"][impl][mode].get("pct_copy")
            pb = twin["impls"][impl][mode].get("pct_copy")
            pairs.append({"what": what, "row": r["name"], "twin": tname, "impl": impl,
                          "mode": mode, "time_ratio": a / b,
                          "pct_copy_ratio": pa / pb if pa and pb else None})
    return pairs


def head_dim_orphans(result: dict) -> list[int]:
    """Row numbers (1-based) of D != 128 rows whose D=128 twin at the same KV bytes is not in
    the run (so the head-dim target cannot check them)."""
    names = {r["name"] for r in result["rows"]}
    out = []
    for n, r in enumerate(result["rows"], 1):
        if r["shape"]["head_dim"] == 128:
            continue
        cands = [t for what, t in _twin_candidates(r["shape"]) if what.startswith("D=")]
        if not (cands and cands[0] in names):
            out.append(n)
    return out
