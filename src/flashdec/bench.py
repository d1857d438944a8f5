"""``python -m flashdec bench``: flashdec against torch SDPA backends on the same GPU, same run.

Method (DESIGN.md section 4): CUDA events, median of many runs after warm-up, cold L2 by
rotating input sets whose total is >= 4x the L2, eager (a plain Python loop, host dispatch
included) and CUDA-graph replay (GPU time). Bandwidth is K+V+Q+Y bytes over time, compared
with a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

# (batch, num_heads, num_kv_heads, kv_len, head_dim): the DESIGN.md table.
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
QUICK_SHAPES = DESIGN_SHAPES[:2] + DESIGN_SHAPES[4:5]
L2_ROTATION_BYTES = 4 * 50 * 2**20


@dataclass
class Row:
    shape: tuple
    impl: str
    mode: str
    us: float
    tbps: float
    pct_copy: float


def _time(fn: Callable[[int], None], sets: int, graph: bool, iters: int = 60) -> float:
    """Median microseconds per call of fn(i) over rotating input sets."""
    import torch

    for i in range(3 * sets):  # warm-up: compile, load, first touch
        fn(i % sets)
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for i in range(sets):
                fn(i)
        torch.cuda.synchronize()
        g.replay()
        torch.cuda.synchronize()
        per = sets
        call = g.replay
    else:  # a plain Python loop over every input set: host dispatch included
        per = sets

        def call():
            for i in range(sets):
                fn(i)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / per)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _time(lambda i: dst.copy_(src), 1, graph=False, iters=20)
    return 2 * n / (us * 1e-6)


def _implementations(q, k, v, out):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashdec

    impls = {}
    p = flashdec.plan(q[0], k[0], v[0], out[0], backend="cuda")
    impls["flashdec"] = lambda i: p.run(q[i], k[i], v[i], out[i])
    for name, which in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                        ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def sdpa(i, which=which):
            with sdpa_kernel([which]):
                return F.scaled_dot_product_attention(q[i].unsqueeze(2), k[i], v[i],
                                                      enable_gqa=True)
        impls[name] = sdpa
    return impls


def run(shapes=DESIGN_SHAPES, dtype: str = "bfloat16", modes=("eager", "graph")) -> dict:
    import torch

    copy_bps = copy_bandwidth()
    rows: list[Row] = []
    for shape in shapes:
        b, hq, hkv, klen, d = shape
        item = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        nbytes = (2 * b * hkv * klen * d + 2 * b * hq * d) * item
        sets = max(1, math.ceil(L2_ROTATION_BYTES / nbytes))
        gen = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, device="cuda", generator=gen, dtype=getattr(torch, dtype))
        q = [mk(b, hq, d) for _ in range(sets)]
        k = [mk(b, hkv, klen, d) for _ in range(sets)]
        v = [mk(b, hkv, klen, d) for _ in range(sets)]
        out = [torch.empty(b, hq, d, device="cuda", dtype=q[0].dtype) for _ in range(sets)]
        for name, fn in _implementations(q, k, v, out).items():
            for mode in modes:
                try:
                    us = _time(fn, sets, graph=(mode == "graph"))
                except Exception as exc:  # a peer that cannot run this shape
                    print(f"# {name} {mode} {shape}: {type(exc).__name__}: {exc}")
                    continue
                tbps = nbytes / (us * 1e-6) / 1e12
                rows.append(Row(shape, name, mode, us, tbps, 100 * tbps * 1e12 / copy_bps))
        del q, k, v, out
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "dtype": dtype,
            "copy_tbps": copy_bps / 1e12, "rows": [asdict(r) for r in rows]}


def format_table(result: dict) -> str:
    lines = [f"# {result['device']}, {result['dtype']}, copy bandwidth "
             f"{result['copy_tbps']:.2f} TB/s (read + write)",
             "| B,H_q,H_kv,K,D | impl | mode | us | TB/s | % copy | speedup vs best peer |",
             "|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for r in rows:
        peers = [x["us"] for x in rows if x["shape"] == r["shape"] and x["mode"] == r["mode"]
                 and x["impl"] != "flashdec"]
        speed = f"{min(peers) / r['us']:.2f}x" if r["impl"] == "flashdec" and peers else ""
        shape = ",".join(map(str, r["shape"]))
        lines.append(f"| {shape} | {r['impl']} | {r['mode']} | {r['us']:.1f} | {r['tbps']:.2f} "
                     f"| {r['pct_copy']:.0f}% | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flashdec bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    result = run(QUICK_SHAPES if args.quick else DESIGN_SHAPES, args.dtype)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
