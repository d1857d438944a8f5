"""The implementations a row is timed on: flashdec (cuda backend; its torch backend as the
error column's reference) and its peers, torch SDPA pinned to cuDNN and to FlashAttention-2,
the Triton split-KV decode of :mod:`flashdec.bench.triton_peer` and FlexDecoding. Each is built
for one row's input sets (:func:`make_inputs`) as an :class:`Impl` by :func:`build_impl`, which
never raises: what cannot run is an ``n/a`` with a one-line reason (:func:`na_reason`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .._dtypes import DType
from .rows import Shape

IMPLS = ("flashdec", "sdpa-cudnn", "sdpa-flash", "triton", "flex", "flashdec-torch")
PEERS = IMPLS[1:]                          # what --peers accepts
# The default run: FlexDecoding only on request (10-30x slower, minutes of compile per run).
DEFAULT_PEERS = ("sdpa-cudnn", "sdpa-flash", "triton", "flashdec-torch")
DEFAULT_IMPLS = ("flashdec",) + DEFAULT_PEERS
SDPA_IMPLS = ("sdpa-cudnn", "sdpa-flash")
RIVALS = SDPA_IMPLS + ("triton", "flex")   # "best peer" for speedups: not flashdec's own torch
LABELS = {"flashdec": "flashdec", "sdpa-cudnn": "SDPA cuDNN", "sdpa-flash": "SDPA FA2",
          "triton": "Triton split-KV", "flex": "FlexDecoding", "flashdec-torch": "flashdec torch"}


@dataclass
class Inputs:
    """``sets`` input sets of one row on ``device``; ``seqlens`` is the int32 tensor [B] shared
    by all sets (ragged rows), ``lengths`` its host copy."""

    shape: Shape
    sets: int
    q: list
    k: list
    v: list
    out: list
    seqlens: Any = None
    lengths: list[int] | None = None
    k_scale: float | None = None
    v_scale: float | None = None
    device: str = "cuda"


def make_inputs(shape: Shape, sets: int, device: str = "cuda", seed: int = 0) -> Inputs:
    """Random normal Q, K, V (K/V cast to fp8 for fp8 rows, scales 1.0), empty Y."""
    import torch

    dt, kv_dt = (getattr(torch, DType(name).torch_name) for name in (shape.dtype, shape.kv_dtype))
    gen = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, klen, d = shape.batch, shape.heads, shape.kv_heads, shape.kv_len, shape.head_dim

    def kv():
        return torch.randn(b, hkv, klen, d, device=device, dtype=dt, generator=gen).to(kv_dt)

    q = [torch.randn(b, hq, d, device=device, dtype=dt, generator=gen) for _ in range(sets)]
    k = [kv() for _ in range(sets)]
    v = [kv() for _ in range(sets)]
    out = [torch.empty(b, hq, d, device=device, dtype=dt) for _ in range(sets)]
    lengths = shape.seqlens()
    seqlens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = 1.0 if shape.fp8 else None
    return Inputs(shape, sets, q, k, v, out, seqlens, lengths, scale, scale, device)


@dataclass
class Impl:
    """A runnable implementation for one row: ``fn(i)`` runs on input set ``i`` and returns Y
    (any shape holding [B, H_q, D]); ``na`` says why it cannot run; timing happens inside
    ``context()`` (e.g. the SDPA backend pin, so its cost stays out of the eager numbers)."""

    fn: Callable[[int], Any] | None = None
    na: str | None = None
    context: Callable[[], Any] = contextlib.nullcontext
    note: str | None = None


FP8_NA = "fp8 KV cache: needs one dtype for Q, K and V"


def _flashdec_impl(inp: Inputs, backend: str) -> Impl:
    import flashdec

    kw: dict[str, Any] = {}  # per-run: seqlens; float scales are fixed by the plan
    if inp.seqlens is not None:
        kw["seqlens"] = inp.seqlens
    scales = {} if inp.k_scale is None else {"k_scale": inp.k_scale, "v_scale": inp.v_scale}
    q, k, v, out = inp.q, inp.k, inp.v, inp.out
    p = flashdec.plan(q[0], k[0], v[0], out[0], backend=backend, **kw, **scales)
    if kw:
        return Impl(lambda i: p.run(q[i], k[i], v[i], out[i], **kw))
    return Impl(lambda i: p.run(q[i], k[i], v[i], out[i]))


def _sdpa_impl(inp: Inputs, which: str) -> Impl:
    if inp.shape.fp8:
        return Impl(na=FP8_NA)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, which)
    q4, k, v = [x.unsqueeze(2) for x in inp.q], inp.k, inp.v
    mask, note = None, None
    if inp.seqlens is not None:  # SDPA has no per-sequence length: a mask over the capacity
        pos = torch.arange(inp.shape.kv_len, device=inp.device)
        mask = (pos[None, :] < inp.seqlens[:, None].long())[:, None, None, :]
        note = "ragged: boolean attn_mask over the capacity (reads all of it)"

    def fn(i):
        return F.scaled_dot_product_attention(q4[i], k[i], v[i], attn_mask=mask, enable_gqa=True)
    return Impl(fn, context=lambda: sdpa_kernel([backend]), note=note)


def _flex_impl(inp: Inputs) -> Impl:
    if inp.shape.fp8:
        return Impl(na=FP8_NA)
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # one row's graphs only: no recompile limit, no long guard chains
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 64))
    compiled = torch.compile(flex_attention, dynamic=False)
    q4, k, v = [x.unsqueeze(2) for x in inp.q], inp.k, inp.v
    block_mask, note = None, None
    if inp.seqlens is not None:
        lens = inp.seqlens

        def valid(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        s = inp.shape
        block_mask = create_block_mask(valid, s.batch, None, 1, s.kv_len, device=inp.device)
        note = "ragged: block mask from seqlens (made outside the timing)"

    def fn(i):
        return compiled(q4[i], k[i], v[i], block_mask=block_mask, enable_gqa=True)
    return Impl(fn, note=note)


def _triton_impl(inp: Inputs) -> Impl:
    """The Triton split-KV peer (:mod:`flashdec.bench.triton_peer`): its workspace is made here, so
    each call only launches (and a CUDA graph can capture it). fp8 K/V are widened to Q's dtype
    inside the kernel. Off CUDA it runs only under Triton's interpreter (tests)."""
    import os

    try:
        from . import triton_peer
    except ImportError as exc:
        if getattr(exc, "name", None) == "triton":
            return Impl(na="triton is not installed")
        return Impl(na="triton cannot be imported: " + na_reason(exc))
    if not str(inp.device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return Impl(na="the Triton peer needs a CUDA device (or TRITON_INTERPRET=1)")
    scales = {} if inp.k_scale is None else {"k_scale": inp.k_scale, "v_scale": inp.v_scale}
    dec = triton_peer.TritonDecode(inp.q[0], inp.k[0], inp.v[0], **scales)
    q, k, v, out, lens = inp.q, inp.k, inp.v, inp.out, inp.seqlens
    return Impl(lambda i: dec(q[i], k[i], v[i], lens, out[i]))


def build_impl(name: str, inp: Inputs) -> Impl:
    """The implementation ``name`` for these inputs; never raises (failures become ``na``)."""
    try:
        if name == "flashdec":
            return _flashdec_impl(inp, "cuda")
        if name == "flashdec-torch":
            return _flashdec_impl(inp, "torch")
        if name == "sdpa-cudnn":
            return _sdpa_impl(inp, "CUDNN_ATTENTION")
        if name == "sdpa-flash":
            return _sdpa_impl(inp, "FLASH_ATTENTION")
        if name == "triton":
            return _triton_impl(inp)
        if name == "flex":
            return _flex_impl(inp)
        return Impl(na=f"unknown implementation {name!r}")
    except Exception as exc:
        return Impl(na=na_reason(exc))


def na_reason(exc: BaseException, warned: Iterable[Any] = ()) -> str:
    """One short line for an n/a: the exception, plus the first warning when it says more
    (SDPA explains "No available kernel" only in warnings)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    for w in warned:
        msg = " ".join(str(getattr(w, "message", w)).split())
        if msg:
            text += f" [{msg}]"
            break
    return text if len(text) <= 240 else text[:237] + "..."
