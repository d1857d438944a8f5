"""TensorRef / TensorMut: building views from torch, NumPy, DLPack producers and raw pointers;
exporting them back through DLPack; lifetimes of owners and exported capsules; DType names."""

from __future__ import annotations

import ctypes
import gc
import weakref
from typing import Any

import numpy as np
import pytest
import torch

import flashdec
from flashdec import ContractError, Device, DType, TensorMut, TensorRef, _dlpack
from flashdec.reference import TOLERANCE, decode_reference, relative_error


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _np_ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class Producer:
    """A generic DLPack producer: only ``__dlpack__`` and ``__dlpack_device__`` over NumPy."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.calls: list[dict[str, Any]] = []

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.calls.append(dict(stream=stream, max_version=max_version))
        return self.a.__dlpack__(stream=stream, max_version=max_version)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class LegacyProducer:
    """A pre-DLPack-1.0 producer: ``__dlpack__`` takes no ``max_version`` (legacy capsule)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.calls = 0

    def __dlpack__(self, stream=None):
        self.calls += 1
        return self.a.__dlpack__(stream=stream)  # NumPy then exports a "dltensor" capsule

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class CapsuleProducer:
    """Hands out a prepared capsule (to test NULL strides and byte_offset)."""

    def __init__(self, capsule: Any, device: tuple[int, int] = (_dlpack.DL_CPU, 0)) -> None:
        self.capsule = capsule
        self.device = device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return self.capsule

    def __dlpack_device__(self):
        return self.device


# -- torch ----------------------------------------------------------------------------------------
TORCH_DTYPES = [(torch.float16, DType.float16), (torch.bfloat16, DType.bfloat16),
                (torch.float32, DType.float32), (torch.float64, DType.float64),
                (torch.float8_e4m3fn, DType.float8_e4m3fn), (torch.float8_e5m2, DType.float8_e5m2),
                (torch.int32, DType.int32)]


def _torch_layouts(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 3, 10, 8, generator=gen).to(dtype)
    return {
        "contiguous": x,
        "capacity-slice": x[:, :, :7],                          # k_cache[:, :, :k_len]
        "nhd-permuted": torch.randn(2, 10, 3, 8, generator=gen).to(dtype).permute(0, 2, 1, 3),
        "storage-offset": x[1:, 1:],
        "inner-stride-2": x[..., ::2],
        "broadcast": torch.randn(2, 1, 10, 8, generator=gen).to(dtype).expand(2, 3, 10, 8),
    }


@pytest.mark.parametrize("tdtype, dtype", TORCH_DTYPES, ids=[d.value for _, d in TORCH_DTYPES])
@pytest.mark.parametrize("layout", ["contiguous", "capacity-slice", "nhd-permuted",
                                    "storage-offset", "inner-stride-2", "broadcast"])
@pytest.mark.parametrize("cls", [TensorRef, TensorMut])
def test_from_torch(tdtype, dtype, layout, cls) -> None:
    x = _torch_layouts(_gen(1), tdtype)[layout]
    view = cls.from_object(x, name="q")
    assert type(view) is cls
    assert view.ptr == x.data_ptr()
    assert view.shape == tuple(x.shape)
    assert view.strides == x.stride()
    assert view.dtype is dtype
    assert view.device == Device("cpu", 0)
    assert view.readonly is False
    assert view.owner is x
    assert view.ndim == 4 and view.numel == x.numel()


def test_from_torch_unsupported_dtype_is_named() -> None:
    x = (torch.randn(3, 4, generator=_gen(2)) * 100).to(torch.int64)
    view = TensorRef.from_object(x)
    assert view.dtype == "int64"


# -- NumPy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("npdtype, dtype", [(np.float16, DType.float16), (np.float32, DType.float32),
                                            (np.float64, DType.float64)])
def test_from_numpy_byte_strides_become_element_strides(npdtype, dtype) -> None:
    base = _rng(3).standard_normal((4, 6, 10)).astype(npdtype)
    a = base[1:, ::2, 3:]
    item = np.dtype(npdtype).itemsize
    view = TensorRef.from_object(a)
    assert view.ptr == _np_ptr(a) == _np_ptr(base) + (60 + 3) * item
    assert view.shape == a.shape
    assert view.strides == tuple(s // item for s in a.strides) == (60, 20, 1)
    assert view.dtype is dtype
    assert view.device == Device("cpu", 0)
    assert view.readonly is False
    assert view.owner is a


def test_from_numpy_readonly_flag() -> None:
    a = _rng(4).standard_normal((3, 4)).astype(np.float32)
    assert TensorRef.from_object(a).readonly is False
    a.flags.writeable = False
    assert TensorRef.from_object(a).readonly is True
    b = np.broadcast_to(_rng(5).standard_normal((1, 4)).astype(np.float32), (3, 4))
    view = TensorRef.from_object(b)
    assert view.readonly is True
    assert view.strides == (0, 1)


def test_from_numpy_byte_strides_not_whole_items() -> None:
    raw = _rng(6).standard_normal(64).astype(np.float32)
    odd = np.lib.stride_tricks.as_strided(raw, (5, 3), (12, 6))
    with pytest.raises(ContractError, match=r"\bmy_k has byte strides \(12, 6\).*item size 4"):
        TensorRef.from_object(odd, name="my_k")


# -- generic DLPack producers ---------------------------------------------------------------------
def test_from_dlpack_producer() -> None:
    a = _rng(7).standard_normal((3, 5, 8)).astype(np.float32)[:, 1:, ::2]
    p = Producer(a)
    view = TensorRef.from_object(p, name="k")
    assert p.calls, "the producer's __dlpack__ was not used"
    assert p.calls[0]["max_version"] is not None and p.calls[0]["max_version"][0] >= 1
    assert p.calls[0]["stream"] is None  # CPU producer: no stream hand-off
    assert view.ptr == _np_ptr(a)
    assert view.shape == a.shape
    assert view.strides == (40, 8, 2)
    assert view.dtype is DType.float32
    assert view.device == Device("cpu", 0)
    assert view.readonly is False
    np.testing.assert_array_equal(np.from_dlpack(view), a)


def test_from_dlpack_producer_float16() -> None:
    a = _rng(8).standard_normal((2, 3)).astype(np.float16)
    view = TensorRef.from_object(Producer(a))
    assert view.dtype is DType.float16
    np.testing.assert_array_equal(np.from_dlpack(view), a)


def test_from_dlpack_producer_read_only() -> None:
    a = _rng(9).standard_normal((2, 3)).astype(np.float32)
    a.flags.writeable = False
    view = TensorRef.from_object(Producer(a))
    assert view.readonly is True
    with pytest.raises(ContractError, match=r"\bout is read-only"):
        TensorMut.from_object(Producer(a), name="out")


def test_from_legacy_dlpack_producer() -> None:
    a = _rng(10).standard_normal((4, 3)).astype(np.float32).T
    p = LegacyProducer(a)
    view = TensorRef.from_object(p, name="v")
    assert p.calls >= 1
    assert view.ptr == _np_ptr(a)
    assert view.strides == (1, 3)
    assert view.dtype is DType.float32
    assert view.readonly is False
    np.testing.assert_array_equal(np.from_dlpack(view), a)


def test_legacy_producer_of_read_only_memory_is_a_contract_error() -> None:
    a = _rng(11).standard_normal((2, 2)).astype(np.float32)
    a.flags.writeable = False  # NumPy refuses a legacy (flagless) export of it: BufferError
    with pytest.raises(ContractError, match=r"\bq could not be read through DLPack"):
        TensorRef.from_object(LegacyProducer(a), name="q")


def test_dlpack_null_strides_and_byte_offset() -> None:
    base = _rng(12).standard_normal(28).astype(np.float32)
    shape = (2, 3, 4)
    capsule = _dlpack.export_capsule(_np_ptr(base), DType.float32.dlpack, shape, (99, 99, 99),
                                     (_dlpack.DL_CPU, 0), False, base, True)
    managed = _dlpack._live[_dlpack._get_pointer(capsule, b"dltensor_versioned")][0]
    managed.dl_tensor.strides = ctypes.POINTER(ctypes.c_int64)()  # NULL: row-major
    managed.dl_tensor.byte_offset = 16                             # starts at element 4
    view = TensorRef.from_object(CapsuleProducer(capsule), name="k")
    assert view.ptr == _np_ptr(base) + 16
    assert view.strides == (12, 4, 1)
    np.testing.assert_array_equal(np.from_dlpack(view), base[4:].reshape(shape))


def test_dlpack_unknown_device_is_a_contract_error() -> None:
    class Metal(Producer):
        def __dlpack_device__(self):
            return (8, 0)  # kDLMetal
    with pytest.raises(ContractError, match=r"\bk lives on DLPack device type 8"):
        TensorRef.from_object(Metal(_rng(13).standard_normal(3).astype(np.float32)), name="k")


def test_dlpack_producer_buffer_error_is_a_contract_error() -> None:
    class Refuses(Producer):
        def __dlpack__(self, **kwargs):
            raise BufferError("no export today")
    with pytest.raises(ContractError, match=r"\bv could not be read through DLPack: no export"):
        TensorRef.from_object(Refuses(_rng(14).standard_normal(3).astype(np.float32)), name="v")


@pytest.mark.parametrize("error", [RuntimeError("boom"), TypeError("boom"), ValueError("boom")])
def test_dlpack_producer_that_raises_anything_is_a_contract_error(error) -> None:
    """Whatever a producer raises (torch raises RuntimeError for a tensor that requires grad)
    comes back as a ContractError naming the argument."""
    class Raises(Producer):
        def __dlpack__(self, **kwargs):
            raise error
    with pytest.raises(ContractError, match=r"\bk could not be read through DLPack: boom$"):
        TensorRef.from_object(Raises(_rng(16).standard_normal(3).astype(np.float32)), name="k")


def test_dlpack_producer_unknown_dtype_is_named() -> None:
    a = (_rng(15).standard_normal(4) * 100).astype(np.int16)
    assert TensorRef.from_object(Producer(a)).dtype == "int16"


@pytest.mark.parametrize("x", [[1.0, 2.0], 3.5, None, "tensor", object()],
                         ids=["list", "float", "None", "str", "object"])
def test_not_a_tensor(x) -> None:
    with pytest.raises(ContractError, match=r"\bq must be a tensor"):
        TensorRef.from_object(x, name="q")


# -- raw pointers ---------------------------------------------------------------------------------
def test_from_pointer_defaults_to_row_major() -> None:
    a = _rng(16).standard_normal((2, 3, 4)).astype(np.float32)
    view = TensorRef.from_pointer(_np_ptr(a), "float32", a.shape, owner=a)
    assert type(view) is TensorRef
    assert view.strides == (12, 4, 1)
    assert view.dtype is DType.float32
    assert view.device == Device("cpu", 0)
    assert view.readonly is False and view.owner is a
    np.testing.assert_array_equal(np.from_dlpack(view), a)


def test_from_pointer_options() -> None:
    view = TensorMut.from_pointer(0x1000, DType.bfloat16, (2, 0, 5), device="cuda:1")
    assert type(view) is TensorMut
    assert view.strides == (5, 5, 1)
    assert view.device == Device("cuda", 1)
    assert str(view.device) == "cuda:1"
    assert view.span_bytes() == (0x1000, 0x1000)  # no elements
    explicit = TensorRef.from_pointer(0x2000, "float16", (3, 4), (1, 3), readonly=True)
    assert explicit.strides == (1, 3) and explicit.readonly is True
    assert explicit.span_bytes() == (0x2000, 0x2000 + 12 * 2)
    assert TensorRef.from_pointer(0x3000, "int8", (4,)).dtype == "int8"
    with pytest.raises(ContractError, match="differ in rank"):
        TensorRef.from_pointer(0x1000, "float32", (2, 3), (3,))


def test_device_parse() -> None:
    assert Device.parse("cpu") == Device("cpu", 0)
    assert Device.parse("cuda") == Device("cuda", 0)
    assert Device.parse("cuda:3") == Device("cuda", 3)
    d = Device("cuda", 2)
    assert Device.parse(d) is d


# -- TensorMut over read-only memory --------------------------------------------------------------
def _readonly_sources() -> dict[str, Any]:
    rng = _rng(17)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    a.flags.writeable = False
    b = rng.standard_normal((2, 3)).astype(np.float32)
    b.flags.writeable = False
    keep = rng.standard_normal((2, 3)).astype(np.float32)
    return {
        "numpy-not-writeable": a,
        "numpy-broadcast-to": np.broadcast_to(rng.standard_normal(3).astype(np.float32), (2, 3)),
        "dlpack-read-only": Producer(b),
        "readonly-view": TensorRef.from_pointer(_np_ptr(keep), "float32", (2, 3), readonly=True,
                                                owner=keep),
    }


@pytest.mark.parametrize("kind", ["numpy-not-writeable", "numpy-broadcast-to", "dlpack-read-only",
                                  "readonly-view"])
def test_tensormut_rejects_read_only_memory(kind) -> None:
    src = _readonly_sources()[kind]
    assert TensorRef.from_object(src).readonly is True
    with pytest.raises(ContractError, match=r"\bout is read-only"):
        TensorMut.from_object(src, name="out")


def test_view_passthrough() -> None:
    a = _rng(18).standard_normal((2, 3)).astype(np.float32)
    ref = TensorRef.from_object(a)
    assert TensorRef.from_object(ref) is ref
    mut = TensorMut.from_object(ref)
    assert type(mut) is TensorMut
    assert (mut.ptr, mut.shape, mut.strides, mut.dtype, mut.device, mut.owner) == \
        (ref.ptr, ref.shape, ref.strides, ref.dtype, ref.device, ref.owner)
    assert TensorMut.from_object(mut) is mut


# -- DLPack export round trips --------------------------------------------------------------------
def test_numpy_to_view_to_torch_shares_memory() -> None:
    a = _rng(19).standard_normal((3, 4, 5)).astype(np.float32)[:, ::2]
    t = torch.from_dlpack(TensorRef.from_object(a))
    assert t.data_ptr() == _np_ptr(a)
    assert t.stride() == (20, 10, 1)
    assert torch.equal(t, torch.from_numpy(a.copy()))
    t[1, 0, 2] = 123.5
    assert a[1, 0, 2] == np.float32(123.5)
    a[2, 1, 4] = -7.25
    assert t[2, 1, 4].item() == -7.25


@pytest.mark.parametrize("tdtype", [torch.float16, torch.float32])
def test_torch_to_view_to_numpy_shares_memory(tdtype) -> None:
    x = torch.randn(2, 6, 4, generator=_gen(20)).to(tdtype).permute(1, 0, 2)[1:]
    arr = np.from_dlpack(TensorMut.from_object(x))
    assert _np_ptr(arr) == x.data_ptr()
    np.testing.assert_array_equal(arr, x.numpy())
    arr[0, 1, 2] = 9.5
    assert x[0, 1, 2].item() == 9.5
    x[3, 0, 1] = -2.5
    assert arr[3, 0, 1] == -2.5


def test_bfloat16_torch_round_trip() -> None:
    x = torch.randn(3, 8, generator=_gen(21)).to(torch.bfloat16)
    t = torch.from_dlpack(TensorRef.from_object(x))
    assert t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr()
    t[0, 0] = 0.5
    assert x[0, 0].item() == 0.5


class TorchProducer:
    """A torch tensor seen only through its own DLPack export (not flashdec's torch path)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return self.x.__dlpack__(max_version=max_version)

    def __dlpack_device__(self):
        return self.x.__dlpack_device__()


@pytest.mark.parametrize("tdtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32])
def test_fp8_and_int32_dlpack_round_trip(tdtype) -> None:
    """torch exports fp8 with the DLPack 1.1 codes; flashdec reads and re-exports them."""
    x = (torch.randn(3, 8, generator=_gen(40)) * 50).to(tdtype)[:, ::2]
    view = TensorRef.from_object(TorchProducer(x))
    assert view.dtype is DType.parse(tdtype)
    assert (view.ptr, view.shape, view.strides) == (x.data_ptr(), (3, 4), x.stride())
    t = torch.from_dlpack(view)
    assert t.dtype == tdtype and t.data_ptr() == x.data_ptr() and t.stride() == x.stride()
    assert torch.equal(t.to(torch.float32), x.to(torch.float32))


@pytest.mark.parametrize("cls", [TensorRef, TensorMut])
def test_index_leading_axis_is_a_view(cls) -> None:
    x = torch.randn(4, 3, 6, generator=_gen(41))[:, :, 1:5]
    view = cls.from_object(x)
    for i in range(4):
        part = view[i]
        assert type(part) is cls and part.owner is x
        assert (part.ptr, part.shape, part.strides) == (x[i].data_ptr(), (3, 4), x[i].stride())
        assert torch.equal(torch.from_dlpack(part), x[i])
    for bad in (4, -1):
        with pytest.raises(IndexError, match=rf"index {bad} is out of range for shape"):
            view[bad]
    with pytest.raises(TypeError, match="int"):
        view[1:2]


def test_producer_to_view_to_torch_shares_memory() -> None:
    a = _rng(22).standard_normal((4, 4)).astype(np.float32)
    t = torch.from_dlpack(TensorRef.from_object(Producer(a)))
    assert t.data_ptr() == _np_ptr(a)
    t[3, 3] = 11.0
    assert a[3, 3] == 11.0


def test_read_only_export() -> None:
    a = _rng(23).standard_normal((2, 2)).astype(np.float32)
    a.flags.writeable = False
    view = TensorRef.from_object(a)
    with pytest.raises(BufferError, match="read-only"):
        view.__dlpack__()  # a legacy consumer could not see the READ_ONLY flag
    arr = np.from_dlpack(view)  # NumPy asks for a versioned capsule and honours the flag
    assert arr.flags.writeable is False
    np.testing.assert_array_equal(arr, a)


def test_export_refuses_copy_and_unknown_dtype() -> None:
    a = _rng(24).standard_normal(3).astype(np.float32)
    with pytest.raises(BufferError):
        TensorRef.from_object(a).__dlpack__(copy=True)
    with pytest.raises(BufferError, match="int8"):
        TensorRef.from_pointer(_np_ptr(a), "int8", (3,), owner=a).__dlpack__()


def test_dlpack_device() -> None:
    assert TensorRef.from_object(torch.randn(2, generator=_gen(25))).__dlpack_device__() == (1, 0)
    assert TensorRef.from_pointer(0x1000, "float32", (2,), device="cuda:2").__dlpack_device__() \
        == (_dlpack.DL_CUDA, 2)


# -- lifetimes ------------------------------------------------------------------------------------
def test_view_keeps_numpy_owner_alive() -> None:
    a = _rng(26).standard_normal((64, 33)).astype(np.float32)
    expected = a.copy()
    alive = weakref.ref(a)
    view = TensorRef.from_object(a[::2])
    del a
    gc.collect()
    assert alive() is not None
    np.testing.assert_array_equal(np.from_dlpack(view), expected[::2])
    del view
    gc.collect()
    assert alive() is None, "the view's owner outlived the view"


def test_view_keeps_torch_owner_alive() -> None:
    x = torch.randn(50, 40, generator=_gen(27))
    expected = x.clone()
    alive = weakref.ref(x)
    view = TensorRef.from_object(x)
    del x
    gc.collect()
    assert alive() is not None
    assert torch.equal(torch.from_dlpack(view), expected)
    del view
    gc.collect()
    assert alive() is None


def test_view_keeps_dlpack_producer_alive() -> None:
    a = _rng(28).standard_normal((10, 7)).astype(np.float32)
    expected = a.copy()
    alive = weakref.ref(a)
    view = TensorRef.from_object(Producer(a))
    del a
    gc.collect()
    assert alive() is not None
    np.testing.assert_array_equal(np.from_dlpack(view), expected)
    del view
    gc.collect()
    assert alive() is None


def test_exported_array_keeps_view_and_source_alive() -> None:
    a = _rng(29).standard_normal((8, 8)).astype(np.float32)
    expected = a.copy()
    alive = weakref.ref(a)
    arr = np.from_dlpack(TensorRef.from_object(a))
    del a
    gc.collect()
    assert alive() is not None
    np.testing.assert_array_equal(arr, expected)
    del arr
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("consumer", ["torch", "numpy"])
def test_consumed_capsule_is_released(consumer) -> None:
    a = _rng(31).standard_normal((4, 4)).astype(np.float32)
    view = TensorRef.from_object(a)
    gc.collect()
    before = len(_dlpack._live)
    t = torch.from_dlpack(view) if consumer == "torch" else np.from_dlpack(view)
    assert len(_dlpack._live) == before + 1
    del t
    gc.collect()
    assert len(_dlpack._live) == before


def _rejected_exports() -> dict[str, TensorRef]:
    return {
        # NumPy has no bfloat16 (ml_dtypes is not installed): it rejects the capsule
        "bfloat16-to-numpy": TensorRef.from_object(torch.randn(3, 4, generator=_gen(32))
                                                   .to(torch.bfloat16)),
        # NumPy reads host memory only (the pointer is never dereferenced)
        "cuda-to-numpy": TensorRef.from_pointer(0x7F00_0000_0000, "float32", (2, 2),
                                                device="cuda:0"),
    }


@pytest.mark.parametrize("kind", ["bfloat16-to-numpy", "cuda-to-numpy"])
def test_capsule_rejected_by_consumer_raises_its_error(kind) -> None:
    """A consumer that refuses a capsule drops it with its own exception pending; that error
    reaches the caller (not a SystemError). The export stays pinned in ``_live``: capsules
    carry no destructor, by design (see flashdec._dlpack)."""
    view = _rejected_exports()[kind]
    gc.collect()
    before = len(_dlpack._live)
    with pytest.raises(Exception) as info:
        np.from_dlpack(view)
    assert not isinstance(info.value, SystemError), f"consumer's error was lost: {info.value!r}"
    assert "Unsupported" in str(info.value)
    assert len(_dlpack._live) == before + 1, "the refused export must stay pinned"


# -- DType names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("obj, expected", [
    ("float32", DType.float32), ("bfloat16", DType.bfloat16), ("float16", DType.float16),
    ("float64", DType.float64), (torch.float16, DType.float16), (torch.bfloat16, DType.bfloat16),
    (torch.float32, DType.float32), (np.dtype(np.float32), DType.float32),
    (np.dtype(np.float16), DType.float16),
    (torch.int32, DType.int32), (np.dtype(np.int32), DType.int32),
    (torch.float8_e4m3fn, DType.float8_e4m3fn), (torch.float8_e5m2, DType.float8_e5m2),
    ("int8", "int8"), (torch.int16, "int16"), (torch.complex64, "complex64"),
    (torch.float8_e4m3fnuz, "float8_e4m3fnuz"),
    (np.dtype(np.int64), "int64"), (np.dtype(bool), "bool"), ("nonsense", "nonsense"),
])
def test_dtype_parse(obj, expected) -> None:
    got = DType.parse(obj)
    assert got == expected
    if isinstance(expected, DType):
        assert got is expected


def test_dtype_parse_accepts_dtype_members_and_numpy_scalar_types() -> None:
    """``DType.parse`` is idempotent and takes NumPy scalar types (``np.float32``), which NumPy
    itself accepts everywhere a dtype is expected."""
    for d in DType:
        assert DType.parse(d) is d
    assert DType.parse(np.float32) is DType.float32
    assert DType.parse(np.float16) is DType.float16
    view = TensorRef.from_pointer(0x1000, np.float32, (2, 3))
    assert view.dtype is DType.float32


@pytest.mark.parametrize("code_bits_lanes, expected", [
    ((2, 16, 1), DType.float16), ((4, 16, 1), DType.bfloat16), ((2, 32, 1), DType.float32),
    ((2, 64, 1), DType.float64), ((0, 32, 1), DType.int32), ((10, 8, 1), DType.float8_e4m3fn),
    ((12, 8, 1), DType.float8_e5m2), ((11, 8, 1), "dlpack_code11_8"), ((0, 32, 2), "int32x2"),
    ((0, 16, 1), "int16"), ((0, 8, 1), "int8"), ((1, 8, 1), "uint8"),
    ((6, 8, 1), "bool8"), ((2, 8, 1), "float8"), ((4, 32, 1), "bfloat32"),
    ((2, 32, 4), "float32x4"), ((2, 16, 2), "float16x2"), ((5, 64, 1), "dlpack_code5_64"),
])
def test_dtype_from_dlpack(code_bits_lanes, expected) -> None:
    assert DType.from_dlpack(*code_bits_lanes) == expected


def test_dtype_properties() -> None:
    assert [d.itemsize for d in (DType.float16, DType.bfloat16, DType.float32, DType.float64)] \
        == [2, 2, 4, 8]
    assert [d.itemsize for d in (DType.float8_e4m3fn, DType.float8_e5m2, DType.int32)] == [1, 1, 4]
    assert [d for d in DType if d.is_fp8] == [DType.float8_e4m3fn, DType.float8_e5m2]
    assert (DType.float8_e4m3fn.ctype, DType.float8_e5m2.ctype, DType.int32.ctype) == \
        ("__nv_fp8_e4m3", "__nv_fp8_e5m2", "int")
    for d in DType:
        assert DType.from_dlpack(*d.dlpack, 1) is d


# -- views and DLPack producers as decode inputs ---------------------------------------------------
def _qkv(seed: int):
    rng = _rng(seed)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 9, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 9, 16)).astype(np.float32)
    return q, k, v


def test_decode_accepts_views_and_producers_with_out() -> None:
    q, k, v = _qkv(33)
    ref = decode_reference(q, k, v)
    out = _rng(34).standard_normal(q.shape).astype(np.float32)
    y = flashdec.decode(TensorRef.from_object(q), Producer(k), LegacyProducer(v),
                        TensorMut.from_object(out))
    assert relative_error(out, ref) < TOLERANCE["float32"]
    assert isinstance(y, TensorMut)
    np.testing.assert_array_equal(np.from_dlpack(y), out)


def test_decode_with_producer_inputs_and_no_out_returns_a_dlpack_buffer() -> None:
    """For inputs that are neither torch nor NumPy (JAX, CuPy, any DLPack producer) the output
    is a buffer flashdec allocates that exports ``__dlpack__`` (README, Quickstart)."""
    q, k, v = _qkv(35)
    y = flashdec.decode(Producer(q), Producer(k), Producer(v))
    assert hasattr(y, "__dlpack__") and hasattr(y, "__dlpack_device__")
    got = np.from_dlpack(y)
    assert got.shape == q.shape and got.dtype == np.float32
    assert relative_error(got, decode_reference(q, k, v)) < TOLERANCE["float32"]


def test_producer_inputs_get_a_dlpack_lse_and_merge_results() -> None:
    """With return_lse, LSE is a flashdec-owned float32 buffer too, and merge_states of such
    buffers returns flashdec-owned buffers."""
    q, k, v = _qkv(36)
    halves = [flashdec.decode(Producer(q), Producer(k[:, :, s]), Producer(v[:, :, s]),
                              return_lse=True) for s in (slice(0, 4), slice(4, 9))]
    for y, lse in halves:
        assert isinstance(y, TensorMut) and isinstance(lse, TensorMut)
        assert lse.dtype is DType.float32 and lse.shape == q.shape[:2]
    y, lse = flashdec.merge_states([h[0] for h in halves], [h[1] for h in halves])
    assert isinstance(y, TensorMut) and isinstance(lse, TensorMut)
    ref, ref_lse = decode_reference(q, k, v, return_lse=True)
    assert relative_error(np.from_dlpack(y), ref) < TOLERANCE["float32"]
    assert relative_error(np.from_dlpack(lse), ref_lse) < TOLERANCE["float32"]
