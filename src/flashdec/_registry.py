"""Backends: the small base class every backend implements, and the registry that picks one.

Adding a backend is one ``register_backend`` call; no frontend code changes.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Protocol, Sequence

from . import _env
from ._contract import BackendOptions, DecodeArgs, DecodeProblem, MergeProblem
from ._dtypes import DType
from ._errors import BackendUnavailableError, ContractError, UnsupportedError
from ._views import Device, TensorMut, TensorRef

__all__ = ["Backend", "Runner", "register_backend", "get_backend", "backend_names",
           "available_backends", "select_backend", "check_choice"]


class Runner(Protocol):
    """A problem prepared by a backend: call it with views of that problem's layout.

    Two optional methods speed up a plan's calls: ``run_pointers(ptrs, stream)`` (``ptrs`` a
    :class:`DecodeArgs` of data pointers, None where absent), which the plan's CUDA torch fast
    path calls with pointers it has checked, and ``bind(args, stream)``, returning a
    zero-argument call that re-runs ``args`` (:meth:`flashdec.DecodePlan.bind`; the cuda
    backend returns a CUDA graph's replay). Without them a plan calls the runner itself.
    """

    workspace_bytes: int

    def __call__(self, args: DecodeArgs, stream: int | None) -> None: ...

    def describe(self) -> dict[str, Any]:
        """How the problem runs, in plain values (kernel, num_splits, merge, workspace_bytes):
        what :attr:`flashdec.DecodePlan.details` shows. Optional: without it a plan shows the
        runner's class name."""
        ...


class Backend:
    """Base class of a backend. The frontend validates; a backend never re-checks shapes."""

    name: str = ""
    device_kinds: tuple[str, ...] = ()  # the Device.kind values it computes on

    def is_available(self) -> tuple[bool, str]:
        """(True, "") or (False, why not)."""
        return True, ""

    def supports(self, problem: DecodeProblem) -> str | None:
        """None if it can run ``problem``, else the reason it cannot."""
        return self._runs_on(problem.device)

    def supports_merge(self, problem: MergeProblem) -> str | None:
        """None if it can run ``merge_states`` for ``problem``, else the reason it cannot."""
        if type(self).merge is Backend.merge:
            return f"the {self.name} backend does not implement merge_states"
        return self._runs_on(problem.device)

    def _runs_on(self, device: Device) -> str | None:
        if device.kind not in self.device_kinds:
            return (f"the {self.name} backend runs on {'/'.join(self.device_kinds)} tensors, "
                    f"these are on {device}")
        return None

    def prepare(self, problem: DecodeProblem, layouts: DecodeArgs,
                options: BackendOptions = BackendOptions()) -> Runner:
        """Do once what every call of this problem shares (kernel, split layout, workspace).

        ``layouts`` holds the (shape, strides, dtype, device) :class:`Layout` of every tensor
        argument, None where the argument is absent. ``options`` are the call's backend
        options, already checked by the frontend; a backend uses those it has a use for.
        """
        raise NotImplementedError

    def merge(self, problem: MergeProblem, outputs: Sequence[TensorRef],
              lses: Sequence[TensorRef], out: TensorMut, lse_out: TensorMut,
              stream: int | None) -> None:
        """Merge the partial states ``outputs[i]`` / ``lses[i]`` into ``out`` / ``lse_out``
        (a stacked input arrives as views into it, one per part)."""
        raise NotImplementedError

    def allocate_output(self, problem: DecodeProblem | MergeProblem, like: Any) -> TensorMut:
        """Y for ``out=None`` when the inputs are neither torch nor NumPy."""
        return self.allocate_buffer(problem.device, problem.out_shape, problem.dtype, like)

    def allocate_lse(self, problem: DecodeProblem | MergeProblem, like: Any) -> TensorMut:
        """LSE for ``return_lse`` without ``lse_out`` when the inputs are neither torch nor
        NumPy."""
        return self.allocate_buffer(problem.device, problem.lse_shape, DType.float32, like)

    def allocate_buffer(self, device: Device, shape: tuple[int, ...], dtype: DType,
                        like: Any) -> TensorMut:
        """A flashdec-owned row-major buffer that exports ``__dlpack__``. This default serves
        CPU problems; a GPU backend overrides it."""
        if device.kind != "cpu":
            raise UnsupportedError(f"allocating a result for {type(like).__name__} inputs on "
                                   f"{device}: the {self.name} backend cannot allocate there; "
                                   f"pass out= (and lse_out=)")
        import numpy

        buf = numpy.empty(max(1, math.prod(shape)) * dtype.itemsize, dtype=numpy.uint8)
        return TensorMut.from_pointer(buf.ctypes.data, dtype, shape, owner=buf)


# name -> factory, in auto-preference order (first match wins).
_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend | BaseException] = {}
_lock = threading.Lock()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register ``factory`` (called lazily, once) under ``name``. Earlier names win in auto."""
    if not isinstance(name, str) or not name.strip() or name.strip().lower() == "auto":
        raise ContractError(f"a backend name must be a non-empty str other than 'auto', got "
                            f"{type(name).__name__} {name!r}")
    if not callable(factory):
        raise ContractError(f"factory must be a callable returning a Backend, got "
                            f"{type(factory).__name__} {factory!r}")
    name = name.strip()
    with _lock:
        _factories[name.lower()] = factory
        _instances.pop(name.lower(), None)


def backend_names() -> list[str]:
    return list(_factories)


def _check_name(name: object, source: str) -> str:
    """``name`` lower-cased and stripped if it is ``auto`` or a registered backend; else a
    ContractError naming ``source`` (the argument or variable it came from)."""
    choices = ", ".join(["auto", *_factories])
    if not isinstance(name, str):
        raise ContractError(f"{source} must be a backend name ({choices}) or None, got "
                            f"{type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key != "auto" and key not in _factories:
        raise ContractError(f"{source}={name!r} is not a flashdec backend; valid choices: "
                            f"{choices}")
    return key


def check_choice(choice: object = None) -> str:
    """The backend choice a call makes: ``choice`` (the ``backend=`` argument) if not None,
    else ``FLASHDEC_BACKEND``, lower-cased; ContractError naming the one that is invalid."""
    if choice is not None:
        return _check_name(choice, "backend")
    return _check_name(_env.backend_choice(), _env.ENV_BACKEND)


def get_backend(name: str) -> Backend:
    """The backend instance for ``name``; raises BackendUnavailableError if it cannot load."""
    key = _check_name(name, "name")
    if key == "auto":
        raise ContractError("get_backend needs a concrete backend name, not 'auto'")
    with _lock:
        if key not in _instances:
            try:
                _instances[key] = _factories[key]()
            except Exception as exc:  # import errors of optional dependencies end up here
                _instances[key] = exc
        found = _instances[key]
    if isinstance(found, BaseException):
        raise BackendUnavailableError(f"the {key} backend failed to load: {found}") from found
    ok, why = found.is_available()
    if not ok:
        raise BackendUnavailableError(f"the {key} backend is unavailable: {why}")
    return found


def available_backends() -> dict[str, tuple[bool, str]]:
    """Each registered backend's name -> (available, reason it is not)."""
    result = {}
    for name in _factories:
        try:
            get_backend(name)
            result[name] = (True, "")
        except BackendUnavailableError as exc:
            result[name] = (False, str(exc))
    return result


def _why_not(backend: Backend, problem: DecodeProblem | MergeProblem) -> str | None:
    if isinstance(problem, MergeProblem):
        return backend.supports_merge(problem)
    return backend.supports(problem)


def select_backend(choice: str | None, problem: DecodeProblem | MergeProblem) -> Backend:
    """The backend for ``problem`` (a decode or a merge): ``choice`` if given, else
    ``FLASHDEC_BACKEND``, else auto.

    An explicit choice never falls back; auto takes the first registered backend that loads
    and supports the problem.
    """
    key = check_choice(choice)
    if key != "auto":
        backend = get_backend(key)
        why = _why_not(backend, problem)
        if why is not None:
            raise UnsupportedError(f"{why}{_who_can(problem, exclude=key)}")
        return backend
    reasons = []
    for name in _factories:
        try:
            backend = get_backend(name)
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
            continue
        why = _why_not(backend, problem)
        if why is None:
            return backend
        reasons.append(why)
    raise BackendUnavailableError("no flashdec backend can run this problem: " + "; ".join(reasons))


def _who_can(problem: DecodeProblem | MergeProblem, exclude: str) -> str:
    able = []
    for name in _factories:
        if name == exclude:
            continue
        try:
            if _why_not(get_backend(name), problem) is None:
                able.append(name)
        except BackendUnavailableError:
            pass
    return f" (backend={able[0]!r} can run it)" if able else ""
