"""``python -m flashdec``: ``info`` (versions, backends, devices, cache), ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import __version__, _env, available_backends, decode
from ._errors import FlashDecError
from .reference import decode_reference

# Llama-3-8B decode: 32 query heads sharing 8 KV heads of width 128, a 4096-token cache.
DEMO_SHAPE = dict(batch=1, num_heads=32, num_kv_heads=8, kv_len=4096, head_dim=128)


def _devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["cpu"]
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return found


def cmd_info(_: argparse.Namespace) -> int:
    print(f"flashdec {__version__} (Python {sys.version.split()[0]})")
    print(f"backend choice: {_env.backend_choice()}  (FLASHDEC_BACKEND)")
    for name, (ok, why) in available_backends().items():
        print(f"  {name:6s} {'available' if ok else 'unavailable: ' + why}")
    print(f"devices: {', '.join(_devices())}")
    print(f"kernel cache: {_env.cache_dir()}  (FLASHDEC_CACHE_DIR)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    s = DEMO_SHAPE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q = torch.randn(s["batch"], s["num_heads"], s["head_dim"], generator=gen).to(device, dtype)
    kv_shape = (s["batch"], s["num_kv_heads"], s["kv_len"], s["head_dim"])
    k = torch.randn(kv_shape, generator=gen).to(device, dtype)
    v = torch.randn(kv_shape, generator=gen).to(device, dtype)
    from ._api import plan

    p = plan(q, k, v, backend=args.backend)
    out = p.run(q, k, v)  # warm-up: kernel load, first-touch
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        p.run(q, k, v, out)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed_us = (time.perf_counter() - start) / args.iters * 1e6
    ref = decode_reference(*(t.float().cpu().double().numpy() for t in (q, k, v)))
    err = float(np.abs(out.float().cpu().double().numpy() - ref).max())
    shape = ", ".join(f"{k}={v}" for k, v in s.items())
    print(f"flashdec demo: {shape}, {args.dtype} on {device}")
    print(f"backend: {p.backend.name}")
    print(f"time: {elapsed_us:.1f} us/call (mean of {args.iters}, host wall clock)")
    print(f"max |error| vs float64 reference: {err:.3e} (max |ref| {np.abs(ref).max():.3f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashdec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends, devices, cache directory")
    demo = sub.add_parser("demo", help="a Llama-3-8B-shaped decode on the default backend")
    demo.add_argument("--backend", default=None, help="auto, torch or cuda (default: FLASHDEC_BACKEND)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    demo.add_argument("--iters", type=int, default=20)
    sub.add_parser("bench", add_help=False,
                   help="flashdec vs torch SDPA, FlexDecoding and the torch backend on the GPU; "
                        "--plot JSON --png PATH redraws a plot without one (see bench --help)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main
        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"info": cmd_info, "demo": cmd_demo}[args.command](args)
    except (FlashDecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
