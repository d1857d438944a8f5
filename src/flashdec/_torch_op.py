"""``flashdec::decode`` as a torch custom op, so that ``flashdec.decode`` works inside
``torch.compile(fullgraph=True)``: while torch compiles, ``decode`` calls the op instead of its
Python body (which holds caches, ctypes and DLPack that no tracer follows), and the op's fake
implementation gives the shapes. At run time the op calls ``decode`` itself, eagerly, so every
backend and feature is the same. Registered when flashdec is imported after torch (or on first
use).

The op is functional: it returns ``(Y, LSE)`` (LSE has shape ``[0]`` when not asked for), and
``out=`` / ``lse_out=`` given to ``decode`` under compile are filled by a copy from them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._contract import DecodeArgs
from ._errors import ContractError
from ._views import check_torch_tensor

__all__ = ["compiled_decode"]


@torch.library.custom_op("flashdec::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               seqlens: Optional[torch.Tensor], k_scale: Optional[torch.Tensor],
               v_scale: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
               cache_leftpad: Optional[torch.Tensor], scale: Optional[float],
               softcap: Optional[float], window_left: Optional[int],
               k_scale_value: Optional[float], v_scale_value: Optional[float],
               return_lse: bool, num_splits: Optional[int],
               backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from ._api import decode

    options = {} if num_splits is None else {"num_splits": num_splits}
    result = decode(q, k, v, seqlens=seqlens,
                    k_scale=k_scale if k_scale is not None else k_scale_value,
                    v_scale=v_scale if v_scale is not None else v_scale_value,
                    block_table=block_table, cache_leftpad=cache_leftpad, scale=scale,
                    softcap=softcap, window_left=window_left, return_lse=return_lse,
                    backend=backend, **options)
    if return_lse:
        return result
    return result, q.new_empty((0,), dtype=torch.float32)


@_decode_op.register_fake
def _(q, k, v, seqlens, k_scale, v_scale, block_table, cache_leftpad, scale, softcap,
      window_left, k_scale_value, v_scale_value, return_lse, num_splits, backend):
    lse_shape = tuple(q.shape[:2]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


_TENSOR_ARGS = ("q", "k", "v", "seqlens", "k_scale", "v_scale", "block_table", "cache_leftpad")


def _refuse_grad(ctx: Any, inputs: tuple, output: Any) -> None:
    """Autograd reaches the op only for inputs that require grad: refuse them, by name, as
    eager decode does (flashdec computes no gradients)."""
    for name, x in zip(_TENSOR_ARGS, inputs):
        if isinstance(x, torch.Tensor):
            check_torch_tensor(x, name)


def _no_backward(ctx: Any, *grads: Any) -> None:
    raise ContractError("flashdec computes no gradients")  # unreachable: forward refuses


_decode_op.register_autograd(_no_backward, setup_context=_refuse_grad)


def _scale_parts(value: Any) -> tuple[Optional[torch.Tensor], Optional[float]]:
    """A scale as the op takes it: (tensor, None) or (None, float)."""
    if isinstance(value, torch.Tensor):
        return value, None
    return None, value


def compiled_decode(given: DecodeArgs, scale: Any, softcap: Any, window_left: Any,
                    return_lse: Any, backend: Any, options: dict) -> Any:
    """What ``decode`` returns, through the custom op (called while torch compiles)."""
    unknown = set(options) - {"num_splits"}
    if unknown:
        raise ContractError(f"unknown backend option {sorted(unknown)[0]}; valid options: "
                            f"num_splits")
    seqlens = given.seqlens
    if seqlens is not None and not isinstance(seqlens, torch.Tensor):
        seqlens = torch.tensor(seqlens, dtype=torch.int32)  # host lengths
    k_scale, k_value = _scale_parts(given.k_scale)
    v_scale, v_value = _scale_parts(given.v_scale)
    want_lse = bool(return_lse) or given.lse is not None
    y, lse = torch.ops.flashdec.decode(
        given.q, given.k, given.v, seqlens, k_scale, v_scale, given.block_table,
        given.cache_leftpad, scale, softcap, window_left, k_value, v_value, want_lse,
        options.get("num_splits"), backend)
    if given.out is not None:
        given.out.copy_(y)
        y = given.out
    if given.lse is not None:
        given.lse.copy_(lse)
        lse = given.lse
    return (y, lse) if want_lse else y
