"""Every way to break the decode and merge contracts, as tables.

Each case builds the arguments (q, k, v, out, scale and the serving features) from random normal
data with exactly one thing wrong and checks that ``flashdec.decode`` (and ``flashdec.plan``
where the argument exists there) raises the documented error type with a message that names the
offending argument; ``merge_states`` has its own table. Further tests check that a failed
validation does no work, that valid corner cases (B = 0, K_len = 0) are not errors, and that
``DecodePlan.run`` rejects tensors of another layout, a per-run tensor the plan does not have
(or lacks one it has), and an aliased output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

import flashdec
from flashdec import ContractError, TensorMut, TensorRef
from flashdec.reference import (LSE_TOLERANCE, TOLERANCE, decode_reference, lse_error,
                                merge_reference, relative_error)

B, HQ, HKV, KLEN, D = 2, 4, 2, 6, 8
Q_SHAPE = (B, HQ, D)
KV_SHAPE = (B, HKV, KLEN, D)
FAKE_CUDA_PTR = 0x7F00_0000_0000  # never dereferenced: validation must fail first


class Maker:
    """Random normal tensors for one case (seeded, so every run sees the same data)."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def t(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype.is_complex:
            return torch.randn(*shape, generator=self.gen, dtype=dtype)
        x = torch.randn(*shape, generator=self.gen)
        if dtype == torch.bool:
            return x > 0
        if not dtype.is_floating_point:
            return (x * 100).to(dtype)
        return x.to(dtype)

    def n(self, *shape: int, dtype: Any = np.float32) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(dtype)

    def torch_args(self) -> dict[str, Any]:
        return dict(q=self.t(*Q_SHAPE), k=self.t(*KV_SHAPE), v=self.t(*KV_SHAPE),
                    out=self.t(*Q_SHAPE))

    def numpy_args(self) -> dict[str, Any]:
        return dict(q=self.n(*Q_SHAPE), k=self.n(*KV_SHAPE), v=self.n(*KV_SHAPE),
                    out=self.n(*Q_SHAPE))


@dataclass
class Case:
    id: str
    make: Callable[[Maker], dict[str, Any]]   # overrides of the valid torch arguments
    exc: type[BaseException] | tuple[type[BaseException], ...]
    match: str
    plan: bool = True                          # the argument exists on flashdec.plan too
    extra: dict[str, Any] = field(default_factory=dict)


def _np_base(m: Maker, **over: Any) -> dict[str, Any]:
    args = m.numpy_args()
    args.update(over)
    return args


def _np_neg(m: Maker, name: str) -> dict[str, Any]:
    args = m.numpy_args()
    x = args[name]
    args[name] = x[:, ::-1]  # same shape, negative stride on axis 1
    assert args[name].strides[1] < 0
    return args


def _readonly_np_out(m: Maker) -> dict[str, Any]:
    args = m.numpy_args()
    args["out"].flags.writeable = False
    return args


def _broadcast_np_out(m: Maker) -> dict[str, Any]:
    return _np_base(m, out=np.broadcast_to(m.n(1, HQ, D), Q_SHAPE))


def _stride0_out(m: Maker) -> dict[str, Any]:
    return dict(out=m.t(1, HQ, D).expand(*Q_SHAPE))


def _overlapping_strides_out(m: Maker) -> dict[str, Any]:
    base = m.t(B * HQ * D)
    # stride 1 on both the head and the head_dim axis: out[b, h, d] == out[b, h + 1, d - 1]
    return dict(out=base.as_strided(Q_SHAPE, (HQ * D, 1, 1)))


def _out_partially_overlaps_q(m: Maker) -> dict[str, Any]:
    n = B * HQ * D
    buf = m.t(2 * n)
    return dict(q=buf[:n].view(Q_SHAPE), out=buf[n // 2: n // 2 + n].view(Q_SHAPE))


def _out_inside(m: Maker, name: str) -> dict[str, Any]:
    src = m.t(*KV_SHAPE)
    return {name: src, "out": src.view(-1)[: B * HQ * D].view(Q_SHAPE)}


def _out_is_q(m: Maker) -> dict[str, Any]:
    q = m.t(*Q_SHAPE)
    return dict(q=q, out=q)


def _cuda_view(m: Maker, name: str) -> dict[str, Any]:
    shape = Q_SHAPE if name in ("q", "out") else KV_SHAPE
    cls = TensorMut if name == "out" else TensorRef
    return {name: cls.from_pointer(FAKE_CUDA_PTR, "float32", shape, device="cuda:0")}


def _bad_byte_strides(m: Maker) -> dict[str, Any]:
    raw = m.n(B * HQ * D * 2)
    # float32 items 6 bytes apart: not a whole number of elements
    q = np.lib.stride_tricks.as_strided(raw, Q_SHAPE, (HQ * D * 6, D * 6, 6))
    return _np_base(m, q=q)


class _ReadOnlyProducer:
    """A DLPack producer over a read-only NumPy array (exports the READ_ONLY flag)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return self.a.__dlpack__(stream=stream, max_version=max_version)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _readonly_producer_out(m: Maker) -> dict[str, Any]:
    out = m.n(*Q_SHAPE)
    out.flags.writeable = False
    return _np_base(m, out=_ReadOnlyProducer(out))


def _fp8(m: Maker, kv: torch.dtype = torch.float8_e4m3fn, q: torch.dtype = torch.bfloat16,
         v: torch.dtype | None = None, **over: Any) -> dict[str, Any]:
    """Arguments with fp8 K/V (and ``over`` on top): valid with ``k_scale`` and ``v_scale``."""
    args = dict(q=m.t(*Q_SHAPE, dtype=q), k=m.t(*KV_SHAPE, dtype=kv),
                v=m.t(*KV_SHAPE, dtype=v or kv), out=m.t(*Q_SHAPE, dtype=q))
    args.update(over)
    return args


def _fake_cuda(dtype: str, *shape: int) -> TensorRef:
    return TensorRef.from_pointer(FAKE_CUDA_PTR, dtype, shape, device="cuda:0")


def _lse_inside(m: Maker, name: str) -> dict[str, Any]:
    """lse_out as the first B * H_q elements of ``name``'s memory."""
    src = m.t(*(Q_SHAPE if name == "out" else KV_SHAPE))
    return {name: src, "lse_out": src.view(-1)[: B * HQ].view(B, HQ)}


def _out_overlaps_seqlens(m: Maker) -> dict[str, Any]:
    out = m.t(*Q_SHAPE)
    return dict(out=out, seqlens=TensorRef.from_pointer(out.data_ptr(), "int32", (B,), owner=out))


def _readonly_np_lse(m: Maker) -> dict[str, Any]:
    lse = m.n(B, HQ)
    lse.flags.writeable = False
    return _np_base(m, lse_out=lse)


def _readonly_view_out(m: Maker) -> dict[str, Any]:
    out = m.t(*Q_SHAPE)
    return dict(out=TensorRef.from_pointer(out.data_ptr(), "float32", Q_SHAPE, readonly=True,
                                           owner=out))


C = ContractError
CASES = [
    # -- ranks ------------------------------------------------------------------------------
    Case("q-rank-2", lambda m: dict(q=m.t(B, HQ * D)), C, r"\bq must have rank 3.*rank 2"),
    Case("q-rank-4-unit-seq", lambda m: dict(q=m.t(B, HQ, 1, D)), C, r"\bq must have rank 3.*rank 4"),
    Case("k-rank-3", lambda m: dict(k=m.t(B, HKV * KLEN, D)), C, r"\bk must have rank 4.*rank 3"),
    Case("k-rank-5", lambda m: dict(k=m.t(B, HKV, 1, KLEN, D)), C, r"\bk must have rank 4.*rank 5"),
    Case("v-rank-3", lambda m: dict(v=m.t(B, HKV * KLEN, D)), C, r"\bv must have rank 4.*rank 3"),
    Case("v-rank-5", lambda m: dict(v=m.t(B, HKV, 1, KLEN, D)), C, r"\bv must have rank 4.*rank 5"),
    Case("out-rank-2", lambda m: dict(out=m.t(B, HQ * D)), C, r"\bout must have rank 3.*rank 2"),
    Case("out-rank-4", lambda m: dict(out=m.t(B, HQ, 1, D)), C, r"\bout must have rank 3.*rank 4"),
    # -- shapes -----------------------------------------------------------------------------
    Case("k-batch", lambda m: dict(k=m.t(B + 1, HKV, KLEN, D), v=m.t(B + 1, HKV, KLEN, D)), C,
         r"\bk has batch 3.*q has batch 2"),
    Case("k-head-dim", lambda m: dict(k=m.t(B, HKV, KLEN, D * 2), v=m.t(B, HKV, KLEN, D * 2)), C,
         r"\bk has head_dim 16.*q has head_dim 8"),
    Case("v-kv-len", lambda m: dict(v=m.t(B, HKV, KLEN + 1, D)), C, r"\bv must have the shape of k"),
    Case("v-heads", lambda m: dict(v=m.t(B, HKV * 2, KLEN, D)), C, r"\bv must have the shape of k"),
    Case("v-head-dim", lambda m: dict(v=m.t(B, HKV, KLEN, D + 1)), C, r"\bv must have the shape of k"),
    Case("v-batch", lambda m: dict(v=m.t(B + 1, HKV, KLEN, D)), C, r"\bv must have the shape of k"),
    Case("out-heads", lambda m: dict(out=m.t(B, HQ + 1, D)), C, r"\bout must have the shape of q"),
    Case("out-batch", lambda m: dict(out=m.t(B + 1, HQ, D)), C, r"\bout must have the shape of q"),
    Case("out-head-dim", lambda m: dict(out=m.t(B, HQ, D - 1)), C, r"\bout must have the shape of q"),
    Case("hq-not-multiple-of-hkv", lambda m: dict(q=m.t(B, 3, D), out=m.t(B, 3, D)), C,
         r"\bq's num_heads 3 must be a multiple of k's num_kv_heads 2"),
    Case("hq-less-than-hkv", lambda m: dict(q=m.t(B, 1, D), out=m.t(B, 1, D)), C,
         r"\bq's num_heads 1 must be a multiple of k's num_kv_heads 2"),
    Case("zero-q-heads", lambda m: dict(q=m.t(B, 0, D), k=m.t(B, 0, KLEN, D),
                                        v=m.t(B, 0, KLEN, D), out=m.t(B, 0, D)), C,
         r"\bq must have at least one head"),
    Case("zero-kv-heads", lambda m: dict(k=m.t(B, 0, KLEN, D), v=m.t(B, 0, KLEN, D)), C,
         r"\bk must have at least one KV head"),
    Case("zero-head-dim", lambda m: dict(q=m.t(B, HQ, 0), k=m.t(B, HKV, KLEN, 0),
                                         v=m.t(B, HKV, KLEN, 0), out=m.t(B, HQ, 0)), C,
         r"head_dim must be >= 1.*\bq shape"),
    # -- dtypes -----------------------------------------------------------------------------
    Case("k-fp16-q-fp32", lambda m: dict(k=m.t(*KV_SHAPE, dtype=torch.float16)), C,
         r"\bk has dtype float16 but q has float32"),
    Case("v-bf16-q-fp32", lambda m: dict(v=m.t(*KV_SHAPE, dtype=torch.bfloat16)), C,
         r"\bv has dtype bfloat16 but q has float32"),
    Case("out-fp16-q-fp32", lambda m: dict(out=m.t(*Q_SHAPE, dtype=torch.float16)), C,
         r"\bout has dtype float16 but q has float32"),
    Case("k-fp32-q-bf16", lambda m: dict(q=m.t(*Q_SHAPE, dtype=torch.bfloat16),
                                         v=m.t(*KV_SHAPE, dtype=torch.bfloat16),
                                         out=m.t(*Q_SHAPE, dtype=torch.bfloat16)), C,
         r"\bk has dtype float32 but q has bfloat16"),
    Case("q-int32", lambda m: dict(q=m.t(*Q_SHAPE, dtype=torch.int32)), C,
         r"\bq has dtype int32; supported dtypes: float16, bfloat16, float32"),
    Case("q-int64", lambda m: dict(q=m.t(*Q_SHAPE, dtype=torch.int64)), C, r"\bq has dtype int64"),
    Case("q-float64", lambda m: dict(q=m.t(*Q_SHAPE, dtype=torch.float64)), C,
         r"\bq has dtype float64; supported"),
    Case("q-bool", lambda m: dict(q=m.t(*Q_SHAPE, dtype=torch.bool)), C, r"\bq has dtype bool"),
    Case("q-complex64", lambda m: dict(q=m.t(*Q_SHAPE, dtype=torch.complex64)), C,
         r"\bq has dtype complex64"),
    Case("q-numpy-float64", lambda m: _np_base(m, q=m.n(*Q_SHAPE, dtype=np.float64)), C,
         r"\bq has dtype float64"),
    Case("q-numpy-int8", lambda m: _np_base(m, q=m.n(*Q_SHAPE, dtype=np.int8)), C,
         r"\bq has dtype int8"),
    # -- devices (views of fake CUDA memory: validation must fail before any access) --------
    Case("k-on-cuda", lambda m: _cuda_view(m, "k"), C, r"\bk is on cuda:0 but q is on cpu"),
    Case("v-on-cuda", lambda m: _cuda_view(m, "v"), C, r"\bv is on cuda:0 but q is on cpu"),
    Case("out-on-cuda", lambda m: _cuda_view(m, "out"), C, r"\bout is on cuda:0 but q is on cpu"),
    Case("q-on-cuda", lambda m: _cuda_view(m, "q"), C, r"\bk is on cpu but q is on cuda:0"),
    # -- aliasing ---------------------------------------------------------------------------
    Case("out-is-q", _out_is_q, C, r"\bout overlaps q in memory"),
    Case("out-partially-overlaps-q", _out_partially_overlaps_q, C, r"\bout overlaps q in memory"),
    Case("out-inside-k", lambda m: _out_inside(m, "k"), C, r"\bout overlaps k in memory"),
    Case("out-inside-v", lambda m: _out_inside(m, "v"), C, r"\bout overlaps v in memory"),
    # -- read-only output -------------------------------------------------------------------
    Case("out-numpy-not-writeable", _readonly_np_out, C, r"\bout is read-only"),
    Case("out-numpy-broadcast-to", _broadcast_np_out, C, r"\bout is read-only"),
    Case("out-dlpack-read-only", _readonly_producer_out, C, r"\bout is read-only"),
    Case("out-readonly-view", _readonly_view_out, C, r"\bout is read-only"),
    # -- strides ----------------------------------------------------------------------------
    Case("out-stride-0", _stride0_out, C, r"\bout has stride 0"),
    Case("out-overlapping-strides", _overlapping_strides_out, C, r"\bout has overlapping strides"),
    Case("q-negative-stride", lambda m: _np_neg(m, "q"), C, r"\bq has negative strides"),
    Case("k-negative-stride", lambda m: _np_neg(m, "k"), C, r"\bk has negative strides"),
    Case("v-negative-stride", lambda m: _np_neg(m, "v"), C, r"\bv has negative strides"),
    Case("out-negative-stride", lambda m: _np_neg(m, "out"), C, r"\bout has negative strides"),
    Case("q-byte-strides-not-items", _bad_byte_strides, C,
         r"\bq has byte strides .* not a multiple of its item size 4"),
    # -- not tensors ------------------------------------------------------------------------
    Case("q-list", lambda m: dict(q=m.t(*Q_SHAPE).tolist()), C, r"\bq must be a tensor.*got list"),
    Case("q-int", lambda m: dict(q=3), C, r"\bq must be a tensor.*got int"),
    Case("q-none", lambda m: dict(q=None), C, r"\bq must be a tensor.*got NoneType"),
    Case("q-str", lambda m: dict(q="q"), C, r"\bq must be a tensor.*got str"),
    Case("k-list", lambda m: dict(k=m.t(*KV_SHAPE).tolist()), C, r"\bk must be a tensor.*got list"),
    Case("k-none", lambda m: dict(k=None), C, r"\bk must be a tensor.*got NoneType"),
    Case("v-int", lambda m: dict(v=7), C, r"\bv must be a tensor.*got int"),
    Case("v-str", lambda m: dict(v="v"), C, r"\bv must be a tensor.*got str"),
    Case("out-list", lambda m: dict(out=m.t(*Q_SHAPE).tolist()), C, r"\bout must be a tensor.*got list"),
    Case("out-int", lambda m: dict(out=1), C, r"\bout must be a tensor.*got int"),
    Case("out-str", lambda m: dict(out="out"), C, r"\bout must be a tensor.*got str"),
    # -- scale ------------------------------------------------------------------------------
    Case("scale-nan", lambda m: dict(scale=float("nan")), C, r"\bscale must be finite, got nan"),
    Case("scale-inf", lambda m: dict(scale=float("inf")), C, r"\bscale must be finite, got inf"),
    Case("scale-minus-inf", lambda m: dict(scale=-float("inf")), C, r"\bscale must be finite, got -inf"),
    Case("scale-numpy-nan", lambda m: dict(scale=np.float32("nan")), C, r"\bscale must be finite"),
    Case("scale-str", lambda m: dict(scale="0.5"), (TypeError, ValueError), r"\bscale\b.*str"),
    Case("scale-bool", lambda m: dict(scale=True), (TypeError, ValueError), r"\bscale\b.*bool"),
    Case("scale-complex", lambda m: dict(scale=0.5 + 0j), (TypeError, ValueError), r"\bscale\b.*complex"),
    Case("scale-list", lambda m: dict(scale=[0.5]), (TypeError, ValueError), r"\bscale\b.*list"),
    # -- stream (decode only: plans take their stream in run) -------------------------------
    Case("stream-bool", lambda m: {}, (TypeError, ValueError), r"\bstream must be", plan=False,
         extra=dict(stream=True)),
    Case("stream-str", lambda m: {}, (TypeError, ValueError), r"\bstream must be", plan=False,
         extra=dict(stream="default")),
    # -- seqlens ----------------------------------------------------------------------------
    Case("seqlens-int64", lambda m: dict(seqlens=torch.tensor([1, 2])), C,
         r"\bseqlens has dtype int64; expected int32"),
    Case("seqlens-float32", lambda m: dict(seqlens=m.t(B)), C,
         r"\bseqlens has dtype float32; expected int32"),
    Case("seqlens-numpy-int64", lambda m: dict(seqlens=np.array([1, 2])), C,
         r"\bseqlens has dtype int64; expected int32"),
    Case("seqlens-too-long", lambda m: dict(seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)),
         C, r"\bseqlens must have shape \(2,\) \[batch\], got \(3,\)"),
    Case("seqlens-rank-2", lambda m: dict(seqlens=torch.tensor([[1], [2]], dtype=torch.int32)),
         C, r"\bseqlens must have shape \(2,\) \[batch\], got \(2, 1\)"),
    Case("seqlens-host-too-short", lambda m: dict(seqlens=[1]), C,
         r"\bseqlens must have shape \(2,\) \[batch\], got \(1,\)"),
    Case("seqlens-on-cuda", lambda m: dict(seqlens=_fake_cuda("int32", B)), C,
         r"\bseqlens is on cuda:0; seqlens must be on k's device \(cpu\) or on the CPU"),
    Case("seqlens-host-above-capacity", lambda m: dict(seqlens=[1, KLEN + 1]), C,
         r"\bseqlens\[1\] is 7; every length must be in \[0, 6\]"),
    Case("seqlens-host-negative", lambda m: dict(seqlens=(-1, 2)), C,
         r"\bseqlens\[0\] is -1; every length must be in \[0, 6\]"),
    Case("seqlens-cpu-tensor-above-capacity",
         lambda m: dict(seqlens=torch.tensor([KLEN, KLEN + 5], dtype=torch.int32)), C,
         r"\bseqlens\[1\] is 11; every length must be in \[0, 6\]"),
    Case("seqlens-numpy-negative", lambda m: dict(seqlens=np.array([3, -4], dtype=np.int32)), C,
         r"\bseqlens\[1\] is -4"),
    Case("seqlens-host-floats", lambda m: dict(seqlens=[1.5, 2.0]), C,
         r"\bseqlens must be an int32 tensor \[batch\] or a flat sequence of ints.*float64"),
    Case("seqlens-host-bools", lambda m: dict(seqlens=[True, False]), C,
         r"\bseqlens must be an int32 tensor \[batch\] or a flat sequence of ints.*bool"),
    Case("seqlens-host-nested", lambda m: dict(seqlens=[[1], [2]]), C,
         r"\bseqlens must be an int32 tensor \[batch\] or a flat sequence of ints"),
    Case("seqlens-int", lambda m: dict(seqlens=3), C,
         r"\bseqlens must be an int32 tensor \[batch\] or a flat sequence of ints.*int"),
    Case("seqlens-host-beyond-int32", lambda m: dict(seqlens=[2**40, 1]), C,
         r"\bseqlens values must fit int32"),
    # -- window_left ------------------------------------------------------------------------
    Case("window-negative", lambda m: dict(window_left=-1), C,
         r"\bwindow_left must be >= 0.*got -1"),
    Case("window-bool", lambda m: dict(window_left=True), C,
         r"\bwindow_left must be an int >= 0 or None, got bool True"),
    Case("window-float", lambda m: dict(window_left=2.0), C,
         r"\bwindow_left must be an int >= 0 or None, got float 2.0"),
    Case("window-str", lambda m: dict(window_left="4"), C,
         r"\bwindow_left must be an int >= 0 or None, got str"),
    # -- softcap ----------------------------------------------------------------------------
    Case("softcap-zero", lambda m: dict(softcap=0.0), C, r"\bsoftcap must be > 0, got 0.0"),
    Case("softcap-negative", lambda m: dict(softcap=-30), C, r"\bsoftcap must be > 0, got -30.0"),
    Case("softcap-inf", lambda m: dict(softcap=float("inf")), C,
         r"\bsoftcap must be finite, got inf"),
    Case("softcap-nan", lambda m: dict(softcap=np.float32("nan")), C,
         r"\bsoftcap must be finite, got nan"),
    Case("softcap-bool", lambda m: dict(softcap=True), C,
         r"\bsoftcap must be a finite real number > 0 or None, got bool True"),
    Case("softcap-str", lambda m: dict(softcap="30"), C,
         r"\bsoftcap must be a finite real number > 0 or None, got str"),
    # -- fp8 K/V and scales -----------------------------------------------------------------
    Case("fp8-without-scales", _fp8, C,
         r"\bk_scale is required with fp8 k and v \(float8_e4m3fn\)"),
    Case("fp8-without-k-scale", lambda m: _fp8(m, v_scale=1.0), C,
         r"\bk_scale is required with fp8 k and v"),
    Case("fp8-without-v-scale", lambda m: _fp8(m, torch.float8_e5m2, k_scale=0.5), C,
         r"\bv_scale is required with fp8 k and v \(float8_e5m2\)"),
    Case("q-fp8", lambda m: _fp8(m, q=torch.float8_e4m3fn, k_scale=1.0, v_scale=1.0), C,
         r"\bq has dtype float8_e4m3fn; supported dtypes: float16, bfloat16, float32 \(fp8 is "
         r"for k and v only"),
    Case("q-fp32-kv-fp8", lambda m: _fp8(m, q=torch.float32, k_scale=1.0, v_scale=1.0), C,
         r"\bk has dtype float8_e4m3fn but q has float32: fp8 k and v need q and out in "
         r"float16 or bfloat16"),
    Case("kv-different-fp8", lambda m: _fp8(m, v=torch.float8_e5m2, k_scale=1.0, v_scale=1.0),
         C, r"\bv has dtype float8_e5m2 but k has float8_e4m3fn: k and v must share one dtype"),
    Case("k-fp8-v-bf16", lambda m: _fp8(m, v=torch.bfloat16, k_scale=1.0, v_scale=1.0), C,
         r"\bv has dtype bfloat16 but k has float8_e4m3fn"),
    Case("out-fp8", lambda m: _fp8(m, out=m.t(*Q_SHAPE, dtype=torch.float8_e4m3fn),
                                   k_scale=1.0, v_scale=1.0), C,
         r"\bout has dtype float8_e4m3fn but q has bfloat16"),
    Case("k-scale-zero", lambda m: dict(k_scale=0.0), C, r"\bk_scale must be > 0, got 0.0"),
    Case("v-scale-negative", lambda m: _fp8(m, k_scale=1.0, v_scale=-2), C,
         r"\bv_scale must be > 0, got -2.0"),
    Case("k-scale-nan", lambda m: dict(k_scale=float("nan")), C, r"\bk_scale must be finite"),
    Case("k-scale-bool", lambda m: dict(k_scale=True), C,
         r"\bk_scale must be a finite real number > 0 or a float32 tensor \[num_kv_heads\], "
         r"got bool"),
    Case("v-scale-str", lambda m: dict(v_scale="1"), C, r"\bv_scale must be a finite real.*str"),
    Case("k-scale-tensor-float16", lambda m: dict(k_scale=m.t(HKV, dtype=torch.float16)), C,
         r"\bk_scale has dtype float16; expected float32"),
    Case("v-scale-tensor-shape", lambda m: dict(v_scale=m.t(HKV + 1)), C,
         r"\bv_scale must have shape \(2,\) \[num_kv_heads\], got \(3,\)"),
    Case("k-scale-0d-tensor", lambda m: dict(k_scale=m.t(1)[0]), C,
         r"\bk_scale must have shape \(2,\) \[num_kv_heads\], got \(\)"),
    Case("k-scale-per-q-head", lambda m: _fp8(m, k_scale=m.t(HQ), v_scale=1.0), C,
         r"\bk_scale must have shape \(2,\) \[num_kv_heads\], got \(4,\)"),
    Case("v-scale-on-cuda", lambda m: dict(v_scale=_fake_cuda("float32", HKV)), C,
         r"\bv_scale is on cuda:0; a scale tensor must be on k's device \(cpu\)"),
    # -- lse_out ----------------------------------------------------------------------------
    Case("lse-float16", lambda m: dict(lse_out=m.t(B, HQ, dtype=torch.float16)), C,
         r"\blse_out has dtype float16; expected float32"),
    Case("lse-shape", lambda m: dict(lse_out=m.t(B, HQ + 1)), C,
         r"\blse_out must have shape \(2, 4\) \[batch, num_heads\], got \(2, 5\)"),
    Case("lse-rank-3", lambda m: dict(lse_out=m.t(B, HQ, 1)), C,
         r"\blse_out must have shape \(2, 4\) \[batch, num_heads\], got \(2, 4, 1\)"),
    Case("lse-numpy-read-only", _readonly_np_lse, C, r"\blse_out is read-only"),
    Case("lse-stride-0", lambda m: dict(lse_out=m.t(1, HQ).expand(B, HQ)), C,
         r"\blse_out has stride 0"),
    Case("lse-on-cuda", lambda m: dict(lse_out=TensorMut.from_pointer(
        FAKE_CUDA_PTR, "float32", (B, HQ), device="cuda:0")), C,
         r"\blse_out is on cuda:0; it must be on q's device \(cpu\)"),
    Case("lse-overlaps-out", lambda m: _lse_inside(m, "out"), C,
         r"\blse_out overlaps out in memory"),
    Case("lse-overlaps-k", lambda m: _lse_inside(m, "k"), C, r"\blse_out overlaps k in memory"),
    Case("out-overlaps-seqlens", _out_overlaps_seqlens, C, r"\bout overlaps seqlens in memory"),
    Case("out-overlaps-k-scale", lambda m: (lambda out: dict(out=out, k_scale=out.view(-1)[:HKV]))(
        m.t(*Q_SHAPE)), C, r"\bout overlaps k_scale in memory"),
    # -- torch tensors whose memory flashdec cannot read as their values (issue 11 s3) --------
    Case("q-sparse", lambda m: dict(q=m.t(*Q_SHAPE).to_sparse()), C,
         r"\bq is a torch.sparse_coo tensor; flashdec reads dense strided memory"),
    Case("k-sparse", lambda m: dict(k=m.t(*KV_SHAPE).to_sparse()), C,
         r"\bk is a torch.sparse_coo tensor"),
    Case("q-neg-view", lambda m: dict(q=torch._neg_view(m.t(*Q_SHAPE))), C,
         r"\bq is a torch view with the negative bit set.*pass q.resolve_neg\(\)"),
    Case("k-conj-imag", lambda m: dict(k=m.t(*KV_SHAPE, dtype=torch.complex64).conj().imag), C,
         r"\bk is a torch view with the negative bit set"),
    Case("v-conj", lambda m: dict(v=m.t(*KV_SHAPE, dtype=torch.complex64).conj()), C,
         r"\bv is a torch view with the conjugate bit set.*pass v.resolve_conj\(\)"),
    Case("out-neg-view", lambda m: dict(out=torch._neg_view(m.t(*Q_SHAPE))), C,
         r"\bout is a torch view with the negative bit set"),
    Case("k-scale-neg-view", lambda m: dict(k_scale=torch._neg_view(m.t(HKV).abs() + 1)), C,
         r"\bk_scale is a torch view with the negative bit set"),
    Case("lse-neg-view", lambda m: dict(lse_out=torch._neg_view(m.t(B, HQ))), C,
         r"\blse_out is a torch view with the negative bit set"),
    Case("q-meta", lambda m: dict(q=torch.empty(Q_SHAPE, device="meta")), C,
         r"\bq is on meta; flashdec reads CPU and CUDA memory"),
    # -- autograd: flashdec has no backward, on any backend ---------------------------------
    Case("q-requires-grad", lambda m: dict(q=m.t(*Q_SHAPE).requires_grad_()), C,
         r"\bq requires grad; flashdec computes no gradients.*pass q.detach\(\)"),
    Case("v-requires-grad-non-leaf", lambda m: dict(v=m.t(*KV_SHAPE).requires_grad_() * 2), C,
         r"\bv requires grad"),
    Case("out-requires-grad", lambda m: dict(out=m.t(*Q_SHAPE).requires_grad_()), C,
         r"\bout requires grad"),
    Case("lse-requires-grad", lambda m: dict(lse_out=m.t(B, HQ).requires_grad_()), C,
         r"\blse_out requires grad"),
    Case("v-scale-requires-grad", lambda m: dict(v_scale=(m.t(HKV).abs() + 1).requires_grad_()),
         C, r"\bv_scale requires grad"),
    # -- scale tensors in host memory hold finite values > 0, as float scales must ----------
    Case("k-scale-tensor-negative", lambda m: dict(k_scale=torch.tensor([0.5, -1.0])), C,
         r"\bk_scale\[1\] is -1.0; every scale must be finite and > 0"),
    Case("v-scale-tensor-nan", lambda m: dict(v_scale=torch.tensor([float("nan"), 1.0])), C,
         r"\bv_scale\[0\] is nan; every scale must be finite and > 0"),
    Case("v-scale-tensor-zero", lambda m: dict(v_scale=torch.tensor([1.0, 0.0])), C,
         r"\bv_scale\[1\] is 0.0"),
    Case("k-scale-numpy-inf", lambda m: _np_base(m, k_scale=np.array([np.inf, 1], np.float32)),
         C, r"\bk_scale\[0\] is inf"),
    # -- real parameters must stay finite in float32, where the kernels compute -------------
    Case("scale-beyond-float32", lambda m: dict(scale=1e39), C,
         r"\bscale must be at most 2\*\*126 .* in magnitude \(the kernels compute in float32\), "
         r"got 1e\+39"),
    Case("scale-negative-beyond-float32", lambda m: dict(scale=-1e38), C,
         r"\bscale must be at most 2\*\*126"),
    Case("softcap-beyond-float32", lambda m: dict(softcap=3.5e38), C,
         r"\bsoftcap must be at most 2\*\*126"),
    Case("k-scale-beyond-float32", lambda m: dict(k_scale=1e300), C,
         r"\bk_scale must be at most 2\*\*126"),
    Case("v-scale-float32-denormal", lambda m: dict(v_scale=1e-40), C,
         r"\bv_scale must be at least 2\*\*-126 .*smallest normal float32.*got 1e-40"),
    Case("softcap-rounds-to-zero", lambda m: dict(softcap=1e-50), C,
         r"\bsoftcap must be at least 2\*\*-126"),
    Case("scale-over-softcap-beyond-float32", lambda m: dict(scale=1e30, softcap=1e-10), C,
         r"\bscale / softcap must be at most 2\*\*126 .*got 1e\+40"),
    # -- backend choice and options: the same typed error whichever backend runs ------------
    Case("backend-bogus", lambda m: {}, C,
         r"\bbackend='bogus' is not a flashdec backend; valid choices: auto, cuda, torch",
         extra=dict(backend="bogus")),
    Case("backend-int", lambda m: {}, C,
         r"\bbackend must be a backend name \(auto, cuda, torch\) or None, got int 3",
         extra=dict(backend=3)),
    Case("option-typo", lambda m: {}, C,
         r"\bunknown backend option num_split=4 \(did you mean num_splits\?\); valid "
         r"options: num_splits", extra=dict(num_split=4)),
    Case("option-unknown", lambda m: {}, C, r"\bunknown backend option block=64; valid",
         extra=dict(block=64)),
    Case("num-splits-zero", lambda m: {}, C,
         r"\bnum_splits must be an int in \[1, 512\] or None, got int 0",
         extra=dict(num_splits=0)),
    Case("num-splits-too-many", lambda m: {}, C, r"\bnum_splits must be an int in \[1, 512\]",
         extra=dict(num_splits=513)),
    Case("num-splits-float", lambda m: {}, C, r"\bnum_splits must be .*got float 2.0",
         extra=dict(num_splits=2.0)),
    Case("num-splits-bool", lambda m: {}, C, r"\bnum_splits must be .*got bool True",
         extra=dict(num_splits=True)),
    Case("num-splits-str", lambda m: {}, C, r"\bnum_splits must be .*got str '4'",
         extra=dict(num_splits="4")),
    Case("num-splits-zero-on-cuda", lambda m: {}, C, r"\bnum_splits must be an int in",
         extra=dict(num_splits=0, backend="cuda")),  # the option is checked first, anywhere
]

assert len({c.id for c in CASES}) == len(CASES)
assert len(CASES) >= 35


def _build(case: Case, seed: int = 0) -> dict[str, Any]:
    m = Maker(seed)
    args = dict(m.torch_args(), scale=None)
    args.update(case.make(m))
    args.setdefault("scale", None)
    return args


def _call(entry: str, args: dict[str, Any], extra: dict[str, Any]) -> Any:
    fn = flashdec.decode if entry == "decode" else flashdec.plan
    keywords = {n: a for n, a in args.items() if n not in ("q", "k", "v", "out")}
    return fn(args["q"], args["k"], args["v"], args["out"], **keywords, **extra)


PARAMS = [pytest.param(case, entry, id=f"{entry}-{case.id}")
          for case in CASES for entry in ("decode", "plan") if entry == "decode" or case.plan]


@pytest.mark.parametrize("case, entry", PARAMS)
def test_rejects(case: Case, entry: str) -> None:
    args = _build(case)
    with pytest.raises(case.exc, match=case.match) as info:
        _call(entry, args, case.extra)
    if case.exc is ContractError:
        # the documented type: a FlashDecError that is also a ValueError, not a subclass accident
        assert type(info.value) is ContractError
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, flashdec.FlashDecError)


def test_case_table_is_valid_without_the_fault() -> None:
    """The base arguments every case starts from are themselves valid (so each case tests
    exactly its one fault)."""
    m = Maker(0)
    args = m.torch_args()
    y = flashdec.decode(args["q"], args["k"], args["v"], args["out"])
    assert y is args["out"]
    ref = decode_reference(args["q"].numpy(), args["k"].numpy(), args["v"].numpy())
    assert relative_error(y.numpy(), ref) < TOLERANCE["float32"]
    np_args = Maker(1).numpy_args()
    y = flashdec.decode(np_args["q"], np_args["k"], np_args["v"], np_args["out"])
    ref = decode_reference(np_args["q"], np_args["k"], np_args["v"])
    assert relative_error(y, ref) < TOLERANCE["float32"]
    fp8 = _fp8(Maker(2))
    y = flashdec.decode(fp8["q"], fp8["k"], fp8["v"], fp8["out"], k_scale=0.5, v_scale=2.0)
    ref = decode_reference(*(fp8[n].to(torch.float64).numpy() for n in ("q", "k", "v")),
                           k_scale=0.5, v_scale=2.0)
    assert relative_error(y.to(torch.float64).numpy(), ref) < TOLERANCE["bfloat16"]


# -- a failed validation does no work -----------------------------------------------------------
NO_WORK = [
    ("k-rank", dict(k=lambda m: m.t(B, HKV * KLEN, D)), {}),
    ("v-dtype", dict(v=lambda m: m.t(*KV_SHAPE, dtype=torch.float16)), {}),
    ("k-device", dict(k=lambda m: TensorRef.from_pointer(FAKE_CUDA_PTR, "float32", KV_SHAPE,
                                                        device="cuda:0")), {}),
    ("q-not-tensor", dict(q=lambda m: m.t(*Q_SHAPE).tolist()), {}),
    ("scale-nan", {}, dict(scale=float("nan"))),
    ("softcap-zero", {}, dict(softcap=0.0)),
    ("seqlens-host-above-capacity", {}, dict(seqlens=[0, KLEN + 1])),
    ("lse-stride-0", dict(lse_out=lambda m: m.t(1, HQ).expand(B, HQ)), {}),
    ("backend-unknown", {}, dict(backend="nope")),
    ("backend-cuda-on-cpu", {}, dict(backend="cuda")),
    # Y used to be written before the LSE copy into a tensor that requires grad raised
    ("lse-requires-grad", dict(lse_out=lambda m: m.t(B, HQ).requires_grad_()), {}),
    ("out-requires-grad", dict(out=lambda m: m.t(*Q_SHAPE).requires_grad_()), {}),
    ("option-typo", {}, dict(num_split=4)),
    ("k-scale-tensor-negative", {}, dict(k_scale=torch.tensor([1.0, -1.0]))),
]


@pytest.mark.parametrize("overrides, kwargs", [pytest.param(o, kw, id=i) for i, o, kw in NO_WORK])
def test_no_work_after_failed_validation(overrides, kwargs) -> None:
    m = Maker(3)
    args = m.torch_args()
    for name, make in overrides.items():
        args[name] = make(m)
    poison = {n: args[n].detach().clone() for n in ("out", "lse_out") if n in args}
    with pytest.raises(flashdec.FlashDecError):  # a flashdec error, whatever went wrong
        flashdec.decode(args["q"], args["k"], args["v"], args["out"],
                        lse_out=args.get("lse_out"), **kwargs)
    for name, before in poison.items():
        assert torch.equal(args[name].detach(), before), \
            f"{name} was written although decode raised"


def test_no_work_after_failed_plan_run() -> None:
    m = Maker(4)
    args = m.torch_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"])
    poison = args["out"].clone()
    wider = m.t(B, HKV, KLEN * 2, D)[:, :, :KLEN]  # same shape, other strides
    with pytest.raises(ContractError, match=r"\bk does not match the plan"):
        p.run(args["q"], wider, args["v"], args["out"])
    assert torch.equal(args["out"], poison)


# -- not errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["decode", "plan"])
def test_empty_batch_is_not_an_error(entry: str) -> None:
    m = Maker(5)
    q, k, v = m.t(0, HQ, D), m.t(0, HKV, KLEN, D), m.t(0, HKV, KLEN, D)
    if entry == "decode":
        y = flashdec.decode(q, k, v)
    else:
        y = flashdec.plan(q, k, v).run(q, k, v)
    assert isinstance(y, torch.Tensor)
    assert tuple(y.shape) == (0, HQ, D)
    assert y.dtype == torch.float32
    out = m.t(0, HQ, D)
    assert flashdec.decode(q, k, v, out) is out


def test_empty_batch_numpy() -> None:
    m = Maker(6)
    y = flashdec.decode(m.n(0, HQ, D), m.n(0, HKV, KLEN, D), m.n(0, HKV, KLEN, D))
    assert isinstance(y, np.ndarray) and y.shape == (0, HQ, D) and y.dtype == np.float32


def test_zero_kv_len_gives_zeros() -> None:
    m = Maker(7)
    out = m.t(*Q_SHAPE)
    y = flashdec.decode(m.t(*Q_SHAPE), m.t(B, HKV, 0, D), m.t(B, HKV, 0, D), out)
    assert y is out
    assert torch.equal(out, torch.zeros(Q_SHAPE))


def test_empty_kv_whose_pointer_lies_inside_out_is_not_an_overlap() -> None:
    """An empty K/V touches no memory, so it cannot overlap Y, wherever its pointer points
    (e.g. a zero-length slice of an arena that also holds Y)."""
    m = Maker(8)
    arena = m.n(4 * B * HQ * D)
    out = arena[: B * HQ * D].reshape(Q_SHAPE)
    empty = np.lib.stride_tricks.as_strided(arena[D:], (B, HKV, 0, D), (HKV * D * 4, D * 4, D * 4, 4))
    assert empty.__array_interface__["data"][0] > out.__array_interface__["data"][0]
    y = flashdec.decode(m.n(*Q_SHAPE), empty, empty, out)
    assert y is out
    np.testing.assert_array_equal(out, np.zeros(Q_SHAPE, np.float32))


def test_scale_accepts_real_numbers() -> None:
    m = Maker(9)
    q, k, v = m.t(*Q_SHAPE), m.t(*KV_SHAPE), m.t(*KV_SHAPE)
    ref = decode_reference(q.numpy(), k.numpy(), v.numpy(), scale=0.25)
    for scale in (0.25, np.float32(0.25), np.float64(0.25), 1 / 4):
        y = flashdec.decode(q, k, v, scale=scale)
        assert relative_error(y.numpy(), ref) < TOLERANCE["float32"], scale
    p = flashdec.plan(q, k, v, scale=2)  # an int is a real number
    assert p.problem.scale == 2.0


def test_problem_records_the_features() -> None:
    """What a backend learns from DecodeProblem: the features, the KV dtype, its bytes."""
    m = Maker(18)
    args = _fp8(m, k_scale=0.5, v_scale=m.t(HKV).abs() + 0.5)
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"], k_scale=args["k_scale"],
                      v_scale=args["v_scale"], softcap=30, window_left=np.int64(4),
                      seqlens=[1, KLEN])
    problem = p.problem
    assert (problem.dtype, problem.kv_dtype) == (flashdec.DType.bfloat16,
                                                 flashdec.DType.float8_e4m3fn)
    assert (problem.softcap, problem.window_left, problem.seqlens) == (30.0, 4, True)
    assert (problem.k_scale, problem.v_scale, problem.return_lse) == (0.5, None, False)
    assert type(problem.softcap) is float and type(problem.window_left) is int
    assert problem.kv_bytes == 2 * B * HKV * KLEN * D * 1
    plain = flashdec.DecodeProblem(B, HQ, HKV, KLEN, D, flashdec.DType.float16, 0.5,
                                   flashdec.Device("cpu"))
    assert plain.kv_dtype is flashdec.DType.float16 and plain.kv_bytes == 2 * B * HKV * KLEN * D * 2
    assert (plain.k_scale, plain.v_scale, plain.softcap, plain.window_left, plain.seqlens,
            plain.return_lse) == (1.0, 1.0, None, None, False, False)
    assert flashdec.plan(*(args[n] for n in ("q", "k", "v")), k_scale=1, v_scale=2.0,
                         lse_out=m.t(B, HQ)).problem.return_lse


# -- plan.run -----------------------------------------------------------------------------------
def _plan_run_case(name: str, m: Maker, args: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Arguments of another layout for ``name``, and the message expected."""
    new = dict(args)
    if name == "q-strides":
        new["q"] = m.t(B, HQ, 2 * D)[:, :, :D]
    elif name == "q-dtype":
        new["q"] = m.t(*Q_SHAPE, dtype=torch.float16)
    elif name == "k-strides":
        new["k"] = m.t(B, HKV, 2 * KLEN, D)[:, :, :KLEN]
    elif name == "k-shape":
        new["k"] = m.t(B, HKV, KLEN + 1, D)
    elif name == "v-shape":
        new["v"] = m.t(B, HKV, KLEN - 1, D)
    elif name == "v-permuted":
        new["v"] = m.t(B, KLEN, HKV, D).permute(0, 2, 1, 3)
    elif name == "out-strides":
        new["out"] = m.t(HQ, B, D).permute(1, 0, 2)
    elif name == "out-dtype":
        new["out"] = m.t(*Q_SHAPE, dtype=torch.bfloat16)
    elif name == "k-device":
        new["k"] = TensorRef.from_pointer(FAKE_CUDA_PTR, "float32", KV_SHAPE, device="cuda:0")
    else:
        raise AssertionError(name)
    return new, rf"\b{name.split('-')[0]} does not match the plan"


PLAN_RUN = ["q-strides", "q-dtype", "k-strides", "k-shape", "v-shape", "v-permuted",
            "out-strides", "out-dtype", "k-device"]


@pytest.mark.parametrize("name", PLAN_RUN)
def test_plan_run_rejects_other_layout(name: str) -> None:
    m = Maker(10)
    args = m.torch_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"])
    new, match = _plan_run_case(name, m, args)
    with pytest.raises(ContractError, match=match):
        p.run(new["q"], new["k"], new["v"], new["out"])
    # the planned layout still runs
    y = p.run(args["q"], args["k"], args["v"], args["out"])
    ref = decode_reference(args["q"].numpy(), args["k"].numpy(), args["v"].numpy())
    assert relative_error(y.numpy(), ref) < TOLERANCE["float32"]


def _aliased_out(m: Maker, name: str, args: dict[str, Any]) -> Any:
    if name == "q":
        return args["q"]
    return args[name].view(-1)[: B * HQ * D].view(Q_SHAPE)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("planned_out", [False, True], ids=["plan-out-none", "plan-with-out"])
def test_plan_run_rejects_out_overlapping_an_input(name: str, planned_out: bool) -> None:
    m = Maker(11)
    args = m.torch_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"] if planned_out else None)
    alias = _aliased_out(m, name, args)
    assert alias.stride() == args["out"].stride()  # same layout: only the aliasing is wrong
    before = {n: args[n].clone() for n in ("q", "k", "v")}
    with pytest.raises(ContractError, match=rf"\bout overlaps {name} in memory"):
        p.run(args["q"], args["k"], args["v"], alias)
    for n, t in before.items():
        assert torch.equal(args[n], t), f"{n} was modified"


def test_plan_run_rejects_readonly_out() -> None:
    m = Maker(12)
    args = m.numpy_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"])
    ro = m.n(*Q_SHAPE)
    ro.flags.writeable = False
    with pytest.raises(ContractError, match=r"\bout is read-only"):
        p.run(args["q"], args["k"], args["v"], ro)


@pytest.mark.parametrize("name", ["q", "k", "v", "out"])
def test_plan_run_rejects_non_tensor(name: str) -> None:
    m = Maker(13)
    args = m.torch_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"])
    args[name] = [1.0, 2.0]
    with pytest.raises(ContractError, match=rf"\b{name} must be a tensor.*got list"):
        p.run(args["q"], args["k"], args["v"], args["out"])


# -- plan.run with the per-run tensors of the serving features -----------------------------------
def _run_tensors(m: Maker, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The per-run tensors named by a PLAN_RUN_FEATURES entry."""
    made = {
        "seqlens": lambda: torch.tensor([KLEN, 1], dtype=torch.int32),
        "seqlens-strided": lambda: torch.tensor([KLEN, 0, 1, 0], dtype=torch.int32)[::2],
        "seqlens-host": lambda: [KLEN, 1],
        "seqlens-host-above-capacity": lambda: [1, KLEN + 3],
        "k_scale": lambda: m.t(HKV).abs() + 0.5,
        "v_scale": lambda: m.t(HKV).abs() + 0.5,
        "k_scale-negative": lambda: torch.tensor([1.0, -0.5]),
        "v_scale-nan": lambda: torch.tensor([1.0, float("nan")]),
        "k_scale-float": lambda: 0.5,
        "v_scale-float": lambda: 2.0,
        "lse_out": lambda: m.t(B, HQ),
        "lse_out-transposed": lambda: m.t(HQ, B).T,
        "lse_out-inside-out": lambda: args["out"].view(-1)[: B * HQ].view(B, HQ),
    }
    return {key.split("-")[0]: made[key]() for key in name.split("+") if key}


# (id, what the plan is made with, what run is given, the message)
PLAN_RUN_FEATURES = [
    ("seqlens-missing", "seqlens", "", r"\bseqlens is missing: the plan was made with a "
     r"per-run seqlens tensor; pass seqlens= to run"),
    ("seqlens-host-missing", "seqlens-host", "", r"\bseqlens is missing"),
    ("seqlens-not-planned", "", "seqlens", r"\bseqlens was not planned.*make a new plan with "
     r"seqlens="),
    ("seqlens-other-layout", "seqlens", "seqlens-strided", r"\bseqlens does not match the plan"),
    ("seqlens-host-out-of-range", "seqlens-host", "seqlens-host-above-capacity",
     r"\bseqlens\[1\] is 9; every length must be in \[0, 6\]"),
    ("k-scale-missing", "k_scale", "", r"\bk_scale is missing"),
    ("v-scale-not-planned", "", "v_scale", r"\bv_scale was not planned"),
    ("k-scale-tensor-for-float-plan", "k_scale-float", "k_scale", r"\bk_scale was not planned"),
    ("k-scale-float-in-run", "k_scale-float", "k_scale-float",
     r"\bk_scale must be a per-run tensor or None in run \(a float scale is fixed when the "
     r"plan is made\), got float 0.5"),
    ("v-scale-float-for-tensor-plan", "v_scale", "v_scale-float",
     r"\bv_scale must be a per-run tensor or None in run"),
    ("k-scale-negative-in-run", "k_scale", "k_scale-negative",
     r"\bk_scale\[1\] is -0.5; every scale must be finite and > 0"),
    ("v-scale-nan-in-run", "v_scale", "v_scale-nan", r"\bv_scale\[1\] is nan"),
    ("lse-not-planned", "", "lse_out", r"\blse_out was not planned.*return_lse=True or lse_out="),
    ("lse-other-layout", "lse_out", "lse_out-transposed", r"\blse_out does not match the plan"),
    ("lse-overlaps-out", "lse_out", "lse_out-inside-out", r"\blse_out overlaps out in memory"),
]


@pytest.mark.parametrize("planned, given, match",
                         [pytest.param(p, g, mt, id=i) for i, p, g, mt in PLAN_RUN_FEATURES])
def test_plan_run_checks_per_run_tensors(planned: str, given: str, match: str) -> None:
    m = Maker(14)
    args = m.torch_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"],
                      **_run_tensors(m, planned, args))
    poison = args["out"].clone()
    with pytest.raises(ContractError, match=match):
        p.run(args["q"], args["k"], args["v"], args["out"], **_run_tensors(m, given, args))
    assert torch.equal(args["out"], poison), "out was written although run raised"


def test_plan_run_returns_what_decode_returns() -> None:
    m = Maker(15)
    args = m.torch_args()
    seqlens = torch.tensor([KLEN, 2], dtype=torch.int32)
    q, k, v = args["q"], args["k"], args["v"]
    p = flashdec.plan(q, k, v, seqlens=seqlens, return_lse=True, window_left=3)
    ref, ref_lse = decode_reference(q.numpy(), k.numpy(), v.numpy(), seqlens=seqlens.numpy(),
                                    window_left=3, return_lse=True)
    y, lse = p.run(q, k, v, seqlens=seqlens)  # Y and LSE allocated per run
    assert y.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (B, HQ)
    assert relative_error(y.numpy(), ref) < TOLERANCE["float32"]
    assert lse_error(lse.numpy(), ref_lse) < LSE_TOLERANCE["float32"]
    lse_out = m.t(B, HQ)
    got = p.run(q, k, v, args["out"], seqlens=[KLEN, 2], lse_out=lse_out)  # host lengths too
    assert got[0] is args["out"] and got[1] is lse_out
    assert torch.equal(lse_out, lse) and torch.equal(args["out"], y)
    with pytest.raises(ContractError, match=r"\bseqlens is missing"):
        p.run(q, k, v)


# -- merge_states -------------------------------------------------------------------------------
N = 3


def _merge_base(m: Maker, **over: Any) -> dict[str, Any]:
    args = dict(outputs=m.t(N, B, HQ, D), lses=m.t(N, B, HQ), out=None, lse_out=None)
    args.update(over)
    return args


def _merge_out_inside_outputs(m: Maker) -> dict[str, Any]:
    outputs = m.t(N, B, HQ, D)
    return _merge_base(m, outputs=outputs, out=outputs[1])


def _merge_lse_inside_out(m: Maker) -> dict[str, Any]:
    out = m.t(*Q_SHAPE)
    return _merge_base(m, out=out, lse_out=out.view(-1)[: B * HQ].view(B, HQ))


def _merge_readonly_out(m: Maker) -> dict[str, Any]:
    out = m.n(*Q_SHAPE)
    out.flags.writeable = False
    return _merge_base(m, out=out)


MERGE_CASES = [
    ("n-mismatch-stacked", lambda m: _merge_base(m, lses=m.t(N - 1, B, HQ)),
     r"\blses holds 2 parts but outputs holds 3"),
    ("n-mismatch-sequence", lambda m: _merge_base(m, outputs=[m.t(B, HQ, D)] * 2,
                                                  lses=[m.t(B, HQ)] * 3),
     r"\blses holds 3 parts but outputs holds 2"),
    ("no-parts", lambda m: _merge_base(m, outputs=[], lses=[]),
     r"\boutputs must hold at least one part \(N >= 1\), got none"),
    ("no-parts-stacked", lambda m: _merge_base(m, outputs=m.t(0, B, HQ, D), lses=m.t(0, B, HQ)),
     r"\boutputs must hold at least one part"),
    ("outputs-rank-3", lambda m: _merge_base(m, outputs=m.t(B, HQ, D)),
     r"\boutputs must have rank 4 \[N, batch, num_heads, head_dim\]"),
    ("lses-rank-2", lambda m: _merge_base(m, lses=m.t(N, B * HQ)),
     r"\blses must have rank 3 \[N, batch, num_heads\]"),
    ("part-shapes-differ", lambda m: _merge_base(m, outputs=[m.t(B, HQ, D), m.t(B, HQ + 1, D)],
                                                 lses=[m.t(B, HQ)] * 2),
     r"\boutputs\[1\] must have shape \(2, 4, 8\)"),
    ("lse-shape-differs", lambda m: _merge_base(m, lses=m.t(N, B, HQ + 1)),
     r"\blses\[0\] must have shape \(2, 4\) \[batch, num_heads\] of outputs, got \(2, 5\)"),
    ("lse-float16", lambda m: _merge_base(m, lses=m.t(N, B, HQ, dtype=torch.float16)),
     r"\blses\[0\] has dtype float16; expected float32"),
    ("lse-bfloat16-part", lambda m: _merge_base(
        m, outputs=[m.t(B, HQ, D)] * 2, lses=[m.t(B, HQ), m.t(B, HQ, dtype=torch.bfloat16)]),
     r"\blses\[1\] has dtype bfloat16; expected float32"),
    ("outputs-dtypes-differ", lambda m: _merge_base(
        m, outputs=[m.t(B, HQ, D), m.t(B, HQ, D, dtype=torch.float16)], lses=[m.t(B, HQ)] * 2),
     r"\boutputs\[1\] has dtype float16; expected float32"),
    ("outputs-int32", lambda m: _merge_base(m, outputs=m.t(N, B, HQ, D, dtype=torch.int32)),
     r"\boutputs\[0\] has dtype int32; supported dtypes: float16, bfloat16, float32"),
    ("outputs-fp8", lambda m: _merge_base(m, outputs=m.t(N, B, HQ, D, dtype=torch.float8_e4m3fn)),
     r"\boutputs\[0\] has dtype float8_e4m3fn; supported dtypes"),
    ("lses-device", lambda m: _merge_base(m, outputs=[m.t(B, HQ, D)] * 2,
                                          lses=[m.t(B, HQ), _fake_cuda("float32", B, HQ)]),
     r"\blses\[1\] is on cuda:0; every part must be on the device of outputs\[0\] \(cpu\)"),
    ("outputs-device", lambda m: _merge_base(m, outputs=[m.t(B, HQ, D),
                                                         _fake_cuda("float32", B, HQ, D)],
                                             lses=[m.t(B, HQ)] * 2),
     r"\boutputs\[1\] is on cuda:0"),
    ("outputs-negative-stride", lambda m: _merge_base(
        m, outputs=m.n(N, B, HQ, D)[:, :, ::-1], lses=m.n(N, B, HQ)),
     r"\boutputs\[0\] has negative strides"),
    ("outputs-not-a-tensor", lambda m: _merge_base(m, outputs=3),
     r"\boutputs must be a stacked tensor \[N, batch, num_heads, head_dim\] or a sequence of N "
     r"tensors, got int"),
    ("outputs-part-not-a-tensor", lambda m: _merge_base(m, outputs=[[1.0]] * N),
     r"\boutputs\[0\] must be a tensor"),
    ("out-shape", lambda m: _merge_base(m, out=m.t(B, HQ, D + 1)),
     r"\bout must have shape \(2, 4, 8\)"),
    ("out-dtype", lambda m: _merge_base(m, out=m.t(*Q_SHAPE, dtype=torch.float16)),
     r"\bout has dtype float16; expected float32"),
    ("out-read-only", _merge_readonly_out, r"\bout is read-only"),
    ("out-stride-0", lambda m: _merge_base(m, out=m.t(1, HQ, D).expand(*Q_SHAPE)),
     r"\bout has stride 0"),
    ("out-inside-outputs", _merge_out_inside_outputs, r"\bout overlaps outputs\[1\] in memory"),
    ("lse-out-dtype", lambda m: _merge_base(m, lse_out=m.t(B, HQ, dtype=torch.float16)),
     r"\blse_out has dtype float16; expected float32"),
    ("lse-out-shape", lambda m: _merge_base(m, lse_out=m.t(HQ, B)),
     r"\blse_out must have shape \(2, 4\)"),
    ("lse-out-inside-out", _merge_lse_inside_out, r"\blse_out overlaps out in memory"),
    ("lse-out-is-a-lse", lambda m: (lambda lses: _merge_base(m, lses=lses, lse_out=lses[2]))(
        m.t(N, B, HQ)), r"\blse_out overlaps lses\[2\] in memory"),
    ("lse-plus-inf", lambda m: _merge_base(m, lses=_with(m.t(N, B, HQ), (1, 0, 2), float("inf"))),
     r"\blses\[1\]\[0, 2\] is \+inf; an LSE is finite, -inf \(no keys\) or NaN"),
    ("lse-plus-inf-part", lambda m: _merge_base(
        m, outputs=[m.t(B, HQ, D)] * 2, lses=[m.t(B, HQ), _with(m.t(B, HQ), (1, 3), float("inf"))]),
     r"\blses\[1\]\[1, 3\] is \+inf"),
    ("lse-plus-inf-numpy", lambda m: _merge_base(
        m, outputs=m.n(N, B, HQ, D), lses=_with(m.n(N, B, HQ), (2, 1, 0), np.inf)),
     r"\blses\[2\]\[1, 0\] is \+inf"),
    ("outputs-neg-view", lambda m: _merge_base(m, outputs=torch._neg_view(m.t(N, B, HQ, D))),
     r"\boutputs is a torch view with the negative bit set"),
    ("lses-requires-grad", lambda m: _merge_base(m, lses=m.t(N, B, HQ).requires_grad_()),
     r"\blses requires grad"),
    ("out-requires-grad", lambda m: _merge_base(m, out=m.t(*Q_SHAPE).requires_grad_()),
     r"\bout requires grad"),
    ("lse-out-requires-grad", lambda m: _merge_base(m, lse_out=m.t(B, HQ).requires_grad_()),
     r"\blse_out requires grad"),
    ("outputs-part-sparse", lambda m: _merge_base(
        m, outputs=[m.t(B, HQ, D), m.t(B, HQ, D).to_sparse()], lses=[m.t(B, HQ)] * 2),
     r"\boutputs\[1\] is a torch.sparse_coo tensor"),
]


def _with(x: Any, index: tuple[int, ...], value: float) -> Any:
    """``x`` with one element set to ``value``."""
    x[index] = value
    return x


@pytest.mark.parametrize("make, match", [pytest.param(mk, mt, id=i) for i, mk, mt in MERGE_CASES])
def test_merge_rejects(make, match) -> None:
    args = make(Maker(16))
    written = [x.detach().clone() for x in (args["out"], args["lse_out"])
               if isinstance(x, torch.Tensor)]
    with pytest.raises(ContractError, match=match) as info:
        flashdec.merge_states(args["outputs"], args["lses"], out=args["out"],
                              lse_out=args["lse_out"])
    assert type(info.value) is ContractError
    for before, x in zip(written, (x for x in (args["out"], args["lse_out"])
                                   if isinstance(x, torch.Tensor))):
        assert torch.equal(before, x.detach()), \
            "an output was written although merge_states raised"


def test_merge_table_is_valid_without_the_fault() -> None:
    args = _merge_base(Maker(17))
    out, lse = flashdec.merge_states(args["outputs"], args["lses"])
    ref, ref_lse = merge_reference(args["outputs"].numpy(), args["lses"].numpy())
    assert relative_error(out.numpy(), ref) < TOLERANCE["float32"]
    assert lse_error(lse.numpy(), ref_lse) < LSE_TOLERANCE["float32"]


# -- issue 11 section 3: valid arguments that used to escape as other errors ----------------------
@pytest.mark.parametrize("window", [KLEN, KLEN + 1, 2**63 - 1, 2**64, 10**30, np.uint64(2**64 - 1)])
@pytest.mark.parametrize("lengths", [None, [KLEN, 2]], ids=["full", "host-seqlens"])
def test_window_wider_than_the_cache_attends_to_every_key(window, lengths) -> None:
    """window_left >= K_len is valid (every key is in the window): it used to overflow the
    torch backend's int64 arithmetic. The plan records it as K_len."""
    m = Maker(20)
    q, k, v = m.t(*Q_SHAPE), m.t(*KV_SHAPE), m.t(*KV_SHAPE)
    y, lse = flashdec.decode(q, k, v, window_left=window, seqlens=lengths, return_lse=True)
    ref, ref_lse = decode_reference(q.numpy(), k.numpy(), v.numpy(), seqlens=lengths,
                                    return_lse=True)
    assert relative_error(y.numpy(), ref) < TOLERANCE["float32"]
    assert lse_error(lse.numpy(), ref_lse) < LSE_TOLERANCE["float32"]
    assert flashdec.plan(q, k, v, window_left=window).problem.window_left == KLEN


def test_sparse_q_after_a_cached_decode_is_a_contract_error() -> None:
    """decode's plan cache reads strides for its key: a sparse tensor has none."""
    m = Maker(21)
    args = m.torch_args()
    flashdec.decode(args["q"], args["k"], args["v"], args["out"])  # cached
    with pytest.raises(ContractError, match=r"\bq is a torch.sparse_coo tensor"):
        flashdec.decode(args["q"].to_sparse(), args["k"], args["v"], args["out"])
    with pytest.raises(ContractError, match=r"\bq requires grad"):
        flashdec.decode(args["q"].clone().requires_grad_(), args["k"], args["v"], args["out"])
    with pytest.raises(ContractError, match=r"\bk is a torch view with the negative bit"):
        flashdec.decode(args["q"], torch._neg_view(args["k"]), args["v"], args["out"])


def test_fast_path_leaves_grad_and_negative_views_to_the_general_path() -> None:
    """The CUDA torch fast path reads data_ptr itself: a tensor that requires grad, or whose
    memory holds minus its values, must not get through it (the general path refuses it by
    name). Checked on CPU tensors through the path decode's cache takes (layouts known)."""
    from flashdec._contract import DecodeArgs
    from flashdec._plan import TorchFastPath

    m = Maker(22)
    args = m.torch_args()
    p = flashdec.plan(args["q"], args["k"], args["v"], args["out"])
    fast = TorchFastPath(torch, p.problem, p._layouts)
    given = [args[n] for n in ("q", "k", "v", "out")] + [None] * 4
    assert fast.pointers(DecodeArgs(*given), layouts_known=True) == DecodeArgs(
        *(None if x is None else x.data_ptr() for x in given))
    for i in range(4):
        for bad in (torch._neg_view(given[i]), given[i].detach().clone().requires_grad_()):
            changed = list(given)
            changed[i] = bad
            assert fast.pointers(DecodeArgs(*changed), layouts_known=True) is None


def test_max_splits_is_the_cuda_backends() -> None:
    """The frontend checks num_splits against its own MAX_SPLITS (no cuda import needed);
    it must be the number the cuda combine kernel merges."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from flashdec._contract import MAX_SPLITS
    from flashdec.backends.cuda import _kernels

    assert MAX_SPLITS == _kernels.MAX_SPLITS == 512


def test_num_splits_in_range_is_accepted_by_the_torch_backend() -> None:
    m = Maker(23)
    q, k, v = m.t(*Q_SHAPE), m.t(*KV_SHAPE), m.t(*KV_SHAPE)
    ref = decode_reference(q.numpy(), k.numpy(), v.numpy())
    for splits in (1, 7, 512, np.int64(3), None):
        y = flashdec.decode(q, k, v, num_splits=splits, backend="torch")
        assert relative_error(y.numpy(), ref) < TOLERANCE["float32"]
    assert flashdec.BackendOptions.parse({"num_splits": np.int64(3)}) == \
        flashdec.BackendOptions(num_splits=3)
