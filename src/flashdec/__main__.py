"""``flashdec`` / ``python -m flashdec``: ``info``, ``demo``, ``precompile``, ``bench``,
``serve``."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time

import numpy as np

from . import __version__, _env, available_backends, plan, precompile
from ._errors import FlashDecError
from ._registry import check_choice
from .reference import decode_reference

# Llama-3-8B decode: 32 query heads sharing 8 KV heads of width 128, a 4096-token cache.
DEMO_SHAPE = dict(batch=1, num_heads=32, num_kv_heads=8, kv_len=4096, head_dim=128)

DESCRIPTION = ("FlashDecoding attention for one query token over a KV cache: the installed "
               "version and backends (info), a Llama-3-8B-shaped decode (demo), kernels "
               "compiled into the disk cache ahead of time (precompile), the GPU "
               "benchmark (bench), and an OpenAI-compatible server (serve).")


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
    """Everything it can say; exit status 2 when FLASHDEC_BACKEND is invalid (every decode
    would fail)."""
    print(f"flashdec {__version__} (Python {sys.version.split()[0]})")
    status = 0
    try:
        choice = check_choice()
    except FlashDecError as exc:
        choice, status = "invalid (see the error below)", 2
        print(f"error: {exc}", file=sys.stderr)
    print(f"backend choice: {choice}  ({_env.ENV_BACKEND})")
    for name, (ok, why) in available_backends().items():
        print(f"  {name:6s} {'available' if ok else 'unavailable: ' + why}")
    print(f"devices: {', '.join(_devices())}")
    print(f"cache: {_env.cache_dir()}  ({_env.ENV_CACHE_DIR})")
    return status


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


def cmd_precompile(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in (*_PRECOMPILE_ARGS, "arch")
             if getattr(args, name) is not None}
    count = precompile(**given, progress=True)
    print(f"{count} kernels in {_env.cache_dir() / 'kernels'}")
    return 0


# what ``serve`` imports beyond the library (the ``serve`` extra)
SERVE_MODULES = ("fastapi", "uvicorn", "torch", "transformers")


def cmd_serve(args: argparse.Namespace) -> int:
    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: serve needs {', '.join(missing)}: pip install \"flashdec[serve]\"",
              file=sys.stderr)
        return 2
    from .serve.server import serve
    try:
        return serve(args)
    except OSError as exc:  # e.g. a model path that is not there
        print(f"error: {exc}", file=sys.stderr)
        return 2


# precompile's list arguments, as the command line spells them (defaults: the function's own)
_PRECOMPILE_ARGS = {"dtypes": str, "head_dims": int, "group_sizes": int, "kv_dtypes": str}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {value}")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"flashdec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends, devices, cache directory")
    demo = sub.add_parser("demo", help="a Llama-3-8B-shaped decode on the default backend")
    demo.add_argument("--backend", default=None, help="auto, torch or cuda (default: FLASHDEC_BACKEND)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    demo.add_argument("--iters", type=_positive_int, default=20, help="timed calls (>= 1)")
    pre = sub.add_parser("precompile", help="compile the cuda kernels into the disk cache "
                                            "(image builds; no GPU needed with --arch)",
                         description="Compile the cuda backend's kernels for these problems "
                                     "into the kernel cache (FLASHDEC_CACHE_DIR); exits "
                                     "non-zero if an argument is wrong or the cache cannot be "
                                     "written.")
    defaults = inspect.signature(precompile).parameters
    for name, kind in _PRECOMPILE_ARGS.items():
        default = defaults[name].default
        shown = "each dtype itself" if default is None else " ".join(map(str, default))
        pre.add_argument(f"--{name.replace('_', '-')}", nargs="+", type=kind, default=None,
                         metavar=name.upper().rstrip("S"), help=f"default: {shown}")
    pre.add_argument("--arch", default=None, help="e.g. sm_90 (default: GPU 0's)")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text "
                                       "completions) over flashdec's batching decode engine",
                         description="Serve a model over HTTP with OpenAI's API "
                                     "(/v1/chat/completions, /v1/completions, /v1/models, "
                                     "/health); Ctrl-C stops it. Needs the serve extra.")
    srv.add_argument("--model", default=None, metavar="PATH_OR_NAME",
                     help="a model directory or name (default: SmolLM2-135M-Instruct)")
    srv.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    srv.add_argument("--port", type=_port, default=8000, help="default: 8000 (0: any free port)")
    srv.add_argument("--attn", default="flashdec", choices=["flashdec", "sdpa"],
                     help="the decode attention (default: flashdec)")
    srv.add_argument("--device", default=None, choices=["cpu", "cuda"],
                     help="default: cuda if there is a GPU, else cpu")
    srv.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="default: the model loader's choice for the device")
    srv.add_argument("--max-batch", type=_positive_int, default=8,
                     help="sequences decoded together (default: 8)")
    srv.add_argument("--max-seq-len", type=_positive_int, default=2048,
                     help="prompt + generated tokens per request (default: 2048)")
    srv.add_argument("--max-queue", type=_positive_int, default=64,
                     help="requests held at once, running and waiting; more get 503 "
                          "(default: 64)")
    sub.add_parser("bench", add_help=False,
                   help="flashdec vs torch SDPA, FlexDecoding and the torch backend on the GPU; "
                        "--plot JSON --png PATH redraws a plot without one (see bench --help)")
    return parser


def main(argv: list[str] | None = None, prog: str = "flashdec") -> int:
    """The command line; ``prog`` is how the help names it (the console script, or
    ``python -m flashdec``)."""
    if argv is None:
        argv = sys.argv[1:]
    parser = _parser(prog)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main
        try:
            return bench_main(argv[1:])
        except (FlashDecError, OSError) as exc:  # e.g. an unwritable --png or --json
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    commands = {"info": cmd_info, "demo": cmd_demo, "precompile": cmd_precompile,
                "serve": cmd_serve}
    try:
        return commands[args.command](args)
    except (FlashDecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(prog="python -m flashdec"))
