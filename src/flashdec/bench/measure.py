"""One row measured: every implementation of :mod:`.peers` on the row's rotated input sets, a
first call (compile, load), then both timing modes, each failure an ``n/a`` of its own; the
row's record (:func:`row_info`, :func:`bench_row`) with its per-mode cells (median, p10, p90,
TB/s, % of the copy bandwidth) and each output's error against flashdec's torch backend."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Iterable

from .peers import DEFAULT_IMPLS, Inputs, build_impl, make_inputs, na_reason
from .rotation import L2_BYTES, rotation_sets
from .rows import Shape
from .timing import ITERS, MODES, sync, time_samples


def row_info(shape: Shape, sets: int, copy_bps: float | None, l2_bytes: int = L2_BYTES) -> dict:
    """The static part of a row's record: sizes, floor, rotation."""
    nbytes = shape.io_bytes()
    return {"name": shape.name, "shape": asdict(shape), "seqlens": shape.seqlens(),
            "kv_bytes": shape.kv_bytes(), "bytes": nbytes,
            "floor_us": None if not copy_bps else nbytes / copy_bps * 1e6,
            "sets": sets, "working_set_bytes": sets * nbytes,
            "cold_l2": sets * nbytes >= 4 * l2_bytes, "impls": {}}


def bench_row(shape: Shape, impls: Iterable[str] = DEFAULT_IMPLS, *,
              copy_bps: float | None = None, iters: int = ITERS, device: str = "cuda",
              sets: int | None = None, l2_bytes: int = L2_BYTES,
              timer: Callable[..., list[float]] | None = None) -> dict:
    """Measure one row: every implementation in both modes, each in its own try.

    Returns the row's record (see :func:`row_info`) with ``impls[name]`` = ``{"eager": cell,
    "graph": cell, "compile_s", "err", "note"}``; a cell is ``{"us", "p10_us", "p90_us", "n",
    "tbps", "pct_copy", "na": None}`` or ``{"us": None, "na": reason}``. ``err`` is the max
    |Y - Y_torch| / max |Y_torch| against flashdec's torch backend (fp32 math) on input set 0,
    over sequences with at least one key. ``timer`` replaces :func:`time_samples` (tests).
    """
    timer = timer or time_samples
    if sets is None:
        sets = rotation_sets(shape.io_bytes(), shape.alloc_bytes(), l2_bytes)
    record = row_info(shape, sets, copy_bps, l2_bytes)
    inp = make_inputs(shape, sets, device)
    outputs: dict[str, Any] = {}
    for name in impls:
        record["impls"][name] = _bench_impl(name, inp, outputs, record["bytes"], copy_bps,
                                            iters, timer)
    _record_errors(record, outputs, inp)
    del inp, outputs
    if str(device).startswith("cuda"):
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()
    return record


def _bench_impl(name: str, inp: Inputs, outputs: dict, nbytes: int, copy_bps: float | None,
                iters: int, timer: Callable[..., list[float]]) -> dict:
    """One implementation of one row: first call (compile, load; its Y goes to ``outputs``),
    then eager and graph timing, each failure an n/a of its own."""
    res: dict[str, Any] = {"eager": None, "graph": None, "compile_s": None, "err": None,
                           "note": None}
    impl = build_impl(name, inp)
    res["note"] = impl.note
    if impl.na:
        res["eager"] = res["graph"] = {"us": None, "na": impl.na}
        return res
    with impl.context():
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            try:
                y = impl.fn(0)
                sync(inp.device)
                res["compile_s"] = time.perf_counter() - t0
                outputs[name] = _as_y(y, inp.shape).clone()
            except Exception as exc:
                res["eager"] = res["graph"] = {"us": None, "na": na_reason(exc, warned)}
                return res
        for mode in MODES:
            try:
                res[mode] = _timed_cell(timer(impl.fn, inp.sets, mode == "graph", iters), nbytes,
                                        copy_bps)
            except Exception as exc:
                res[mode] = {"us": None, "na": na_reason(exc)}
                with contextlib.suppress(Exception):
                    sync(inp.device)
    return res


def _record_errors(record: dict, outputs: dict, inp: Inputs) -> None:
    """Each implementation's ``err`` against flashdec-torch's output (see :func:`bench_row`)."""
    ref = outputs.get("flashdec-torch")
    if ref is None:
        return
    if inp.lengths is not None:
        keep = [b for b, n in enumerate(inp.lengths) if n > 0]
        if not keep:
            return
        import torch
        index = torch.tensor(keep, device=ref.device)
        outputs = {name: y.index_select(0, index) for name, y in outputs.items()}
        ref = outputs["flashdec-torch"]
    scale = float(ref.abs().max()) or 1.0
    for name, y in outputs.items():
        if name == "flashdec-torch":
            continue
        err = float((y - ref).abs().max()) / scale
        record["impls"][name]["err"] = err if math.isfinite(err) else "nan"


def _as_y(out: Any, shape: Shape) -> Any:
    """An implementation's output as fp32 Y [B, H_q, D]."""
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(shape.batch, shape.heads, shape.head_dim).float()


def _timed_cell(samples: list[float], nbytes: int, copy_bps: float | None) -> dict:
    """A measured mode's cell: median, p10, p90 and count of the samples, and their rates."""
    us = statistics.median(samples)
    ordered = sorted(samples)
    cell = {"us": us, "p10_us": ordered[len(ordered) // 10],
            "p90_us": ordered[(9 * len(ordered)) // 10], "n": len(samples), "na": None}
    cell.update(_rates(us, nbytes, copy_bps))
    return cell


def _rates(us: float, nbytes: int, copy_bps: float | None) -> dict:
    """TB/s moving ``nbytes`` in ``us``, and that as a % of the copy bandwidth (None without)."""
    tbps = nbytes / (us * 1e-6) / 1e12
    return {"tbps": tbps, "pct_copy": None if not copy_bps else 100 * tbps * 1e12 / copy_bps}
