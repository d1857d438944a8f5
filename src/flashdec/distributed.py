"""Decode across processes with torch.distributed (NCCL on GPUs, gloo on CPUs; imported
lazily, no new dependency).

- :func:`context_parallel_decode`: each rank holds a shard of every sequence's keys; it
  decodes its shard with LSE, the ranks exchange their ``(Y, LSE)`` states in one
  all-gather, and every rank merges them in rank order (:func:`flashdec.merge_states`), so
  the result is deterministic and identical on every rank.
- :func:`head_shard`: the query and KV heads a rank holds in tensor parallelism, keeping each KV
  head with its query heads; tensor-parallel decode is then plain :func:`flashdec.decode` on
  the rank's heads.
"""

from __future__ import annotations

from typing import Any

from ._api import decode, merge_states
from ._errors import ContractError

__all__ = ["context_parallel_decode", "head_shard"]


def context_parallel_decode(q: Any, k_shard: Any, v_shard: Any, *, group: Any = None,
                            seqlens: Any = None, return_lse: bool = False,
                            **decode_kwargs: Any) -> Any:
    """Attention of ``q`` over the keys of all ranks' shards, on every rank of ``group``.

    Each rank passes the same ``q`` [B, H_q, D] and its own shard of the cache: K/V
    ``[B, H_kv, K_shard, D]`` (or a paged pool with ``block_table=``), with ``seqlens`` [B]
    the live keys of each sequence *in this shard* (0 for a sequence with no keys here: that
    rank's state weighs nothing). Shards may differ in length and position; together they must
    hold each sequence's keys once. Every :func:`flashdec.decode` keyword applies per shard
    (``softcap``, ``scale``, fp8 scales, ``cache_leftpad``...); a sliding window over the whole
    sequence is a per-shard ``cache_leftpad``: ``clamp(L - 1 - window_left - shard_start, 0)``
    with L the sequence's total length.

    One collective per call: an all-gather of each rank's state, packed in one byte buffer that
    decode writes directly (``out=``, ``lse_out=``): Y in ``q``'s dtype and LSE in float32,
    about B * H_q * (D * itemsize + 4) bytes per rank (so a bf16 or fp16 part is rounded once
    to its dtype before the merge, as decode's own Y is). Then one merge kernel, in fp32, writes the
    result in ``q``'s dtype. No other kernel: the combine is the collective and the merge.
    Capturable in a CUDA graph with NCCL (the collective runs on the current stream).

    Returns
    -------
    Y in ``q``'s dtype, or ``(Y, LSE)`` with ``return_lse``: the same values on every rank.
    """
    import torch
    import torch.distributed as dist

    if not isinstance(q, torch.Tensor):
        raise ContractError(f"context_parallel_decode takes torch tensors, got q of "
                            f"{type(q).__name__}")
    for name in ("out", "lse_out"):
        if name in decode_kwargs:
            raise ContractError(f"context_parallel_decode writes its shard's state itself; "
                                f"{name}= is not taken")
    if not dist.is_available() or not dist.is_initialized():
        raise ContractError("context_parallel_decode needs torch.distributed initialised "
                            "(torch.distributed.init_process_group)")
    if q.dim() != 3:
        raise ContractError(f"q must be [batch, num_heads, head_dim], got shape "
                            f"{tuple(q.shape)}")
    world = dist.get_world_size(group)
    # one rank's state: Y, then (16-byte aligned) LSE, in bytes
    rows = q.shape[0] * q.shape[1]
    y = slice(0, rows * q.shape[-1] * q.element_size())
    lse = slice(_aligned(y.stop), _aligned(y.stop) + rows * 4)
    state = torch.empty(_aligned(lse.stop), dtype=torch.uint8, device=q.device)
    gathered = torch.empty(world * state.numel(), dtype=torch.uint8, device=q.device)
    parts = gathered.view(world, -1)
    decode(q, k_shard, v_shard, seqlens=seqlens, return_lse=True,
           out=_unpack(state[y], q.dtype, q.shape),
           lse_out=_unpack(state[lse], torch.float32, q.shape[:2]), **decode_kwargs)
    # all_gather_single is the newer torch's name for all_gather_into_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, state, group=group)
    out, out_lse = merge_states(_unpack(parts[:, y], q.dtype, q.shape),
                                _unpack(parts[:, lse], torch.float32, q.shape[:2]))
    return (out, out_lse) if return_lse else out


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to 16, so each packed piece starts 16-byte aligned."""
    return -(-nbytes // 16) * 16


def _unpack(raw: Any, dtype: Any, shape: Any) -> Any:
    """The bytes ``raw`` ([n] or [world, n], uint8) read as ``dtype`` in ``shape`` (after the
    leading world axis, if any)."""
    return raw.view(dtype).view(*raw.shape[:-1], *shape)


def head_shard(num_heads: int, num_kv_heads: int, world_size: int,
               rank: int) -> tuple[slice, slice]:
    """(query heads, KV heads) that ``rank`` of ``world_size`` holds in tensor parallelism:
    contiguous blocks of ``num_kv_heads / world_size`` KV heads with their query heads
    (``kv_head = q_head // (H_q // H_kv)``, as in decode). A sharding that would split a KV head
    from its query heads (``num_kv_heads`` not a multiple of ``world_size``) is refused;
    replicate the KV heads first (``repeat_interleave`` on the head axis) to shard wider.

    Example: ``q_heads, kv_heads = head_shard(32, 8, 4, rank)`` then
    ``decode(q[:, q_heads], k[:, kv_heads], v[:, kv_heads])`` on each rank."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ContractError(f"{name} must be an int >= 1, got {value!r}")
    if num_heads % num_kv_heads:
        raise ContractError(f"num_heads {num_heads} must be a multiple of num_kv_heads "
                            f"{num_kv_heads}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ContractError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if num_kv_heads % world_size:
        raise ContractError(f"{num_kv_heads} KV heads cannot be split evenly over {world_size} "
                            f"ranks without separating a KV head from its query heads; "
                            f"replicate the KV heads to a multiple of {world_size} first")
    kv = num_kv_heads // world_size
    group = num_heads // num_kv_heads
    return (slice(rank * kv * group, (rank + 1) * kv * group), slice(rank * kv, (rank + 1) * kv))
