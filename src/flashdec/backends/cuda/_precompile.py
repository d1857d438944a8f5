"""``precompile``: every argument checked, the cache checked writable, then each kernel the
described problems can select compiled into the disk cache."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from ..._dtypes import DType
from ..._errors import ContractError
from . import _driver, _modules
from ._kernels import MAX_HEAD_DIM, combine_kernel, kernels_for, kv_dtypes_for, merge_kernel

__all__ = ["precompile"]

_MIN_ARCH = 80  # the kernels' cp.async and bf16 MMAs need sm_80 or newer


def _listed(name: str, values: Any) -> list:
    """``values`` as a non-empty list; a str (which would iterate its characters) or a scalar
    is refused."""
    if isinstance(values, (str, bytes, DType)) or not hasattr(values, "__iter__"):
        raise ContractError(f"{name} must be a sequence, got {type(values).__name__} "
                            f"{values!r} (write [{values!r}] for one)")
    listed = list(values)
    if not listed:
        raise ContractError(f"{name} is empty: nothing to compile")
    return listed


def _dtypes(name: str, values: Any, allowed: Sequence[DType]) -> list[DType]:
    found = []
    for value in _listed(name, values):
        try:
            dtype = DType.parse(value)
        except (TypeError, ValueError):
            dtype = None
        if dtype not in allowed:
            raise ContractError(f"{name}: {value!r} is not one of "
                                f"{', '.join(d.value for d in allowed)}")
        found.append(dtype)
    return found


def _ints(name: str, values: Any, low: int, high: int | None) -> list[int]:
    found = []
    for value in _listed(name, values):
        if (isinstance(value, bool) or not hasattr(value, "__index__")
                or value < low or (high is not None and value > high)):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ContractError(f"{name}: each must be an int {bound}, got "
                                f"{type(value).__name__} {value!r}")
        found.append(int(value))
    return found


def _check_arch(arch: Any) -> None:
    """``arch`` names an architecture this NVRTC compiles and the kernels run on."""
    import re

    match = re.fullmatch(r"sm_(\d+)([af]?)", arch) if isinstance(arch, str) else None
    if match is None:
        raise ContractError(f"arch must look like 'sm_90' or 'sm_90a', got "
                            f"{type(arch).__name__} {arch!r}")
    from cuda.bindings import nvrtc

    from ._compiler import nvrtc_version

    version = nvrtc_version()  # BackendUnavailableError when NVRTC cannot load
    _, supported = nvrtc.nvrtcGetSupportedArchs()
    number, suffix = int(match.group(1)), match.group(2)
    usable = [n for n in supported if n >= _MIN_ARCH]
    if (number not in usable or (suffix == "a" and number < 90)
            or (suffix == "f" and number < 100)):
        raise ContractError(
            f"arch {arch!r} is not one flashdec compiles for with NVRTC "
            f"{version[0]}.{version[1]}: sm_N with N in {', '.join(map(str, usable))} (an 'a' "
            f"suffix from sm_90, 'f' from sm_100)")


def precompile(*, dtypes: Sequence[str | DType], head_dims: Sequence[int],
               group_sizes: Sequence[int], kv_dtypes: Sequence[str | DType] | None = None,
               arch: str | None = None, progress: bool = False) -> int:
    """:func:`flashdec.precompile` (which documents it and holds the defaults): check every
    argument, then that the cache can be written, then compile each kernel into it."""
    import tempfile
    import time

    from ... import _env
    from ..._contract import COMPUTE_DTYPES, KV_DTYPES_FP8
    from ..._errors import CacheError
    from . import _compiler

    q_dtypes = _dtypes("dtypes", dtypes, COMPUTE_DTYPES)
    kv_given = None if kv_dtypes is None else _dtypes("kv_dtypes", kv_dtypes,
                                                      COMPUTE_DTYPES + KV_DTYPES_FP8)
    dims = _ints("head_dims", head_dims, 1, MAX_HEAD_DIM)
    groups = _ints("group_sizes", group_sizes, 1, None)
    pairs = [(dtype, kv) for dtype in q_dtypes
             for kv in ([dtype] if kv_given is None else kv_given) if kv in kv_dtypes_for(dtype)]
    for kv in kv_given or ():
        if not any(kv == pair[1] for pair in pairs):
            raise ContractError(
                f"kv_dtypes: {kv.value} pairs with none of dtypes "
                f"({', '.join(d.value for d in q_dtypes)}): K and V have Q's dtype, or an fp8 "
                f"dtype with float16 or bfloat16 Q")
    if arch is None:
        arch = _driver.device_info(0).arch
    _check_arch(arch)

    directory = _env.cache_dir() / "kernels"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise CacheError(f"precompile cannot write the kernel cache in {directory} ({exc}); "
                         f"set {_env.ENV_CACHE_DIR} to a writable directory") from exc

    names = {merge_kernel(dtype) for dtype in q_dtypes}
    for dtype, kv in pairs:
        for d in dims:
            names.add(combine_kernel(dtype, d))
            for g in groups:
                names |= {spec.name_expression for spec in kernels_for(dtype, kv, d, g)}
    ordered = sorted(names)
    for i, name in enumerate(ordered, 1):
        start = time.perf_counter()
        module = _modules.compile_kernel(name, arch)
        entry = directory / f"{module.key}.cubin"
        if not entry.is_file():  # compiled by this process before the cache moved, or lost
            _compiler._store(directory, module)
            if not entry.is_file():
                raise CacheError(f"precompile could not write {entry}: the kernel cache in "
                                 f"{directory} is not writable")
        if progress:
            print(f"flashdec precompile: [{i}/{len(ordered)}] {name} for {arch} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return len(ordered)
