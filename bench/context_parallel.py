"""Context-parallel decode on the GPUs of one host against one GPU: B=1, H_q=32, H_kv=8,
D=128, bf16, K_len 128K, 512K and 1M. Each rank holds K_len / world keys; rank 0 also runs the
whole sequence alone (where it fits) and checks the result against the CP result.

Each timed piece is captured in a CUDA graph (the NCCL all-gather included: it runs on the
capturing stream) and replayed REPS times back to back between two CUDA events (each replay
waits for the one before, as a layer waits for its attention); a sample is their mean, the
ranks lined up by a barrier before each; median of 50 samples. Itemised: the whole CP call,
its local decode with LSE, the combine (the call less its decode), and alone: the all-gather
of the packed (Y, LSE) bytes and the merge; one GPU's decode of the whole sequence. The eager
CP call (host launch costs included, GPU idle at the start) is printed beside it.

    torchrun --nproc-per-node 2 bench/context_parallel.py [K_len ...]
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Callable

import torch
import torch.distributed as dist

import flashdec
from flashdec.distributed import context_parallel_decode

ITERS = 50
REPS = 10


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_us(fn: Callable[[], object], barrier: bool = True, reps: int = REPS) -> float:
    """Median over samples of the mean us of ``reps`` back-to-back calls of ``fn``, by CUDA
    events; ``barrier``: all ranks line up before each sample (off for rank 0 timing alone)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if barrier:
            dist.barrier()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(samples)


def main(lengths: list[int]) -> None:
    rank = int(os.environ.get("RANK", 0))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size()
    for kv_len in lengths:
        shard = kv_len // world
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, 32, 128, device=device, dtype=torch.bfloat16, generator=gen)
        gen.manual_seed(1 + rank)
        k = torch.randn(1, 8, shard, 128, device=device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        seqlens = torch.full((1,), shard, dtype=torch.int32, device=device)
        y = context_parallel_decode(q, k, v, seqlens=seqlens)
        # the pieces alone, on buffers of the call's sizes: Y bf16 + LSE fp32 per rank
        state = torch.empty(32 * (128 * 2 + 4), dtype=torch.uint8, device=device)
        gathered = torch.empty(world * state.numel(), dtype=torch.uint8, device=device)
        y_parts = torch.randn(world, 1, 32, 128, device=device, dtype=torch.bfloat16)
        lse_parts = torch.randn(world, 1, 32, device=device)
        eager = time_us(lambda: context_parallel_decode(q, k, v, seqlens=seqlens), reps=1)
        times = {
            "context-parallel call": time_us(graphed(
                lambda: context_parallel_decode(q, k, v, seqlens=seqlens))),
            "local decode (LSE)": time_us(graphed(
                lambda: flashdec.decode(q, k, v, seqlens=seqlens, return_lse=True))),
        }
        times["combine"] = times["context-parallel call"] - times["local decode (LSE)"]
        times["all-gather alone"] = time_us(graphed(
            lambda: dist.all_gather_into_tensor(gathered, state)))
        times["merge alone"] = time_us(graphed(lambda: flashdec.merge_states(y_parts, lse_parts)))
        ks = [torch.empty_like(k) for _ in range(world)]
        vs = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(ks, k)
        dist.all_gather(vs, v)
        if rank == 0:
            line = f"K={kv_len} ({world} GPUs, {shard} keys each): "
            try:
                kk, vv = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
                whole = flashdec.decode(q, kk, vv)
                err = ((y.float() - whole.float()).abs().max() / whole.float().abs().max()).item()
                one = time_us(graphed(lambda: flashdec.decode(q, kk, vv)), barrier=False)
                line += (f"one GPU {one:.1f} us, CP {times['context-parallel call']:.1f} us, "
                         f"speedup {one / times['context-parallel call']:.2f}x, "
                         f"max |CP - one GPU| / max |one GPU| {err:.2e}; ")
                del kk, vv
            except torch.OutOfMemoryError:
                line += "one GPU: does not fit; "
            print(line + ", ".join(f"{n} {t:.1f} us" for n, t in times.items())
                  + f"; eager CP call {eager:.1f} us", flush=True)
        del ks, vs
        torch.cuda.empty_cache()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [131072, 524288, 1048576])
