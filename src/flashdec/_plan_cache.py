"""The plans ``decode`` keeps for torch tensors, keyed by everything a plan fixes (layouts,
scalars, backend, options) plus the stream and thread that use it, so a loop of decode calls
pays for validation and kernel choice once. Least recently used go first."""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any, Callable

from . import _env
from ._contract import DecodeArgs
from ._plan import DecodePlan
from ._streams import torch_current_stream

__all__ = ["PLAN_CACHE_SIZE", "KEY_STREAM", "key", "lookup", "clear", "size"]

PLAN_CACHE_SIZE = 64
KEY_STREAM = -2  # where key() keeps the current stream (None off the GPU)
_plans: OrderedDict[tuple, DecodePlan] = OrderedDict()
_lock = threading.Lock()
_SCALES = (DecodeArgs._fields.index("k_scale"), DecodeArgs._fields.index("v_scale"))


def key(given: DecodeArgs, stream: Any, scalars: tuple, backend: str | None,
        options: dict) -> tuple | None:
    """The cache key of a decode call with torch tensors, or None (not cacheable: other
    producers, host seqlens, an explicit stream, unhashable arguments). ``scalars``: scale,
    softcap, window_left, return_lse."""
    torch = sys.modules.get("torch")
    q = given.q
    if torch is None or stream is not None or type(q) is not torch.Tensor:
        return None
    tensor = torch.Tensor
    sigs = []
    try:
        for i, x in enumerate(given):
            if x is None:
                sigs.append(None)
            elif type(x) is tensor:
                sigs.append((x.shape, x.stride(), x.dtype, x.get_device()))
            elif i in _SCALES:  # a float scale is part of the key
                sigs.append(x)
            else:
                return None
    except RuntimeError:  # a tensor without strides (sparse): the general path names it
        return None
    device = q.get_device()
    found = (tuple(sigs), scalars, backend if backend is not None else _env.backend_choice(),
             tuple(sorted(options.items())) if options else (),
             torch_current_stream(device) if device >= 0 else None,  # found[KEY_STREAM]
             threading.get_ident())
    try:
        hash(found)
    except TypeError:
        return None
    return found


def lookup(cache_key: tuple, make: Callable[[], DecodePlan]) -> DecodePlan:
    """The plan cached under ``cache_key``, made by ``make()`` on a miss."""
    with _lock:
        found = _plans.get(cache_key)
        if found is not None:
            _plans.move_to_end(cache_key)
            return found
    found = make()
    with _lock:
        _plans[cache_key] = found
        while len(_plans) > PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return found


def clear() -> None:
    with _lock:
        _plans.clear()


def size() -> int:
    return len(_plans)
