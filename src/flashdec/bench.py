"""``python -m flashdec bench``: flashdec against its peers on one GPU, in one process and run.

Peers: torch SDPA pinned to cuDNN and to FlashAttention-2 (``enable_gqa=True``, Q as
``[B, H, 1, D]``), a plain two-kernel Triton split-KV decode (:mod:`flashdec._bench_triton`,
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

Pieces, importable: :class:`Shape` / :func:`parse_shapes` / :func:`default_shapes` (rows),
:func:`time_samples` / :func:`time_eager` / :func:`time_graph` (timing),
:func:`copy_bandwidth`, :func:`host_overhead`, :func:`bench_row` (one row), :func:`run` (the
whole run, a JSON-ready dict), :func:`summarize`, :func:`targets` (the per-row targets),
:func:`format_table`, :func:`plot` (PNG).
Everything but the measuring runs without a GPU (``--plot results.json --png out.png``).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

SCHEMA = "flashdec-bench/2"
L2_BYTES = 50 * 2**20                      # H100; the device's own L2 size wins when known
L2_ROTATION_BYTES = 4 * L2_BYTES           # working set of the rotated input sets, at least
MIN_SETS = 4                               # rotate at least this many sets while a set is small
MAX_SETS = 128                             # tiny custom rows: cap the rotation (cold_l2 says so)
MAX_ROTATION_ALLOC = 4 * 2**30             # device memory for all sets of one row, at most
ITERS = 50                                 # timed samples per measurement (median of these)
HOST_CALLS = 10_000
HOST_PROBLEM = (1, 8, 8, 16, 64)           # B, H_q, H_kv, K_len, D: GPU time negligible
ERR_WARN = 2e-2                            # relative max error vs the torch backend that is flagged

IMPLS = ("flashdec", "sdpa-cudnn", "sdpa-flash", "triton", "flex", "flashdec-torch")
PEERS = IMPLS[1:]                          # what --peers accepts
# The default run: FlexDecoding only on request (10-30x slower, minutes of compile per run).
DEFAULT_PEERS = ("sdpa-cudnn", "sdpa-flash", "triton", "flashdec-torch")
DEFAULT_IMPLS = ("flashdec",) + DEFAULT_PEERS
SDPA_IMPLS = ("sdpa-cudnn", "sdpa-flash")
RIVALS = SDPA_IMPLS + ("triton", "flex")   # "best peer" for speedups: not flashdec's own torch
LABELS = {"flashdec": "flashdec", "sdpa-cudnn": "SDPA cuDNN", "sdpa-flash": "SDPA FA2",
          "triton": "Triton split-KV", "flex": "FlexDecoding", "flashdec-torch": "flashdec torch"}
MODES = ("eager", "graph")

# -- targets of the H200 kernel push (targets()); MB = 10^6 bytes like the table's "KV MB" --------
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

DTYPE_ALIASES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "f16": "float16", "half": "float16", "float16": "float16",
    "fp32": "float32", "f32": "float32", "float": "float32", "float32": "float32",
    "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
    "e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2",
}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "e4m3",
         "float8_e5m2": "e5m2"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
Q_DTYPES = ("bfloat16", "float16", "float32")


# -- rows -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One benchmark row. ``kv_len`` is the cache capacity; a ``ragged`` row's ``seqlens``
    spread evenly over 0..kv_len (mean kv_len / 2, shuffled), so its uniform twin has
    ``kv_len // 2``. ``kv_dtype`` differs from ``dtype`` only for an fp8 KV cache."""

    name: str
    batch: int
    heads: int
    kv_heads: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    ragged: bool = False

    @classmethod
    def make(cls, batch: int, heads: int, kv_heads: int, kv_len: int, head_dim: int,
             dtype: str = "bfloat16", kv_dtype: str | None = None, ragged: bool = False) -> "Shape":
        """A validated row, named ``"B,H_q,H_kv,K,D dtype[ kv=e4m3][ ragged]"``."""
        dtype, kv_dtype = _dtype(dtype), _dtype(kv_dtype or dtype)
        dims = (batch, heads, kv_heads, kv_len, head_dim)
        if any(int(x) != x or x < 1 for x in dims):
            raise ValueError(f"B, H_q, H_kv, K, D must be integers >= 1, got {dims}")
        if heads % kv_heads:
            raise ValueError(f"H_q ({heads}) must be a multiple of H_kv ({kv_heads})")
        if dtype not in Q_DTYPES:
            raise ValueError(f"Q dtype must be one of {', '.join(Q_DTYPES)}, got {dtype}")
        if kv_dtype not in Q_DTYPES and dtype == "float32":
            raise ValueError("an fp8 KV cache goes with a float16 or bfloat16 Q")
        if kv_dtype in Q_DTYPES and kv_dtype != dtype:
            raise ValueError(f"K/V dtype {kv_dtype} differs from Q's {dtype}: only fp8 may")
        name = ",".join(map(str, dims)) + " " + cls.variant_of(dtype, kv_dtype, ragged)
        return cls(name, *map(int, dims), dtype, kv_dtype, bool(ragged))

    @staticmethod
    def variant_of(dtype: str, kv_dtype: str, ragged: bool) -> str:
        text = SHORT[dtype] + ("" if kv_dtype == dtype else f" kv={SHORT[kv_dtype]}")
        return text + (" ragged" if ragged else "")

    @property
    def dims(self) -> str:
        return f"{self.batch},{self.heads},{self.kv_heads},{self.kv_len},{self.head_dim}"

    @property
    def variant(self) -> str:
        return self.variant_of(self.dtype, self.kv_dtype, self.ragged)

    @property
    def fp8(self) -> bool:
        return self.kv_dtype.startswith("float8")

    def seqlens(self) -> list[int] | None:
        """Per-sequence lengths of a ragged row (0 and kv_len included), else None."""
        if not self.ragged:
            return None
        b, k = self.batch, self.kv_len
        lengths = [k // 2] if b == 1 else [round(k * i / (b - 1)) for i in range(b)]
        # A fixed shuffle (a multiplicative permutation) so long rows are not all at the end.
        step = next(s for s in (5, 7, 11, 13, 17, 19, 23, 29, 31, 37) if math.gcd(s, b) == 1) \
            if b > 1 else 1
        return [lengths[(i * step) % b] for i in range(b)]

    def kv_rows(self) -> int:
        """Valid KV rows per head summed over the batch (what must be read)."""
        lengths = self.seqlens()
        return self.batch * self.kv_len if lengths is None else sum(lengths)

    def kv_bytes(self) -> int:
        """Bytes of K and V that must be read."""
        return 2 * self.kv_rows() * self.kv_heads * self.head_dim * ITEMSIZE[self.kv_dtype]

    def io_bytes(self) -> int:
        """The fewest bytes a decode moves: K + V (valid rows) + Q + Y."""
        return self.kv_bytes() + 2 * self.batch * self.heads * self.head_dim * ITEMSIZE[self.dtype]

    def alloc_bytes(self) -> int:
        """Device bytes of one input set (K and V at capacity, Q, Y)."""
        kv = 2 * self.batch * self.kv_heads * self.kv_len * self.head_dim * ITEMSIZE[self.kv_dtype]
        return kv + 2 * self.batch * self.heads * self.head_dim * ITEMSIZE[self.dtype]


def _dtype(name: str) -> str:
    try:
        return DTYPE_ALIASES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPE_ALIASES))}") \
            from None


def parse_shapes(text: str, dtype: str = "bfloat16") -> list[Shape]:
    """Rows from ``"B,Hq,Hkv,K,D[,dtype[,kv_dtype]][,ragged][;...]"``.

    ``dtype`` (Q, Y; default the ``dtype`` argument) and ``kv_dtype`` (K, V; default Q's, or
    fp8 / e4m3 / e5m2) take the names of :data:`DTYPE_ALIASES`; ``ragged`` may come anywhere
    after D. Raises ``ValueError`` naming the entry on any mistake.
    """
    shapes = []
    for entry in filter(None, (e.strip() for e in text.replace("\n", ";").split(";"))):
        fields = [f.strip() for f in entry.split(",")]
        try:
            if len(fields) < 5:
                raise ValueError("needs at least B,Hq,Hkv,K,D")
            try:
                dims = [int(f) for f in fields[:5]]
            except ValueError:
                raise ValueError("B, Hq, Hkv, K, D must be integers") from None
            extra = [f for f in fields[5:] if f]
            ragged = "ragged" in (f.lower() for f in extra)
            dtypes = [f for f in extra if f.lower() != "ragged"]
            if len(dtypes) > 2:
                raise ValueError("at most two dtypes (Q, then K/V)")
            q_dtype = dtypes[0] if dtypes else dtype
            kv_dtype = dtypes[1] if len(dtypes) > 1 else None
            shapes.append(Shape.make(*dims, dtype=q_dtype, kv_dtype=kv_dtype, ragged=ragged))
        except ValueError as exc:
            raise ValueError(f"--shapes entry {entry!r}: {exc}") from None
    if not shapes:
        raise ValueError(f"--shapes {text!r} names no row")
    return shapes


# (B, H_q, H_kv, K, D): the baseline rows every earlier run measured (bench/results).
DESIGN_SHAPES = [
    (1, 32, 8, 4096, 128),
    (1, 32, 8, 32768, 128),
    (1, 32, 8, 131072, 128),
    (8, 32, 8, 8192, 128),
    (64, 32, 8, 2048, 128),
    (1, 32, 32, 8192, 128),
    (4, 16, 8, 16384, 256),
    (1, 64, 8, 65536, 128),
]
# (dims, dtype or None for the run's --dtype, kv_dtype or None, ragged)
_DEFAULT = (
    [(d, None, None, False) for d in DESIGN_SHAPES] + [
        # K_len 512..1024, small and mid KV; B up to 256
        ((1, 32, 8, 512, 128), None, None, False),
        ((1, 32, 8, 16384, 128), None, None, False),
        ((16, 32, 8, 1024, 128), None, None, False),
        ((256, 32, 8, 512, 128), None, None, False),
        # MQA (group 32 and 8), GQA 8, MHA with a batch
        ((4, 32, 1, 65536, 128), None, None, False),
        ((256, 8, 1, 2048, 128), None, None, False),
        ((16, 32, 4, 4096, 128), None, None, False),
        ((8, 32, 32, 2048, 128), None, None, False),
        # D = 64 and 256 at the KV bytes of (1,32,8,32768,128); D = 64 with a batch
        ((1, 32, 8, 65536, 64), None, None, False),
        ((1, 32, 8, 16384, 256), None, None, False),
        ((32, 16, 4, 8192, 64), None, None, False),
        # fp16 twins of bf16 rows
        ((1, 32, 8, 32768, 128), "float16", None, False),
        ((64, 32, 8, 2048, 128), "float16", None, False),
        # fp8 KV (e4m3, scales 1.0) twins of bf16 rows
        ((1, 32, 8, 32768, 128), None, "float8_e4m3fn", False),
        ((1, 32, 8, 131072, 128), None, "float8_e4m3fn", False),
        ((8, 32, 8, 8192, 128), None, "float8_e4m3fn", False),
        ((64, 32, 8, 2048, 128), None, "float8_e4m3fn", False),
        # ragged seqlens over twice the capacity: same valid KV as the uniform twin (K / 2)
        ((8, 32, 8, 16384, 128), None, None, True),
        ((64, 32, 8, 4096, 128), None, None, True),
        ((256, 8, 1, 4096, 128), None, None, True),
        ((8, 32, 8, 16384, 128), None, "float8_e4m3fn", True),
        # head_dim not a power of two (D = 80 Phi-2, 96 Phi-3-mini, 112, 160, 192; 32/32
        # MHA), every one at the 110 MB of its D = 128 twin (1,32,32,6720,128): K = 6720*128/D
        # (6720 = 64 * 105 makes that whole for D = 80..192).
        ((1, 32, 32, 6720, 128), None, None, False),
        ((1, 32, 32, 10752, 80), None, None, False),
        ((1, 32, 32, 8960, 96), None, None, False),
        ((1, 32, 32, 7680, 112), None, None, False),
        ((1, 32, 32, 5376, 160), None, None, False),
        ((1, 32, 32, 4480, 192), None, None, False),
        ((1, 32, 32, 6720, 128), None, "float8_e4m3fn", False),
        ((1, 32, 32, 8960, 96), None, "float8_e4m3fn", False),
        # D = 96 with a batch (no D = 128 twin) and its ragged twin
        ((8, 32, 32, 2048, 96), None, None, False),
        ((8, 32, 32, 4096, 96), None, None, True),
        # GQA groups 5, 7 and 16 (1 is the MHA rows, 4, 8 and 32 above)
        ((1, 40, 8, 32768, 128), None, None, False),
        ((1, 28, 4, 32768, 128), None, None, False),
        ((1, 64, 4, 32768, 128), None, None, False),
        # few KV heads (batch * kv_heads <= 8): the splits alone must fill the GPU
        ((1, 8, 1, 65536, 128), None, None, False),
        ((1, 8, 1, 262144, 128), None, None, False),
        ((1, 16, 2, 131072, 128), None, None, False),
        ((2, 32, 4, 65536, 128), None, None, False),
        ((1, 8, 1, 262144, 128), None, "float8_e4m3fn", False),
        # large batches, one split each: batch * kv_heads alone fills the GPU
        ((128, 32, 8, 1024, 128), None, None, False),
        ((64, 16, 16, 2048, 64), None, None, False),
    ])
_QUICK = [
    ((1, 32, 8, 4096, 128), None, None, False),
    ((1, 32, 8, 32768, 128), None, None, False),
    ((64, 32, 8, 2048, 128), None, None, False),
    ((1, 32, 8, 32768, 128), None, "float8_e4m3fn", False),
    ((8, 32, 8, 8192, 128), None, None, False),
    ((8, 32, 8, 16384, 128), None, None, True),
]
QUICK_SHAPES = [d for d, *_ in _QUICK]


def default_shapes(dtype: str = "bfloat16", quick: bool = False) -> list[Shape]:
    """The built-in rows (49, or 6 with ``quick``); ``dtype`` is Q's dtype for rows that
    do not name one (the fp16 twins keep fp16). Duplicates are dropped."""
    rows, seen = [], set()
    for dims, q_dtype, kv_dtype, ragged in (_QUICK if quick else _DEFAULT):
        if kv_dtype and _dtype(dtype) == "float32" and not q_dtype:
            continue  # an fp8 KV cache goes with a 16-bit Q: no fp8 rows for --dtype float32
        shape = Shape.make(*dims, dtype=q_dtype or dtype, kv_dtype=kv_dtype, ragged=ragged)
        if shape.name not in seen:
            seen.add(shape.name)
            rows.append(shape)
    return rows


def rotation_sets(touched_bytes: int, alloc_bytes: int, l2_bytes: int = L2_BYTES) -> int:
    """How many input sets to rotate so the L2 is cold at every call.

    At least ``MIN_SETS`` and 4x the L2 in total while a set is smaller than that; 2 sets once
    one set alone is 4x the L2; never more than ``MAX_SETS`` sets or ``MAX_ROTATION_ALLOC``
    bytes (at least 1 set).
    """
    target = 4 * l2_bytes
    if touched_bytes >= target:
        sets = 2
    else:
        sets = max(MIN_SETS, math.ceil(target / max(touched_bytes, 1)))
    return max(1, min(sets, MAX_SETS, MAX_ROTATION_ALLOC // max(alloc_bytes, 1)))


# -- timing ---------------------------------------------------------------------------------------
def time_samples(fn: Callable[[int], Any], sets: int, graph: bool, iters: int = ITERS,
                 warmup: int | None = None) -> list[float]:
    """Microseconds per call of ``fn(i)``, ``iters`` samples, each over all ``sets`` input sets.

    Warm-up: ``warmup`` calls (default ``max(2 * sets, 10)``). ``graph``: the ``sets`` calls are
    captured once in a CUDA graph and each sample times one replay (GPU time); else each sample
    times a plain Python loop of ``sets`` calls (host dispatch included). CUDA events, cold L2.
    """
    import torch

    for i in range(max(2 * sets, 10) if warmup is None else warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        inner: list[BaseException] = []  # the capture's own error, not capture_end's
        try:
            with torch.cuda.graph(g, stream=stream):
                try:
                    for i in range(sets):
                        fn(i)
                except Exception as exc:
                    inner.append(exc)
                    raise
        except Exception:
            if inner:
                raise inner[0] from None
            raise
        torch.cuda.synchronize()
        g.replay()
        torch.cuda.synchronize()
        call = g.replay
    else:
        g = None

        def call():
            for i in range(sets):
                fn(i)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    samples = []
    for start, end in events:
        start.record()
        call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / sets)
    del g
    return samples


def time_eager(fn: Callable[[int], Any], sets: int, iters: int = ITERS) -> float:
    """Median us per call in a plain Python loop (host dispatch included)."""
    return statistics.median(time_samples(fn, sets, False, iters))


def time_graph(fn: Callable[[int], Any], sets: int, iters: int = ITERS) -> float:
    """Median us per call in CUDA-graph replay (GPU time)."""
    return statistics.median(time_samples(fn, sets, True, iters))


def _time(fn: Callable[[int], Any], sets: int, graph: bool, iters: int = ITERS) -> float:
    """Median us per call, eager or graph (kept for bench/split_sweep.py)."""
    return statistics.median(time_samples(fn, sets, graph, iters))


def copy_bandwidth(nbytes: int = 2**30, iters: int = ITERS) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + written per second (median)."""
    import torch

    def samples():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        return time_samples(lambda i: dst.copy_(src), 1, False, iters, warmup=3)
    us = statistics.median(samples())
    torch.cuda.empty_cache()
    return 2 * nbytes / (us * 1e-6)


def host_overhead(calls: int = HOST_CALLS) -> dict:
    """Wall-clock us per call of ``plan.run``, ``flashdec.decode`` (cuda backend, ``out=``
    given) and default-dispatch SDPA on a tiny problem, ``calls`` calls each, one synchronize
    at the end. A failure is an ``na`` entry."""
    import torch
    import torch.nn.functional as F

    import flashdec

    b, hq, hkv, klen, d = HOST_PROBLEM
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hkv, klen, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    q4 = q.unsqueeze(2)

    def plan_run():
        p = flashdec.plan(q, k, v, out, backend="cuda")
        return lambda: p.run(q, k, v, out)

    makers = {
        "plan.run": plan_run,
        "decode": lambda: lambda: flashdec.decode(q, k, v, out, backend="cuda"),
        "sdpa": lambda: lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
    }
    result = {"problem": dict(zip(("batch", "heads", "kv_heads", "kv_len", "head_dim"),
                                  HOST_PROBLEM), dtype="bfloat16"),
              "calls": calls, "us_per_call": {}, "na": {}}
    for name, make in makers.items():
        try:
            fn = make()
            for _ in range(100):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            result["us_per_call"][name] = (time.perf_counter() - t0) / calls * 1e6
        except Exception as exc:
            result["na"][name] = _reason(exc)
    return result


# -- implementations ------------------------------------------------------------------------------
@dataclass
class Inputs:
    """``sets`` input sets of one row on ``device``; ``seqlens`` is the int32 tensor [B] shared
    by all sets (ragged rows), ``lengths`` its host copy."""

    shape: Shape
    sets: int
    q: list
    k: list
    v: list
    out: list
    seqlens: Any = None
    lengths: list[int] | None = None
    k_scale: float | None = None
    v_scale: float | None = None
    device: str = "cuda"


def make_inputs(shape: Shape, sets: int, device: str = "cuda", seed: int = 0) -> Inputs:
    """Random normal Q, K, V (K/V cast to fp8 for fp8 rows, scales 1.0), empty Y."""
    import torch

    dt, kv_dt = getattr(torch, shape.dtype), getattr(torch, shape.kv_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, klen, d = shape.batch, shape.heads, shape.kv_heads, shape.kv_len, shape.head_dim

    def kv():
        return torch.randn(b, hkv, klen, d, device=device, dtype=dt, generator=gen).to(kv_dt)

    q = [torch.randn(b, hq, d, device=device, dtype=dt, generator=gen) for _ in range(sets)]
    k = [kv() for _ in range(sets)]
    v = [kv() for _ in range(sets)]
    out = [torch.empty(b, hq, d, device=device, dtype=dt) for _ in range(sets)]
    lengths = shape.seqlens()
    seqlens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = 1.0 if shape.fp8 else None
    return Inputs(shape, sets, q, k, v, out, seqlens, lengths, scale, scale, device)


@dataclass
class Impl:
    """A runnable implementation for one row: ``fn(i)`` runs on input set ``i`` and returns Y
    (any shape holding [B, H_q, D]); ``na`` says why it cannot run; timing happens inside
    ``context()`` (e.g. the SDPA backend pin, so its cost stays out of the eager numbers)."""

    fn: Callable[[int], Any] | None = None
    na: str | None = None
    context: Callable[[], Any] = contextlib.nullcontext
    note: str | None = None


FP8_NA = "fp8 KV cache: needs one dtype for Q, K and V"


def _flashdec_impl(inp: Inputs, backend: str) -> Impl:
    import flashdec

    kw: dict[str, Any] = {}  # per-run: seqlens; float scales are fixed by the plan
    if inp.seqlens is not None:
        kw["seqlens"] = inp.seqlens
    scales = {} if inp.k_scale is None else {"k_scale": inp.k_scale, "v_scale": inp.v_scale}
    q, k, v, out = inp.q, inp.k, inp.v, inp.out
    p = flashdec.plan(q[0], k[0], v[0], out[0], backend=backend, **kw, **scales)
    if kw:
        return Impl(lambda i: p.run(q[i], k[i], v[i], out[i], **kw))
    return Impl(lambda i: p.run(q[i], k[i], v[i], out[i]))


def _sdpa_impl(inp: Inputs, which: str) -> Impl:
    if inp.shape.fp8:
        return Impl(na=FP8_NA)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, which)
    q4, k, v = [x.unsqueeze(2) for x in inp.q], inp.k, inp.v
    mask, note = None, None
    if inp.seqlens is not None:  # SDPA has no per-sequence length: a mask over the capacity
        pos = torch.arange(inp.shape.kv_len, device=inp.device)
        mask = (pos[None, :] < inp.seqlens[:, None].long())[:, None, None, :]
        note = "ragged: boolean attn_mask over the capacity (reads all of it)"

    def fn(i):
        return F.scaled_dot_product_attention(q4[i], k[i], v[i], attn_mask=mask, enable_gqa=True)
    return Impl(fn, context=lambda: sdpa_kernel([backend]), note=note)


def _flex_impl(inp: Inputs) -> Impl:
    if inp.shape.fp8:
        return Impl(na=FP8_NA)
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # one row's graphs only: no recompile limit, no long guard chains
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 64))
    compiled = torch.compile(flex_attention, dynamic=False)
    q4, k, v = [x.unsqueeze(2) for x in inp.q], inp.k, inp.v
    block_mask, note = None, None
    if inp.seqlens is not None:
        lens = inp.seqlens

        def valid(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        s = inp.shape
        block_mask = create_block_mask(valid, s.batch, None, 1, s.kv_len, device=inp.device)
        note = "ragged: block mask from seqlens (made outside the timing)"

    def fn(i):
        return compiled(q4[i], k[i], v[i], block_mask=block_mask, enable_gqa=True)
    return Impl(fn, note=note)


def _triton_impl(inp: Inputs) -> Impl:
    """The Triton split-KV peer (:mod:`flashdec._bench_triton`): its workspace is made here, so
    each call only launches (and a CUDA graph can capture it). fp8 K/V are widened to Q's dtype
    inside the kernel. Off CUDA it runs only under Triton's interpreter (tests)."""
    import os

    try:
        from . import _bench_triton
    except ImportError as exc:
        if getattr(exc, "name", None) == "triton":
            return Impl(na="triton is not installed")
        return Impl(na="triton cannot be imported: " + _reason(exc))
    if not str(inp.device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return Impl(na="the Triton peer needs a CUDA device (or TRITON_INTERPRET=1)")
    scales = {} if inp.k_scale is None else {"k_scale": inp.k_scale, "v_scale": inp.v_scale}
    dec = _bench_triton.TritonDecode(inp.q[0], inp.k[0], inp.v[0], **scales)
    q, k, v, out, lens = inp.q, inp.k, inp.v, inp.out, inp.seqlens
    return Impl(lambda i: dec(q[i], k[i], v[i], lens, out[i]))


def build_impl(name: str, inp: Inputs) -> Impl:
    """The implementation ``name`` for these inputs; never raises (failures become ``na``)."""
    try:
        if name == "flashdec":
            return _flashdec_impl(inp, "cuda")
        if name == "flashdec-torch":
            return _flashdec_impl(inp, "torch")
        if name == "sdpa-cudnn":
            return _sdpa_impl(inp, "CUDNN_ATTENTION")
        if name == "sdpa-flash":
            return _sdpa_impl(inp, "FLASH_ATTENTION")
        if name == "triton":
            return _triton_impl(inp)
        if name == "flex":
            return _flex_impl(inp)
        return Impl(na=f"unknown implementation {name!r}")
    except Exception as exc:
        return Impl(na=_reason(exc))


def _reason(exc: BaseException, warned: Iterable[Any] = ()) -> str:
    """One short line for an n/a: the exception, plus the first warning when it says more
    (SDPA explains "No available kernel" only in warnings)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    for w in warned:
        msg = " ".join(str(getattr(w, "message", w)).split())
        if msg:
            text += f" [{msg}]"
            break
    return text if len(text) <= 240 else text[:237] + "..."


def _y(out: Any, shape: Shape) -> Any:
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(shape.batch, shape.heads, shape.head_dim).float()


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def _measure(samples: list[float], nbytes: int, copy_bps: float | None) -> dict:
    us = statistics.median(samples)
    ordered = sorted(samples)
    cell = {"us": us, "p10_us": ordered[len(ordered) // 10],
            "p90_us": ordered[(9 * len(ordered)) // 10], "n": len(samples), "na": None}
    cell.update(_rates(us, nbytes, copy_bps))
    return cell


def _rates(us: float, nbytes: int, copy_bps: float | None) -> dict:
    tbps = nbytes / (us * 1e-6) / 1e12
    return {"tbps": tbps, "pct_copy": None if not copy_bps else 100 * tbps * 1e12 / copy_bps}


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
    _errors(record, outputs, inp)
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
                _sync(inp.device)
                res["compile_s"] = time.perf_counter() - t0
                outputs[name] = _y(y, inp.shape).clone()
            except Exception as exc:
                res["eager"] = res["graph"] = {"us": None, "na": _reason(exc, warned)}
                return res
        for mode in MODES:
            try:
                res[mode] = _measure(timer(impl.fn, inp.sets, mode == "graph", iters), nbytes,
                                     copy_bps)
            except Exception as exc:
                res[mode] = {"us": None, "na": _reason(exc)}
                with contextlib.suppress(Exception):
                    _sync(inp.device)
    return res


def _errors(record: dict, outputs: dict, inp: Inputs) -> None:
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


# -- the whole run --------------------------------------------------------------------------------
def environment() -> dict:
    """Device and version facts for the JSON (None where unknown)."""
    import platform

    import torch

    from . import __version__

    env: dict[str, Any] = {"flashdec": __version__, "python": platform.python_version(),
                           "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    with contextlib.suppress(Exception):
        env["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                   sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                   l2_bytes=getattr(props, "L2_cache_size", None))
    env["driver"] = _driver_version()
    with contextlib.suppress(Exception):
        from cuda.bindings import driver
        err, version = driver.cuDriverGetVersion()
        env["cuda_driver_api"] = f"{version // 1000}.{version % 1000 // 10}"
    with contextlib.suppress(Exception):
        from .backends.cuda._compiler import nvrtc_version
        env["nvrtc"] = "%d.%d" % nvrtc_version()
    for mod in ("cuda.core", "triton"):
        with contextlib.suppress(Exception):
            env[mod.replace(".", "_")] = __import__(mod, fromlist=["__version__"]).__version__
    return env


def _driver_version() -> str | None:
    with contextlib.suppress(Exception), open("/proc/driver/nvidia/version") as f:
        words = f.readline().split()
        for w in words:
            if w[:1].isdigit() and "." in w:
                return w
    with contextlib.suppress(Exception):
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    return None


def gpu_unavailable_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def run(shapes: Iterable[Shape] | None = None, impls: Iterable[str] = DEFAULT_IMPLS, *,
        iters: int = ITERS, host_calls: int = HOST_CALLS, json_path: str | None = None,
        log: Any = sys.stderr, argv: list[str] | None = None, device: str = "cuda") -> dict:
    """The whole benchmark on the current GPU; returns the results (JSON-ready) and, with
    ``json_path``, rewrites that file after every row (a crash keeps the rows done).

    Order: environment, copy bandwidth, host overhead, then the rows; progress on ``log``.
    ``device`` other than cuda is for tests (with the timers replaced)."""
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
    result = {"schema": SCHEMA, "environment": env, "argv": argv,
              "config": {"iters": iters, "modes": list(MODES), "impls": impls,
                         "l2_bytes": l2, "rotation_bytes": 4 * l2, "min_sets": MIN_SETS,
                         "timing": "CUDA events, median per call; eager = Python loop over the "
                                   "sets, graph = one replay of all sets captured"},
              "copy": {"bytes": 2**30, "bps": copy_bps, "tbps": copy_bps / 1e12},
              "host_overhead": None, "rows": [], "summary": None}
    if host_calls:
        result["host_overhead"] = host_overhead(host_calls)
        say("# host overhead: " + _host_text(result["host_overhead"]))
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
    result["summary"] = summarize(result)
    result["elapsed_s"] = time.perf_counter() - started
    _sync(device)
    if json_path:
        write_json(result, json_path)
    return result


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _progress(row: dict) -> str:
    parts = []
    for name, res in row["impls"].items():
        e, g = (res.get(m) or {} for m in MODES)
        parts.append(f"{name} {_us(e)}/{_us(g)}")
    slow = [f"{name} {res['compile_s']:.1f} s" for name, res in row["impls"].items()
            if (res.get("compile_s") or 0) > 1]
    first = f"; first call: {', '.join(slow)}" if slow else ""
    return f"{row['name']}: " + ", ".join(parts) + " us eager/graph" + first


# -- summary, table, plot -------------------------------------------------------------------------
def geomean(values: Iterable[float]) -> float | None:
    """Geometric mean of positive values; None for none."""
    logs = [math.log(x) for x in values if x and x > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _us_of(row: dict, name: str, mode: str) -> float | None:
    cell = (row["impls"].get(name) or {}).get(mode) or {}
    return cell.get("us")


def speedup(row: dict, mode: str, peers: Iterable[str] = RIVALS) -> float | None:
    """Best peer's time over flashdec's in ``mode`` (> 1: flashdec is faster; peers: SDPA,
    Triton and FlexDecoding, not the torch reference backend); None if either is missing."""
    mine = _us_of(row, "flashdec", mode)
    theirs = [t for t in (_us_of(row, p, mode) for p in peers) if t]
    return min(theirs) / mine if mine and theirs else None


def _geomeans(rows: list[dict], peers: Iterable[str]) -> dict:
    peers = tuple(peers)
    out = {}
    for mode in MODES:
        ratios = [s for s in (speedup(r, mode, peers) for r in rows) if s]
        out[mode] = {"geomean": geomean(ratios), "rows": len(ratios),
                     "min": min(ratios) if ratios else None}
    return out


def summarize(result: dict) -> dict:
    """Geometric-mean speedups of flashdec (over the best SDPA backend, and over the best peer:
    SDPA, Triton, FlexDecoding), per mode; the twin comparisons; the targets' outcome
    (``targets``: checks made and missed; ``misses``: the missed checks of :func:`targets`)."""
    out: dict[str, Any] = {}
    for key, peers in (("vs_best_sdpa", SDPA_IMPLS), ("vs_best_peer", RIVALS)):
        out[key] = _geomeans(result["rows"], peers)
    for mode, want in GEOMEAN_VS_SDPA.items():
        out["vs_best_sdpa"][mode]["target"] = want
    out["twins"] = twins(result)
    checks = targets(result)
    misses = [c for c in checks if not c["ok"]]
    out["targets"] = {"checked": len(checks), "missed": len(misses)}
    out["misses"] = misses
    return out


def _row_name(dims: tuple, dtype: str, kv_dtype: str, ragged: bool) -> str:
    return ",".join(map(str, dims)) + " " + Shape.variant_of(dtype, kv_dtype, ragged)


def _twin_candidates(s: dict) -> list[tuple[str, str]]:
    """``(what, twin row name)`` for a row's shape record: its one dtype / ragged twin (fp16
    vs bf16, fp8 KV vs 16-bit, ragged vs uniform with the same valid KV) and, for D != 128,
    the D=128 row of the same variant at the same KV bytes (K * D / 128 rows, when whole)."""
    dims = (s["batch"], s["heads"], s["kv_heads"], s["kv_len"], s["head_dim"])
    dt, kvdt, ragged = s["dtype"], s["kv_dtype"], s["ragged"]
    out = []
    if ragged:
        out.append(("ragged vs uniform",
                    _row_name(dims[:3] + (s["kv_len"] // 2, dims[4]), dt, kvdt, False)))
    elif kvdt != dt:
        out.append(("fp8 KV vs " + SHORT[dt], _row_name(dims, dt, dt, False)))
    elif dt == "float16":
        out.append(("fp16 vs bf16", _row_name(dims, "bfloat16", "bfloat16", False)))
    if s["head_dim"] != 128 and s["kv_len"] * s["head_dim"] % 128 == 0:
        out.append((f"D={s['head_dim']} vs D=128",
                    _row_name(dims[:3] + (s["kv_len"] * s["head_dim"] // 128, 128), dt, kvdt,
                              ragged)))
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
            a, b = _us_of(r, impl, mode), twin and _us_of(twin, impl, mode)
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
    sdpa = _geomeans(result["rows"], SDPA_IMPLS)
    for mode, want in GEOMEAN_VS_SDPA.items():
        g = sdpa[mode]["geomean"]
        if g is not None:
            checks.append(_check(None, "all rows", "geomean_vs_sdpa",
                                 f"geomean best SDPA / flashdec, {mode} >= {want:.2f}x", g,
                                 f"{g:.2f}x over {sdpa[mode]['rows']} rows", g >= want))
    return checks


def _us(cell: dict | None) -> str:
    if not cell or cell.get("us") is None:
        return "n/a"
    us = cell["us"]
    return f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _host_text(host: dict | None) -> str:
    if not host:
        return "not measured"
    parts = [f"{k} {v:.2f} us/call" for k, v in host["us_per_call"].items()]
    parts += [f"{k} n/a ({v})" for k, v in host["na"].items()]
    p = host["problem"]
    return (", ".join(parts) + f"  [{host['calls']} calls, wall clock, B={p['batch']} "
            f"H_q={p['heads']} H_kv={p['kv_heads']} K={p['kv_len']} D={p['head_dim']} "
            f"{SHORT.get(p['dtype'], p['dtype'])}]")


def format_table(result: dict) -> str:
    """The stdout report: a Markdown table (one line per row, ``eager / graph`` us per
    implementation, flashdec's graph TB/s and % of copy (= % of the floor), best peer's time
    over flashdec's per mode), the n/a reasons, host overhead, twin ratios, the
    geometric-mean speedups and, last, the checks of :func:`targets` that missed."""
    env = result.get("environment", {})
    copy_tbps = result["copy"]["tbps"]
    impls = result.get("config", {}).get("impls") or list(IMPLS)
    iters = result.get("config", {}).get("iters", ITERS)
    lines = [f"# flashdec bench: {env.get('device', '?')}, driver {env.get('driver', '?')}, "
             f"torch {env.get('torch', '?')}, NVRTC {env.get('nvrtc', '?')}; copy bandwidth "
             f"{copy_tbps:.2f} TB/s (read + write)",
             f"# us per call, eager / graph (median of {iters}, cold L2); TB/s and % copy: "
             "flashdec, graph (% copy = % of the floor: floor us / us); ragged: K = capacity, "
             "lengths 0..K (mean K/2); best peer / flashdec > 1: flashdec faster", ""]
    head = ["#", "B,H_q,H_kv,K,D", "dtype", "KV MB", "floor us"] + [LABELS.get(i, i) for i in impls]
    head += ["TB/s", "% copy", "best peer / flashdec (graph / eager)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    na: dict[tuple[str, str], list[int]] = {}
    for n, row in enumerate(result["rows"], 1):
        s = row["shape"]
        dims = f"{s['batch']},{s['heads']},{s['kv_heads']},{s['kv_len']},{s['head_dim']}"
        cells = [str(n), dims, Shape.variant_of(s["dtype"], s["kv_dtype"], s["ragged"]),
                 f"{row['kv_bytes'] / 1e6:.{1 if row['kv_bytes'] >= 1e6 else 3}f}",
                 "-" if row.get("floor_us") is None else f"{row['floor_us']:.1f}"]
        for name in impls:
            res = row["impls"].get(name)
            if not res:
                cells.append("-")
                continue
            e, g = res.get("eager") or {}, res.get("graph") or {}
            for cell in (e, g):
                if cell.get("na"):
                    na.setdefault((name, cell["na"]), [])
                    if n not in na[(name, cell["na"])]:
                        na[(name, cell["na"])].append(n)
            if e.get("na") and e.get("na") == g.get("na"):
                cells.append("n/a (fp8)" if e["na"] == FP8_NA else "n/a")
            else:
                cells.append(f"{_us(e)} / {_us(g)}")
        g = (row["impls"].get("flashdec") or {}).get("graph") or {}
        cells += ["-" if g.get("tbps") is None else f"{g['tbps']:.2f}",
                  "-" if g.get("pct_copy") is None else f"{g['pct_copy']:.0f}%",
                  f"{_x(speedup(row, 'graph'))} / {_x(speedup(row, 'eager'))}"]
        lines.append("| " + " | ".join(cells) + " |")
    if na:
        lines += ["", "n/a:"]
        for (name, reason), rows in sorted(na.items()):
            lines.append(f"  {name} ({_rows(rows)}): {reason}")
    notes = sorted({(n, r["note"]) for row in result["rows"] for n, r in row["impls"].items()
                    if r.get("note")})
    notes = [f"  {name}: {note}" for name, note in notes]
    cold = [n for n, row in enumerate(result["rows"], 1) if not row.get("cold_l2", True)]
    if cold:
        notes.append(f"  {_rows(cold)}: rotation capped, working set < 4x L2 (warm L2)")
    if notes:
        lines += ["", "notes:"] + notes
    lines += ["", "Host overhead: " + _host_text(result.get("host_overhead"))]
    summary = result.get("summary") or summarize(result)
    if summary["twins"]:
        lines += ["", "Twins (flashdec, graph): time ratio, % copy ratio"]
        for t in summary["twins"]:
            lines.append(f"  {t['what']}: {t['row']} / {t['twin']}: {t['time_ratio']:.3f}x time, "
                         f"{_x(t['pct_copy_ratio'])} % copy")
    orphans = head_dim_orphans(result)
    if orphans:
        lines += ["", f"No D=128 twin at the same KV bytes in this run: {_rows(orphans)}"]
    lines.append("")
    for key, label in (("vs_best_sdpa", "the best SDPA backend"),
                       ("vs_best_peer", "the best peer (SDPA, Triton, FlexDecoding)")):
        g, e = summary[key]["graph"], summary[key]["eager"]
        want = (f"; targets graph >= {GEOMEAN_VS_SDPA['graph']:.2f}x, eager >= "
                f"{GEOMEAN_VS_SDPA['eager']:.2f}x" if key == "vs_best_sdpa" else "")
        lines.append(f"Geometric-mean speedup of flashdec over {label}: graph {_x(g['geomean'])} "
                     f"({g['rows']} rows, min {_x(g['min'])}), eager {_x(e['geomean'])} "
                     f"({e['rows']} rows, min {_x(e['min'])}){want}")
    # Recomputed (not read from the summary) so an older JSON gets the current targets.
    checks = targets(result)
    misses = [c for c in checks if not c["ok"]]
    lines += ["", f"Rows that miss a target: {len(misses)} of {len(checks)} checks"
              + ("" if misses else ", none missed")]
    for c in misses:
        where = "all rows" if c["n"] is None else f"row {c['n']} ({c['row']})"
        lines.append(f"  {where}: {c['target']}: measured {c['shown']}")
    return "\n".join(lines)


def _rows(ns: list[int]) -> str:
    return ("row " if len(ns) == 1 else "rows ") + _ranges(ns)


def _ranges(ns: list[int]) -> str:
    ns, parts, i = sorted(ns), [], 0
    while i < len(ns):
        j = i
        while j + 1 < len(ns) and ns[j + 1] == ns[j] + 1:
            j += 1
        parts.append(str(ns[i]) if i == j else f"{ns[i]}-{ns[j]}")
        i = j + 1
    return ",".join(parts)


class MissingMatplotlib(RuntimeError):
    """--png without matplotlib."""


def require_matplotlib() -> None:
    """Raise :class:`MissingMatplotlib` with the install command when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingMatplotlib(
            f"--png needs matplotlib ({exc}); pip install matplotlib "
            "(or pip install -e \".[bench]\")") from None


def plot(result: dict, path: str, mode: str = "graph") -> None:
    """PNG of % of copy bandwidth vs KV size (MB, log x) per implementation, in ``mode``.

    Uses matplotlib's object API (Agg canvas): no display, no pyplot state.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    impls = result.get("config", {}).get("impls") or list(IMPLS)
    copy_bps = result["copy"]["bps"]
    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = dict(zip(IMPLS, "o^sPDv"))
    plotted = False
    for name in impls:
        points = []
        for row in result["rows"]:
            us = _us_of(row, name, mode)
            if us:
                points.append((row["kv_bytes"] / 1e6, 100 * row["bytes"] / (us * 1e-6) / copy_bps))
        if points:
            points.sort()
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=markers.get(name, "x"), linestyle="none", markersize=6,
                    alpha=0.85, label=LABELS.get(name, name), zorder=3 if name == "flashdec" else 2)
            plotted = True
    ax.set_xscale("log")
    xs_all = [row["kv_bytes"] / 1e6 for row in result["rows"]]
    if xs_all:
        lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
        ax.set_xlim(lo, hi)
        ticks = [m * 10**e for e in range(-3, 6) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("KV cache read (MB, log scale)")
    ax.set_ylabel("% of device copy bandwidth")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    env = result.get("environment", {})
    ax.set_title(f"flashdec decode, {mode} mode, cold L2: {env.get('device', '?')}, copy "
                 f"{result['copy']['tbps']:.2f} TB/s", fontsize=10)
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path)


# -- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flashdec bench",
        description="flashdec vs torch SDPA (cuDNN, FA2), a Triton split-KV decode, "
                    "flashdec's torch backend (and FlexDecoding on request) on this GPU: eager "
                    "and CUDA-graph replay, cold L2; then the rows that miss a target.")
    parser.add_argument("--quick", action="store_true", help="6 rows instead of ~50")
    parser.add_argument("--shapes", help='your own rows: "B,Hq,Hkv,K,D[,dtype[,kv_dtype]]'
                                         '[,ragged][;...]", e.g. "1,32,8,32768,128,bf16,fp8"')
    parser.add_argument("--dtype", default="bfloat16",
                        help="Q/Y dtype of rows that name none (default bfloat16)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma list of peers to run next to flashdec, from "
                             f"{','.join(PEERS)} (default {','.join(DEFAULT_PEERS)}; 'none' "
                             "for flashdec alone)")
    parser.add_argument("--iters", type=int, default=ITERS, help="timed samples per "
                        f"measurement (default {ITERS}; medians of fewer are noisy)")
    parser.add_argument("--host-calls", type=int, default=HOST_CALLS,
                        help=f"calls in the host-overhead loops (default {HOST_CALLS}; 0 skips)")
    parser.add_argument("--json", default=None, help="write the results here (after every row)")
    parser.add_argument("--png", default=None, help="plot %% of copy bandwidth vs KV size here")
    parser.add_argument("--plot", metavar="JSON", default=None,
                        help="no GPU: print the table of a results JSON (and draw --png from it)")
    argv = sys.argv[2:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.png:
        try:
            require_matplotlib()
        except MissingMatplotlib as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.plot:
        try:
            with open(args.plot) as f:
                result = json.load(f)
            if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
                raise ValueError("not a flashdec bench results file (no list of rows)")
            table = format_table(result)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"error: cannot read {args.plot}: {exc}", file=sys.stderr)
            return 2
        print(table)
        if args.png:
            plot(result, args.png)
            print(f"plot: {args.png}", file=sys.stderr)
        return 0
    try:
        _dtype(args.dtype)
        shapes = (parse_shapes(args.shapes, args.dtype) if args.shapes
                  else default_shapes(args.dtype, args.quick))
        peers = [] if args.peers.strip().lower() == "none" else \
            [p.strip() for p in args.peers.split(",") if p.strip()]
        bad = [p for p in peers if p not in PEERS]
        if bad:
            raise ValueError(f"unknown peer(s) {', '.join(bad)}; choose from {', '.join(PEERS)}")
        if args.iters < 1:
            raise ValueError("--iters must be >= 1")
    except ValueError as exc:
        parser.error(str(exc))
    why = gpu_unavailable_reason()
    if why:
        print(f"error: python -m flashdec bench needs a CUDA GPU: {why}. "
              "(--plot JSON --png PATH redraws a plot without one.)", file=sys.stderr)
        return 2
    if args.iters < ITERS:
        print(f"# note: --iters {args.iters} < {ITERS}: medians of fewer samples are noisy",
              file=sys.stderr)
    result = run(shapes, ["flashdec"] + peers, iters=args.iters, host_calls=args.host_calls,
                 json_path=args.json, argv=["bench"] + argv)
    print(format_table(result))
    if args.png:
        plot(result, args.png)
        print(f"plot: {args.png}", file=sys.stderr)
    return 0
