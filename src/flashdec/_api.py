"""``decode``, ``plan`` and ``merge_states``: views, contract, backend choice, result
allocation, launch."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any, Sequence

from . import _dlpack, _env
from ._contract import (ARG_NAMES, BackendOptions, DecodeArgs, DecodeProblem, Layout,
                        MergeProblem, check_aliasing, check_host_values, check_rank, layouts,
                        validate, validate_merge)
from ._dtypes import DType
from ._errors import ContractError
from ._registry import Backend, Runner, select_backend
from ._streams import dlpack_stream, stream_handle, torch_current_stream
from ._views import Device, Lengths, Scale, Tensor, TensorMut, TensorRef, extent_bytes

__all__ = ["decode", "plan", "DecodePlan", "merge_states"]

_OUTPUTS = (ARG_NAMES.out, ARG_NAMES.lse)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, TensorRef) or hasattr(x, "__dlpack__")


def _view(x: Any, name: str, stream: int | None, writable: bool = False) -> TensorRef | None:
    if x is None:
        return None
    return (TensorMut if writable else TensorRef).from_object(x, name=name, stream=stream)


def _host_lengths(seqlens: Any) -> Any:
    """Lengths given as a host sequence, as a NumPy int32 array (range-checked later)."""
    import numpy

    values = numpy.asarray(seqlens)
    if values.size and (values.ndim != 1 or values.dtype.kind not in "iu"):
        raise ContractError(f"seqlens must be an int32 tensor [batch] or a flat sequence of "
                            f"ints, got {type(seqlens).__name__} of {values.dtype} with shape "
                            f"{values.shape}")
    limits = numpy.iinfo(numpy.int32)
    if values.size and not limits.min <= values.min() <= values.max() <= limits.max:
        raise ContractError(f"seqlens values must fit int32, got values from {values.min()} to "
                            f"{values.max()}")
    return values.astype(numpy.int32).reshape(-1)


def _views(q: Any, k: Any, v: Any, out: Any, seqlens: Any, k_scale: Any, v_scale: Any,
           lse_out: Any, stream: int | None) -> tuple[DecodeArgs, dict[str, Any]]:
    """Views of every tensor argument, in argument order (so the first bad one is named), and
    the float scales (None where absent or given as a tensor)."""
    dl_stream = dlpack_stream(stream)
    if seqlens is not None and not _is_tensor(seqlens):
        seqlens = _host_lengths(seqlens)
    scalars, tensors = {}, {}
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        is_tensor = value is not None and _is_tensor(value)
        scalars[name], tensors[name] = (None, value) if is_tensor else (value, None)
    given = DecodeArgs(q, k, v, out, seqlens, tensors["k_scale"], tensors["v_scale"], lse_out)
    views = [TensorRef.from_object(x, name=name, stream=dl_stream)
             for x, name in zip(given[:3], ARG_NAMES[:3])]
    views += [_view(x, name, dl_stream, writable=name in _OUTPUTS)
              for x, name in zip(given[3:], ARG_NAMES[3:])]
    return DecodeArgs(*views), scalars


def _new_result(backend: Backend, problem: DecodeProblem | MergeProblem, like: Any,
                lse: bool) -> Any:
    """Y (or LSE) the caller left to flashdec: a tensor like ``like`` for torch and NumPy,
    else the backend's buffer."""
    shape = problem.lse_shape if lse else problem.out_shape
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(like, torch.Tensor):
        return torch.empty(shape, dtype=torch.float32 if lse else like.dtype, device=like.device)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(like, numpy.ndarray):
        return numpy.empty(shape, dtype=numpy.float32 if lse else like.dtype)
    return (backend.allocate_lse if lse else backend.allocate_output)(problem, like)


def _results(backend: Backend, problem: DecodeProblem, args: DecodeArgs, like: Any, out: Any,
             lse_out: Any, stream: int | None) -> tuple[DecodeArgs, Any]:
    """Allocate the Y and LSE the caller did not pass; return the completed args and what the
    call returns (Y, or (Y, LSE))."""
    dl_stream = dlpack_stream(stream)
    if out is None:
        out = _new_result(backend, problem, like, lse=False)
        args = args._replace(out=TensorMut.from_object(out, name="out", stream=dl_stream))
    if problem.return_lse and lse_out is None:
        lse_out = _new_result(backend, problem, like, lse=True)
        args = args._replace(lse=TensorMut.from_object(lse_out, name="lse_out",
                                                       stream=dl_stream))
    return args, ((out, lse_out) if problem.return_lse else out)


def _check_planned(planned: DecodeArgs, args: DecodeArgs) -> None:
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


class _TorchFastPath:
    """A plan's layouts as torch reports them, so a run with CUDA torch tensors is checked in
    a few attribute reads and integer compares and handed to the runner as raw pointers.

    Any mismatch falls back to the general path, which names what is wrong. Taken only for
    runners with ``run_pointers`` and device-side (not host) ``seqlens``.
    """

    __slots__ = ("torch", "checks", "absent", "overlaps", "out_alloc", "lse_alloc")

    def __init__(self, torch: Any, problem: DecodeProblem, planned: DecodeArgs) -> None:
        self.torch = torch
        sigs = [None if layout is None else
                (torch.Size(layout[0]), tuple(layout[1]), getattr(torch, layout[2].torch_name),
                 layout[3].index)
                for layout in planned]
        # (index, signature) of each planned tensor, the indices of the others, and the
        # (output, other) pairs of non-empty planned tensors whose byte ranges must not meet
        self.checks = tuple((i, sig) for i, sig in enumerate(sigs) if sig is not None)
        self.absent = tuple(i for i, sig in enumerate(sigs) if sig is None)
        extents = [None if layout is None else extent_bytes(layout[0], layout[1], layout[2].itemsize)
                   for layout in planned]
        self.overlaps = tuple((o, i, extents[o], extents[i])
                              for o in (DecodeArgs._fields.index("out"), DecodeArgs._fields.index("lse"))
                              for i in range(len(planned))
                              if i != o and extents[o] and extents[i])
        device = torch.device("cuda", problem.device.index)
        self.out_alloc = (problem.out_shape, getattr(torch, problem.dtype.torch_name), device)
        self.lse_alloc = (problem.lse_shape, torch.float32, device)

    def pointers(self, given: tuple, layouts_known: bool = False) -> tuple | None:
        """Data pointers of ``given`` (q, k, v, out, seqlens, k_scale, v_scale, lse) if each
        is a CUDA torch tensor of the planned layout (or absent where the plan has none) and
        the outputs overlap nothing; else None. ``layouts_known``: the caller has matched
        every layout already (decode's plan-cache key holds them), so only the overlap is
        checked. A tensor that requires grad or has the negative bit set (its memory holds
        minus its values) is left to the general path, which refuses it by name; the conjugate
        bit needs a complex dtype, which no plan has."""
        if not layouts_known:
            tensor = self.torch.Tensor
            try:
                for i, sig in self.checks:
                    x = given[i]
                    if (type(x) is not tensor or x.get_device() != sig[3]
                            or x.dtype is not sig[2] or x.shape != sig[0]
                            or x.stride() != sig[1]):
                        return None
            except RuntimeError:  # no strides (sparse): the general path names it
                return None
            for i in self.absent:
                if given[i] is not None:
                    return None  # a tensor the plan does not have
        ptrs = []
        for x in given:
            if x is None:
                ptrs.append(None)
            elif x.requires_grad or x.is_neg():
                return None
            else:
                ptrs.append(x.data_ptr())
        for o, i, extent_o, extent_i in self.overlaps:
            if ptrs[i] < ptrs[o] + extent_o and ptrs[o] < ptrs[i] + extent_i:
                return None
        return tuple(ptrs)


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
        self._fast = None
        torch = sys.modules.get("torch")
        seqlens = layouts.seqlens
        if (torch is not None and problem.device.kind == "cuda"
                and hasattr(runner, "run_pointers")
                and (seqlens is None or seqlens[3].kind == "cuda")):
            self._fast = _TorchFastPath(torch, problem, layouts)

    @property
    def workspace_bytes(self) -> int:
        """Device memory the plan holds for split partials."""
        return self._runner.workspace_bytes

    @property
    def details(self) -> dict[str, Any]:
        """How the backend runs this plan, in plain values: ``kernel``, ``num_splits``,
        ``merge`` (``"none"``, ``"last CTA"``, ``"combine kernel"``), ``workspace_bytes``, and
        what else the backend says (the cuda backend: ``tensor_cores``, ``split_rows``,
        ``q_tile``, ``fallback_kernel``). A new dict each time."""
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
            stream: Any = None) -> Tensor | tuple[Tensor, Tensor]:
        """Decode with tensors of the planned layout; returns what :func:`decode` would.

        ``seqlens``, ``k_scale``/``v_scale`` tensors and ``lse_out`` are passed here exactly
        when the plan was made with them; float scales were fixed by the plan.
        """
        fast = self._fast
        if fast is not None and stream is None and type(q) is fast.torch.Tensor:
            done = self._run_torch(q, k, v, out, seqlens, k_scale, v_scale, lse_out, None)
            if done is not None:
                return done
        return self._run_general(q, k, v, out, seqlens, k_scale, v_scale, lse_out, stream)

    def _run_torch(self, q: Any, k: Any, v: Any, out: Any, seqlens: Any, k_scale: Any,
                   v_scale: Any, lse_out: Any, known_stream: int | None) -> Any:
        """The fast path with CUDA torch tensors, or None to take the general one.
        ``known_stream``: decode's cache key matched every layout and read the current
        stream."""
        fast = self._fast
        if out is None:
            out = fast.torch.empty(fast.out_alloc[0], dtype=fast.out_alloc[1],
                                   device=fast.out_alloc[2])
        if lse_out is None and self.problem.return_lse:
            lse_out = fast.torch.empty(fast.lse_alloc[0], dtype=fast.lse_alloc[1],
                                       device=fast.lse_alloc[2])
        ptrs = fast.pointers((q, k, v, out, seqlens, k_scale, v_scale, lse_out),
                             layouts_known=known_stream is not None)
        if ptrs is None:
            return None
        self._runner.run_pointers(ptrs, known_stream if known_stream is not None
                                  else torch_current_stream(q.get_device()))
        return (out, lse_out) if self.problem.return_lse else out

    def _run_general(self, q: Any, k: Any, v: Any, out: Any, seqlens: Any, k_scale: Any,
                     v_scale: Any, lse_out: Any, stream: Any) -> Any:
        handle = stream_handle(stream, q)
        args, scalars = _views(q, k, v, out, seqlens, k_scale, v_scale, lse_out, handle)
        for name, value in scalars.items():
            if value is not None:
                raise ContractError(f"{name} must be a per-run tensor or None in run (a float "
                                    f"scale is fixed when the plan is made), got "
                                    f"{type(value).__name__} {value!r}")
        args, result = _results(self.backend, self.problem, args, q, out, lse_out, handle)
        _check_planned(self._layouts, args)
        check_aliasing(args)
        check_host_values(args, self.problem.kv_len)
        self._runner(args, handle)
        return result


def _row_major(shape: tuple[int, ...], dtype: DType, device: Device) -> Layout:
    """The layout of a result flashdec allocates."""
    return Layout((shape, _dlpack._row_major(shape), dtype, device))


def _validated(q: Any, k: Any, v: Any, out: Any, seqlens: Any, k_scale: Any, v_scale: Any,
               lse_out: Any, backend: str | None, stream: int | None,
               **features: Any) -> tuple[DecodeArgs, DecodeProblem, Backend]:
    """What decode and plan share: views, the contract, the backend."""
    args, scalars = _views(q, k, v, out, seqlens, k_scale, v_scale, lse_out, stream)
    problem = validate(args, **features, **scalars)
    return args, problem, select_backend(backend, problem)


def plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, *,
         scale: float | None = None, softcap: float | None = None,
         window_left: int | None = None, seqlens: Lengths | None = None,
         k_scale: Scale | None = None, v_scale: Scale | None = None, return_lse: bool = False,
         lse_out: Tensor | None = None, backend: str | None = None,
         **options: Any) -> DecodePlan:
    """Validate once, choose the backend, prepare kernels and workspace; see :func:`decode`.

    ``out`` fixes Y's layout; without it Y is planned as a fresh row-major tensor like Q (and
    LSE likewise with ``return_lse``). ``seqlens``, scale tensors and ``lse_out`` fix their
    presence and layout: each run passes tensors of the same layout. Float scales, ``scale``,
    ``softcap`` and ``window_left`` are fixed here, and so are the backend options
    (``num_splits=``), checked here on every backend.
    """
    parsed = BackendOptions.parse(options)
    args, problem, chosen = _validated(q, k, v, out, seqlens, k_scale, v_scale, lse_out,
                                       backend, None, scale=scale, softcap=softcap,
                                       window_left=window_left, return_lse=return_lse)
    planned = layouts(args)
    if out is None:
        planned = planned._replace(out=_row_major(problem.out_shape, problem.dtype,
                                                  problem.device))
    if problem.return_lse and lse_out is None:
        planned = planned._replace(lse=_row_major(problem.lse_shape, DType.float32,
                                                  problem.device))
    return DecodePlan(problem, chosen, chosen.prepare(problem, planned, parsed), planned)


def decode(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, *,
           scale: float | None = None, softcap: float | None = None,
           window_left: int | None = None, seqlens: Lengths | None = None,
           k_scale: Scale | None = None, v_scale: Scale | None = None,
           return_lse: bool = False, lse_out: Tensor | None = None, backend: str | None = None,
           stream: Any = None, **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """One decode step of attention: ``Y[b, h] = softmax(s) . V[b, g]`` over the keys ``j`` of
    ``[lo_b, L_b)``, with ``s_j = softcap * tanh(scale * Q[b, h] . K[b, g, j] / softcap)``.

    ``g = h // (H_q // H_kv)``; ``L_b = seqlens[b]`` (else K_len); ``lo_b = L_b - 1 -
    window_left`` (else 0); fp8 K and V are read as ``k_scale[g] * K`` and ``v_scale[g] * V``.
    Shapes: Q ``[B, H_q, D]``, K and V ``[B, H_kv, K_len, D]`` (physical layout, any strides
    >= 0), Y ``[B, H_q, D]``, LSE ``[B, H_q]``. Q and Y share one dtype (float16, bfloat16,
    float32); K and V share Q's dtype or one fp8 dtype (float8_e4m3fn, float8_e5m2, with
    float16 or bfloat16 Q). One device. An empty key range gives Y = 0 and LSE = -inf.

    flashdec computes no gradients, on every backend: a torch tensor that requires grad is
    refused (ContractError; pass ``x.detach()``), so results never carry autograd history. A
    torch view whose memory does not hold its values (the negative or conjugate bit, e.g.
    ``x.conj().imag``) and a non-strided (sparse) tensor are refused too.

    Parameters
    ----------
    q, k, v : torch.Tensor, numpy.ndarray, any DLPack producer, or TensorRef
    out : writable tensor of Q's shape, optional
        Written in full. Without it Y is allocated like Q (torch for torch, NumPy for NumPy).
    scale : float, optional
        Multiplies ``Q . K``; default ``1 / sqrt(D)``. At most 2**126 in magnitude, and so
        is ``scale / softcap`` (the kernels compute in float32).
    softcap : float > 0, optional
        Caps the scaled scores at +-softcap through tanh (Gemma 2).
    window_left : int >= 0, optional
        Attend only to keys ``j >= L - 1 - window_left``; any value >= K_len attends to every
        key (the plan records it as K_len).
    seqlens : int32 tensor [B] or a host sequence of ints, optional
        Valid KV rows per batch entry; K_len is then the capacity and rows at or past
        ``seqlens[b]`` are never read. On K's device (read at run time, clamped to
        [0, K_len]) or on the CPU (checked to lie in [0, K_len]).
    k_scale, v_scale : float > 0 or float32 tensor [H_kv], optional
        Dequantization scales of K and V; required with fp8 K/V, default 1. Floats, and a
        tensor's values in host memory, are checked to be finite and > 0; a tensor on the GPU
        is read at run time, unchecked (like device ``seqlens``).
    return_lse : bool
        Also return LSE = log of the softmax denominator of the (capped) scores, float32.
    lse_out : writable float32 tensor [B, H_q], optional
        Where to write LSE (implies ``return_lse``).
    backend : {"auto", "torch", "cuda"}, optional
        Wins over ``FLASHDEC_BACKEND``. An explicit backend never falls back.
    stream : int or object with ``__cuda_stream__``, optional
        CUDA stream to run on; default torch's current stream for torch tensors.
    **options
        Backend options (:class:`BackendOptions`), checked the same way on every backend:
        ``num_splits=`` (1..512) cuts the KV sequence into that many chunks on cuda (the torch
        backend computes in one piece). An unknown name is a ContractError.

    Returns
    -------
    Y (``out`` itself when given), or ``(Y, LSE)`` with ``return_lse`` or ``lse_out``.

    Notes
    -----
    With torch tensors, ``decode`` keeps the plans it makes (up to ``PLAN_CACHE_SIZE``, least
    recently used dropped), keyed by the layouts, scalars, backend, options, stream and thread,
    so a loop of calls validates and chooses kernels once. Each cached plan holds its split
    workspace; use :func:`plan` to own that memory explicitly.

    Raises
    ------
    ContractError, UnsupportedError, BackendUnavailableError, CompilationError
    """
    key = _plan_key(q, k, v, out, seqlens, k_scale, v_scale, lse_out, stream, scale, softcap,
                    window_left, return_lse, backend, options)
    if key is not None:
        with _plans_lock:
            found = _plans.get(key)
            if found is not None:
                _plans.move_to_end(key)
        if found is None:
            found = plan(q, k, v, out, scale=scale, softcap=softcap, window_left=window_left,
                         seqlens=seqlens, k_scale=k_scale, v_scale=v_scale,
                         return_lse=return_lse, lse_out=lse_out, backend=backend, **options)
            with _plans_lock:
                _plans[key] = found
                while len(_plans) > PLAN_CACHE_SIZE:
                    _plans.popitem(last=False)
        tensor = type(q)
        k_scale = k_scale if type(k_scale) is tensor else None  # floats were fixed by the plan
        v_scale = v_scale if type(v_scale) is tensor else None
        if found._fast is None:
            return found.run(q, k, v, out, seqlens=seqlens, k_scale=k_scale, v_scale=v_scale,
                             lse_out=lse_out)
        # the key matched every tensor's layout (and read the stream), so the run checks only
        # the overlap; an overlap goes straight to the general path, which names it
        done = found._run_torch(q, k, v, out, seqlens, k_scale, v_scale, lse_out,
                                key[_KEY_STREAM])
        if done is not None:
            return done
        return found._run_general(q, k, v, out, seqlens, k_scale, v_scale, lse_out, None)
    parsed = BackendOptions.parse(options)
    handle = stream_handle(stream, q)
    args, problem, chosen = _validated(q, k, v, out, seqlens, k_scale, v_scale, lse_out,
                                       backend, handle, scale=scale, softcap=softcap,
                                       window_left=window_left, return_lse=return_lse)
    args, result = _results(chosen, problem, args, q, out, lse_out, handle)
    chosen.prepare(problem, layouts(args), parsed)(args, handle)
    return result


# decode() keeps the plans it made for torch tensors, keyed by everything a plan fixes
# (layouts, scalars, backend, options) plus the stream and thread that use it, so a loop of
# decode calls pays for validation and kernel choice once. Least recently used go first.
PLAN_CACHE_SIZE = 64
_KEY_STREAM = -2  # where _plan_key keeps the current stream (None off the GPU)
_plans: OrderedDict[tuple, DecodePlan] = OrderedDict()
_plans_lock = threading.Lock()


def _plan_key(q: Any, k: Any, v: Any, out: Any, seqlens: Any, k_scale: Any, v_scale: Any,
              lse_out: Any, stream: Any, scale: Any, softcap: Any, window_left: Any,
              return_lse: Any, backend: Any, options: dict) -> tuple | None:
    """The cache key of a decode call with torch tensors, or None (not cacheable: other
    producers, host seqlens, an explicit stream, unhashable arguments)."""
    torch = sys.modules.get("torch")
    if torch is None or stream is not None or type(q) is not torch.Tensor:
        return None
    tensor = torch.Tensor
    sigs = []
    try:
        for x in (q, k, v, out, seqlens, lse_out):
            if x is None:
                sigs.append(None)
            elif type(x) is tensor:
                sigs.append((x.shape, x.stride(), x.dtype, x.get_device()))
            else:
                return None
        for x in (k_scale, v_scale):
            sigs.append(x if type(x) is not tensor
                        else (x.shape, x.stride(), x.dtype, x.get_device()))
    except RuntimeError:  # a tensor without strides (sparse): the general path names it
        return None
    device = q.get_device()
    key = (tuple(sigs), scale, softcap, window_left, return_lse,
           backend if backend is not None else _env.backend_choice(),
           tuple(sorted(options.items())) if options else (),
           torch_current_stream(device) if device >= 0 else None,  # key[_KEY_STREAM]
           threading.get_ident())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _first(x: Any) -> Any:
    """The tensor that stands for ``x`` (a stacked tensor or a sequence of parts)."""
    if _is_tensor(x) or not isinstance(x, Sequence) or not x:
        return x
    return x[0]


def _parts(x: Any, name: str, stacked_rank: int, axes: str,
           stream: int | None) -> list[TensorRef]:
    """One view per part: slices of a stacked tensor (no copy), or views of a sequence."""
    if _is_tensor(x):
        stacked = TensorRef.from_object(x, name=name, stream=stream)
        check_rank(name, stacked, stacked_rank, f"{axes} (or pass a sequence of N tensors)")
        return [stacked[i] for i in range(stacked.shape[0])]
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [TensorRef.from_object(p, name=f"{name}[{i}]", stream=stream)
                for i, p in enumerate(x)]
    raise ContractError(f"{name} must be a stacked tensor {axes} or a sequence of N tensors, "
                        f"got {type(x).__name__}")


def merge_states(outputs: Tensor | Sequence[Tensor], lses: Tensor | Sequence[Tensor], *,
                 out: Tensor | None = None, lse_out: Tensor | None = None,
                 backend: str | None = None, stream: Any = None) -> tuple[Tensor, Tensor]:
    """Merge attention states of the same queries over disjoint key sets:
    ``Y = sum_i w_i Y_i / sum_i w_i`` and ``LSE = m + log(sum_i w_i)`` with
    ``w_i = exp(lse_i - m)``, ``m = max_i lse_i``.

    What context parallelism and cascade attention do with the ``(Y, LSE)`` pairs that
    ``decode(..., return_lse=True)`` returns for each key set. Parts with LSE = -inf (no keys)
    weigh nothing; if every part is empty, Y = 0 and LSE = -inf. NaN propagates. Parts are
    summed in order, in fp32, so the result is deterministic. An LSE of +inf is no state
    (ContractError for LSEs in host memory; LSEs on the GPU are not read on the host, and a
    +inf there gives NaN in its row). Torch tensors that require grad are refused, as in
    :func:`decode`.

    Parameters
    ----------
    outputs : tensor [N, B, H, D] or a sequence of N tensors [B, H, D]
        float16, bfloat16 or float32; Y has their dtype.
    lses : float32 tensor [N, B, H] or a sequence of N tensors [B, H]
    out, lse_out : writable tensors [B, H, D] and float32 [B, H], optional
    backend, stream
        As in :func:`decode`.

    Returns
    -------
    (Y, LSE)

    Raises
    ------
    ContractError, UnsupportedError, BackendUnavailableError
    """
    like_out, like_lse = _first(outputs), _first(lses)
    handle = stream_handle(stream, like_out)
    dl_stream = dlpack_stream(handle)
    parts_out = _parts(outputs, "outputs", 4, "[N, batch, num_heads, head_dim]", dl_stream)
    parts_lse = _parts(lses, "lses", 3, "[N, batch, num_heads]", dl_stream)
    out_view = _view(out, "out", dl_stream, writable=True)
    lse_view = _view(lse_out, "lse_out", dl_stream, writable=True)
    problem = validate_merge(parts_out, parts_lse, out_view, lse_view)
    chosen = select_backend(backend, problem)
    if out is None:
        out = _new_result(chosen, problem, like_out, lse=False)
        out_view = TensorMut.from_object(out, name="out", stream=dl_stream)
    if lse_out is None:
        lse_out = _new_result(chosen, problem, like_lse, lse=True)
        lse_view = TensorMut.from_object(lse_out, name="lse_out", stream=dl_stream)
    if problem.batch:
        chosen.merge(problem, parts_out, parts_lse, out_view, lse_view, handle)
    return out, lse_out
