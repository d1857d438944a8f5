"""ctypes mirrors of decode.cu's kernel parameter structs (same field order, C layout; a CI
test checks sizes and offsets against the .cu with static_assert)."""

from __future__ import annotations

import ctypes

from ._kernels import MAX_MERGE_PARTS

__all__ = ["DecodeParams", "MergeParams", "LOG2E"]

LOG2E = 1.4426950408889634  # scores are scaled into base 2 on the host


class DecodeParams(ctypes.Structure):
    """Mirror of ``flashdec::DecodeParams`` in decode.cu (same order, C layout)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("seqlens", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
        ("partial_o", ctypes.c_void_p), ("partial_ml", ctypes.c_void_p),
        ("arrivals", ctypes.c_void_p), ("block_table", ctypes.c_void_p),
        ("leftpad", ctypes.c_void_p), ("slot_info", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 4),
        ("v_stride", ctypes.c_int64 * 4), ("out_stride", ctypes.c_int64 * 3),
        ("lse_stride", ctypes.c_int64 * 2), ("seqlens_stride", ctypes.c_int64),
        ("k_scale_stride", ctypes.c_int64), ("v_scale_stride", ctypes.c_int64),
        ("block_table_stride", ctypes.c_int64 * 2), ("leftpad_stride", ctypes.c_int64),
        ("kv_len", ctypes.c_int64), ("split_rows", ctypes.c_int64),
        ("window_left", ctypes.c_int64), ("num_pages", ctypes.c_int64),
        ("min_chunk", ctypes.c_int64),
        ("head_dim", ctypes.c_int32), ("group_size", ctypes.c_int32),
        ("num_group_tiles", ctypes.c_int32), ("num_splits", ctypes.c_int32),
        ("group_tile", ctypes.c_int32), ("combine", ctypes.c_int32),
        ("q_vector", ctypes.c_int32), ("page_size", ctypes.c_int32),
        ("page_shift", ctypes.c_int32), ("batch", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("target_splits", ctypes.c_int32), ("few_splits", ctypes.c_int32),
        ("part_capacity", ctypes.c_int32),
        ("qk_scale", ctypes.c_float), ("softcap_log2", ctypes.c_float),
        ("k_scale_value", ctypes.c_float), ("v_scale_value", ctypes.c_float),
    ]


class MergeParams(ctypes.Structure):
    """Mirror of ``flashdec::MergeParams`` in decode.cu."""

    _fields_ = [
        ("o", ctypes.c_void_p * MAX_MERGE_PARTS), ("lse", ctypes.c_void_p * MAX_MERGE_PARTS),
        ("o_stride", (ctypes.c_int64 * 3) * MAX_MERGE_PARTS),
        ("lse_stride", (ctypes.c_int64 * 2) * MAX_MERGE_PARTS),
        ("out", ctypes.c_void_p), ("lse_out", ctypes.c_void_p),
        ("out_stride", ctypes.c_int64 * 3), ("lse_out_stride", ctypes.c_int64 * 2),
        ("num_parts", ctypes.c_int32), ("num_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
    ]
