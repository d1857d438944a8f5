"""The whole run (:func:`run`): environment, copy bandwidth, host overhead, then every row, with
progress on a log and the results file rewritten after each row."""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

from .checks import summarize
from .host import HOST_CALLS, host_overhead, host_overhead_text
from .measure import bench_row
from .paged import paged_section, paged_text
from .peers import DEFAULT_IMPLS
from .probe import environment
from .report import us_text
from .results import new_result, write_json
from .rotation import L2_BYTES
from .rows import Shape, default_shapes
from .timing import COPY_BYTES, ITERS, MODES, copy_bandwidth, sync

ERR_WARN = 2e-2                            # relative max error vs the torch backend that is flagged


def run(shapes: Iterable[Shape] | None = None, impls: Iterable[str] = DEFAULT_IMPLS, *,
        iters: int = ITERS, host_calls: int = HOST_CALLS, json_path: str | None = None,
        log: Any = sys.stderr, argv: list[str] | None = None, device: str = "cuda",
        paged: bool = False) -> dict:
    """The whole benchmark on the current GPU; returns the results (JSON-ready) and, with
    ``json_path``, rewrites that file after every row (a crash keeps the rows done).

    Order: environment, copy bandwidth, host overhead, the rows, then (``paged``) the paged-KV
    section; progress on ``log``. ``device`` other than cuda is for tests (with the timers
    replaced)."""
    started = time.perf_counter()
    shapes = list(default_shapes() if shapes is None else shapes)
    impls = list(impls)
    env = environment()
    l2 = env.get("l2_bytes") or L2_BYTES
    say = (lambda *a: print(*a, file=log, flush=True)) if log else (lambda *a: None)
    say(f"# flashdec bench on {env.get('device')}: {len(shapes)} rows x {len(impls)} "
        f"implementations x 2 modes, median of {iters}")
    copy_bps = copy_bandwidth(iters=iters)
    say(f"# copy bandwidth {copy_bps / 1e12:.3f} TB/s (read + write, 1 GiB device-to-device)")
    result = new_result(env, argv, iters=iters, impls=impls, l2_bytes=l2, copy_bytes=COPY_BYTES,
                        copy_bps=copy_bps)
    if host_calls:
        result["host_overhead"] = host_overhead(host_calls)
        say("# host overhead: " + host_overhead_text(result["host_overhead"]))
    for n, shape in enumerate(shapes, 1):
        t0 = time.perf_counter()
        row = bench_row(shape, impls, copy_bps=copy_bps, iters=iters, l2_bytes=l2,
                        device=device)
        row["elapsed_s"] = time.perf_counter() - t0
        result["rows"].append(row)
        say(f"[{n:2d}/{len(shapes)}] {_progress(row)} ({row['elapsed_s']:.1f} s)")
        for name, res in row["impls"].items():
            err = res["err"]
            if err is not None and (err == "nan" or err > ERR_WARN):
                say(f"  WARNING {name}: relative max error {err} vs the torch backend")
        result["summary"] = summarize(result)
        result["elapsed_s"] = time.perf_counter() - started
        if json_path:
            write_json(result, json_path)
    if paged:
        result["paged"] = paged_section(iters)
        say("\n".join(paged_text(result["paged"])))
    result["summary"] = summarize(result)
    result["elapsed_s"] = time.perf_counter() - started
    sync(device)
    if json_path:
        write_json(result, json_path)
    return result


def _progress(row: dict) -> str:
    """A measured row's progress line: each implementation's eager/graph us, slow first calls."""
    parts = []
    for name, res in row["impls"].items():
        e, g = (res.get(m) or {} for m in MODES)
        parts.append(f"{name} {us_text(e)}/{us_text(g)}")
    slow = [f"{name} {res['compile_s']:.1f} s" for name, res in row["impls"].items()
            if (res.get("compile_s") or 0) > 1]
    first = f"; first call: {', '.join(slow)}" if slow else ""
    return f"{row['name']}: " + ", ".join(parts) + " us eager/graph" + first
