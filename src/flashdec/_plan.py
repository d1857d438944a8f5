"""A decode problem prepared once and run every token (:class:`DecodePlan`), the same plan
bound to fixed tensors and replayed (:class:`BoundDecode`), and the CUDA torch fast path that
checks a run in a few attribute reads (:class:`TorchFastPath`)."""

from __future__ import annotations

import sys
from typing import Any, Callable

from . import _args
from ._contract import ARG_NAMES, DecodeArgs, DecodeProblem, Layout, check_aliasing, check_host_values
from ._errors import ContractError
from ._registry import Backend, Runner
from ._streams import stream_handle, torch_current_stream
from ._views import Lengths, Tensor, extent_bytes

__all__ = ["DecodePlan", "BoundDecode", "TorchFastPath", "check_planned"]

_OUT, _LSE = DecodeArgs._fields.index("out"), DecodeArgs._fields.index("lse")
_NUM_ARGS = len(DecodeArgs._fields)


def check_planned(planned: DecodeArgs, args: DecodeArgs) -> None:
    """Each tensor of a run is present exactly when the plan has it, with the planned layout."""
    for name, layout, view in zip(ARG_NAMES, planned, args):
        if layout is None and view is None:
            continue
        if layout is None:
            how = "return_lse=True or lse_out=" if name == ARG_NAMES.lse else f"{name}="
            raise ContractError(f"{name} was not planned: this plan was made without it; make "
                                f"a new plan with {how} to pass it to run")
        if view is None:
            raise ContractError(f"{name} is missing: the plan was made with a per-run {name} "
                                f"tensor; pass {name}= to run")
        if Layout.of(view) != layout:
            shape, strides, dtype, device = layout
            raise ContractError(
                f"{name} does not match the plan: planned shape {shape}, strides {strides}, "
                f"{getattr(dtype, 'value', dtype)} on {device}; got shape {view.shape}, "
                f"strides {view.strides}, {getattr(view.dtype, 'value', view.dtype)} on "
                f"{view.device}. Make a new plan for a new layout")


def _strides_to_check(layout: Layout) -> tuple[int, ...] | None:
    """The strides a run's tensor must have, or None where any tensor torch calls contiguous
    has the same memory layout (strides differ at most on extent-1 axes, never indexed)."""
    shape, strides = layout[0], tuple(layout[1])
    row_major = _args.row_major(shape, layout[2], layout[3])[1]
    same = all(s == r for e, s, r in zip(shape, strides, row_major) if e > 1)
    return None if same else strides


class TorchFastPath:
    """A plan's layouts as torch reports them, so a run with torch tensors is checked in a
    few attribute reads and integer compares and handed to the runner as named raw pointers
    (a :class:`DecodeArgs` of ints, ``run_pointers``) or as the checked tensors themselves
    (``run_tensors``: the torch backend), without building views.

    Any mismatch falls back to the general path, which names what is wrong. Taken only for
    runners with one of those methods, and on the GPU for device-side (not host) ``seqlens``.
    """

    __slots__ = ("tensor", "empty", "checks", "present", "absent", "overlaps", "out_alloc",
                 "lse_alloc", "launch", "pointers_only", "cuda", "host_values", "kv_len")

    def __init__(self, torch: Any, problem: DecodeProblem, planned: DecodeArgs,
                 launch: Callable[[DecodeArgs, int | None], None] | None = None,
                 pointers_only: bool = True) -> None:
        self.tensor, self.empty = torch.Tensor, torch.empty
        self.launch = launch  # the runner's run_pointers (or run_tensors)
        self.pointers_only = pointers_only
        self.cuda = problem.device.kind == "cuda"
        # Host lengths, offsets and scale tensors are checked on every run (the general path
        # names a bad value; this one only spots it): (index, is a scale) of each.
        self.kv_len = problem.kv_len
        self.host_values = tuple(
            (DecodeArgs._fields.index(name), name.endswith("scale"))
            for name in ("seqlens", "cache_leftpad", "k_scale", "v_scale")
            if getattr(planned, name) is not None and getattr(planned, name)[3].kind == "cpu")
        # (index, shape, strides, dtype, device index) of each planned tensor (strides None
        # where the layout is row-major but for extent-1 axes: then torch's is_contiguous(),
        # half the cost of reading the strides, decides), the indices of the others, and the
        # (output, other) pairs of non-empty planned tensors whose byte ranges must not meet
        self.checks = tuple((i, torch.Size(layout[0]), _strides_to_check(layout),
                             getattr(torch, layout[2].torch_name),
                             layout[3].index if layout[3].kind == "cuda" else -1)  # get_device()
                            for i, layout in enumerate(planned) if layout is not None)
        self.present = tuple(check[0] for check in self.checks)
        self.absent = tuple(i for i, layout in enumerate(planned) if layout is None)
        extents = [None if layout is None else extent_bytes(layout[0], layout[1], layout[2].itemsize)
                   for layout in planned]
        self.overlaps = tuple((o, i, extents[o], extents[i]) for o in (_OUT, _LSE)
                              for i in range(len(planned))
                              if i != o and extents[o] and extents[i])
        device = (torch.device("cuda", problem.device.index) if self.cuda
                  else torch.device(problem.device.kind))
        self.out_alloc = (problem.out_shape, getattr(torch, problem.dtype.torch_name), device)
        self.lse_alloc = ((problem.lse_shape, torch.float32, device) if problem.return_lse
                          else None)

    def pointers(self, given: DecodeArgs, layouts_known: bool = False) -> DecodeArgs | None:
        """Data pointers of ``given`` if each tensor is a torch tensor of the planned
        layout (or absent where the plan has none) and the outputs overlap nothing; else None.
        ``layouts_known``: the caller has matched every layout already (decode's plan-cache
        key holds them), so only the overlap is checked. A tensor that requires grad or has
        the negative bit set (its memory holds minus its values) is left to the general path,
        which refuses it by name; the conjugate bit needs a complex dtype, which no plan has."""
        ptrs = [None] * _NUM_ARGS
        try:
            if layouts_known:
                for i in self.present:
                    x = given[i]
                    if x.requires_grad or x.is_neg():
                        return None
                    ptrs[i] = x.data_ptr()
            else:
                tensor = self.tensor
                for i, shape, strides, dtype, index in self.checks:
                    x = given[i]
                    if (type(x) is not tensor or x.dtype is not dtype or x.shape != shape
                            or not (x.is_contiguous() if strides is None
                                    else x.stride() == strides)
                            or x.get_device() != index or x.requires_grad or x.is_neg()):
                        return None
                    ptrs[i] = x.data_ptr()
                for i in self.absent:
                    if given[i] is not None:
                        return None  # a tensor the plan does not have
        except RuntimeError:  # no strides (sparse): the general path names it
            return None
        for o, i, extent_o, extent_i in self.overlaps:
            if ptrs[i] < ptrs[o] + extent_o and ptrs[o] < ptrs[i] + extent_i:
                return None
        return tuple.__new__(DecodeArgs, ptrs)

    def _host_values_ok(self, given: DecodeArgs) -> bool:
        """Host lengths and offsets in [0, kv_len], host scales finite and > 0 (the general
        path's check_host_values, as a yes/no)."""
        for i, is_scale in self.host_values:
            values = given[i].tolist()  # a few values: Python beats numpy's per-call cost
            if not values:
                continue
            if is_scale:
                if not all(0 < x < float("inf") for x in values):
                    return False
            elif min(values) < 0 or max(values) > self.kv_len:
                return False
        return True

    def run(self, given: DecodeArgs, stream: int | None, layouts_known: bool = False) -> Any:
        """Run with torch tensors and return what the call returns, or None to take the
        general path. ``layouts_known``: decode's cache key matched every layout (and read
        ``stream``, the current one; else None: read here)."""
        out, lse = given.out, given.lse
        if out is None or (lse is None and self.lse_alloc is not None):
            if out is None:
                out = self.empty(self.out_alloc[0], dtype=self.out_alloc[1],
                                 device=self.out_alloc[2])
            if lse is None and self.lse_alloc is not None:
                lse = self.empty(self.lse_alloc[0], dtype=self.lse_alloc[1],
                                 device=self.lse_alloc[2])
            given = given._replace(out=out, lse=lse)
        ptrs = self.pointers(given, layouts_known=layouts_known)
        if ptrs is None or (self.host_values and not self._host_values_ok(given)):
            return None
        if stream is None and self.cuda:
            stream = torch_current_stream(self.checks[0][4])
        self.launch(ptrs if self.pointers_only else given, stream)
        return (out, lse) if self.lse_alloc is not None else out


class DecodePlan:
    """A decode problem prepared once and run every token.

    ``run`` checks only that each tensor has the planned shape, strides, dtype and device,
    that the outputs overlap no input, and host-side ``seqlens`` values; everything else was
    validated when the plan was made. A plan serves one stream at a time from one thread (its
    workspace and launch parameters are its own); make one plan per concurrent stream.
    """

    def __init__(self, problem: DecodeProblem, backend: Backend, runner: Runner,
                 layouts: DecodeArgs) -> None:
        self.problem = problem
        self.backend = backend
        self._runner = runner
        self._layouts = layouts
        self._fast: TorchFastPath | None = None
        torch = sys.modules.get("torch")
        seqlens = layouts.seqlens
        if torch is None:
            return
        if (problem.device.kind == "cuda" and hasattr(runner, "run_pointers")
                and (seqlens is None or seqlens[3].kind == "cuda")):
            self._fast = TorchFastPath(torch, problem, layouts, runner.run_pointers)
        elif hasattr(runner, "run_tensors") and (layouts.block_table is None
                                                 or layouts.block_table[3].kind == "cuda"):
            self._fast = TorchFastPath(torch, problem, layouts, runner.run_tensors,
                                       pointers_only=False)

    @property
    def workspace_bytes(self) -> int:
        """Device memory the plan holds for split partials."""
        return self._runner.workspace_bytes

    @property
    def details(self) -> dict[str, Any]:
        """How the backend runs this plan, in plain values: ``kernel``, ``num_splits``,
        ``merge`` (``"none"``, ``"last CTA"``, ``"combine kernel"``), ``workspace_bytes``, and
        what else the backend says (the cuda backend: ``splits``, by capacity or by length,
        ``tensor_cores``, ``split_rows``, ``q_tile``, ``fallback_kernel``). A new dict each
        time."""
        describe = getattr(self._runner, "describe", None)  # optional for third-party backends
        if describe is None:
            return {"kernel": type(self._runner).__name__, "num_splits": None,
                    "merge": None, "workspace_bytes": self._runner.workspace_bytes}
        return dict(describe())

    def __repr__(self) -> str:
        d = self.details
        return (f"DecodePlan(backend={self.backend.name!r}, kernel={d['kernel']!r}, "
                f"num_splits={d['num_splits']}, merge={d['merge']!r}, "
                f"workspace_bytes={d['workspace_bytes']}, problem={self.problem})")

    def run(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, *,
            seqlens: Lengths | None = None, k_scale: Tensor | None = None,
            v_scale: Tensor | None = None, lse_out: Tensor | None = None,
            block_table: Tensor | None = None, cache_leftpad: Tensor | None = None,
            stream: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        """Decode with tensors of the planned layout; returns what :func:`decode` would.

        ``seqlens``, ``k_scale``/``v_scale`` tensors, ``lse_out``, ``block_table`` and
        ``cache_leftpad`` are passed here exactly when the plan was made with them; float
        scales were fixed by the plan.
        """
        given = _args.bundle(q, k, v, out, seqlens, k_scale, v_scale, lse_out, block_table,
                             cache_leftpad)
        fast = self._fast
        if fast is not None and stream is None:
            done = fast.run(given, None)
            if done is not None:
                return done
        return self.run_checked(given, stream)

    def run_checked(self, given: DecodeArgs, stream: Any) -> Any:
        """The general path of :meth:`run`: every check, typed errors naming the argument."""
        args, result, handle = self._checked(given, stream, "run")
        self._runner(args, handle)
        return result

    def _checked(self, given: DecodeArgs, stream: Any,
                 method: str) -> tuple[DecodeArgs, Any, int | None]:
        handle = stream_handle(stream, given.q)
        args, scalars = _args.views(given, handle)
        for name, value in scalars.items():
            if value is not None:
                raise ContractError(f"{name} must be a per-run tensor or None in {method} (a "
                                    f"float scale is fixed when the plan is made), got "
                                    f"{type(value).__name__} {value!r}")
        args, result = _args.complete(self.backend, self.problem, args, given, handle)
        check_planned(self._layouts, args)
        check_aliasing(args)
        check_host_values(args, self.problem.kv_len)
        return args, result, handle

    def bind(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, *,
             seqlens: Lengths | None = None, k_scale: Tensor | None = None,
             v_scale: Tensor | None = None, lse_out: Tensor | None = None,
             block_table: Tensor | None = None, cache_leftpad: Tensor | None = None,
             stream: Any = None) -> "BoundDecode":
        """This plan bound to these tensors and one stream: :class:`BoundDecode`, whose call
        re-runs the decode over the tensors' current contents with no per-call checks.

        Checked here as :meth:`run` checks. Y (and LSE) are allocated once when not given.
        ``stream``: default torch's current stream now (for torch tensors), else the legacy
        default stream; every call runs there.
        """
        given = _args.bundle(q, k, v, out, seqlens, k_scale, v_scale, lse_out, block_table,
                             cache_leftpad)
        args, result, handle = self._checked(given, stream, "bind")
        bind = getattr(self._runner, "bind", None)  # optional for third-party backends
        replay = (bind(args, handle) if bind is not None
                  else (lambda: self._runner(args, handle)))
        return BoundDecode(self, args, result, replay, handle)


class BoundDecode:
    """A :class:`DecodePlan` bound to fixed tensors and a stream (:meth:`DecodePlan.bind`).

    ``bound()`` decodes again over the *current contents* of the bound tensors and returns
    the bound result (Y, or (Y, LSE)): the loop that calls with the same tensors every step
    (write the new query into Q, the new keys into the cache, the lengths into a device
    ``seqlens``, in place, before each call). Nothing is checked per call, so the contract is
    the caller's: keep the bound tensors alive and at their shape, strides and storage (no
    ``resize_``, ``set_`` or reallocation), and use the bound stream only. Like its plan it
    serves one stream at a time (it shares the plan's split workspace).

    On the cuda backend a call replays a CUDA graph of the plan's launches captured at bind
    time (one ``cuGraphLaunch``, below the cost of one kernel launch), except with host-side
    ``seqlens``, which are uploaded on every call by a plain run. Other backends run the
    plan on the bound views.
    """

    __slots__ = ("plan", "args", "result", "stream", "_replay")

    def __init__(self, plan: DecodePlan, args: DecodeArgs, result: Any,
                 replay: Callable[[], None], stream: int | None) -> None:
        self.plan, self.args, self.result, self.stream = plan, args, result, stream
        self._replay = replay

    def __call__(self) -> Any:
        self._replay()
        return self.result

    def __repr__(self) -> str:
        return f"BoundDecode(stream={self.stream}, plan={self.plan!r})"
