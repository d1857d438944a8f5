"""Every way to break the decode contract, as one table.

Each case builds (q, k, v, out, scale) from random normal data with exactly one thing wrong and
checks that ``flashdec.decode`` (and ``flashdec.plan`` where the argument exists there) raises
the documented error type with a message that names the offending argument. Further tests check
that a failed validation does no work, that valid corner cases (B = 0, K_len = 0) are not
errors, and that ``DecodePlan.run`` rejects tensors of another layout and an aliased output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch

import flashdec
from flashdec import BackendUnavailableError, ContractError, TensorMut, TensorRef, UnsupportedError
from flashdec.reference import TOLERANCE, decode_reference, relative_error

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
    return fn(args["q"], args["k"], args["v"], args["out"], scale=args["scale"], **extra)


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


# -- a failed validation does no work -----------------------------------------------------------
NO_WORK = [
    ("k-rank", dict(k=lambda m: m.t(B, HKV * KLEN, D)), {}),
    ("v-dtype", dict(v=lambda m: m.t(*KV_SHAPE, dtype=torch.float16)), {}),
    ("k-device", dict(k=lambda m: TensorRef.from_pointer(FAKE_CUDA_PTR, "float32", KV_SHAPE,
                                                        device="cuda:0")), {}),
    ("q-not-tensor", dict(q=lambda m: m.t(*Q_SHAPE).tolist()), {}),
    ("scale-nan", {}, dict(scale=float("nan"))),
    ("backend-unknown", {}, dict(backend="nope")),
    ("backend-cuda-on-cpu", {}, dict(backend="cuda")),
]


@pytest.mark.parametrize("overrides, kwargs", [pytest.param(o, kw, id=i) for i, o, kw in NO_WORK])
def test_no_work_after_failed_validation(overrides, kwargs) -> None:
    m = Maker(3)
    args = m.torch_args()
    for name, make in overrides.items():
        args[name] = make(m)
    poison = args["out"].clone()
    with pytest.raises((ContractError, ValueError, UnsupportedError, BackendUnavailableError)):
        flashdec.decode(args["q"], args["k"], args["v"], args["out"], **kwargs)
    assert torch.equal(args["out"], poison), "out was written although decode raised"


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
