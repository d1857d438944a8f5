"""Timing: microseconds per call by CUDA events, in the two modes (``eager``: a plain Python
loop, host dispatch included; ``graph``: CUDA-graph replay, GPU time) over rotated input sets
(:func:`time_samples` and its medians), and the device-to-device copy bandwidth that a row's
floor is measured against (:func:`copy_bandwidth`)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

ITERS = 50                                 # timed samples per measurement (median of these)
MODES = ("eager", "graph")                 # every row, every implementation: both
COPY_BYTES = 2**30                         # copied by copy_bandwidth: 1 GiB


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


def median_us(fn: Callable[[int], Any], sets: int, graph: bool, iters: int = ITERS) -> float:
    """Median us per call, eager or graph (bench/split_sweep.py imports it as ``_time``)."""
    return statistics.median(time_samples(fn, sets, graph, iters))


def interleaved_us(fns: dict, iters: int = ITERS) -> dict:
    """Graph-mode median us of each call of ``fns`` (name -> no-argument call), measured in
    turn, twice (A/B comparisons on a shared, noisy host); the mean of the two."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(2):
        for name, fn in fns.items():
            runs[name].append(median_us(lambda i: fn(), 1, True, iters))
    return {name: statistics.fmean(values) for name, values in runs.items()}


def time_eager(fn: Callable[[int], Any], sets: int, iters: int = ITERS) -> float:
    """Median us per call in a plain Python loop (host dispatch included)."""
    return median_us(fn, sets, False, iters)


def time_graph(fn: Callable[[int], Any], sets: int, iters: int = ITERS) -> float:
    """Median us per call in CUDA-graph replay (GPU time)."""
    return median_us(fn, sets, True, iters)


def copy_bandwidth(nbytes: int = COPY_BYTES, iters: int = ITERS) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + written per second (median)."""
    import torch

    def samples():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        return time_samples(lambda i: dst.copy_(src), 1, False, iters, warmup=3)
    us = statistics.median(samples())
    torch.cuda.empty_cache()
    return 2 * nbytes / (us * 1e-6)


def sync(device: str) -> None:
    """Wait for the GPU when ``device`` is a CUDA device (a no-op elsewhere)."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()
