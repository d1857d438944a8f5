"""A float64 NumPy reference of the decode contract, for tests and error reports."""

from __future__ import annotations

import numpy as np

__all__ = ["decode_reference", "TOLERANCE", "relative_error"]


def decode_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     scale: float | None = None) -> np.ndarray:
    """``softmax(scale * q . K^T) . V`` per query head in float64; zeros where K_len is 0.

    ``q`` is [B, H_q, D], ``k``/``v`` are [B, H_kv, K_len, D]; inputs are upcast to float64.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, num_heads, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    group = num_heads // num_kv_heads
    if kv_len == 0:
        return np.zeros(q.shape, dtype=np.float64)
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    scores = np.einsum("bhgd,bhkd->bhgk", qg, k) * scale
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhgk,bhkd->bhgd", weights, v).reshape(q.shape)


# Allowed max |Y - reference| relative to max |reference|: two units in the last place of the
# output dtype (DESIGN.md section 4). Keyed by dtype name; the one definition tests and the
# benchmark use.
TOLERANCE = {"bfloat16": 2 * 2.0**-8, "float16": 2 * 2.0**-11, "float32": 1e-5}


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref| (or max |out - ref| when ref is all zeros); NaN-aware."""
    out = np.asarray(out, dtype=np.float64)
    diff = np.abs(out - ref)
    if np.isnan(diff).any():
        return float("nan")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    worst = float(diff.max()) if diff.size else 0.0
    return worst / scale if scale > 0 else worst
