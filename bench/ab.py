"""A/B timing of cuda-backend variants on one shape, interleaved in one process, each twice.

    PYTHONPATH=src:bench python3 bench/ab.py "B,Hq,Hkv,K,D[,kv_dtype[,q_dtype]]" VARIANT ...

A variant is a comma-free list of ``key=value`` settings joined by ``+`` (``auto`` for the
plan as shipped):
    splits=N       num_splits
    combine=0|1    merge in the split kernel's last CTA (0) or in combine_kernel (1)
    qvec=0|1       Q tile by plain loads (0) or as the first cp.async group (1)
    ctas=N,stages=N  the MMA kernel sized for N CTAs/SM with N ring stages
    simt=1         the 16-byte SIMT kernel instead of the MMA kernel
    base=1         the kernel compiled from the decode.cu at $AB_BASE_SOURCE (an older version
                   with the same parameter struct) instead of the tree's
e.g. ``auto splits=16 splits=16+combine=1 ctas=3+stages=2``. Prints graph-replay us per
variant and round (cold L2, median of 50), then the min of the two rounds.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys

import torch

import flashdec
from case import make_case
from flashdec.backends.cuda import _driver, _kernels, _launch, _modules
from flashdec.bench import rotation_sets, time_samples


def _parse(text: str) -> dict:
    if text == "auto":
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in text.split("+"))}


def build(case: tuple, sets: list, settings: dict):
    """A plan of the case with ``settings`` applied to its launch; fn(i) runs input set i."""
    q, k, v, out, scales = case
    p = flashdec.plan(q, k, v, out, backend="cuda", num_splits=settings.get("splits"), **scales)
    runner = p._runner
    spec = runner.fast.spec
    if "ctas" in settings or "stages" in settings:
        spec = dataclasses.replace(spec, ctas_per_sm=settings.get("ctas", spec.ctas_per_sm),
                                   stages=settings.get("stages", spec.stages))
    if settings.get("simt"):
        vec = 16 // runner.problem.dtype.itemsize
        spec = _kernels._simt(runner.problem.dtype, runner.problem.kv_dtype, vec,
                              runner.problem.head_dim,
                              _kernels._simt_group_tile(runner.problem.group_size))
    if spec is not runner.fast.spec:
        runner.fast = _launch.Launch(runner, spec, settings.get("splits"))
    launch = runner.fast
    if "combine" in settings:
        on = bool(settings["combine"]) and launch.split.num_splits > 1
        launch.split = dataclasses.replace(launch.split, combine=on)
        launch.params.combine = int(on)
        launch.combine = None
        if on:
            problem = runner.problem
            fn = _modules.load_kernel(_kernels.combine_kernel(problem.dtype, problem.head_dim),
                                        runner.device)
            launch.combine = _driver.LaunchEx(
                runner.device, fn, _kernels.combine_grid(problem, launch.spec, launch.split),
                _kernels.THREADS, dependent=True)
    if "qvec" in settings:
        launch.params.q_vector = settings["qvec"]
    if settings.get("base"):
        from flashdec.backends.cuda._compiler import compile_cubin

        name = launch.spec.name_expression
        with open(os.environ["AB_BASE_SOURCE"]) as f:
            module = compile_cubin(f.read(), [name], runner.device.arch, source_name="base.cu")
        fn = _driver.load_function(runner.device, module.cubin, module.symbols[name], name,
                                   launch.spec.smem_bytes)
        launch.kernel = _driver.LaunchEx(runner.device, fn, launch.kernel.grid, _kernels.THREADS)
    qs, ks, vs, outs = sets
    label = (f"{type(launch.spec).__name__[:4]} ctas={launch.spec.ctas_per_sm} "
             f"splits={launch.split.num_splits} combine={int(launch.split.combine)} "
             f"qvec={launch.params.q_vector}")
    return (lambda i: p.run(qs[i], ks[i], vs[i], outs[i])), label


def main(argv: list[str]) -> None:
    shape, variants = argv[0], argv[1:] or ["auto"]
    case = make_case(shape)
    q, k, v, out, scales = case
    nbytes = k.numel() * k.element_size() * 2
    n = rotation_sets(nbytes, nbytes)
    sets = ([q] + [torch.randn_like(q) for _ in range(n - 1)],
            [k] + [torch.randn(k.shape, device="cuda", dtype=q.dtype).to(k.dtype)
                   for _ in range(n - 1)],
            [v] + [torch.randn(v.shape, device="cuda", dtype=q.dtype).to(v.dtype)
                   for _ in range(n - 1)],
            [torch.empty_like(out) for _ in range(n)])
    built = [build(case, sets, _parse(text)) for text in variants]
    ref = None
    for fn, label in built:  # every variant computes the same Y (to bf16 rounding)
        sets[3][0].fill_(float("nan"))
        fn(0)
        torch.cuda.synchronize()
        y = sets[3][0].float()
        assert not y.isnan().any(), f"{label}: unwritten or NaN output"
        if ref is None:
            ref = y
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, f"{label}: differs from the first variant by {err}"
    times = {text: [] for text in variants}
    for _ in range(2):
        for text, (fn, _) in zip(variants, built):
            times[text].append(statistics.median(time_samples(fn, n, True)))
    floor = nbytes / 4.2e12 * 1e6
    print(f"## {shape}  KV {nbytes / 1e6:.1f} MB  floor(4.2 TB/s) {floor:.1f} us")
    for text, (_, label) in zip(variants, built):
        t = times[text]
        print(f"  {text:28s} {label:48s} {t[0]:8.2f} {t[1]:8.2f}  min {min(t):8.2f} "
              f"({100 * floor / min(t):.0f}%)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
