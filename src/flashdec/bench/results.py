"""The results document (JSON): its schema tag and top-level layout (:func:`new_result`), writing
it (:func:`write_json`, after every row of a run) and reading one back (:func:`read_json`). A
row's record is :func:`flashdec.bench.measure.bench_row`'s; the summary is
:func:`flashdec.bench.checks.summarize`'s."""

from __future__ import annotations

import json

from .rotation import MIN_SETS
from .timing import MODES

SCHEMA = "flashdec-bench/2"


def new_result(environment: dict, argv: list[str] | None, *, iters: int, impls: list[str],
               l2_bytes: int, copy_bytes: int, copy_bps: float) -> dict:
    """A run's results before its rows: the environment, the command line, the configuration
    and the copy bandwidth; ``host_overhead``, ``rows`` and ``summary`` are filled in later."""
    return {"schema": SCHEMA, "environment": environment, "argv": argv,
            "config": {"iters": iters, "modes": list(MODES), "impls": impls,
                       "l2_bytes": l2_bytes, "rotation_bytes": 4 * l2_bytes, "min_sets": MIN_SETS,
                       "timing": "CUDA events, median per call; eager = Python loop over the "
                                 "sets, graph = one replay of all sets captured"},
            "copy": {"bytes": copy_bytes, "bps": copy_bps, "tbps": copy_bps / 1e12},
            "host_overhead": None, "rows": [], "summary": None}


def write_json(result: dict, path: str) -> None:
    """Write the results to ``path`` (replacing it)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def read_json(path: str) -> dict:
    """The results in ``path``; ``ValueError`` when it is not a results file (no list of rows),
    ``OSError`` when it cannot be read."""
    with open(path) as f:
        result = json.load(f)
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise ValueError("not a flashdec bench results file (no list of rows)")
    return result
