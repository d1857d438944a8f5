"""The one place that reads ``FLASHDEC_*`` environment variables.

Values are read at call time, so tests can scope them with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["backend_choice", "cache_dir", "ENV_BACKEND", "ENV_CACHE_DIR"]

ENV_BACKEND = "FLASHDEC_BACKEND"
ENV_CACHE_DIR = "FLASHDEC_CACHE_DIR"


def _environ_getter(name: str) -> Callable[[], str | None]:
    """A reader of one variable of ``os.environ``: CPython's raw dict under it where there is
    one (``os.environ.get`` of an unset name raises and catches a KeyError inside, ~1-2 us; a
    decode call reads this variable every time), else ``os.environ.get``. Both see exactly
    what ``os.environ`` holds."""
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if isinstance(data, dict) and callable(encode) and callable(decode):
        key = encode(name)

        def get() -> str | None:
            raw = data.get(key)
            return None if raw is None else decode(raw)

        return get
    return lambda: os.environ.get(name)


_backend_value = _environ_getter(ENV_BACKEND)


def backend_choice() -> str:
    """``FLASHDEC_BACKEND`` lower-cased; ``auto`` when unset or empty."""
    return (_backend_value() or "auto").strip().lower()


def cache_dir() -> Path:
    """flashdec's cache folder (compiled kernels in ``kernels/``, the server's converted models
    in ``models/``): ``FLASHDEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/flashdec``."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "flashdec"
