"""Element types flashdec knows, with their DLPack codes, NumPy / torch names and C++ names."""

from __future__ import annotations

import enum

__all__ = ["DType"]

# DLPack DLDataTypeCode values (dlpack.h; the fp8 codes arrived in DLPack 1.1).
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT, _DL_BOOL = 0, 1, 2, 4, 6
_DL_FLOAT8_E4M3FN, _DL_FLOAT8_E5M2 = 10, 12


class DType(enum.Enum):
    """A tensor element type. ``value`` is the user-facing name."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    float64 = "float64"  # recognised so errors can name it; no backend computes in it
    float8_e4m3fn = "float8_e4m3fn"  # KV cache only: dequantized on load
    float8_e5m2 = "float8_e5m2"
    int32 = "int32"  # per-sequence lengths

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def is_fp8(self) -> bool:
        return self in (DType.float8_e4m3fn, DType.float8_e5m2)

    @property
    def ctype(self) -> str:
        """The CUDA C++ type of one element."""
        return _CTYPE[self]

    @property
    def torch_name(self) -> str:
        return self.value

    @classmethod
    def from_dlpack(cls, code: int, bits: int, lanes: int) -> "DType | str":
        """The DType for a DLPack dtype, or a readable name of an unknown one."""
        if lanes == 1:
            found = _FROM_DLPACK.get((code, bits))
            if found is not None:
                return found
        kind = {_DL_INT: "int", _DL_UINT: "uint", _DL_FLOAT: "float", _DL_BFLOAT: "bfloat",
                _DL_BOOL: "bool"}.get(code, f"dlpack_code{code}_")
        return f"{kind}{bits}" + (f"x{lanes}" if lanes != 1 else "")

    @property
    def dlpack(self) -> tuple[int, int]:
        """(DLDataTypeCode, bits)."""
        return _TO_DLPACK[self]

    @classmethod
    def parse(cls, obj: object) -> "DType | str":
        """The DType for a DType, torch / NumPy dtype, NumPy scalar type or name, else a
        readable name of it."""
        if isinstance(obj, DType):
            return obj
        if isinstance(obj, type):  # numpy.float32 and friends
            import numpy

            obj = numpy.dtype(obj)
        name = str(obj).removeprefix("torch.")
        try:
            return cls(name)
        except ValueError:
            return name


_ITEMSIZE = {DType.float16: 2, DType.bfloat16: 2, DType.float32: 4, DType.float64: 8,
             DType.float8_e4m3fn: 1, DType.float8_e5m2: 1, DType.int32: 4}
_CTYPE = {DType.float16: "__half", DType.bfloat16: "__nv_bfloat16", DType.float32: "float",
          DType.float64: "double", DType.float8_e4m3fn: "__nv_fp8_e4m3",
          DType.float8_e5m2: "__nv_fp8_e5m2", DType.int32: "int"}
_TO_DLPACK = {DType.float16: (_DL_FLOAT, 16), DType.bfloat16: (_DL_BFLOAT, 16),
              DType.float32: (_DL_FLOAT, 32), DType.float64: (_DL_FLOAT, 64),
              DType.float8_e4m3fn: (_DL_FLOAT8_E4M3FN, 8), DType.float8_e5m2: (_DL_FLOAT8_E5M2, 8),
              DType.int32: (_DL_INT, 32)}
_FROM_DLPACK = {v: k for k, v in _TO_DLPACK.items()}
