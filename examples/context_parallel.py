"""Context-parallel decode: each rank holds a contiguous shard of one long sequence's KV cache;
every rank gets the attention over the whole sequence.

    torchrun --nproc-per-node 2 examples/context_parallel.py            # GPUs (NCCL)
    torchrun --nproc-per-node 2 examples/context_parallel.py --cpu      # CPUs (gloo)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import flashdec
from flashdec.distributed import context_parallel_decode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="gloo on CPUs instead of NCCL")
    parser.add_argument("--kv-len", type=int, default=131072, help="keys of the whole sequence")
    args = parser.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if args.cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if not args.cpu:
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)  # the same Q on every rank
    q = torch.randn(1, 32, 128, device=device, dtype=dtype, generator=gen)
    shard = args.kv_len // world  # this rank's keys: [rank * shard, (rank + 1) * shard)
    gen.manual_seed(1 + rank)
    k = torch.randn(1, 8, shard, 128, device=device, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    seqlens = torch.full((1,), shard, dtype=torch.int32, device=device)
    y = context_parallel_decode(q, k, v, seqlens=seqlens)
    # check on rank 0 against one decode over the gathered cache
    ks = [torch.empty_like(k) for _ in range(world)]
    vs = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(ks, k)
    dist.all_gather(vs, v)
    if rank == 0:
        whole = flashdec.decode(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2))
        err = ((y.float() - whole.float()).abs().max() / whole.float().abs().max()).item()
        print(f"{world} ranks x {shard} keys: relative difference to one decode {err:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
