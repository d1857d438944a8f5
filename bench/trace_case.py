"""Where a decode launch's time goes: per-CTA %globaltimer stamps of the MMA kernel.

    PYTHONPATH=src python3 bench/trace_case.py [--warm] B,Hq,Hkv,K,D[,kv_dtype][:num_splits] ...

Compiles decode.cu with -DFLASHDEC_TRACE (thread 0 of every CTA stamps entry, Q loaded, first
K/V block arrived, main loop done, partial published, CTA done; see decode.cu), replays one
launch in a CUDA graph after an L2 flush, and prints the timeline against the event-timed
graph replay of the same launch and of an empty-ish one-element kernel (the launch floor).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import flashdec
from flashdec.backends.cuda import _modules
from case import make_case
from flashdec.backends.cuda import _driver

POINTS = ("entry", "rows_known", "kv_issued", "q_ready", "first_kv", "loop_done", "states_done",
          "fenced", "published", "merge_fenced", "ml_loaded", "weighted", "done")
SLOT = {"entry": 0, "first_kv": 1, "loop_done": 2, "published": 3, "done": 4, "q_ready": 5,
        "merge_fenced": 6, "ml_loaded": 8, "weighted": 9, "states_done": 10, "fenced": 11,
        "rows_known": 12, "kv_issued": 13}

_source = _modules.source
_modules.source = lambda: "#define FLASHDEC_TRACE 1\n" + _source()


def graph_us(fn, flush, reps=30) -> float:
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        flush_l2(flush)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return float(np.median(times)), g


MERGE_POINTS = ("merge_fenced", "ml_loaded", "weighted")


def flush_l2(buf: torch.Tensor | None) -> None:
    """Evict K/V from L2 by reading (not writing: dirty lines would be written back to HBM
    while the kernel reads) a buffer several times the L2's size; None keeps L2 warm."""
    if buf is not None:
        buf.max()


def pct(x, q):
    return float(np.percentile(x, q)) / 1e3


def case(spec: str, splits: int | None, flush: torch.Tensor) -> None:
    q, k, v, out, scales = make_case(spec)
    b, _, hkv, klen, d = map(int, spec.split(",")[:5])
    p = flashdec.plan(q, k, v, out, backend="cuda", num_splits=splits, **scales)
    launch = p._runner.fast
    us, g = graph_us(lambda: p.run(q, k, v, out), flush)
    err, dptr, size = _driver.driver.cuModuleGetGlobal(launch.kernel.func.module, b"flashdec_trace")
    _driver.check(err, "cuModuleGetGlobal")
    _driver.check(_driver.driver.cuMemsetD32(dptr, 0, size // 4)[0], "cuMemsetD32")
    flush_l2(flush)
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    n = launch.kernel.grid[0] * launch.kernel.grid[1] * launch.kernel.grid[2]
    host = np.zeros((n, 16), dtype=np.uint64)
    _driver.check(_driver.driver.cuMemcpyDtoH(host.ctypes.data, dptr, host.nbytes)[0], "DtoH")
    t = host[:, :15].astype(np.int64)
    t0 = t[:, 0].min()
    rel = {name: t[:, SLOT[name]] - t0 for name in POINTS}
    end = rel["done"].max()
    merging = t[:, SLOT["merge_fenced"]] != 0
    kv_mb = 2 * b * hkv * klen * d * k.element_size() / 1e6
    print(f"\n== {spec} {launch.spec.name_expression.split('::')[1]} grid {launch.kernel.grid} "
          f"splits {launch.split.num_splits} x {launch.split.split_rows} rows, {kv_mb:.1f} MB")
    print(f"graph replay (events): {us:.1f} us; kernel span (first entry -> last done): "
          f"{end / 1e3:.1f} us; outside the span: {us - end / 1e3:.1f} us")
    print("point        min    p10    p50    p90    max  (us from the first CTA's entry)")
    for name in POINTS:
        x = rel[name]
        if name in MERGE_POINTS:
            x = x[merging]
        print(f"{name:10s} {pct(x, 0):6.1f} {pct(x, 10):6.1f} {pct(x, 50):6.1f} {pct(x, 90):6.1f} "
              f"{pct(x, 100):6.1f}")
    steps = [(f"{a}->{c}", a, c) for a, c in zip(POINTS, POINTS[1:])
             if a not in ("published", "merge_fenced", "ml_loaded", "weighted")]
    steps += [("published->done", "published", "done")]
    print("step               p10    p50    p90    max")
    for label, a, bname in steps:
        x = rel[bname] - rel[a]
        print(f"{label:16s} {pct(x, 10):6.2f} {pct(x, 50):6.2f} {pct(x, 90):6.2f} {pct(x, 100):6.2f}")
    print("last CTAs (merge), us:       p10    p50    p90    max")
    for a, c in zip(("published",) + MERGE_POINTS, MERGE_POINTS + ("done",)):
        x = (rel[c] - rel[a])[merging]
        print(f"  {a + '->' + c:26s} {pct(x, 10):6.2f} {pct(x, 50):6.2f} {pct(x, 90):6.2f} {pct(x, 100):6.2f}")
    last = np.argmax(rel["done"])
    print(f"last CTA to finish: #{last} on SM {host[last, 15]}, entry {rel['entry'][last] / 1e3:.1f}, "
          f"loop done {rel['loop_done'][last] / 1e3:.1f}, published {rel['published'][last] / 1e3:.1f}, "
          f"done {rel['done'][last] / 1e3:.1f} us; last publish overall "
          f"{rel['published'].max() / 1e3:.1f} us")
    sms = np.bincount(host[:, 15].astype(np.int64), minlength=132)
    print(f"CTAs per SM: min {sms.min()} max {sms.max()}; distinct entry stamps "
          f"{len(np.unique(t[:, 0]))} (timer resolution check)")


def main() -> None:
    torch.manual_seed(0)
    flush = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    if "--warm" in sys.argv:
        sys.argv.remove("--warm")
        flush = None
    tiny = torch.zeros(1, device="cuda")
    floor, _ = graph_us(lambda: tiny.add_(1), flush)
    print(f"one-element kernel, graph replay (events): {floor:.1f} us")
    args = sys.argv[1:] or ["1,32,8,4096,128", "1,32,8,32768,128", "16,32,8,1024,128"]
    for a in args:
        spec, _, splits = a.partition(":")
        case(spec, int(splits) if splits else None, flush)


if __name__ == "__main__":
    main()
