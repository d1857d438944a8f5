"""The one place that reads ``FLASHDEC_*`` environment variables.

Values are read at call time, so tests can scope them with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["backend_choice", "cache_dir", "ENV_BACKEND", "ENV_CACHE_DIR"]

ENV_BACKEND = "FLASHDEC_BACKEND"
ENV_CACHE_DIR = "FLASHDEC_CACHE_DIR"


def backend_choice() -> str:
    """``FLASHDEC_BACKEND`` lower-cased; ``auto`` when unset or empty."""
    return (os.environ.get(ENV_BACKEND) or "auto").strip().lower()


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``FLASHDEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/flashdec``."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "flashdec"
