"""The benchmark's Triton peer: a plain two-kernel split-KV decode, "what a user would write in
an afternoon", so ``python -m flashdec bench`` can say how flashdec compares with it.

Kernel 1 (grid ``B x H_kv x splits``) takes the query heads of one KV head (the GQA group,
padded to at least 16 rows so ``tl.dot`` applies), streams its split's K/V in ``BLOCK_N``-row
tiles with an online softmax in base 2 (fp32) and writes a partial ``(o, m, l)`` per split to
an fp32 workspace. Kernel 2 (grid ``B x H_q``) merges the splits into Y in Q's dtype.

Not part of flashdec's API: only :mod:`flashdec.bench.peers` uses it, and triton stays an
optional package (the bench reports the peer ``n/a`` without it). Importing this module imports
triton, so :mod:`flashdec.bench` does not import it.

With ``TRITON_INTERPRET=1`` set before the import, Triton's interpreter runs the kernels on CPU
tensors (slowly): the tests do that on machines without a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["TritonDecode", "split_plan", "block_sizes", "MIN_SPLIT_ROWS", "CTAS_PER_SM"]

MIN_SPLIT_ROWS = 256       # a split reads at least this many rows: fewer cost more to merge
CTAS_PER_SM = 2            # kernel 1 aims for about this many CTAs per SM in all
DEFAULT_SM_COUNT = 132     # H100/H200 SXM, when no CUDA device answers (interpreter runs)
LOG2E = 1.4426950408889634
COMBINE_BLOCK_S = 32       # splits merged per step by kernel 2 (bounds its registers)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, m_ptr, l_ptr,
                  sq_b, sq_h, sq_d,
                  sk_b, sk_h, sk_n, sk_d,
                  sv_b, sv_h, sv_n, sv_d,
                  so_b, so_h, so_s, sm_b, sm_h,
                  qk_scale, kv_len, split_rows, head_dim,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, HAS_LENS: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # 64-bit batch/head offsets: a large cache overflows int32 element offsets.
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    g_ok = g < GROUP
    d_ok = d < head_dim
    heads = kvh64 * GROUP + g

    q = tl.load(q_ptr + b64 * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    end = kv_len
    if HAS_LENS:
        # Clamped like the contract: a length outside [0, kv_len] reads nothing past the cache.
        end = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), kv_len)
    lo = split * split_rows
    hi = tl.minimum(lo + split_rows, end)

    k_base = k_ptr + b64 * sk_b + kvh64 * sk_h
    v_base = v_ptr + b64 * sv_b + kvh64 * sv_h
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # The loop runs only over tiles with at least one valid row, so m_i is finite after the
    # first one and no exp2(-inf - -inf) NaN can appear; an empty split writes m = -inf, l = 0.
    for start in range(lo, hi, BLOCK_N):
        rows = start + n
        r_ok = rows < hi
        kv_mask = r_ok[:, None] & d_ok[None, :]
        # An fp8 cache is widened to Q's dtype for the MMA; its scales are folded elsewhere.
        k = tl.load(k_base + rows[:, None].to(tl.int64) * sk_n + d[None, :] * sk_d,
                    mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(r_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None].to(tl.int64) * sv_n + d[None, :] * sv_d,
                    mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new

    heads_out = b64 * sm_b + heads * sm_h + split
    tl.store(m_ptr + heads_out, m_i, mask=g_ok)
    tl.store(l_ptr + heads_out, l_i, mask=g_ok)
    o_off = b64 * so_b + heads[:, None] * so_h + split * so_s + d[None, :]
    tl.store(o_ptr + o_off, acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, y_ptr,
                    so_b, so_h, so_s, sm_b, sm_h,
                    sy_b, sy_h, sy_d,
                    splits, head_dim, v_scale,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    ml_base = b * sm_b + h * sm_h
    o_base = b * so_b + h * so_h

    # Pass 1: the largest running max over all splits (m only: cheap).
    m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        m = tl.load(m_ptr + ml_base + s0 + s, mask=s0 + s < splits, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    top = tl.max(m_max, 0)
    # A sequence with no key has top = -inf: shift by 0 so every weight is exp2(-inf) = 0
    # and Y is 0 (flashdec's contract for an empty sequence), not NaN.
    top = tl.where(top == float("-inf"), 0.0, top)

    # Pass 2: weight each split by exp2(m - top) and sum l and o.
    l_sum = tl.zeros([BLOCK_S], tl.float32)
    o_sum = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s_ok = s0 + s < splits
        m = tl.load(m_ptr + ml_base + s0 + s, mask=s_ok, other=float("-inf"))
        w = tl.math.exp2(m - top)
        l_sum += w * tl.load(l_ptr + ml_base + s0 + s, mask=s_ok, other=0.0)
        o = tl.load(o_ptr + o_base + (s0 + s)[:, None] * so_s + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        o_sum += w[:, None] * o
    total = tl.sum(l_sum, 0)
    total = tl.where(total == 0.0, 1.0, total)
    y = tl.sum(o_sum, 0) * (v_scale / total)
    tl.store(y_ptr + b * sy_b + h * sy_h + d * sy_d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


def block_sizes(group: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_G, BLOCK_N, BLOCK_D)`` for a GQA group and head_dim.

    ``tl.dot`` needs every extent >= 16 and a power of two, so the group is padded to
    ``max(16, next_pow2(group))`` rows and D to ``next_pow2(D)`` (masked); 256-wide heads get
    32-row tiles so the fp32 accumulator and the K/V tiles fit in registers.
    """
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 and block_g <= 32 else 32
    return block_g, block_n, block_d


def split_plan(batch: int, kv_heads: int, kv_len: int, sm_count: int,
               min_rows: int = MIN_SPLIT_ROWS, block_n: int = 64) -> tuple[int, int]:
    """``(splits, rows per split)``: enough splits that ``batch * kv_heads * splits`` is about
    ``CTAS_PER_SM * sm_count``, each split at least ``min_rows`` rows (a multiple of
    ``block_n``), and no empty split at full length."""
    want = max(1, math.ceil(CTAS_PER_SM * sm_count / max(batch * kv_heads, 1)))
    splits = max(1, min(want, kv_len // max(min_rows, 1)))
    rows = math.ceil(kv_len / splits)
    rows = max(block_n, math.ceil(rows / block_n) * block_n)
    return math.ceil(kv_len / rows), rows


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


class TritonDecode:
    """A split-KV decode for one problem shape; its fp32 workspace is allocated here, once, so
    a call allocates nothing and can be captured in a CUDA graph.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``q [B, H_q, D]``, ``k``/``v`` ``[B, H_kv, K, D]`` with any strides; Q bf16 or fp16,
        K/V Q's dtype or fp8 (e4m3/e5m2, widened to Q's dtype in the kernel). Shapes, dtypes
        and the device are fixed by these; later calls pass tensors like them.
    scale : float, optional
        Softmax scale; default ``1 / sqrt(D)``.
    k_scale, v_scale : float
        Dequantization scales of an fp8 cache (K = k_scale * K_stored, likewise V).
    sm_count : int, optional
        SMs to fill; default the device's (``DEFAULT_SM_COUNT`` off CUDA).
    min_split_rows : int
        The fewest rows a split reads (tests lower it to get several splits on small K).
    num_warps, num_stages : int
        Kernel 1's launch options.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                 sm_count: int | None = None, min_split_rows: int = MIN_SPLIT_ROWS,
                 num_warps: int = 4, num_stages: int = 2) -> None:
        if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"want q [B, H_q, D] and k, v [B, H_kv, K, D]; got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        batch, heads, head_dim = q.shape
        kb, kv_heads, kv_len, kd = k.shape
        if kb != batch or kd != head_dim or heads % kv_heads:
            raise ValueError(f"q {tuple(q.shape)} does not match k {tuple(k.shape)}")
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"Q must be bfloat16 or float16, got {q.dtype}")
        if head_dim % 16 or head_dim > 256:
            raise ValueError(f"head_dim must be a multiple of 16 up to 256, got {head_dim}")
        self.batch, self.heads, self.kv_heads = batch, heads, kv_heads
        self.kv_len, self.head_dim = kv_len, head_dim
        self.group = heads // kv_heads
        self.block_g, self.block_n, self.block_d = block_sizes(self.group, head_dim)
        sms = sm_count or _sm_count(q.device)
        self.splits, self.split_rows = split_plan(batch, kv_heads, max(kv_len, 1), sms,
                                                  min_split_rows, self.block_n)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        # exp2 in the kernel: fold log2(e) (and K's dequantization scale) into the logit scale.
        self.qk_scale = scale * float(k_scale) * LOG2E
        self.v_scale = float(v_scale)
        self.num_warps, self.num_stages = num_warps, num_stages
        dev = q.device
        self.o_part = torch.empty(batch, heads, self.splits, head_dim, device=dev,
                                  dtype=torch.float32)
        self.m_part = torch.empty(batch, heads, self.splits, device=dev, dtype=torch.float32)
        self.l_part = torch.empty_like(self.m_part)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 seqlens: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Y ``[B, H_q, D]`` in Q's dtype (into ``out`` when given); ``seqlens`` int32 [B]
        masks rows ``>= seqlens[b]`` (they are not read); an empty sequence gives zeros."""
        if out is None:
            out = torch.empty_like(q)
        o, m, lsum = self.o_part, self.m_part, self.l_part
        # seqlens is unused when HAS_LENS is false; any tensor fills the pointer slot.
        lens: Any = seqlens if seqlens is not None else m
        grid = (self.batch, self.kv_heads, self.splits)
        _split_kernel[grid](
            q, k, v, lens, o, m, lsum,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
            self.qk_scale, self.kv_len, self.split_rows, self.head_dim,
            GROUP=self.group, BLOCK_G=self.block_g, BLOCK_N=self.block_n,
            BLOCK_D=self.block_d, HAS_LENS=seqlens is not None,
            num_warps=self.num_warps, num_stages=self.num_stages)
        _combine_kernel[(self.batch, self.heads)](
            o, m, lsum, out,
            o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            self.splits, self.head_dim, self.v_scale,
            BLOCK_S=min(COMBINE_BLOCK_S, max(2, triton.next_power_of_2(self.splits))),
            BLOCK_D=self.block_d, num_warps=4)
        return out
