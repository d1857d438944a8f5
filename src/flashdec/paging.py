"""Converters between page-table formats and flashdec's dense ``block_table``.

flashdec's paged cache reads an int32 ``block_table [B, max_pages]``: key j of sequence b is
row ``j % page_size`` of page ``block_table[b, j // page_size]``, and ``seqlens[b]`` keys are
valid. Engines that keep a compressed page list (FlashInfer's ``paged_kv_indptr``,
``paged_kv_indices``, ``paged_kv_last_page_len``) convert it here once per step.
"""

from __future__ import annotations

import sys
from numbers import Integral
from typing import Any

from ._errors import ContractError

__all__ = ["block_table_from_page_list"]

_INT32_MAX = 2**31 - 1
_TORCH_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def block_table_from_page_list(indptr: Any, indices: Any, last_page_len: Any, page_size: int,
                               *, max_pages: int | None = None) -> tuple[Any, Any]:
    """The dense ``block_table [B, max_pages]`` and ``seqlens [B]`` of a compressed page list:
    ``block_table[b, i] = indices[indptr[b] + i]`` for ``i < n_b = indptr[b+1] - indptr[b]``
    (0 past a sequence's pages) and ``seqlens[b] = (n_b - 1) * page_size + last_page_len[b]``
    (0 when ``n_b = 0``).

    Sequence b owns pages ``indices[indptr[b]:indptr[b+1]]`` in order, its last page holding
    ``last_page_len[b]`` keys (FlashInfer's layout). The results feed :func:`decode`'s
    ``block_table=`` and ``seqlens=`` and :func:`append_kv`'s ``block_table=``.

    Parameters
    ----------
    indptr : int tensor or array [B + 1]
        Non-decreasing, ``indptr[0] = 0``.
    indices : int tensor or array [>= indptr[B]]
        Page ids; those the list uses must lie in ``[0, 2**31)`` (int32).
    last_page_len : int tensor or array [B]
        Keys in each sequence's last page, in ``[1, page_size]`` where it has pages (ignored
        where it has none).
    page_size : int >= 1
    max_pages : int, optional
        Columns of the table; default the largest page count. Smaller than a sequence's page
        count is an error.

    Returns
    -------
    (block_table, seqlens)
        int32, row-major. Torch tensors on the inputs' device for torch inputs (any integer
        dtype, one device; ``indptr`` and ``last_page_len`` are read on the host, a sync
        on the GPU), NumPy arrays for NumPy arrays or sequences.

    Raises
    ------
    ContractError
        A bad argument: rank, dtype, device, indptr not starting at 0 or decreasing, too few
        indices, a last-page length out of range, too small a max_pages, an int32 overflow.
    """
    import numpy

    named = {"indptr": indptr, "indices": indices, "last_page_len": last_page_len}
    torch = sys.modules.get("torch")
    is_torch = [torch is not None and isinstance(x, torch.Tensor) for x in named.values()]
    if any(is_torch):
        if not all(is_torch):
            odd = next(n for n, t in zip(named, is_torch) if not t)
            raise ContractError(f"{odd} is a {type(named[odd]).__name__}, but the other "
                                f"arguments are torch tensors: pass all three as torch tensors "
                                f"(one device) or all as NumPy arrays")
        device = indptr.device
        for name, x in named.items():
            if str(x.dtype).removeprefix("torch.") not in _TORCH_INTS:
                raise ContractError(f"{name} has dtype {str(x.dtype).removeprefix('torch.')}; "
                                    f"expected an integer dtype (int32 or int64)")
            if x.device != device:
                raise ContractError(f"{name} is on {x.device} but indptr is on {device}: the "
                                    f"page list must be on one device")
        hosts = {name: x.detach().cpu().numpy() if name != "indices" else None
                 for name, x in named.items()}
    else:
        device = None
        hosts = {}
        for name, x in named.items():
            try:
                hosts[name] = numpy.asarray(x)
            except (ValueError, TypeError) as exc:
                raise ContractError(f"{name} must be an integer array: {exc}") from exc
            if hosts[name].size and hosts[name].dtype.kind not in "iu":
                raise ContractError(f"{name} has dtype {hosts[name].dtype}; expected an integer "
                                    f"dtype (int32 or int64)")
        named = dict(hosts)
        indices = hosts["indices"]
    for name, x in named.items():
        if x.ndim != 1:
            raise ContractError(f"{name} must have rank 1, got rank {x.ndim} with shape "
                                f"{tuple(x.shape)}")

    if isinstance(page_size, bool) or not isinstance(page_size, Integral) or page_size < 1:
        raise ContractError(f"page_size must be an int >= 1, got {page_size!r}")
    page_size = int(page_size)
    ptr = hosts["indptr"].astype(numpy.int64)
    last = hosts["last_page_len"].astype(numpy.int64)
    batch = last.shape[0]
    if ptr.shape[0] != batch + 1:
        raise ContractError(f"indptr must have B + 1 = {batch + 1} entries (last_page_len has "
                            f"B = {batch}), got {ptr.shape[0]}")
    if ptr[0] != 0:
        raise ContractError(f"indptr[0] is {int(ptr[0])}; a page list starts at 0")
    counts = numpy.diff(ptr)
    if (counts < 0).any():
        b = int(numpy.argmax(counts < 0))
        raise ContractError(f"indptr decreases at {b}: indptr[{b}] = {int(ptr[b])} > "
                            f"indptr[{b + 1}] = {int(ptr[b + 1])}; it must be non-decreasing")
    used = int(ptr[-1])
    if indices.shape[0] < used:
        raise ContractError(f"indices holds {indices.shape[0]} page ids but indptr[{batch}] = "
                            f"{used} are used")
    bad = (counts > 0) & ((last < 1) | (last > page_size))
    if bad.any():
        b = int(numpy.argmax(bad))
        raise ContractError(f"last_page_len[{b}] is {int(last[b])}; a sequence with pages "
                            f"holds 1..page_size = 1..{page_size} keys in its last page")

    widest = int(counts.max()) if batch else 0
    if max_pages is None:
        max_pages = widest
    elif isinstance(max_pages, bool) or not isinstance(max_pages, Integral) or max_pages < 0:
        raise ContractError(f"max_pages must be an int >= 0 or None, got {max_pages!r}")
    elif max_pages < widest:
        b = int(numpy.argmax(counts))
        raise ContractError(f"max_pages is {max_pages} but sequence {b} has {widest} pages; "
                            f"max_pages must be at least the largest page count")
    max_pages = int(max_pages)
    if max_pages * page_size > _INT32_MAX:
        raise ContractError(f"max_pages * page_size = {max_pages} * {page_size} = "
                            f"{max_pages * page_size} positions; at most {_INT32_MAX} (int32 "
                            f"positions)")
    seqlens = numpy.where(counts > 0, (counts - 1) * page_size + last, 0).astype(numpy.int32)

    columns = numpy.arange(max_pages, dtype=numpy.int64)
    owned = columns[None, :] < counts[:, None]  # [B, max_pages]
    source = numpy.minimum(ptr[:-1, None] + columns[None, :], max(used - 1, 0))
    if device is None:
        ids = indices[:used].astype(numpy.int64)
        _check_ids(ids, lambda k: int(ids[k]))
        table = numpy.where(owned, ids[source] if used else 0, 0).astype(numpy.int32)
        return numpy.ascontiguousarray(table), seqlens

    ids = indices[:used].to(torch.int64)
    _check_ids(ids, lambda k: int(ids[k]))
    if not used:
        table = torch.zeros((batch, max_pages), dtype=torch.int32, device=device)
    else:
        gathered = ids[torch.as_tensor(source, device=device)]
        table = torch.where(torch.as_tensor(owned, device=device), gathered,
                            torch.zeros((), dtype=torch.int64, device=device))
        table = table.to(torch.int32).contiguous()
    return table, torch.as_tensor(seqlens, device=device)


def _check_ids(ids: Any, value_at: Any) -> None:
    """The page ids the list uses lie in [0, 2**31) (NumPy or torch, one host read)."""
    if ids.shape[0] == 0:
        return
    bad = (ids < 0) | (ids > _INT32_MAX)
    if bool(bad.any()):
        k = int(bad.nonzero()[0][0])  # NumPy: a tuple of index arrays; torch: [N, 1]
        raise ContractError(f"indices[{k}] is {value_at(k)}; page ids must be in "
                            f"[0, {_INT32_MAX}] (int32)")
