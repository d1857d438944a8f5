"""``python -m flashdec bench``: flashdec against its peers on one GPU, in one process and run.

Peers: torch SDPA pinned to cuDNN and to FlashAttention-2 (``enable_gqa=True``, Q as
``[B, H, 1, D]``), a plain two-kernel Triton split-KV decode (:mod:`flashdec.bench.triton_peer`,
when triton is installed) and flashdec's own torch backend on the GPU (the error column's
reference); FlexDecoding (``torch.compile(flex_attention)``, compile outside the timing) on
request (``--peers``: it is 10-30x slower and compiles for minutes). A peer that cannot run a
row is reported as ``n/a`` with the reason; it never stops the run.

Method: CUDA events, median of ``iters`` (>= 50) after a warm-up, cold L2
by rotating input sets whose bytes total >= 4x the L2, two modes for every implementation and
row: ``eager`` (a plain Python loop, host dispatch included) and ``graph`` (CUDA-graph replay,
GPU time). Effective bandwidth is the bytes of K + V (valid rows, the KV dtype's size) + Q + Y
over the time, also as a percentage of the device-to-device copy bandwidth (read + write)
measured in the same run. Host overhead: 10,000 calls on a tiny problem, wall clock.

Modules, one concern each; this package re-exports their public names:

- :mod:`.rows`: :class:`Shape`, :func:`parse_shapes`, :func:`default_shapes`, dtype names
- :mod:`.rotation`: :func:`rotation_sets` (cold L2)
- :mod:`.timing`: :func:`time_samples`, :func:`time_eager`, :func:`time_graph`,
  :func:`copy_bandwidth`
- :mod:`.host`: :func:`host_overhead`
- :mod:`.peers`: the implementations (:func:`build_impl`); :mod:`.triton_peer`, the Triton one
- :mod:`.measure`: :func:`bench_row` (one row)
- :mod:`.probe`: :func:`environment`, :func:`gpu_unavailable_reason`
- :mod:`.results`: the JSON document (:data:`SCHEMA`, :func:`write_json`)
- :mod:`.runner`: :func:`run` (the whole run, a JSON-ready dict)
- :mod:`.compare`: :func:`speedup`, :func:`geomean`, :func:`twins`
- :mod:`.checks`: :func:`targets` (the per-row targets), :func:`summarize`
- :mod:`.report`: :func:`format_table`, :func:`plot` (PNG)
- :mod:`.cli`: :func:`main`

Everything but the measuring runs without a GPU (``--plot results.json --png out.png``).
"""

from __future__ import annotations

from .checks import (FEW_KV_FLOOR_PCT, FEW_KV_HEADS, FEW_KV_MIN_BYTES, FLOOR_TARGETS,
                     FP8_FLOOR_PCT, FP8_MIN_BYTES, GEOMEAN_VS_SDPA, HEAD_DIM_TWIN_RATIO, MB,
                     SMALL_ROW, SMALL_ROW_US, TARGET_VS_PEER, floor_targets, summarize, targets)
from .cli import main
from .compare import geomean, geomeans, head_dim_orphans, impl_us, speedup, twins
from .host import HOST_CALLS, HOST_PROBLEM, host_overhead, host_overhead_text
from .measure import bench_row, row_info
from .peers import (DEFAULT_IMPLS, DEFAULT_PEERS, FP8_NA, IMPLS, LABELS, PEERS, RIVALS,
                    SDPA_IMPLS, Impl, Inputs, build_impl, make_inputs, na_reason)
from .probe import environment, gpu_unavailable_reason
from .report import MissingMatplotlib, format_table, plot, require_matplotlib
from .results import SCHEMA, new_result, read_json, write_json
from .rotation import (L2_BYTES, L2_ROTATION_BYTES, MAX_ROTATION_ALLOC, MAX_SETS, MIN_SETS,
                       rotation_sets)
from .rows import (DESIGN_SHAPES, DTYPE_ALIASES, DTYPE_NAMES, Q_DTYPES, QUICK_SHAPES,
                   SHORT_NAMES, Shape, canonical_dtype, default_shapes, parse_shapes)
from .runner import ERR_WARN, run
from .timing import (COPY_BYTES, ITERS, MODES, copy_bandwidth, median_us, time_eager,
                     time_graph, time_samples)

_time = median_us  # the name bench/split_sweep.py imports

__all__ = [
    # rows
    "Shape", "parse_shapes", "default_shapes", "canonical_dtype", "DESIGN_SHAPES",
    "QUICK_SHAPES", "DTYPE_NAMES", "DTYPE_ALIASES", "SHORT_NAMES", "Q_DTYPES",
    # rotation
    "rotation_sets", "L2_BYTES", "L2_ROTATION_BYTES", "MIN_SETS", "MAX_SETS",
    "MAX_ROTATION_ALLOC",
    # timing
    "time_samples", "time_eager", "time_graph", "median_us", "copy_bandwidth", "ITERS", "MODES",
    "COPY_BYTES",
    # host overhead
    "host_overhead", "host_overhead_text", "HOST_CALLS", "HOST_PROBLEM",
    # peers
    "Inputs", "make_inputs", "Impl", "build_impl", "na_reason", "IMPLS", "PEERS",
    "DEFAULT_PEERS", "DEFAULT_IMPLS", "SDPA_IMPLS", "RIVALS", "LABELS", "FP8_NA",
    # one row, the whole run
    "row_info", "bench_row", "run", "ERR_WARN",
    # environment
    "environment", "gpu_unavailable_reason",
    # JSON
    "SCHEMA", "new_result", "write_json", "read_json",
    # comparisons, targets, summary
    "geomean", "geomeans", "impl_us", "speedup", "twins", "head_dim_orphans", "floor_targets",
    "targets", "summarize", "MB", "TARGET_VS_PEER", "FLOOR_TARGETS", "SMALL_ROW",
    "SMALL_ROW_US", "FEW_KV_HEADS", "FEW_KV_MIN_BYTES", "FEW_KV_FLOOR_PCT", "FP8_MIN_BYTES",
    "FP8_FLOOR_PCT", "HEAD_DIM_TWIN_RATIO", "GEOMEAN_VS_SDPA",
    # table, plot, command line
    "format_table", "plot", "require_matplotlib", "MissingMatplotlib", "main",
]
