"""The public entry points ``decode``, ``plan`` and ``merge_states``: the argument bundle,
the contract, backend choice, launch. The plan lives in ``_plan``, decode's plan cache in
``_plan_cache``, the bundle's views and results in ``_args``."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from . import _args, _plan_cache
from ._contract import (BackendOptions, DecodeArgs, DecodeProblem, check_rank, layouts,
                        validate, validate_merge)
from ._dtypes import DType
from ._errors import ContractError
from ._plan import BoundDecode, DecodePlan
from ._registry import Backend, select_backend
from ._streams import dlpack_stream, stream_handle
from ._views import Lengths, Scale, Tensor, TensorMut, TensorRef

__all__ = ["decode", "plan", "DecodePlan", "BoundDecode", "merge_states"]


def _torch_compiling() -> bool:
    """torch.compile is tracing this call (``flashdec::decode`` then stands for it)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def _validated(given: DecodeArgs, backend: str | None, stream: int | None,
               **features: Any) -> tuple[DecodeArgs, DecodeProblem, Backend]:
    """What decode and plan share: views, the contract, the backend."""
    args, scalars = _args.views(given, stream)
    problem = validate(args, **features, **scalars)
    return args, problem, select_backend(backend, problem)


def plan(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, *,
         scale: float | None = None, softcap: float | None = None,
         window_left: int | None = None, seqlens: Lengths | None = None,
         k_scale: Scale | None = None, v_scale: Scale | None = None, return_lse: bool = False,
         lse_out: Tensor | None = None, block_table: Tensor | None = None,
         cache_leftpad: Tensor | None = None, backend: str | None = None,
         **options: Any) -> DecodePlan:
    """Validate once, choose the backend, prepare kernels and workspace; see :func:`decode`.

    ``out`` fixes Y's layout; without it Y is planned as a fresh row-major tensor like Q (and
    LSE likewise with ``return_lse``). ``seqlens``, scale tensors and ``lse_out`` fix their
    presence and layout: each run passes tensors of the same layout. Float scales, ``scale``,
    ``softcap`` and ``window_left`` are fixed here, and so are the backend options
    (``num_splits=``), checked here on every backend. A paged plan fixes ``max_pages``; every
    run reads its table and lengths anew (on the cuda backend, lengths also decide how the
    keys are split, on the GPU).
    """
    given = _args.bundle(q, k, v, out, seqlens, k_scale, v_scale, lse_out, block_table,
                         cache_leftpad)
    return _plan_of(given, scale, softcap, window_left, return_lse, backend, options)


def _plan_of(given: DecodeArgs, scale: Any, softcap: Any, window_left: Any, return_lse: Any,
             backend: Any, options: dict) -> DecodePlan:
    parsed = BackendOptions.parse(options)
    args, problem, chosen = _validated(given, backend, None, scale=scale, softcap=softcap,
                                       window_left=window_left, return_lse=return_lse)
    planned = layouts(args)
    if given.out is None:
        planned = planned._replace(out=_args.row_major(problem.out_shape, problem.dtype,
                                                       problem.device))
    if problem.return_lse and given.lse is None:
        planned = planned._replace(lse=_args.row_major(problem.lse_shape, DType.float32,
                                                       problem.device))
    return DecodePlan(problem, chosen, chosen.prepare(problem, planned, parsed), planned)


def decode(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, *,
           scale: float | None = None, softcap: float | None = None,
           window_left: int | None = None, seqlens: Lengths | None = None,
           k_scale: Scale | None = None, v_scale: Scale | None = None,
           return_lse: bool = False, lse_out: Tensor | None = None,
           block_table: Tensor | None = None, cache_leftpad: Tensor | None = None,
           backend: str | None = None, stream: Any = None,
           **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """One decode step of attention: ``Y[b, h] = softmax(s) . V[b, g]`` over the keys ``j`` of
    ``[lo_b, L_b)``, with ``s_j = softcap * tanh(scale * Q[b, h] . K[b, g, j] / softcap)``.

    ``g = h // (H_q // H_kv)``; ``L_b = seqlens[b]`` (else K_len); ``lo_b`` is the larger of
    ``L_b - 1 - window_left`` and ``cache_leftpad[b]`` (else 0); fp8 K and V are read as
    ``k_scale[g] * K`` and ``v_scale[g] * V``. With ``block_table``, K and V are pools of pages
    and key ``j`` of sequence ``b`` is row ``j % page_size`` of page
    ``block_table[b, j // page_size]``.
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
    block_table : int32 tensor [B, max_pages] on K's device, optional
        A paged cache: K and V are then pools ``[num_pages, H_kv, page_size, D]`` (any
        strides; vLLM's ``[num_pages, page_size, H_kv, D]`` passes as
        ``.permute(0, 2, 1, 3)``), K_len is ``max_pages * page_size``, and ``seqlens`` is
        required. Entries past the pages ``seqlens[b]`` reaches are never read. On the GPU the
        table is read at run time and an id outside ``[0, num_pages)`` is clamped into range
        (memory-safe; that sequence's result is then meaningless); in host memory the ids a
        sequence reads are checked. Any page_size; the tensor-core kernel takes multiples of 16.
    cache_leftpad : int32 tensor [B] on K's device, optional
        Keys before ``cache_leftpad[b]`` are not attended (left-padded batches, as
        ``flash_attn_with_kvcache``'s ``cache_leftpad``); clamped to [0, K_len] on the GPU,
        checked in host memory.
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
    With torch tensors, ``decode`` keeps the plans it makes (up to 64,
    ``flashdec._plan_cache.PLAN_CACHE_SIZE``; least recently used dropped), keyed by the
    layouts, scalars, backend, options, stream and thread, so a loop of calls validates and
    chooses kernels once. Each cached plan holds its split workspace; use :func:`plan` to own
    that memory explicitly, and :meth:`DecodePlan.bind` for a loop that calls with the same
    tensors every step (a replayed CUDA graph, no per-call checks).

    Raises
    ------
    ContractError, UnsupportedError, BackendUnavailableError, CompilationError
    """
    given = _args.bundle(q, k, v, out, seqlens, k_scale, v_scale, lse_out, block_table,
                         cache_leftpad)
    if _torch_compiling():  # torch.compile traces the custom op, not this body
        from . import _torch_op

        return _torch_op.compiled_decode(given, scale, softcap, window_left, return_lse,
                                         backend, options)
    key = _plan_cache.key(given, stream, (scale, softcap, window_left, return_lse), backend,
                          options)
    if key is not None:
        found = _plan_cache.lookup(key, lambda: _plan_of(given, scale, softcap, window_left,
                                                         return_lse, backend, options))
        tensor = type(q)  # floats were fixed by the plan; run takes scale tensors only
        if (k_scale is not None and type(k_scale) is not tensor) or (
                v_scale is not None and type(v_scale) is not tensor):
            given = given._replace(k_scale=k_scale if type(k_scale) is tensor else None,
                                   v_scale=v_scale if type(v_scale) is tensor else None)
        fast = found._fast
        if fast is not None:
            # the key matched every tensor's layout (and read the stream), so the run checks
            # only the overlap; an overlap goes to the general path, which names it
            done = fast.run(given, key[_plan_cache.KEY_STREAM], layouts_known=True)
            if done is not None:
                return done
        return found.run_checked(given, None)
    parsed = BackendOptions.parse(options)
    handle = stream_handle(stream, q)
    args, problem, chosen = _validated(given, backend, handle, scale=scale, softcap=softcap,
                                       window_left=window_left, return_lse=return_lse)
    args, result = _args.complete(chosen, problem, args, given, handle)
    chosen.prepare(problem, layouts(args), parsed)(args, handle)
    return result


def _first(x: Any) -> Any:
    """The tensor that stands for ``x`` (a stacked tensor or a sequence of parts)."""
    if _args.is_tensor(x) or not isinstance(x, Sequence) or not x:
        return x
    return x[0]


def _parts(x: Any, name: str, stacked_rank: int, axes: str,
           stream: int | None) -> list[TensorRef]:
    """One view per part: slices of a stacked tensor (no copy), or views of a sequence."""
    if _args.is_tensor(x):
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
    out_view = _args.view(out, "out", dl_stream, writable=True)
    lse_view = _args.view(lse_out, "lse_out", dl_stream, writable=True)
    problem = validate_merge(parts_out, parts_lse, out_view, lse_view)
    chosen = select_backend(backend, problem)
    if out is None:
        out = _args.new_result(chosen, problem, like_out, lse=False)
        out_view = TensorMut.from_object(out, name="out", stream=dl_stream)
    if lse_out is None:
        lse_out = _args.new_result(chosen, problem, like_lse, lse=True)
        lse_view = TensorMut.from_object(lse_out, name="lse_out", stream=dl_stream)
    if problem.batch:
        chosen.merge(problem, parts_out, parts_lse, out_view, lse_view, handle)
    return out, lse_out
