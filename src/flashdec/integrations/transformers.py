"""flashdec as an attention implementation of Hugging Face transformers (5.x).

Importing this module registers it under :data:`NAME`; then
``AutoModelForCausalLM.from_pretrained(..., attn_implementation="fdec")`` (or
``model.set_attn_implementation("fdec")``) runs every decode step (one new token per
sequence) through :func:`flashdec.decode`, reading the model's KV cache in place: the key and
value states a cache layer hands over are ``[B, H_kv, S, D]``, flashdec's physical layout. The
boolean mask transformers builds for the step (``sdpa``'s format, registered for this name in
``AttentionMaskInterface``: without it the function would get no mask and padding would be
ignored) is turned into each row's key range ``[cache_leftpad[b], seqlens[b])`` on the device,
with no sync: a static cache's capacity, left padding and a sliding window all become that
range. The model's ``scaling`` and ``softcap`` are passed on.

Everything else runs transformers' own implementation: ``sdpa`` for prefill (more than one
query token), dropout, ``output_attentions`` and position biases; ``eager`` where ``sdpa`` has no
softcap (Gemma 2's prefill); and any step whose inputs require grad (flashdec computes no
gradients). Masks whose attended keys are not one run per row (packed sequences) are not
supported on the flashdec path: on the CPU they are detected and sent to ``sdpa``; on the GPU
(where checking would need a sync) the row's first to last attended key is used.

The name has no "flash" in it: transformers takes such names for FlashAttention kernels.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import _api

__all__ = ["NAME", "attention_forward", "register"]

NAME = "fdec"


def _key_ranges(mask: torch.Tensor | None, kv_len: int) -> tuple[Any, Any]:
    """(seqlens, cache_leftpad) as int32 [B] from a boolean mask [B, 1, 1, S] (True: attend),
    or (None, None) without a mask."""
    if mask is None:
        return None, None
    rows = mask[:, 0, 0, :]
    positions = torch.arange(kv_len, device=rows.device, dtype=torch.int32)
    last = torch.where(rows, positions, -1).amax(-1)         # -1: no key
    first = torch.where(rows, positions, kv_len).amin(-1)    # kv_len: no key
    return (last + 1).to(torch.int32), torch.minimum(first, last + 1).to(torch.int32)


def _one_run_per_row(mask: torch.Tensor, seqlens: Any, leftpad: Any) -> bool:
    """Every row attends to exactly its keys [leftpad, seqlens) (checked on the CPU only)."""
    if mask.device.type != "cpu":
        return True
    return bool((mask[:, 0, 0, :].sum(-1) == seqlens - leftpad).all())


def _eager(module: torch.nn.Module) -> Any:
    """The model's own eager attention (each transformers model file defines
    ``eager_attention_forward``): the fallback where sdpa has no softcap."""
    found = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if found is None:
        raise NotImplementedError(f"{type(module).__name__} has softcap and more than one query "
                                  f"token, and its module defines no eager_attention_forward "
                                  f"to run that step")
    return found


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` [B, H, L, D], ``key``/``value``
    [B, H_kv, S, D]; returns ([B, L, H, D], None). flashdec for L == 1, else the fallbacks
    the module docstring lists."""
    softcap = kwargs.get("softcap")
    decode_step = (query.shape[2] == 1 and not dropout and not kwargs.get("output_attentions")
                   and kwargs.get("position_bias") is None
                   and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                        or value.requires_grad))
                   and (attention_mask is None or attention_mask.dtype == torch.bool))
    if decode_step:
        seqlens, leftpad = _key_ranges(attention_mask, key.shape[2])
        if attention_mask is None or _one_run_per_row(attention_mask, seqlens, leftpad):
            y = _api.decode(query[:, :, 0], key, value, scale=scaling, softcap=softcap,
                            seqlens=seqlens, cache_leftpad=leftpad)
            return y.unsqueeze(1), None
    if softcap is not None:  # eager adds its mask to the scores: the boolean one as 0 / min
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype,
                                         device=query.device).masked_fill(
                                             ~attention_mask, torch.finfo(query.dtype).min)
        return _eager(module)(module, query, key, value, attention_mask, dropout=dropout,
                              scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register(name: str = NAME) -> str:
    """Register :func:`attention_forward` and sdpa's boolean mask under ``name`` (done for
    :data:`NAME` on import); returns ``name``."""
    if "flash" in name.lower():
        raise ValueError(f"{name!r}: transformers takes names containing 'flash' for "
                         f"FlashAttention kernels; choose another")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
