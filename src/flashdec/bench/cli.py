"""``python -m flashdec bench``'s command line (:func:`main`): measure on this GPU and print the
table, or, with ``--plot JSON``, show a results file without one."""

from __future__ import annotations

import sys

from .host import HOST_CALLS
from .peers import DEFAULT_PEERS, PEERS
from .probe import gpu_unavailable_reason
from .report import MissingMatplotlib, format_table, plot, require_matplotlib
from .results import read_json
from .rows import canonical_dtype, default_shapes, parse_shapes
from .runner import run
from .timing import ITERS


def main(argv: list[str] | None = None) -> int:
    """Run ``bench`` with ``argv`` (default ``sys.argv[2:]``); returns the exit status (2: an
    error it reported on stderr; argparse exits on a usage error)."""
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
    parser.add_argument("--paged", choices=("auto", "yes", "no"), default="auto",
                        help="the paged-KV section (paged vs contiguous cache, SDPA on the "
                             "gathered cache, a ragged paged batch); auto: with the built-in "
                             "full row set only")
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
            result = read_json(args.plot)
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
        canonical_dtype(args.dtype)
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
    paged = args.paged == "yes" or (args.paged == "auto" and not args.quick and not args.shapes)
    result = run(shapes, ["flashdec"] + peers, iters=args.iters, host_calls=args.host_calls,
                 json_path=args.json, argv=["bench"] + argv, paged=paged)
    print(format_table(result))
    if args.png:
        plot(result, args.png)
        print(f"plot: {args.png}", file=sys.stderr)
    return 0
