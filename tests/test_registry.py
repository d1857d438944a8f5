"""Backend selection: FLASHDEC_BACKEND, backend=, explicit choices that never fall back,
available_backends(), register_backend(), and the FLASHDEC_CACHE_DIR / XDG_CACHE_HOME rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import flashdec
from flashdec import (Backend, BackendUnavailableError, ContractError, UnsupportedError, _env,
                      _registry)
from flashdec.reference import TOLERANCE, decode_reference, merge_reference, relative_error

Q_SHAPE, KV_SHAPE = (2, 4, 16), (2, 2, 7, 16)
VALID = r"valid choices: auto, cuda, torch"


@pytest.fixture
def qkv():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(Q_SHAPE, generator=gen)
    k = torch.randn(KV_SHAPE, generator=gen)
    v = torch.randn(KV_SHAPE, generator=gen)
    out = torch.randn(Q_SHAPE, generator=gen)  # poison: random, so any write shows
    ref = decode_reference(q.numpy(), k.numpy(), v.numpy())
    return q, k, v, out, ref


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("FLASHDEC_BACKEND", raising=False)
    return monkeypatch


def _check(y: torch.Tensor, ref: np.ndarray) -> None:
    assert relative_error(y.numpy(), ref) < TOLERANCE["float32"]


# -- FLASHDEC_BACKEND -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["auto", "torch", "TORCH", "Torch", " torch ", "AUTO", ""])
def test_env_choice_runs_on_cpu(clean_env, qkv, value) -> None:
    q, k, v, out, ref = qkv
    clean_env.setenv("FLASHDEC_BACKEND", value)
    y = flashdec.decode(q, k, v, out)
    assert y is out
    _check(y, ref)
    p = flashdec.plan(q, k, v)
    assert p.backend.name == "torch"
    _check(p.run(q, k, v), ref)


def test_unset_env_means_auto(clean_env, qkv) -> None:
    q, k, v, _, ref = qkv
    assert _env.backend_choice() == "auto"
    assert flashdec.plan(q, k, v).backend.name == "torch"
    _check(flashdec.decode(q, k, v), ref)


@pytest.mark.parametrize("value", ["TORCH", " Torch", "CUDA", "Auto"])
def test_backend_choice_is_lower_cased_and_stripped(clean_env, value) -> None:
    clean_env.setenv("FLASHDEC_BACKEND", value)
    assert _env.backend_choice() == value.strip().lower()


@pytest.mark.parametrize("entry", ["decode", "plan"])
def test_unknown_env_backend_lists_valid_names(clean_env, qkv, entry) -> None:
    q, k, v, out, _ = qkv
    poison = out.clone()
    clean_env.setenv("FLASHDEC_BACKEND", "nope")
    fn = flashdec.decode if entry == "decode" else flashdec.plan
    with pytest.raises(ContractError, match=rf"\bFLASHDEC_BACKEND='nope' is not a flashdec "
                                            rf"backend; {VALID}"):
        fn(q, k, v, out)
    assert torch.equal(out, poison)


@pytest.mark.parametrize("entry", ["decode", "plan", "merge_states"])
@pytest.mark.parametrize("name", ["nope", "tirch", "cuda2", "", "bogus"])
def test_unknown_backend_argument_lists_valid_names(clean_env, qkv, entry, name) -> None:
    q, k, v, out, _ = qkv
    poison = out.clone()
    expected = rf"\bbackend={re.escape(repr(name))} is not a flashdec backend; {VALID}$"
    with pytest.raises(ContractError, match=expected):  # a ValueError too, as before
        if entry == "merge_states":
            flashdec.merge_states([q], [q[..., 0]], out=out, backend=name)
        else:
            (flashdec.decode if entry == "decode" else flashdec.plan)(q, k, v, out, backend=name)
    assert torch.equal(out, poison)


@pytest.mark.parametrize("entry", ["decode", "plan", "merge_states"])
@pytest.mark.parametrize("name", [3, 1.5, b"torch", ["torch"], True])
def test_backend_that_is_not_a_str_is_a_contract_error(clean_env, qkv, entry, name) -> None:
    """Not an AttributeError from name.strip(), nor (for unhashable ones) a TypeError."""
    q, k, v, out, _ = qkv
    expected = (rf"\bbackend must be a backend name \(auto, cuda, torch\) or None, got "
                rf"{type(name).__name__} {re.escape(repr(name))}$")
    with pytest.raises(ContractError, match=expected):
        if entry == "merge_states":
            flashdec.merge_states([q], [q[..., 0]], backend=name)
        else:
            (flashdec.decode if entry == "decode" else flashdec.plan)(q, k, v, out, backend=name)


def test_unknown_backend_in_get_backend() -> None:
    with pytest.raises(ContractError, match=rf"\bname='nope' is not a flashdec backend; {VALID}"):
        flashdec.get_backend("nope")
    with pytest.raises(ContractError, match="not 'auto'"):
        flashdec.get_backend("auto")  # not a concrete backend
    with pytest.raises(ContractError, match=r"\bname must be a backend name.*got NoneType"):
        flashdec.get_backend(None)


@pytest.mark.parametrize("name, factory, match", [
    (None, lambda: None, r"backend name must be a non-empty str other than 'auto', got NoneType"),
    ("", lambda: None, r"backend name must be a non-empty str"),
    ("Auto", lambda: None, r"backend name must be a non-empty str other than 'auto'"),
    ("toy", "not callable", r"\bfactory must be a callable returning a Backend, got str"),
])
def test_register_backend_checks_its_arguments(name, factory, match) -> None:
    names = _registry.backend_names()
    with pytest.raises(ContractError, match=match):
        flashdec.register_backend(name, factory)
    assert _registry.backend_names() == names


@pytest.mark.parametrize("env", ["nope", "cuda", "auto"])
@pytest.mark.parametrize("arg", ["torch", "TORCH", "auto"])
def test_backend_argument_wins_over_env(clean_env, qkv, env, arg) -> None:
    q, k, v, out, ref = qkv
    clean_env.setenv("FLASHDEC_BACKEND", env)
    y = flashdec.decode(q, k, v, out, backend=arg)
    _check(y, ref)
    p = flashdec.plan(q, k, v, backend=arg)
    assert p.backend.name == "torch"
    _check(p.run(q, k, v), ref)


# -- an explicit choice never falls back ----------------------------------------------------------
@pytest.mark.parametrize("how", ["argument", "env", "argument-upper"])
@pytest.mark.parametrize("entry", ["decode", "plan"])
def test_explicit_cuda_on_cpu_tensors_never_falls_back(clean_env, qkv, how, entry) -> None:
    q, k, v, out, _ = qkv
    poison = out.clone()
    kwargs: dict[str, Any] = {}
    if how == "env":
        clean_env.setenv("FLASHDEC_BACKEND", "cuda")
    else:
        clean_env.setenv("FLASHDEC_BACKEND", "torch")  # the argument must win over this too
        kwargs["backend"] = "CUDA" if how == "argument-upper" else "cuda"
    fn = flashdec.decode if entry == "decode" else flashdec.plan
    result = "nothing returned"
    with pytest.raises((BackendUnavailableError, UnsupportedError)) as info:
        result = fn(q, k, v, out, **kwargs)
    assert result == "nothing returned"
    assert "cuda" in str(info.value).lower()
    assert torch.equal(out, poison), "out was written: the explicit cuda choice fell back"


def test_explicit_cuda_error_explains(clean_env, qkv) -> None:
    q, k, v, out, _ = qkv
    with pytest.raises((BackendUnavailableError, UnsupportedError)) as info:
        flashdec.decode(q, k, v, out, backend="cuda")
    message = str(info.value)
    if isinstance(info.value, UnsupportedError):
        # a valid problem the chosen backend cannot run: say which backend can
        assert "cpu" in message and "torch" in message
    else:
        assert len(message) > len("the cuda backend is unavailable: ")


# -- available_backends ---------------------------------------------------------------------------
def test_available_backends() -> None:
    found = flashdec.available_backends()
    assert isinstance(found, dict)
    assert {"cuda", "torch"} <= set(found)
    for name, entry in found.items():
        assert isinstance(name, str)
        assert isinstance(entry, tuple) and len(entry) == 2
        ok, why = entry
        assert isinstance(ok, bool) and isinstance(why, str)
        if not ok:
            assert why, f"{name} is unavailable without a reason"
    assert found["torch"] == (True, "")
    assert list(found)[:2] == ["cuda", "torch"]  # auto-preference order


def test_get_backend_torch() -> None:
    b = flashdec.get_backend("torch")
    assert isinstance(b, Backend)
    assert b.name == "torch"
    assert b.is_available() == (True, "")
    assert flashdec.get_backend(" Torch ") is b  # one instance, case-insensitive


# -- register_backend -----------------------------------------------------------------------------
@pytest.fixture
def registered():
    """Register backends for one test; remove them (and their cached instances) afterwards."""
    names: list[str] = []

    def register(name: str, factory) -> None:
        names.append(name.lower())
        flashdec.register_backend(name, factory)

    yield register
    for name in names:
        _registry._factories.pop(name, None)
        _registry._instances.pop(name, None)


class _ToyRunner:
    workspace_bytes = 0

    def __init__(self, backend: "ToyBackend", problem) -> None:
        self.backend, self.problem = backend, problem

    def __call__(self, args, stream) -> None:
        self.backend.calls.append((args, stream))
        # the toy's answer: -2 * q, a result no real backend would give
        torch.from_dlpack(args.out).copy_(torch.from_dlpack(args.q) * -2)


class ToyBackend(Backend):
    name = "toy"
    device_kinds = ("cpu",)

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.options: list[dict] = []

    def prepare(self, problem, layouts, options=flashdec.BackendOptions()):
        self.options.append(options)
        return _ToyRunner(self, problem)


def test_registered_backend_is_picked_by_name(registered, clean_env, qkv) -> None:
    q, k, v, out, _ = qkv
    made: list[ToyBackend] = []

    def factory() -> ToyBackend:
        made.append(ToyBackend())
        return made[-1]

    registered("Toy", factory)
    assert "toy" in _registry.backend_names()
    assert flashdec.available_backends()["toy"] == (True, "")
    y = flashdec.decode(q, k, v, out, backend="TOY", num_splits=3)
    assert y is out
    assert torch.equal(out, q * -2)
    assert len(made) == 1, "the factory is called lazily, once"
    toy = made[0]
    assert len(toy.calls) == 1 and toy.options == [flashdec.BackendOptions(num_splits=3)]
    p = flashdec.plan(q, k, v, backend="toy")
    assert p.backend is toy
    out2 = p.run(q, k, v)
    assert torch.equal(out2, q * -2)
    clean_env.setenv("FLASHDEC_BACKEND", "toy")
    assert flashdec.plan(q, k, v).backend is toy
    assert len(made) == 1


def test_registered_backend_is_listed_in_valid_choices(registered, qkv) -> None:
    registered("toy", ToyBackend)
    q, k, v, out, _ = qkv
    with pytest.raises(ValueError, match=r"valid choices: auto, cuda, torch, toy"):
        flashdec.decode(q, k, v, out, backend="nope")


def test_auto_keeps_builtin_preference_over_later_registrations(registered, clean_env, qkv) -> None:
    registered("toy", ToyBackend)
    q, k, v, out, ref = qkv
    assert flashdec.plan(q, k, v).backend.name == "torch"
    _check(flashdec.decode(q, k, v, out), ref)


def test_explicit_backend_that_cannot_run_the_problem_says_who_can(registered, qkv) -> None:
    class GpuOnly(ToyBackend):
        name = "gpuonly"
        device_kinds = ("cuda",)

    registered("gpuonly", GpuOnly)
    q, k, v, out, _ = qkv
    poison = out.clone()
    with pytest.raises(UnsupportedError, match=r"gpuonly.*cpu.*backend='torch' can run it"):
        flashdec.decode(q, k, v, out, backend="gpuonly")
    assert torch.equal(out, poison)


def test_factory_that_raises_is_unavailable_with_reason(registered, qkv) -> None:
    def broken() -> Backend:
        raise ImportError("libfrobnicate.so.3: cannot open shared object file")

    registered("broken", broken)
    found = flashdec.available_backends()
    ok, why = found["broken"]
    assert ok is False
    assert "broken" in why and "libfrobnicate.so.3" in why
    assert found["torch"] == (True, "")
    q, k, v, out, ref = qkv
    poison = out.clone()
    with pytest.raises(BackendUnavailableError, match="libfrobnicate"):
        flashdec.decode(q, k, v, out, backend="broken")
    assert torch.equal(out, poison)
    with pytest.raises(BackendUnavailableError, match="libfrobnicate"):
        flashdec.get_backend("broken")
    _check(flashdec.decode(q, k, v, out), ref)  # auto still works around it


def test_backend_reporting_unavailable(registered, qkv) -> None:
    class NoDevice(ToyBackend):
        name = "nodevice"

        def is_available(self):
            return False, "no frobnicator attached"

    registered("nodevice", NoDevice)
    assert flashdec.available_backends()["nodevice"] == (
        False, "the nodevice backend is unavailable: no frobnicator attached")
    q, k, v, out, _ = qkv
    with pytest.raises(BackendUnavailableError, match="no frobnicator attached"):
        flashdec.plan(q, k, v, out, backend="nodevice")


class MergingToy(ToyBackend):
    """A toy that also merges: it records the parts it is handed and writes -1 / -2."""

    name = "mergingtoy"

    def merge(self, problem, outputs, lses, out, lse_out, stream) -> None:
        self.calls.append((problem, list(outputs), list(lses), stream))
        torch.from_dlpack(out).fill_(-1.0)
        torch.from_dlpack(lse_out).fill_(-2.0)


@pytest.fixture
def parts():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 2, 4, 16, generator=gen), torch.randn(3, 2, 4, generator=gen)


def test_merge_goes_to_the_named_backend_as_views_of_the_stack(registered, clean_env,
                                                               parts) -> None:
    registered("mergingtoy", MergingToy)
    outputs, lses = parts
    out, lse = flashdec.merge_states(outputs, lses, backend="mergingtoy")
    assert torch.equal(out, torch.full((2, 4, 16), -1.0))
    assert torch.equal(lse, torch.full((2, 4), -2.0))
    toy = flashdec.get_backend("mergingtoy")
    (problem, got_outputs, got_lses, stream), = toy.calls
    assert problem == flashdec.MergeProblem(3, 2, 4, 16, flashdec.DType.float32,
                                            flashdec.Device("cpu"))
    assert [p.ptr for p in got_outputs] == [outputs[i].data_ptr() for i in range(3)]
    assert [p.ptr for p in got_lses] == [lses[i].data_ptr() for i in range(3)]
    assert all(p.owner is outputs for p in got_outputs), "a stacked input must not be copied"
    assert stream is None


def test_merge_auto_skips_backends_without_merge(registered, clean_env, parts) -> None:
    registered("toy", ToyBackend)
    clean_env.setenv("FLASHDEC_BACKEND", "toy")
    outputs, lses = parts
    with pytest.raises(UnsupportedError,
                       match=r"toy backend does not implement merge_states.*backend='torch' can"):
        flashdec.merge_states(outputs, lses)
    out, _ = flashdec.merge_states(outputs, lses, backend="auto")
    ref, _ = merge_reference(outputs.numpy(), lses.numpy())
    _check(out, ref)


def test_merge_explicit_cuda_on_cpu_never_falls_back(clean_env, parts) -> None:
    outputs, lses = parts
    out = torch.full((2, 4, 16), 7.0)
    with pytest.raises((BackendUnavailableError, UnsupportedError), match="cuda"):
        flashdec.merge_states(outputs, lses, out=out, backend="cuda")
    assert torch.equal(out, torch.full((2, 4, 16), 7.0))


def test_registry_validates_before_choosing(registered, qkv) -> None:
    """Contract errors come first, whatever backend is named (the frontend owns validation)."""
    registered("toy", ToyBackend)
    q, k, v, out, _ = qkv
    with pytest.raises(ContractError, match=r"\bk must have rank 4"):
        flashdec.decode(q, k[0], v, out, backend="toy")


# -- cache directory ------------------------------------------------------------------------------
def test_cache_dir_explicit(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _env.cache_dir() == tmp_path / "kernels"


def test_cache_dir_expands_user(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", "~/fd-cache")
    assert _env.cache_dir() == tmp_path / "fd-cache"


@pytest.mark.parametrize("explicit", [None, ""])
def test_cache_dir_xdg(monkeypatch, tmp_path, explicit) -> None:
    if explicit is None:
        monkeypatch.delenv("FLASHDEC_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("FLASHDEC_CACHE_DIR", explicit)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _env.cache_dir() == tmp_path / "xdg" / "flashdec"


@pytest.mark.parametrize("xdg", [None, ""])
def test_cache_dir_default_home(monkeypatch, tmp_path, xdg) -> None:
    monkeypatch.delenv("FLASHDEC_CACHE_DIR", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _env.cache_dir() == tmp_path / ".cache" / "flashdec"


def test_cache_dir_read_at_call_time(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "a"))
    first = _env.cache_dir()
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "b"))
    assert (first, _env.cache_dir()) == (tmp_path / "a", tmp_path / "b")
    assert isinstance(first, Path)
