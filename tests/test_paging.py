"""``flashdec.block_table_from_page_list``: FlashInfer's compressed page list (indptr, indices,
last_page_len) to a dense int32 block table and int32 seqlens, on torch and NumPy inputs,
round-tripped against the page lists that made them; then every error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashdec
from flashdec import ContractError, block_table_from_page_list

PAGE_SIZE = 4


def random_page_list(seed, batch=7, num_pages=64):
    """Per sequence its pages (distinct ids in random order) and last-page length; ragged,
    with an empty sequence, a one-page sequence and a sequence whose last page is full."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=batch)
    counts[1] = 0
    counts[2] = 1
    ids = rng.permutation(num_pages)[:counts.sum()]
    pages = np.split(ids, np.cumsum(counts)[:-1])
    last = rng.integers(1, PAGE_SIZE + 1, size=batch)
    last[3] = PAGE_SIZE
    last[1] = 0  # ignored: the sequence has no page
    return pages, last


def compress(pages, extra=()):
    """indptr, indices (with ``extra`` unused ids after the used ones)."""
    indptr = np.concatenate([[0], np.cumsum([len(p) for p in pages])])
    indices = np.concatenate([np.concatenate(pages), np.asarray(extra, dtype=np.int64)])
    return indptr, indices


def check_round_trip(table, seqlens, pages, last, max_pages):
    table, seqlens = np.asarray(table), np.asarray(seqlens)
    assert table.dtype == np.int32 and seqlens.dtype == np.int32
    assert table.shape == (len(pages), max_pages) and seqlens.shape == (len(pages),)
    assert table.flags.c_contiguous
    for b, owned in enumerate(pages):
        n = len(owned)
        np.testing.assert_array_equal(table[b, :n], owned)
        np.testing.assert_array_equal(table[b, n:], 0)
        expected = (n - 1) * PAGE_SIZE + int(last[b]) if n else 0
        assert seqlens[b] == expected, (b, n, last[b])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["numpy-int32", "numpy-int64", "list", "torch-int32",
                                  "torch-int64"])
@pytest.mark.parametrize("max_pages", [None, 9])
def test_round_trip(seed, kind, max_pages):
    pages, last = random_page_list(seed)
    indptr, indices = compress(pages, extra=[-5, 10**12])  # unused entries are never read
    if kind.startswith("numpy"):
        dtype = np.int32 if kind.endswith("32") else np.int64
        args = (indptr.astype(dtype), indices.astype(np.int64), last.astype(dtype))
    elif kind == "list":
        args = (indptr.tolist(), indices.tolist(), last.tolist())
    else:
        dtype = torch.int32 if kind.endswith("32") else torch.int64
        args = (torch.tensor(indptr, dtype=dtype), torch.tensor(indices),
                torch.tensor(last, dtype=dtype))
    table, seqlens = block_table_from_page_list(*args, PAGE_SIZE, max_pages=max_pages)
    if kind.startswith("torch"):
        assert isinstance(table, torch.Tensor) and isinstance(seqlens, torch.Tensor)
        assert table.device == args[0].device
        table, seqlens = table.numpy(), seqlens.numpy()
    else:
        assert isinstance(table, np.ndarray) and isinstance(seqlens, np.ndarray)
    widest = max(len(p) for p in pages)
    check_round_trip(table, seqlens, pages, last, max_pages or widest)


def test_exported():
    assert flashdec.block_table_from_page_list is block_table_from_page_list
    assert "block_table_from_page_list" in flashdec.__all__


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_empty_batch_and_all_empty_sequences(kind):
    as_ = torch.tensor if kind == "torch" else np.array
    table, seqlens = block_table_from_page_list(as_([0]), as_([], dtype=None) if kind == "numpy"
                                                else torch.zeros(0, dtype=torch.int64),
                                                as_([1])[:0], PAGE_SIZE)
    assert tuple(table.shape) == (0, 0) and tuple(seqlens.shape) == (0,)
    table, seqlens = block_table_from_page_list(as_([0, 0, 0]), as_([3, 4]), as_([0, 7]),
                                                PAGE_SIZE, max_pages=2)
    assert np.asarray(table).tolist() == [[0, 0], [0, 0]]
    assert np.asarray(seqlens).tolist() == [0, 0]


def test_feeds_decode():
    """The table and lengths drive decode over pools (torch backend), like a gathered cache."""
    pages, last = random_page_list(11, batch=4, num_pages=24)
    indptr, indices = compress(pages)
    table, seqlens = block_table_from_page_list(torch.tensor(indptr), torch.tensor(indices),
                                                torch.tensor(last), PAGE_SIZE)
    gen = torch.Generator().manual_seed(0)
    k_pool = torch.randn(24, 2, PAGE_SIZE, 8, generator=gen)
    v_pool = torch.randn(24, 2, PAGE_SIZE, 8, generator=gen)
    q = torch.randn(4, 4, 8, generator=gen)
    y = flashdec.decode(q, k_pool, v_pool, block_table=table, seqlens=seqlens, backend="torch")
    capacity = table.shape[1] * PAGE_SIZE
    k_flat = torch.randn(4, 2, capacity, 8, generator=gen)
    v_flat = torch.randn(4, 2, capacity, 8, generator=gen)
    for b, owned in enumerate(pages):
        for i, page in enumerate(owned):
            k_flat[b, :, i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = k_pool[int(page)]
            v_flat[b, :, i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = v_pool[int(page)]
    y_flat = flashdec.decode(q, k_flat, v_flat, seqlens=seqlens, backend="torch")
    torch.testing.assert_close(y, y_flat, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_round_trip_cuda():
    pages, last = random_page_list(5)
    indptr, indices = compress(pages)
    table, seqlens = block_table_from_page_list(
        torch.tensor(indptr, device="cuda"), torch.tensor(indices, device="cuda"),
        torch.tensor(last, device="cuda"), PAGE_SIZE)
    assert table.is_cuda and seqlens.is_cuda
    check_round_trip(table.cpu().numpy(), seqlens.cpu().numpy(), pages, last,
                     max(len(p) for p in pages))


# indptr [0, 2, 2, 5] (3 sequences: 2 pages, none, 3 pages), last_page_len [3, 0, 4]
GOOD = dict(indptr=[0, 2, 2, 5], indices=[7, 3, 9, 1, 4, 0], last_page_len=[3, 0, 4],
            page_size=PAGE_SIZE)

ERRORS = {
    "indptr-rank": (dict(indptr=[[0, 2, 2, 5]]),
                    r"indptr must have rank 1, got rank 2 with shape \(1, 4\)"),
    "indices-rank": (dict(indices=np.zeros((6, 1), np.int64)),
                     r"indices must have rank 1, got rank 2"),
    "last-rank": (dict(last_page_len=np.int64(3)), r"last_page_len must have rank 1, got rank 0"),
    "indptr-dtype": (dict(indptr=[0.0, 2.0, 2.0, 5.0]),
                     r"indptr has dtype float64; expected an integer dtype"),
    "indices-bool": (dict(indices=[True] * 6), r"indices has dtype bool; expected an integer"),
    "torch-dtype": (dict(indptr=torch.tensor([0, 2, 2, 5]), indices=torch.tensor([7, 3, 9, 1, 4,
                                                                                   0]),
                         last_page_len=torch.tensor([3.0, 0.0, 4.0])),
                    r"last_page_len has dtype float32; expected an integer dtype"),
    "mixed": (dict(indptr=torch.tensor([0, 2, 2, 5])),
              r"indices is a list, but the other arguments are torch tensors"),
    "indptr-length": (dict(indptr=[0, 2, 5]),
                      r"indptr must have B \+ 1 = 4 entries \(last_page_len has B = 3\), got 3"),
    "indptr-start": (dict(indptr=[1, 2, 2, 5]), r"indptr\[0\] is 1; a page list starts at 0"),
    "indptr-decreasing": (dict(indptr=[0, 3, 2, 5]),
                          r"indptr decreases at 1: indptr\[1\] = 3 > indptr\[2\] = 2; it must "
                          r"be non-decreasing"),
    "indices-short": (dict(indices=[7, 3, 9, 1]),
                      r"indices holds 4 page ids but indptr\[3\] = 5 are used"),
    "last-zero": (dict(last_page_len=[0, 0, 4]),
                  r"last_page_len\[0\] is 0; a sequence with pages holds 1\.\.page_size = "
                  r"1\.\.4 keys in its last page"),
    "last-too-big": (dict(last_page_len=[3, 0, 5]), r"last_page_len\[2\] is 5"),
    "page-size-zero": (dict(page_size=0), r"page_size must be an int >= 1, got 0"),
    "page-size-float": (dict(page_size=4.0), r"page_size must be an int >= 1, got 4\.0"),
    "page-size-bool": (dict(page_size=True), r"page_size must be an int >= 1, got True"),
    "max-pages-small": (dict(max_pages=2),
                        r"max_pages is 2 but sequence 2 has 3 pages; max_pages must be at "
                        r"least the largest page count"),
    "max-pages-negative": (dict(max_pages=-1), r"max_pages must be an int >= 0 or None, got -1"),
    "max-pages-float": (dict(max_pages=3.0), r"max_pages must be an int >= 0 or None, got 3\.0"),
    "page-id-negative": (dict(indices=[7, 3, 9, -1, 4, 0]),
                         r"indices\[3\] is -1; page ids must be in \[0, 2147483647\] \(int32\)"),
    "page-id-int32": (dict(indices=[7, 2**31, 9, 1, 4, 0]), r"indices\[1\] is 2147483648"),
    "capacity-int32": (dict(page_size=2**30, last_page_len=[3, 0, 4]),
                       r"max_pages \* page_size = 3 \* 1073741824 = 3221225472 positions; at "
                       r"most 2147483647"),
}


TORCH_ONLY = ("mixed", "torch-dtype")


@pytest.mark.parametrize("case, kind", [(c, k) for c in ERRORS for k in ("numpy", "torch")
                                        if k == "numpy" or c not in TORCH_ONLY])
def test_error(case, kind):
    """Each case as NumPy arrays / lists, and (but the torch-only ones) as CPU tensors."""
    change, message = ERRORS[case]
    args = GOOD | change
    if kind == "torch" and case not in TORCH_ONLY:
        for name in ("indptr", "indices", "last_page_len"):
            value = np.asarray(args[name])
            if value.dtype.kind == "f":
                value = value.astype(np.float32)
            args[name] = torch.tensor(value)
        message = message.replace("float64", "float32")
    with pytest.raises(ContractError, match=message):
        block_table_from_page_list(args.pop("indptr"), args.pop("indices"),
                                   args.pop("last_page_len"), args.pop("page_size"), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_error_device():
    with pytest.raises(ContractError, match=r"indices is on cpu but indptr is on cuda:0"):
        block_table_from_page_list(torch.tensor([0, 1], device="cuda"), torch.tensor([0]),
                                   torch.tensor([1], device="cuda"), PAGE_SIZE)
