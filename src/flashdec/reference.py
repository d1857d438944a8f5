"""A float64 NumPy reference of the decode and merge contracts, for tests and error reports."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["decode_reference", "gather_pages", "merge_reference", "TOLERANCE", "LSE_TOLERANCE",
           "relative_error", "lse_error"]


def _per_kv_head(scale: float | np.ndarray, num_kv_heads: int) -> np.ndarray:
    """A float or [H_kv] scale as float64 [1, H_kv, 1, 1]."""
    values = np.broadcast_to(np.asarray(scale, dtype=np.float64), (num_kv_heads,))
    return values.reshape(1, num_kv_heads, 1, 1)


def _attended(batch: int, kv_len: int, seqlens: Sequence[int] | np.ndarray | None,
              window_left: int | None,
              cache_leftpad: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Bool [B, K_len]: keys j with L - 1 - window_left <= j < L and j >= cache_leftpad[b],
    L = clamp(seqlens[b])."""
    if seqlens is None:
        lengths = np.full(batch, kv_len, dtype=np.int64)
    else:
        lengths = np.clip(np.asarray(seqlens, dtype=np.int64).reshape(batch), 0, kv_len)
    j = np.arange(kv_len)
    valid = j < lengths[:, None]
    if window_left is not None:
        valid &= j >= (lengths - 1 - window_left)[:, None]
    if cache_leftpad is not None:
        valid &= j >= np.clip(np.asarray(cache_leftpad, dtype=np.int64).reshape(batch), 0,
                              kv_len)[:, None]
    return valid


def gather_pages(pool: np.ndarray, block_table: np.ndarray) -> np.ndarray:
    """A paged pool [num_pages, H_kv, page_size, D] read through ``block_table`` [B,
    max_pages] as the cache [B, H_kv, max_pages * page_size, D] it stands for (ids outside
    the pool are clamped, as on the GPU: such rows must not be attended)."""
    pool = np.asarray(pool)
    table = np.clip(np.asarray(block_table, dtype=np.int64), 0, pool.shape[0] - 1)
    pages = pool[table]                       # [B, max_pages, H_kv, page_size, D]
    batch, max_pages, heads, page_size, dim = pages.shape
    return pages.transpose(0, 2, 1, 3, 4).reshape(batch, heads, max_pages * page_size, dim)


def _softmax_states(scores: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(softmax(scores) . values, logsumexp(scores)) over axis -1 of ``scores`` (axis -2 of
    ``values``); rows with no finite score give 0 and -inf; NaN propagates."""
    top = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    top = np.where(top == -np.inf, 0.0, top)
    weights = np.exp(scores - top)
    total = weights.sum(axis=-1, keepdims=True)
    out = np.matmul(weights, values) / np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore"):
        lse = (top + np.log(total))[..., 0]
    return out, lse


def decode_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None,
                     *, softcap: float | None = None, window_left: int | None = None,
                     seqlens: Sequence[int] | np.ndarray | None = None,
                     k_scale: float | np.ndarray = 1.0, v_scale: float | np.ndarray = 1.0,
                     return_lse: bool = False,
                     cache_leftpad: Sequence[int] | np.ndarray | None = None,
                     block_table: np.ndarray | None = None,
                     ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The decode contract in float64: Y, or (Y, LSE) with ``return_lse``.

    ``q`` is [B, H_q, D], ``k``/``v`` are [B, H_kv, K_len, D] (or pools of pages read through
    ``block_table``, see :func:`gather_pages`), upcast to float64 (fp8 values as the caller
    converted them); ``k_scale``/``v_scale`` a float or [H_kv]; ``seqlens`` and
    ``cache_leftpad`` [B] are clamped to [0, K_len] like the kernels do. Rows with no
    attended key give Y = 0 and LSE = -inf; keys that are not attended are never read,
    whatever they hold.
    """
    if block_table is not None:
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    group = num_heads // num_kv_heads
    valid = _attended(batch, kv_len, seqlens, window_left, cache_leftpad)
    keys = np.where(valid[:, None, :, None], k, 0.0) * _per_kv_head(k_scale, num_kv_heads)
    values = np.where(valid[:, None, :, None], v, 0.0) * _per_kv_head(v_scale, num_kv_heads)
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    scores = np.einsum("bhgd,bhkd->bhgk", qg, keys) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(valid[:, None, None, :], scores, -np.inf)
    out, lse = _softmax_states(scores, values)
    out = out.reshape(q.shape)
    return (out, lse.reshape(batch, num_heads)) if return_lse else out


def merge_reference(outputs: Sequence[np.ndarray] | np.ndarray,
                    lses: Sequence[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``merge_states`` in float64: N states [B, H, D] with LSEs [B, H] -> (Y, LSE)."""
    ys = np.stack([np.asarray(y, dtype=np.float64) for y in outputs])  # [N, B, H, D]
    ls = np.stack([np.asarray(s, dtype=np.float64) for s in lses])     # [N, B, H]
    ys = np.where((ls == -np.inf)[..., None], 0.0, ys)  # an empty part adds nothing, even NaN
    # a softmax over the parts, with lse_i as the scores and Y_i as the values
    out, lse = _softmax_states(np.moveaxis(ls, 0, -1)[..., None, :], np.moveaxis(ys, 0, -2))
    return out[..., 0, :], lse[..., 0]


# Allowed max |Y - reference| relative to max |reference|: two units in the last place of the
# output dtype. Keyed by dtype name; the one definition tests and the benchmark use. fp8 K/V
# are judged by Q's dtype against the reference of the same fp8 values.
TOLERANCE = {"bfloat16": 2 * 2.0**-8, "float16": 2 * 2.0**-11, "float32": 1e-5}

# Allowed |LSE - reference| / max(1, |reference|), keyed by the output dtype like TOLERANCE:
# four units in its last place (LSE is float32, but its scores come from inputs of that dtype
# and the kernels may use its fast paths).
LSE_TOLERANCE = {name: 2 * tol for name, tol in TOLERANCE.items()}


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref| (or max |out - ref| when ref is all zeros); NaN-aware."""
    out = np.asarray(out, dtype=np.float64)
    diff = np.abs(out - ref)
    if np.isnan(diff).any():
        return float("nan")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    worst = float(diff.max()) if diff.size else 0.0
    return worst / scale if scale > 0 else worst


def lse_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max(1, |ref|) over elements; an infinite ``ref`` must be matched
    exactly (else inf); NaN anywhere in ``out`` or ``ref`` gives NaN."""
    out = np.asarray(out, dtype=np.float64)
    if np.isnan(out).any() or np.isnan(ref).any():
        return float("nan")
    same = out == ref  # covers -inf == -inf
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(out - ref) / np.maximum(1.0, np.abs(ref)))
    return float(err.max()) if err.size else 0.0
