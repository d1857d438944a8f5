"""The torch reference backend: any device torch runs on, fp32 math, Y written in place.

GQA is computed by viewing Q as [B, H_kv, group, D] against K/V [B, H_kv, K_len, D], so
repeated KV heads are never materialised. Inputs of any stride are read as they are; the
result is copied into Y through Y's own strides.
"""

from __future__ import annotations

from typing import Any

from .._contract import DecodeProblem
from .._registry import Backend
from .._streams import torch_current_stream
from .._views import TensorMut, TensorRef

__all__ = ["TorchBackend"]


def _as_torch(torch: Any, view: TensorRef) -> Any:
    """The torch tensor behind ``view``, without copying."""
    owner = view.owner
    if isinstance(owner, torch.Tensor) and owner.data_ptr() == view.ptr:
        return owner
    return torch.from_dlpack(view)


class _Runner:
    workspace_bytes = 0

    def __init__(self, torch: Any, problem: DecodeProblem) -> None:
        self.torch = torch
        self.problem = problem

    def __call__(self, q: TensorRef, k: TensorRef, v: TensorRef, out: TensorMut,
                 stream: int | None) -> None:
        torch = self.torch
        if self.problem.device.kind == "cuda" and stream is not None and stream != \
                torch_current_stream(self.problem.device.index):
            device = torch.device("cuda", self.problem.device.index)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
                self._compute(q, k, v, out)
        else:
            self._compute(q, k, v, out)

    def _compute(self, q: TensorRef, k: TensorRef, v: TensorRef, out: TensorMut) -> None:
        torch, p = self.torch, self.problem
        y = _as_torch(torch, out)
        if y.numel() == 0:
            return
        f32 = torch.float32
        qg = _as_torch(torch, q).to(f32).reshape(p.batch, p.num_kv_heads, p.group_size, p.head_dim)
        keys = _as_torch(torch, k).to(f32)
        values = _as_torch(torch, v).to(f32)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * p.scale
        weights = torch.softmax(scores, dim=-1)
        result = torch.matmul(weights, values)  # zeros when kv_len == 0
        y.copy_(result.reshape(p.batch, p.num_heads, p.head_dim))


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

    def supports(self, problem: DecodeProblem) -> str | None:
        why = super().supports(problem)
        if why is None and problem.device.kind == "cuda" and not self._torch.cuda.is_available():
            why = "torch was built without CUDA or sees no GPU"
        return why

    def prepare(self, problem: DecodeProblem, layouts: tuple = (), *,
                num_splits: int | None = None, **options: Any) -> _Runner:
        """``num_splits`` (a cuda backend option) changes nothing here."""
        if options:
            raise TypeError(f"unknown torch backend options: {', '.join(options)}")
        return _Runner(self._torch, problem)

    def allocate_output(self, problem: DecodeProblem, like: Any) -> TensorMut:
        if problem.device.kind == "cpu":
            return super().allocate_output(problem, like)
        torch = self._torch
        shape = (problem.batch, problem.num_heads, problem.head_dim)
        buf = torch.empty(shape, dtype=getattr(torch, problem.dtype.torch_name),
                          device=str(problem.device))
        return TensorMut.from_pointer(buf.data_ptr(), problem.dtype, shape,
                                      device=problem.device, owner=buf)
