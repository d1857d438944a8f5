"""The torch backend: any device torch runs on, Y (and LSE) written in place.

Without softcap or LSE, Y comes from torch's scaled_dot_product_attention (GQA through its
``enable_gqa``) over each row's attended keys: all of them, or, when the lengths, window and
left padding are in host memory (CPU problems), the slice ``[lo_b, L_b)`` of each row, in one
call when the rows share it. Slicing instead of masking means unattended rows are never read.
Otherwise (softcap, LSE, or device-side lengths) the fp32 reference path: Q viewed as [B, H_kv,
group, D] against K/V [B, H_kv, K_len, D] (repeated KV heads never materialised), keys outside
the attended range get score -inf and their V rows are zeroed, so whatever the cache holds there
(even NaN) never reaches Y. fp8 K/V are upcast to fp32, their per-head scales folded into Q (for
K) and into the result (for V). A paged cache is gathered through its block table into the
contiguous cache it stands for. Inputs of any stride are read as they are; results are copied
into Y and LSE through their own strides.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from .._contract import BackendOptions, DecodeArgs, DecodeProblem, MergeProblem
from .._dtypes import DType
from .._registry import Backend
from .._streams import torch_current_stream
from .._views import Device, TensorMut, TensorRef

__all__ = ["TorchBackend"]


def _as_torch(torch: Any, view: Any) -> Any:
    """The torch tensor behind ``view`` (a torch tensor itself on the plan's fast path),
    without copying."""
    if isinstance(view, torch.Tensor):
        return view
    owner = view.owner
    if isinstance(owner, torch.Tensor) and owner.data_ptr() == view.ptr \
            and tuple(owner.shape) == view.shape and owner.stride() == view.strides:
        return owner
    return torch.from_dlpack(view)


def _on_stream(torch: Any, device: Device, stream: int | None):
    """Run on the caller's CUDA stream when it is not torch's current one."""
    if device.kind == "cuda" and stream is not None and \
            stream != torch_current_stream(device.index):
        cuda_device = torch.device("cuda", device.index)
        return torch.cuda.stream(torch.cuda.ExternalStream(stream, device=cuda_device))
    return contextlib.nullcontext()


def _per_kv_head(torch: Any, planned: float | None, view: TensorRef | None) -> Any:
    """A scale as something that broadcasts over [B, H_kv, ...]: the planned float or the
    run's float32 [H_kv] tensor as [1, H_kv, 1, 1]."""
    if view is None:
        return planned
    return _as_torch(torch, view).reshape(1, -1, 1, 1)


# A ragged batch on the CPU is sliced row by row up to this many rows (one SDPA call each);
# beyond, masked in fp32.
_SLICED_ROWS = 32


class _Runner:
    workspace_bytes = 0

    def __init__(self, torch: Any, problem: DecodeProblem) -> None:
        self.torch = torch
        self.problem = problem

    def describe(self) -> dict[str, Any]:
        return {"kernel": "torch (SDPA, or fp32 math for softcap and LSE)", "num_splits": 1,
                "merge": "none", "workspace_bytes": 0}

    def __call__(self, args: DecodeArgs, stream: int | None) -> None:
        # no history even for a view built by hand over a tensor that requires grad (the
        # frontend refuses such tensors): results never carry autograd history, as on cuda
        with _on_stream(self.torch, self.problem.device, stream), self.torch.no_grad():
            self._compute(args)

    def run_tensors(self, args: DecodeArgs, stream: int | None) -> None:
        """The plan's fast path: the torch tensors themselves, checked (no views), none of
        them requiring grad, so no result can carry history and grad mode need not be set;
        on the CPU there is no stream either (a few us a call, next to SDPA's ~20 at small
        shapes)."""
        if self.problem.device.kind == "cpu":
            self._compute(args)
        else:
            self(args, stream)

    def _host_ranges(self, args: DecodeArgs) -> list[tuple[int, int]] | None:
        """Each batch entry's attended keys [lo, hi) when its lengths and offsets are in host
        memory (reading them costs no sync), else None."""
        torch, p = self.torch, self.problem
        if p.device.kind != "cpu":
            return None
        cap = p.kv_len
        hi = ([cap] * p.batch if not p.seqlens else
              [min(max(n, 0), cap) for n in _as_torch(torch, args.seqlens).tolist()])
        first = ([0] * p.batch if not p.leftpad else
                 [min(max(n, 0), cap) for n in _as_torch(torch, args.cache_leftpad).tolist()])
        window = p.window_left
        return [(max(f, h - 1 - window if window is not None else 0, 0), h)
                for f, h in zip(first, hi)]

    def _sdpa(self, args: DecodeArgs, q: Any, keys: Any, values: Any, y: Any) -> bool:
        """Y by torch's scaled_dot_product_attention over each row's attended keys, sliced (no
        mask, so whatever the cache holds elsewhere is never read); False when this problem
        needs the fp32 reference path instead (softcap, LSE, or masks it cannot slice)."""
        torch, p = self.torch, self.problem
        if p.softcap is not None or args.lse is not None:
            return False
        ranges = None
        if p.seqlens or p.window_left is not None or p.leftpad:
            ranges = self._host_ranges(args)
            if ranges is None or (len(set(ranges)) > 1 and p.batch > _SLICED_ROWS):
                return False
        f32 = torch.float32
        if keys.dtype == q.dtype and args.k_scale is None and args.v_scale is None:
            scale, post = p.scale * p.k_scale, (None if p.v_scale == 1.0 else p.v_scale)
        else:  # fp8 K/V or per-head scale tensors: fp32, the K scale folded into Q
            qg = q.to(f32).view(p.batch, p.num_kv_heads, p.group_size, p.head_dim)
            q = (qg * _per_kv_head(torch, p.k_scale, args.k_scale)).view(q.shape)
            keys, values, scale = keys.to(f32), values.to(f32), p.scale
            post = _per_kv_head(torch, p.v_scale, args.v_scale)
            if isinstance(post, torch.Tensor):  # [1, H_kv, 1, 1] -> per query head
                post = post.view(-1).repeat_interleave(p.group_size).view(1, -1, 1, 1)
        attention = torch.nn.functional.scaled_dot_product_attention
        q4 = q.unsqueeze(2)
        if ranges is None or len(set(ranges)) == 1:  # one call for the batch
            lo, hi = (0, p.kv_len) if ranges is None else ranges[0]
            parts = [(None, lo, hi)]
        else:
            parts = [(b, lo, hi) for b, (lo, hi) in enumerate(ranges)]
        for b, lo, hi in parts:
            target = y if b is None else y[b:b + 1]
            if hi <= lo:
                target.zero_()
                continue
            qb, kb, vb = (q4, keys, values) if b is None else (
                q4[b:b + 1], keys[b:b + 1], values[b:b + 1])
            if lo or hi < p.kv_len:
                kb, vb = kb[:, :, lo:hi], vb[:, :, lo:hi]
            out = attention(qb, kb, vb, scale=scale, enable_gqa=True)
            if post is not None:
                out = out.to(f32) * post
            target.copy_(out.view(target.shape))
        return True

    def _valid_keys(self, args: DecodeArgs, device: Any) -> Any:
        """Bool [B, 1, 1, K_len]: the keys each batch entry attends to; None when all are."""
        torch, p = self.torch, self.problem
        if not p.seqlens and p.window_left is None and not p.leftpad:
            return None
        if p.seqlens:  # device values are clamped, as in the CUDA kernel
            lengths = _as_torch(torch, args.seqlens).to(device=device, dtype=torch.int64)
            lengths = lengths.clamp(0, p.kv_len)
        else:
            lengths = torch.full((p.batch,), p.kv_len, dtype=torch.int64, device=device)
        j = torch.arange(p.kv_len, device=device)
        valid = j < lengths[:, None]
        if p.window_left is not None:
            valid &= j >= (lengths - 1 - p.window_left)[:, None]
        if p.leftpad:  # device values are clamped, as in the CUDA kernel
            first = _as_torch(torch, args.cache_leftpad).to(device=device, dtype=torch.int64)
            valid &= j >= first.clamp(0, p.kv_len)[:, None]
        return valid[:, None, None, :]

    def _cache(self, view: Any, table: Any) -> Any:
        """K or V as [B, H_kv, K_len, D] in its own dtype: a paged pool gathered through the
        block table (ids clamped into the pool, as in the CUDA kernel; rows past seqlens are
        masked or sliced away)."""
        torch, p = self.torch, self.problem
        x = _as_torch(torch, view)
        if table is None:
            return x
        pages = x[table]  # [B, max_pages, H_kv, page_size, D]
        return pages.permute(0, 2, 1, 3, 4).reshape(p.batch, p.num_kv_heads, p.kv_len,
                                                     p.head_dim)

    def _compute(self, args: DecodeArgs) -> None:
        torch, p = self.torch, self.problem
        y = _as_torch(torch, args.out)
        if y.numel() == 0:
            return
        f32 = torch.float32
        q = _as_torch(torch, args.q)
        table = None
        if p.paged:
            table = _as_torch(torch, args.block_table).to(torch.int64).clamp(0, p.num_pages - 1)
        keys, values = self._cache(args.k, table), self._cache(args.v, table)
        if self._sdpa(args, q, keys, values, y):
            return
        qg = q.to(f32).reshape(p.batch, p.num_kv_heads, p.group_size, p.head_dim)
        keys, values = keys.to(f32), values.to(f32)
        valid = self._valid_keys(args, keys.device)

        scores = torch.matmul(qg * _per_kv_head(torch, p.k_scale, args.k_scale),
                              keys.transpose(-1, -2)) * p.scale
        if p.softcap is not None:
            scores = torch.tanh(scores / p.softcap) * p.softcap
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
            values = values.masked_fill(~valid.transpose(-1, -2), 0.0)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf where no key is attended
        weights = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0))
        result = torch.matmul(weights, values) * _per_kv_head(torch, p.v_scale, args.v_scale)
        y.copy_(result.reshape(p.out_shape))
        if args.lse is not None:
            _as_torch(torch, args.lse).copy_(lse.reshape(p.lse_shape))


class TorchBackend(Backend):
    """Reference backend on CPU or GPU through torch."""

    name = "torch"
    device_kinds = ("cpu", "cuda")

    def __init__(self) -> None:
        try:
            import torch
        except ImportError as exc:
            self._torch, self._why = None, f"torch is not installed ({exc}); pip install torch"
        else:
            self._torch, self._why = torch, ""

    def is_available(self) -> tuple[bool, str]:
        return self._torch is not None, self._why

    def _runs_on(self, device: Device) -> str | None:
        why = super()._runs_on(device)
        if why is None and device.kind == "cuda" and not self._torch.cuda.is_available():
            why = "torch was built without CUDA or sees no GPU"
        return why

    def prepare(self, problem: DecodeProblem, layouts: DecodeArgs | None = None,
                options: BackendOptions = BackendOptions()) -> _Runner:
        """``options.num_splits`` changes nothing here: the reference computes in one piece."""
        return _Runner(self._torch, problem)

    def merge(self, problem: MergeProblem, outputs: Sequence[TensorRef],
              lses: Sequence[TensorRef], out: TensorMut, lse_out: TensorMut,
              stream: int | None) -> None:
        """Weights ``exp(lse_i - max lse)`` summed in part order (deterministic), fp32."""
        torch = self._torch
        with _on_stream(torch, problem.device, stream), torch.no_grad():
            parts = [_as_torch(torch, x) for x in lses]
            top = parts[0]
            for lse in parts[1:]:
                top = torch.maximum(top, lse)  # NaN propagates
            top = top.masked_fill(top == float("-inf"), 0.0)  # all parts empty: weights 0
            total = torch.zeros(problem.lse_shape, dtype=torch.float32, device=top.device)
            acc = torch.zeros(problem.out_shape, dtype=torch.float32, device=top.device)
            for y, lse in zip(outputs, parts):
                weight = torch.exp(lse - top)
                total += weight
                part = weight[..., None] * _as_torch(torch, y).to(torch.float32)
                # an empty part (weight 0) adds nothing, whatever its Y holds (as in cuda)
                acc += part.masked_fill((weight == 0)[..., None], 0.0)
            merged = acc / total[..., None]
            empty = (total == 0)[..., None]
            _as_torch(torch, out).copy_(merged.masked_fill(empty, 0.0))
            _as_torch(torch, lse_out).copy_(top + torch.log(total))

    def allocate_buffer(self, device: Device, shape: tuple[int, ...], dtype: DType,
                        like: Any) -> TensorMut:
        if device.kind == "cpu":
            return super().allocate_buffer(device, shape, dtype, like)
        torch = self._torch
        buf = torch.empty(shape, dtype=getattr(torch, dtype.torch_name), device=str(device))
        return TensorMut.from_pointer(buf.data_ptr(), dtype, shape, device=device, owner=buf)
