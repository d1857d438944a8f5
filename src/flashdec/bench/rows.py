"""The benchmark's rows: :class:`Shape` (one problem and its byte counts), :func:`parse_shapes`
(``--shapes`` text), the built-in rows (:func:`default_shapes`) and the names a row's dtypes go
by (:data:`DTYPE_NAMES`: short display names and command-line aliases over
:class:`flashdec._dtypes.DType`, which holds the element sizes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._dtypes import DType

# The dtypes a row may name, each with its short display name (row names, tables) first and then
# its other command-line aliases; the DType's own name (bfloat16, float8_e4m3fn, ...) works too.
DTYPE_NAMES: dict[DType, tuple[str, ...]] = {
    DType.bfloat16: ("bf16",),
    DType.float16: ("fp16", "f16", "half"),
    DType.float32: ("fp32", "f32", "float"),
    DType.float8_e4m3fn: ("e4m3", "fp8"),
    DType.float8_e5m2: ("e5m2",),
}
DTYPE_ALIASES = {alias: dt.value for dt, names in DTYPE_NAMES.items()
                 for alias in (*names, dt.value)}           # any accepted name -> DType's name
SHORT_NAMES = {dt.value: names[0] for dt, names in DTYPE_NAMES.items()}  # DType's name -> short
Q_DTYPES = (DType.bfloat16.value, DType.float16.value, DType.float32.value)  # Q and Y; K/V: + fp8


@dataclass(frozen=True)
class Shape:
    """One benchmark row. ``kv_len`` is the cache capacity; a ``ragged`` row's ``seqlens``
    spread evenly over 0..kv_len (mean kv_len / 2, shuffled), so its uniform twin has
    ``kv_len // 2``. ``kv_dtype`` differs from ``dtype`` only for an fp8 KV cache."""

    name: str
    batch: int
    heads: int
    kv_heads: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_dtype: str = "bfloat16"
    ragged: bool = False

    @classmethod
    def make(cls, batch: int, heads: int, kv_heads: int, kv_len: int, head_dim: int,
             dtype: str = "bfloat16", kv_dtype: str | None = None, ragged: bool = False) -> "Shape":
        """A validated row, named ``"B,H_q,H_kv,K,D dtype[ kv=e4m3][ ragged]"``."""
        dtype, kv_dtype = canonical_dtype(dtype), canonical_dtype(kv_dtype or dtype)
        dims = (batch, heads, kv_heads, kv_len, head_dim)
        if any(int(x) != x or x < 1 for x in dims):
            raise ValueError(f"B, H_q, H_kv, K, D must be integers >= 1, got {dims}")
        if heads % kv_heads:
            raise ValueError(f"H_q ({heads}) must be a multiple of H_kv ({kv_heads})")
        if dtype not in Q_DTYPES:
            raise ValueError(f"Q dtype must be one of {', '.join(Q_DTYPES)}, got {dtype}")
        if kv_dtype not in Q_DTYPES and dtype == "float32":
            raise ValueError("an fp8 KV cache goes with a float16 or bfloat16 Q")
        if kv_dtype in Q_DTYPES and kv_dtype != dtype:
            raise ValueError(f"K/V dtype {kv_dtype} differs from Q's {dtype}: only fp8 may")
        name = cls.name_of(dims, dtype, kv_dtype, ragged)
        return cls(name, *map(int, dims), dtype, kv_dtype, bool(ragged))

    @staticmethod
    def name_of(dims: tuple, dtype: str, kv_dtype: str, ragged: bool) -> str:
        """A row's name from (B, H_q, H_kv, K, D) and its variant (see :meth:`variant_of`)."""
        return ",".join(map(str, dims)) + " " + Shape.variant_of(dtype, kv_dtype, ragged)

    @staticmethod
    def variant_of(dtype: str, kv_dtype: str, ragged: bool) -> str:
        """``bf16``, ``bf16 kv=e4m3``, ``fp16 ragged``, ...: the dtypes' short names, ragged."""
        text = SHORT_NAMES[dtype] + ("" if kv_dtype == dtype else f" kv={SHORT_NAMES[kv_dtype]}")
        return text + (" ragged" if ragged else "")

    @property
    def dims(self) -> str:
        return f"{self.batch},{self.heads},{self.kv_heads},{self.kv_len},{self.head_dim}"

    @property
    def variant(self) -> str:
        return self.variant_of(self.dtype, self.kv_dtype, self.ragged)

    @property
    def fp8(self) -> bool:
        return DType(self.kv_dtype).is_fp8

    def seqlens(self) -> list[int] | None:
        """Per-sequence lengths of a ragged row (0 and kv_len included), else None."""
        if not self.ragged:
            return None
        b, k = self.batch, self.kv_len
        lengths = [k // 2] if b == 1 else [round(k * i / (b - 1)) for i in range(b)]
        # A fixed shuffle (a multiplicative permutation) so long rows are not all at the end.
        step = next(s for s in (5, 7, 11, 13, 17, 19, 23, 29, 31, 37) if math.gcd(s, b) == 1) \
            if b > 1 else 1
        return [lengths[(i * step) % b] for i in range(b)]

    def kv_rows(self) -> int:
        """Valid KV rows per head summed over the batch (what must be read)."""
        lengths = self.seqlens()
        return self.batch * self.kv_len if lengths is None else sum(lengths)

    def kv_bytes(self) -> int:
        """Bytes of K and V that must be read."""
        return 2 * self.kv_rows() * self.kv_heads * self.head_dim * DType(self.kv_dtype).itemsize

    def io_bytes(self) -> int:
        """The fewest bytes a decode moves: K + V (valid rows) + Q + Y."""
        return self.kv_bytes() + self._qy_bytes()

    def alloc_bytes(self) -> int:
        """Device bytes of one input set (K and V at capacity, Q, Y)."""
        kv = 2 * self.batch * self.kv_heads * self.kv_len * self.head_dim \
            * DType(self.kv_dtype).itemsize
        return kv + self._qy_bytes()

    def _qy_bytes(self) -> int:
        """Bytes of Q and Y."""
        return 2 * self.batch * self.heads * self.head_dim * DType(self.dtype).itemsize


def canonical_dtype(name: str) -> str:
    """The DType name (``bfloat16``, ``float8_e4m3fn``, ...) of any name in
    :data:`DTYPE_ALIASES`; ``ValueError`` for another."""
    try:
        return DTYPE_ALIASES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPE_ALIASES))}") \
            from None


def parse_shapes(text: str, dtype: str = "bfloat16") -> list[Shape]:
    """Rows from ``"B,Hq,Hkv,K,D[,dtype[,kv_dtype]][,ragged][;...]"``.

    ``dtype`` (Q, Y; default the ``dtype`` argument) and ``kv_dtype`` (K, V; default Q's, or
    fp8 / e4m3 / e5m2) take the names of :data:`DTYPE_ALIASES`; ``ragged`` may come anywhere
    after D. Raises ``ValueError`` naming the entry on any mistake.
    """
    shapes = []
    for entry in filter(None, (e.strip() for e in text.replace("\n", ";").split(";"))):
        fields = [f.strip() for f in entry.split(",")]
        try:
            if len(fields) < 5:
                raise ValueError("needs at least B,Hq,Hkv,K,D")
            try:
                dims = [int(f) for f in fields[:5]]
            except ValueError:
                raise ValueError("B, Hq, Hkv, K, D must be integers") from None
            extra = [f for f in fields[5:] if f]
            ragged = "ragged" in (f.lower() for f in extra)
            dtypes = [f for f in extra if f.lower() != "ragged"]
            if len(dtypes) > 2:
                raise ValueError("at most two dtypes (Q, then K/V)")
            q_dtype = dtypes[0] if dtypes else dtype
            kv_dtype = dtypes[1] if len(dtypes) > 1 else None
            shapes.append(Shape.make(*dims, dtype=q_dtype, kv_dtype=kv_dtype, ragged=ragged))
        except ValueError as exc:
            raise ValueError(f"--shapes entry {entry!r}: {exc}") from None
    if not shapes:
        raise ValueError(f"--shapes {text!r} names no row")
    return shapes


# (B, H_q, H_kv, K, D): the baseline rows every earlier run measured (bench/results).
DESIGN_SHAPES = [
    (1, 32, 8, 4096, 128),
    (1, 32, 8, 32768, 128),
    (1, 32, 8, 131072, 128),
    (8, 32, 8, 8192, 128),
    (64, 32, 8, 2048, 128),
    (1, 32, 32, 8192, 128),
    (4, 16, 8, 16384, 256),
    (1, 64, 8, 65536, 128),
]
# (dims, dtype or None for the run's --dtype, kv_dtype or None, ragged)
_DEFAULT = (
    [(d, None, None, False) for d in DESIGN_SHAPES] + [
        # K_len 512..1024, small and mid KV; B up to 256
        ((1, 32, 8, 512, 128), None, None, False),
        ((1, 32, 8, 16384, 128), None, None, False),
        ((16, 32, 8, 1024, 128), None, None, False),
        ((256, 32, 8, 512, 128), None, None, False),
        # MQA (group 32 and 8), GQA 8, MHA with a batch
        ((4, 32, 1, 65536, 128), None, None, False),
        ((256, 8, 1, 2048, 128), None, None, False),
        ((16, 32, 4, 4096, 128), None, None, False),
        ((8, 32, 32, 2048, 128), None, None, False),
        # D = 64 and 256 at the KV bytes of (1,32,8,32768,128); D = 64 with a batch
        ((1, 32, 8, 65536, 64), None, None, False),
        ((1, 32, 8, 16384, 256), None, None, False),
        ((32, 16, 4, 8192, 64), None, None, False),
        # fp16 twins of bf16 rows
        ((1, 32, 8, 32768, 128), "float16", None, False),
        ((64, 32, 8, 2048, 128), "float16", None, False),
        # fp8 KV (e4m3, scales 1.0) twins of bf16 rows
        ((1, 32, 8, 32768, 128), None, "float8_e4m3fn", False),
        ((1, 32, 8, 131072, 128), None, "float8_e4m3fn", False),
        ((8, 32, 8, 8192, 128), None, "float8_e4m3fn", False),
        ((64, 32, 8, 2048, 128), None, "float8_e4m3fn", False),
        # ragged seqlens over twice the capacity: same valid KV as the uniform twin (K / 2)
        ((8, 32, 8, 16384, 128), None, None, True),
        ((64, 32, 8, 4096, 128), None, None, True),
        ((256, 8, 1, 4096, 128), None, None, True),
        ((8, 32, 8, 16384, 128), None, "float8_e4m3fn", True),
        # head_dim not a power of two (D = 80 Phi-2, 96 Phi-3-mini, 112, 160, 192; 32/32
        # MHA), every one at the 110 MB of its D = 128 twin (1,32,32,6720,128): K = 6720*128/D
        # (6720 = 64 * 105 makes that whole for D = 80..192).
        ((1, 32, 32, 6720, 128), None, None, False),
        ((1, 32, 32, 10752, 80), None, None, False),
        ((1, 32, 32, 8960, 96), None, None, False),
        ((1, 32, 32, 7680, 112), None, None, False),
        ((1, 32, 32, 5376, 160), None, None, False),
        ((1, 32, 32, 4480, 192), None, None, False),
        ((1, 32, 32, 6720, 128), None, "float8_e4m3fn", False),
        ((1, 32, 32, 8960, 96), None, "float8_e4m3fn", False),
        # D = 96 with a batch (no D = 128 twin) and its ragged twin
        ((8, 32, 32, 2048, 96), None, None, False),
        ((8, 32, 32, 4096, 96), None, None, True),
        # GQA groups 5, 7 and 16 (1 is the MHA rows, 4, 8 and 32 above)
        ((1, 40, 8, 32768, 128), None, None, False),
        ((1, 28, 4, 32768, 128), None, None, False),
        ((1, 64, 4, 32768, 128), None, None, False),
        # few KV heads (batch * kv_heads <= 8): the splits alone must fill the GPU
        ((1, 8, 1, 65536, 128), None, None, False),
        ((1, 8, 1, 262144, 128), None, None, False),
        ((1, 16, 2, 131072, 128), None, None, False),
        ((2, 32, 4, 65536, 128), None, None, False),
        ((1, 8, 1, 262144, 128), None, "float8_e4m3fn", False),
        # large batches, one split each: batch * kv_heads alone fills the GPU
        ((128, 32, 8, 1024, 128), None, None, False),
        ((64, 16, 16, 2048, 64), None, None, False),
    ])
_QUICK = [
    ((1, 32, 8, 4096, 128), None, None, False),
    ((1, 32, 8, 32768, 128), None, None, False),
    ((64, 32, 8, 2048, 128), None, None, False),
    ((1, 32, 8, 32768, 128), None, "float8_e4m3fn", False),
    ((8, 32, 8, 8192, 128), None, None, False),
    ((8, 32, 8, 16384, 128), None, None, True),
]
QUICK_SHAPES = [d for d, *_ in _QUICK]


def default_shapes(dtype: str = "bfloat16", quick: bool = False) -> list[Shape]:
    """The built-in rows (49, or 6 with ``quick``); ``dtype`` is Q's dtype for rows that
    do not name one (the fp16 twins keep fp16). Duplicates are dropped."""
    rows, seen = [], set()
    for dims, q_dtype, kv_dtype, ragged in (_QUICK if quick else _DEFAULT):
        if kv_dtype and canonical_dtype(dtype) == "float32" and not q_dtype:
            continue  # an fp8 KV cache goes with a 16-bit Q: no fp8 rows for --dtype float32
        shape = Shape.make(*dims, dtype=q_dtype or dtype, kv_dtype=kv_dtype, ragged=ragged)
        if shape.name not in seen:
            seen.add(shape.name)
            rows.append(shape)
    return rows
