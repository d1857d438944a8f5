"""``decode`` and ``plan``: views, contract, backend choice, output allocation, launch."""

from __future__ import annotations

import sys
from typing import Any

from ._contract import DecodeProblem, Layout, check_no_overlap, validate
from ._errors import ContractError
from ._registry import Backend, Runner, select_backend
from ._streams import dlpack_stream, stream_handle
from ._views import TensorMut, TensorRef

__all__ = ["decode", "plan", "DecodePlan"]

_NAMES = ("q", "k", "v")


def _views(q: Any, k: Any, v: Any, out: Any, stream: int | None):
    dl_stream = dlpack_stream(stream)
    ins = tuple(TensorRef.from_object(x, name=n, stream=dl_stream) for x, n in zip((q, k, v), _NAMES))
    out_view = None if out is None else TensorMut.from_object(out, name="out", stream=dl_stream)
    return ins, out_view


def _allocate(backend: Backend, problem: DecodeProblem, q: Any) -> Any:
    """Y for ``out=None``: a tensor like Q for torch and NumPy, else the backend's buffer."""
    shape = (problem.batch, problem.num_heads, problem.head_dim)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor):
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(q, numpy.ndarray):
        return numpy.empty(shape, dtype=q.dtype)
    return backend.allocate_output(problem, q)


class DecodePlan:
    """A decode problem prepared once and run every token.

    ``run`` checks only that each tensor has the planned shape, strides, dtype and device and
    that Y does not overlap an input; everything else was validated when the plan was made.
    """

    def __init__(self, problem: DecodeProblem, backend: Backend, runner: Runner,
                 layouts: tuple[Layout, ...]) -> None:
        self.problem = problem
        self.backend = backend
        self._runner = runner
        self._layouts = layouts

    @property
    def workspace_bytes(self) -> int:
        """Device memory the plan holds for split partials."""
        return self._runner.workspace_bytes

    def __repr__(self) -> str:
        return f"DecodePlan(backend={self.backend.name!r}, problem={self.problem})"

    def run(self, q: Any, k: Any, v: Any, out: Any = None, stream: Any = None) -> Any:
        """Decode with tensors of the planned layout; returns Y (``out``, or a new tensor)."""
        handle = stream_handle(stream, q)
        (qv, kv, vv), _ = _views(q, k, v, None, handle)
        if out is None:
            out = _allocate(self.backend, self.problem, q)
        ov = TensorMut.from_object(out, name="out", stream=dlpack_stream(handle))
        for name, view, planned in zip(("q", "k", "v", "out"), (qv, kv, vv, ov), self._layouts):
            if Layout.of(view) != planned:
                shape, strides, dtype, device = planned
                raise ContractError(
                    f"{name} does not match the plan: planned shape {shape}, strides {strides}, "
                    f"{getattr(dtype, 'value', dtype)} on {device}; got shape {view.shape}, "
                    f"strides {view.strides}, {getattr(view.dtype, 'value', view.dtype)} on "
                    f"{view.device}. Make a new plan for a new layout")
        check_no_overlap(ov, {"q": qv, "k": kv, "v": vv})
        self._runner(qv, kv, vv, ov, handle)
        return out


def _row_major_layout(problem: DecodeProblem) -> Layout:
    shape = (problem.batch, problem.num_heads, problem.head_dim)
    strides = (problem.num_heads * problem.head_dim, problem.head_dim, 1)
    return Layout((shape, strides, problem.dtype, problem.device))


def plan(q: Any, k: Any, v: Any, out: Any = None, *, scale: float | None = None,
         backend: str | None = None, **options: Any) -> DecodePlan:
    """Validate once, choose the backend, prepare kernels and workspace; see :func:`decode`.

    ``out`` fixes Y's layout; without it Y is planned as a fresh row-major tensor like Q.
    Backend options (``num_splits=`` for cuda) are passed through.
    """
    (qv, kv, vv), ov = _views(q, k, v, out, None)
    problem = validate(qv, kv, vv, ov, scale)
    chosen = select_backend(backend, problem)
    out_layout = _row_major_layout(problem) if ov is None else Layout.of(ov)
    layouts = (Layout.of(qv), Layout.of(kv), Layout.of(vv), out_layout)
    return DecodePlan(problem, chosen, chosen.prepare(problem, layouts, **options), layouts)


def decode(q: Any, k: Any, v: Any, out: Any = None, *, scale: float | None = None,
           backend: str | None = None, stream: Any = None, **options: Any) -> Any:
    """One decode step of attention: ``Y[b, h] = softmax(scale * Q[b, h] . K[b, g]^T) . V[b, g]``.

    Shapes: Q ``[B, H_q, D]``, K and V ``[B, H_kv, K_len, D]`` (physical layout, any strides
    >= 0), Y ``[B, H_q, D]``, with ``g = h // (H_q // H_kv)`` and ``scale`` defaulting to
    ``1 / sqrt(D)``. Q, K, V and Y share one dtype (float16, bfloat16, float32) and device.

    Parameters
    ----------
    q, k, v : torch.Tensor, numpy.ndarray, any DLPack producer, or TensorRef
    out : writable tensor of Q's shape, optional
        Written in full. Without it Y is allocated like Q (torch for torch, NumPy for NumPy).
    scale : float, optional
    backend : {"auto", "torch", "cuda"}, optional
        Wins over ``FLASHDEC_BACKEND``. An explicit backend never falls back.
    stream : int or object with ``__cuda_stream__``, optional
        CUDA stream to run on; default torch's current stream for torch tensors.
    **options
        Backend options, e.g. ``num_splits=`` for cuda.

    Returns
    -------
    Y (``out`` itself when given).

    Raises
    ------
    ContractError, UnsupportedError, BackendUnavailableError, CompilationError
    """
    handle = stream_handle(stream, q)
    (qv, kv, vv), ov = _views(q, k, v, out, handle)
    problem = validate(qv, kv, vv, ov, scale)
    chosen = select_backend(backend, problem)
    if out is None:
        out = _allocate(chosen, problem, q)
        ov = TensorMut.from_object(out, name="out", stream=dlpack_stream(handle))
    layouts = (Layout.of(qv), Layout.of(kv), Layout.of(vv), Layout.of(ov))
    chosen.prepare(problem, layouts, **options)(qv, kv, vv, ov, handle)
    return out
