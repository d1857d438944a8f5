"""decode.cu's kernels compiled (through the disk cache) and loaded: one compiled module per
(name expression, arch), one loaded function per (name expression, device), under a lock."""

from __future__ import annotations

import threading
from typing import Any

from . import _driver
from ._kernels import source

__all__ = ["compile_kernel", "load_kernel"]

_compiled: dict[tuple[str, str], Any] = {}
_functions: dict[tuple[str, int], _driver.Function] = {}
_kernels_lock = threading.Lock()


def compile_kernel(name_expression: str, arch: str) -> Any:
    """The compiled module holding ``name_expression`` for ``arch`` (a CompiledModule)."""
    from ._compiler import compile_cubin

    key = (name_expression, arch)
    found = _compiled.get(key)
    if found is None:
        found = compile_cubin(source(), (name_expression,), arch, source_name="decode.cu")
        _compiled[key] = found
    return found


def load_kernel(name_expression: str, device: _driver.DeviceInfo,
                dynamic_smem: int = 0) -> _driver.Function:
    """``name_expression`` loaded on ``device`` (compiled first where needed), allowed
    ``dynamic_smem`` bytes of dynamic shared memory."""
    key = (name_expression, device.index)
    found = _functions.get(key)
    if found is None:
        with _kernels_lock:
            found = _functions.get(key)
            if found is None:
                module = compile_kernel(name_expression, device.arch)
                found = _driver.load_function(device, module.cubin,
                                              module.symbols[name_expression], name_expression,
                                              dynamic_smem)
                _functions[key] = found
    return found
