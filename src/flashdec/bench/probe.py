"""The machine a run is on: device and version facts for the results (:func:`environment`) and
why the benchmark cannot run here, if it cannot (:func:`gpu_unavailable_reason`)."""

from __future__ import annotations

import contextlib
from typing import Any


def environment() -> dict:
    """Device and version facts for the JSON (None where unknown)."""
    import platform

    import torch

    from .. import __version__

    env: dict[str, Any] = {"flashdec": __version__, "python": platform.python_version(),
                           "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    with contextlib.suppress(Exception):
        env["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                   sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                   l2_bytes=getattr(props, "L2_cache_size", None))
    env["driver"] = _driver_version()
    with contextlib.suppress(Exception):
        from cuda.bindings import driver
        err, version = driver.cuDriverGetVersion()
        env["cuda_driver_api"] = f"{version // 1000}.{version % 1000 // 10}"
    with contextlib.suppress(Exception):
        from ..backends.cuda._compiler import nvrtc_version
        env["nvrtc"] = "%d.%d" % nvrtc_version()
    for mod in ("cuda.core", "triton"):
        with contextlib.suppress(Exception):
            env[mod.replace(".", "_")] = __import__(mod, fromlist=["__version__"]).__version__
    return env


def _driver_version() -> str | None:
    """The NVIDIA driver's version, from the kernel module or nvidia-smi; None without."""
    with contextlib.suppress(Exception), open("/proc/driver/nvidia/version") as f:
        words = f.readline().split()
        for w in words:
            if w[:1].isdigit() and "." in w:
                return w
    with contextlib.suppress(Exception):
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    return None


def gpu_unavailable_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None
