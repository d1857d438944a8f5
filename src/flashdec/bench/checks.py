"""The targets of the H200 kernel push and the checks of a result against them
(:func:`targets`, :func:`floor_targets`), and a result's summary: geometric-mean speedups, twin
pairs and the checks' outcome (:func:`summarize`)."""

from __future__ import annotations

from typing import Any

from .compare import geomeans, speedup, twins
from .peers import RIVALS, SDPA_IMPLS
from .timing import MODES

# MB = 10^6 bytes, like the table's "KV MB".
MB = 1e6
TARGET_VS_PEER = 1.0                       # best peer's us / flashdec's, every row, both modes
FLOOR_TARGETS = ((256 * MB, 97.0),         # (KV bytes at least, % of floor at least), graph;
                 (128 * MB, 90.0),         # ragged rows count their valid bytes; the first
                 (32 * MB, 85.0))          # matching line applies, none below 32 MB
SMALL_ROW = ((1, 32, 8, 4096, 128), "bfloat16")  # this row (uniform, 16-bit KV) ...
SMALL_ROW_US = 9.0                         # ... in at most this many us, graph
FEW_KV_HEADS = 8                           # batch * kv_heads at most this: a few-KV-heads row
FEW_KV_MIN_BYTES = 32 * MB                 # ... with at least this much KV is held to
FEW_KV_FLOOR_PCT = 70.0                    # ... this % of floor and to beating the Triton peer
FP8_MIN_BYTES = 64 * MB                    # an fp8 KV row with at least this much KV is held to
FP8_FLOOR_PCT = 90.0                       # ... this % of floor
HEAD_DIM_TWIN_RATIO = 0.95                 # D != 128: % of floor over the D=128 twin's, at least
GEOMEAN_VS_SDPA = {"graph": 1.15, "eager": 1.3}  # geomean best SDPA / flashdec, per mode


def floor_targets(row: dict) -> list[tuple[str, str, float]]:
    """``(key, which, % of floor)`` for every floor target a row meets the condition of
    (graph mode): the KV-size ladder of ``FLOOR_TARGETS`` for 16-bit caches (``floor``; KV
    bytes are the valid bytes, so ragged rows are measured alike), few KV heads
    (``few_kv_floor``) and fp8 KV (``fp8_floor``, in place of the ladder). A row can meet
    several: each is a check of its own."""
    s, kv = row["shape"], row["kv_bytes"]
    fp8 = s["kv_dtype"] != s["dtype"]
    out = []
    for at_least, pct in () if fp8 else FLOOR_TARGETS:  # the ladder is for 16-bit caches
        if kv >= at_least:
            out.append(("floor", f"KV >= {at_least / MB:.0f} MB", pct))
            break
    if s["batch"] * s["kv_heads"] <= FEW_KV_HEADS and kv >= FEW_KV_MIN_BYTES:
        out.append(("few_kv_floor", f"few KV heads, KV >= {FEW_KV_MIN_BYTES / MB:.0f} MB",
                    FEW_KV_FLOOR_PCT))
    if fp8 and kv >= FP8_MIN_BYTES:
        out.append(("fp8_floor", f"fp8 KV, KV >= {FP8_MIN_BYTES / MB:.0f} MB", FP8_FLOOR_PCT))
    return out


def _check(n: int | None, row: str, key: str, target: str, measured: float | None,
           shown: str, ok: bool) -> dict:
    """One check's record (see :func:`targets`)."""
    return {"n": n, "row": row, "key": key, "target": target, "measured": measured,
            "shown": shown, "ok": bool(ok)}


def targets(result: dict) -> list[dict]:
    """Check every row against the targets of the H200 kernel push (graph mode unless noted).

    Each target is a check of its own, made on every row that meets its condition. Per row
    with flashdec in it: flashdec ran (``flashdec_runs``, both modes); best peer's time /
    flashdec's >= ``TARGET_VS_PEER`` (``vs_best_peer``, both modes); the % of floor of
    :func:`floor_targets` (``floor``, ``few_kv_floor``, ``fp8_floor``); the row ``SMALL_ROW``
    within ``SMALL_ROW_US`` (``small_row_us``); a few-KV-heads row faster than the Triton peer
    (``vs_triton``); a D != 128 row's % of floor over its D=128 twin's >=
    ``HEAD_DIM_TWIN_RATIO`` (``head_dim_twin``). Over all rows: the geometric-mean speedup
    over the best SDPA backend per mode >= ``GEOMEAN_VS_SDPA`` (``geomean_vs_sdpa``, ``n``
    None). A check whose numbers are missing (a peer n/a, no copy bandwidth) is not made.

    Returns
    -------
    list of dict
        One per check made, in row order: ``n`` (1-based row), ``row`` (name), ``key``,
        ``target`` (text), ``measured`` (number or None), ``shown`` (text), ``ok``.
    """
    checks: list[dict] = []
    head_twins = {t["row"]: t for t in twins(result) if t["what"].startswith("D=")}
    for n, row in enumerate(result["rows"], 1):
        if "flashdec" not in row["impls"]:
            continue
        name, s = row["name"], row["shape"]
        for mode in MODES:
            cell = row["impls"]["flashdec"].get(mode) or {}
            if cell.get("us") is None:
                checks.append(_check(n, name, "flashdec_runs", f"flashdec runs, {mode}", None,
                                     f"n/a ({cell.get('na') or 'not measured'})", False))
                continue
            ratio = speedup(row, mode)
            if ratio is not None:
                checks.append(_check(n, name, "vs_best_peer",
                                     f"best peer / flashdec, {mode} >= {TARGET_VS_PEER:.2f}x",
                                     ratio, f"{ratio:.2f}x", ratio >= TARGET_VS_PEER))
        graph = row["impls"]["flashdec"].get("graph") or {}
        us, pct = graph.get("us"), graph.get("pct_copy")
        if us is None:
            continue
        for key, which, want in floor_targets(row) if pct is not None else ():
            checks.append(_check(n, name, key, f"% of floor ({which}) >= {want:g}%", pct,
                                 f"{pct:.1f}%", pct >= want))
        dims = (s["batch"], s["heads"], s["kv_heads"], s["kv_len"], s["head_dim"])
        if (dims, s["dtype"]) == SMALL_ROW and s["kv_dtype"] == s["dtype"] and not s["ragged"]:
            checks.append(_check(n, name, "small_row_us", f"graph us <= {SMALL_ROW_US:g}", us,
                                 f"{us:.1f} us", us <= SMALL_ROW_US))
        if s["batch"] * s["kv_heads"] <= FEW_KV_HEADS and row["kv_bytes"] >= FEW_KV_MIN_BYTES:
            ratio = speedup(row, "graph", ("triton",))
            if ratio is not None:
                checks.append(_check(n, name, "vs_triton",
                                     f"few KV heads: Triton / flashdec >= {TARGET_VS_PEER:.2f}x",
                                     ratio, f"{ratio:.2f}x", ratio >= TARGET_VS_PEER))
        twin = head_twins.get(name)
        if twin and twin["pct_copy_ratio"] is not None:
            r = twin["pct_copy_ratio"]
            checks.append(_check(n, name, "head_dim_twin",
                                 f"% of floor / D=128 twin's ({twin['twin']}) >= "
                                 f"{HEAD_DIM_TWIN_RATIO:.2f}", r, f"{r:.3f}",
                                 r >= HEAD_DIM_TWIN_RATIO))
    sdpa = geomeans(result["rows"], SDPA_IMPLS)
    for mode, want in GEOMEAN_VS_SDPA.items():
        g = sdpa[mode]["geomean"]
        if g is not None:
            checks.append(_check(None, "all rows", "geomean_vs_sdpa",
                                 f"geomean best SDPA / flashdec, {mode} >= {want:.2f}x", g,
                                 f"{g:.2f}x over {sdpa[mode]['rows']} rows", g >= want))
    return checks


def summarize(result: dict) -> dict:
    """Geometric-mean speedups of flashdec (over the best SDPA backend, and over the best peer:
    SDPA, Triton, FlexDecoding), per mode; the twin comparisons; the targets' outcome
    (``targets``: checks made and missed; ``misses``: the missed checks of :func:`targets`)."""
    out: dict[str, Any] = {}
    for key, peers in (("vs_best_sdpa", SDPA_IMPLS), ("vs_best_peer", RIVALS)):
        out[key] = geomeans(result["rows"], peers)
    for mode, want in GEOMEAN_VS_SDPA.items():
        out["vs_best_sdpa"][mode]["target"] = want
    out["twins"] = twins(result)
    checks = targets(result)
    misses = [c for c in checks if not c["ok"]]
    out["targets"] = {"checked": len(checks), "missed": len(misses)}
    out["misses"] = misses
    return out
