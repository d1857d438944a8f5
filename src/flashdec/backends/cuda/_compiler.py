"""NVRTC compilation of kernel sources to cubin, with an on-disk cache.

Kernels are compiled to **cubin for the device's own architecture**, never to PTX for the driver
to JIT: the pip NVRTC can be newer than the installed driver, which then rejects its PTX. NVRTC
needs no GPU and no driver when the arch is explicit, so everything here runs in CI; nothing in
this module touches the driver.

A compiled module is cached in ``flashdec._env.cache_dir() / "kernels"`` as ``<key>.cubin``. The
key is a sha256 over everything that can change the binary: the source text and name, every
project header (name and text), the options, the arch, the NVRTC version, the version of the
CUDA headers, the flashdec version, and the name expressions. An entry is self-checking (magic,
JSON header, cubin, sha256 of all before it), so a truncated or corrupt file is a miss, and it is
written to a temporary file that is then renamed over the entry, so readers never see half a
file and concurrent writers just race to install identical bytes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cuda.bindings import nvrtc
from cuda.core import Program, ProgramOptions
from cuda.pathfinder import find_nvidia_header_directory

from ... import _env
from ..._errors import BackendUnavailableError, CompilationError

__all__ = [
    "CompiledModule",
    "KernelResources",
    "compile_cubin",
    "nvrtc_version",
    "cuda_include_dir",
    "arch_of",
    "clear_memory_cache",
]

# Bump when the entry layout or the meaning of its fields changes: old entries become misses.
_FORMAT_VERSION = 1
_MAGIC = b"FLDCUBIN"
_HEADER_LENGTH = struct.Struct("<I")
_DIGEST_SIZE = hashlib.sha256().digest_size

_ARCH_RE = re.compile(r"sm_\d{2,3}[af]?")


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one kernel (``-Xptxas -v``).

    Attributes
    ----------
    registers : int
        Registers per thread.
    spill_stores, spill_loads : int
        Bytes of register spills written to and read from local memory.
    stack_frame : int
        Bytes of per-thread stack frame.
    shared_bytes : int
        Bytes of static shared memory (0 when ptxas printed none); dynamic shared memory is
        chosen at launch and is not included.
    """

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int


@dataclass(frozen=True)
class CompiledModule:
    """A cubin and what is needed to use it.

    Attributes
    ----------
    cubin : bytes
        The ELF image for ``arch``.
    symbols : dict[str, str]
        Name expression (``"decode<128, 8>"``) -> lowered (mangled) name in ``cubin``.
    arch : str
        The architecture compiled for, e.g. ``"sm_90"``.
    log : str
        The NVRTC log, including ptxas' ``-v`` resource report.
    key : str
        Hex sha256 cache key of the compile.
    """

    cubin: bytes
    symbols: dict[str, str]
    arch: str
    log: str
    key: str

    def resources(self) -> dict[str, KernelResources]:
        """Registers, spills and static shared memory of each kernel, parsed from ``log``.

        Returns
        -------
        dict[str, KernelResources]
            Keyed by name expression; a name expression that is not a kernel (no ptxas entry
            report) is left out. Spills inside non-inlined device functions that a kernel calls
            are reported by ptxas under the callee's name and are not included.
        """
        by_mangled = _parse_ptxas_report(self.log)
        return {expression: by_mangled[mangled]
                for expression, mangled in self.symbols.items() if mangled in by_mangled}


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def _parse_ptxas_report(log: str) -> dict[str, KernelResources]:
    # ptxas prints, per kernel: "Compiling entry function 'X'", "Function properties for X",
    # the stack/spill line, then "Used N registers, ..., M bytes smem". Non-inlined device
    # functions get their own "Function properties" block, so the stack/spill line belongs to
    # the last named function, and the "Used" line to the last entry.
    frames: dict[str, tuple[int, int, int]] = {}
    usage: dict[str, tuple[int, int]] = {}
    entry = properties_of = None
    for line in log.splitlines():
        if m := _ENTRY_RE.search(line):
            entry = m.group(1)
        elif m := _PROPERTIES_RE.search(line):
            properties_of = m.group(1)
        elif (m := _FRAME_RE.search(line)) and properties_of is not None:
            frames[properties_of] = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _REGISTERS_RE.search(line)) and entry is not None:
            smem = _SMEM_RE.search(line)
            usage[entry] = (int(m.group(1)), int(smem.group(1)) if smem else 0)
    resources = {}
    for name, (registers, shared_bytes) in usage.items():
        stack_frame, spill_stores, spill_loads = frames.get(name, (0, 0, 0))
        resources[name] = KernelResources(registers=registers, spill_stores=spill_stores,
                                          spill_loads=spill_loads, stack_frame=stack_frame,
                                          shared_bytes=shared_bytes)
    return resources


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """The (major, minor) version of the NVRTC library that compiles.

    Raises
    ------
    BackendUnavailableError
        NVRTC could not be loaded or queried.
    """
    try:
        result, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the shared library is missing or cannot be loaded
        raise BackendUnavailableError(f"cannot load NVRTC: {exc}") from exc
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise BackendUnavailableError(f"nvrtcVersion failed: {result!r}")
    return major, minor


@functools.lru_cache(maxsize=1)
def cuda_include_dir() -> str:
    """The directory holding the CUDA runtime headers (``cuda_bf16.h``, ...).

    Found with ``cuda.pathfinder`` (usually the ``nvidia-cuda-runtime`` wheel).

    Raises
    ------
    BackendUnavailableError
        No CUDA runtime headers were found.
    """
    found = find_nvidia_header_directory("cudart")
    if not found:
        raise BackendUnavailableError(
            "CUDA runtime headers not found; install them with `pip install nvidia-cuda-runtime`")
    return str(found)


@functools.lru_cache(maxsize=1)
def _cuda_headers_version() -> str:
    # The headers can come from a different wheel or toolkit than NVRTC and change the code
    # (e.g. cuda_bf16.h intrinsics), so their version is part of the key. CUDART_VERSION is
    # defined near the top of cuda_runtime_api.h: reading its head is cheap.
    try:
        with open(os.path.join(cuda_include_dir(), "cuda_runtime_api.h"), "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return "unknown"
    m = re.search(rb"#define\s+CUDART_VERSION\s+(\d+)", head)
    return m.group(1).decode() if m else "unknown"


def arch_of(major: int, minor: int) -> str:
    """The NVRTC arch name of a compute capability: ``arch_of(9, 0) == "sm_90"``.

    Parameters
    ----------
    major, minor : int
        The compute capability, as reported by the device.
    """
    if major < 1 or minor < 0 or minor > 9:
        raise ValueError(f"compute capability must be (major >= 1, 0 <= minor <= 9), "
                         f"got ({major}, {minor})")
    return f"sm_{major}{minor}"


_memory_cache: dict[str, CompiledModule] = {}
_warned_dirs: set[str] = set()
_lock = threading.Lock()


def clear_memory_cache() -> None:
    """Forget the modules compiled or loaded by this process (the disk cache stays)."""
    with _lock:
        _memory_cache.clear()


def compile_cubin(source: str, name_expressions: Sequence[str], arch: str, *,
                  options: Sequence[str] = (), headers: Mapping[str, str] = {},
                  source_name: str = "kernel.cu", use_cache: bool = True) -> CompiledModule:
    """Compile CUDA C++ ``source`` to a cubin for ``arch``, through the cache.

    Parameters
    ----------
    source : str
        Text of the ``.cu`` file.
    name_expressions : Sequence[str]
        Kernels to instantiate and look up, e.g. ``["decode<128, 8>"]``.
    arch : str
        Target architecture, ``"sm_80"``, ``"sm_90"``, ``"sm_90a"``... (see :func:`arch_of`).
    options : Sequence[str]
        Extra NVRTC options, one per string: ``-DNAME[=VALUE]``, ``-UNAME``,
        ``--use_fast_math``, ``--ftz=``/``--prec-div=``/``--prec-sqrt=``/``--fmad=`` with
        ``true|false``, ``--maxrregcount=N``, ``-lineinfo``, ``--extra-device-vectorization``,
        ``--restrict``, ``-G``, ``--std=c++20``, ``-Xptxas=OPT``/``--ptxas-options=OPT``.
    headers : Mapping[str, str]
        Project headers by include name (``"flashdec/softmax.cuh"`` -> text). Every
        ``#include "..."``, in the source or in a header, resolves against these names and the
        CUDA headers only, never the current directory, so the cache key covers all inputs.
    source_name : str
        Name NVRTC uses for the source in diagnostics and ``__FILE__``.
    use_cache : bool
        False compiles afresh and neither reads nor writes the caches.

    Returns
    -------
    CompiledModule

    Raises
    ------
    CompilationError
        NVRTC rejected the source; ``.log`` holds its log. Nothing is cached.
    ValueError
        A malformed ``arch``, header name or unsupported option.
    TypeError
        ``name_expressions`` is a single string instead of a sequence of them.
    BackendUnavailableError
        NVRTC or the CUDA headers cannot be found.

    Notes
    -----
    A cache directory that cannot be written only costs the reuse across processes: the compile
    succeeds and a ``RuntimeWarning`` is issued once per directory.
    """
    if isinstance(name_expressions, str):
        raise TypeError("name_expressions must be a sequence of strings, got one str "
                        f"{name_expressions!r}")
    name_expressions = tuple(name_expressions)
    options = tuple(options)
    if not _ARCH_RE.fullmatch(arch):
        raise ValueError(f"arch must look like 'sm_90' or 'sm_90a', got {arch!r}")
    for name in headers:
        _check_header_name(name)
    # Parse before the cache lookup so a bad option fails the same way on a hit and a miss.
    option_fields = _option_fields(options)
    key = _cache_key(source, source_name, name_expressions, arch, options, headers)
    if not use_cache:
        return _compile(source, source_name, name_expressions, arch, option_fields, headers, key)

    with _lock:
        module = _memory_cache.get(key)
    if module is not None:
        return module
    directory = _env.cache_dir() / "kernels"
    module = _read_entry(directory / f"{key}.cubin", key)
    if module is None:
        module = _compile(source, source_name, name_expressions, arch, option_fields, headers,
                          key)
        _store(directory, module)
    with _lock:
        # Threads that compiled the same key concurrently all return the first one stored.
        return _memory_cache.setdefault(key, module)


def _check_header_name(name: str) -> None:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"header name must be a relative include path like 'flashdec/x.cuh', "
                         f"got {name!r}")


def _cache_key(source: str, source_name: str, name_expressions: tuple[str, ...], arch: str,
               options: tuple[str, ...], headers: Mapping[str, str]) -> str:
    from ... import __version__  # lazily: flashdec/__init__ imports the backends

    digest = hashlib.sha256()

    def field(tag: str, value: str) -> None:
        # Length-prefixed, so no two different field lists hash the same byte stream.
        data = value.encode("utf-8")
        digest.update(f"{tag}:{len(data)}:".encode("ascii") + data)

    field("format", str(_FORMAT_VERSION))
    field("flashdec", __version__)
    field("nvrtc", "%d.%d" % nvrtc_version())
    field("cuda_headers", _cuda_headers_version())
    field("arch", arch)
    field("source_name", source_name)
    field("source", source)
    for name in sorted(headers):
        field("header_name", name)
        field("header_text", headers[name])
    for option in options:
        field("option", option)
    for expression in name_expressions:
        field("name_expression", expression)
    return digest.hexdigest()


# Raw NVRTC spellings -> ProgramOptions fields (cuda.core 1.2 has no pass-through for raw
# option strings). "-x" and "--x" are accepted alike.
_FLAG_FIELDS = {
    "use_fast_math": "use_fast_math",
    "use-fast-math": "use_fast_math",
    "lineinfo": "lineinfo",
    "generate-line-info": "lineinfo",
    "extra-device-vectorization": "extra_device_vectorization",
    "restrict": "restrict",
    "G": "debug",
    "device-debug": "debug",
}
_BOOLS = {"true": True, "false": False}
_VALUE_FIELDS: dict[str, tuple[str, Any]] = {
    "ftz": ("ftz", _BOOLS.__getitem__),
    "prec-div": ("prec_div", _BOOLS.__getitem__),
    "prec-sqrt": ("prec_sqrt", _BOOLS.__getitem__),
    "fmad": ("fma", _BOOLS.__getitem__),
    "maxrregcount": ("max_register_count", int),
    "std": ("std", str),
}
_LIST_FIELDS = {
    "D": "define_macro",
    "define-macro": "define_macro",
    "U": "undefine_macro",
    "undefine-macro": "undefine_macro",
    "Xptxas": "ptxas_options",
    "ptxas-options": "ptxas_options",
}

_SUPPORTED_OPTIONS = {*_FLAG_FIELDS, *_VALUE_FIELDS, *_LIST_FIELDS}


def _option_fields(options: tuple[str, ...]) -> dict[str, Any]:
    fields: dict[str, Any] = {"std": "c++17"}
    lists: dict[str, list[Any]] = {"ptxas_options": ["-v"], "define_macro": [],
                                   "undefine_macro": []}
    for option in options:
        name, value = _split_option(option)
        try:
            if name in _FLAG_FIELDS and value is None:
                fields[_FLAG_FIELDS[name]] = True
            elif name in _VALUE_FIELDS and value is not None:
                field, convert = _VALUE_FIELDS[name]
                fields[field] = convert(value)
            elif name in _LIST_FIELDS and value:
                field = _LIST_FIELDS[name]
                macro, eq, definition = value.partition("=")
                # cuda.core spells "NAME=VALUE" as a (NAME, VALUE) pair.
                lists[field].append((macro, definition) if field == "define_macro" and eq
                                    else value)
            else:
                raise KeyError(name)
        except (KeyError, ValueError):
            hint = (" (pass header text with headers= so it is part of the cache key)"
                    if name in ("I", "include-path") else
                    " (pass arch= instead)" if name in ("arch", "gpu-architecture") else "")
            raise ValueError(f"unsupported or malformed NVRTC option {option!r}{hint}; "
                             f"supported: {', '.join(sorted(_SUPPORTED_OPTIONS))}") from None
    # cuda.core rejects an empty list for these fields.
    fields.update((field, values) for field, values in lists.items() if values)
    return fields


def _split_option(option: str) -> tuple[str, str | None]:
    # "-DFOO=1" -> ("D", "FOO=1"); "--ftz=true" -> ("ftz", "true"); "-G" -> ("G", None)
    option = option.strip()
    body = option.lstrip("-")
    if option[:2] in ("-D", "-U", "-I") and len(option) > 2:
        return option[1], option[2:]
    name, eq, value = body.partition("=")
    return name, (value if eq else None)


def _compile(source: str, source_name: str, name_expressions: tuple[str, ...], arch: str,
             option_fields: dict[str, Any], headers: Mapping[str, str],
             key: str) -> CompiledModule:
    with tempfile.TemporaryDirectory(prefix="flashdec-headers-") as header_dir:
        for name, text in headers.items():
            path = Path(header_dir, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        program_options = ProgramOptions(
            name=source_name, arch=arch, include_path=[header_dir, cuda_include_dir()],
            # NVRTC otherwise searches the source's directory, i.e. the current working
            # directory for a bare name: a stray header there would bypass the cache key.
            no_source_include=True, **option_fields)
        cubin, symbols, log = _run_nvrtc(source, program_options, name_expressions)
    return CompiledModule(cubin=cubin, symbols=symbols, arch=arch, log=log, key=key)


def _run_nvrtc(source: str, program_options: ProgramOptions,
               name_expressions: tuple[str, ...]) -> tuple[bytes, dict[str, str], str]:
    log = io.StringIO()
    try:
        program = Program(source, "c++", program_options)
        try:
            code = program.compile("cubin", name_expressions=name_expressions, logs=log)
        finally:
            program.close()
    except Exception as exc:  # cuda.core raises its private NVRTCError/CUDAError types
        raise CompilationError(
            f"NVRTC failed to compile {program_options.name} for {program_options.arch} "
            f"(name expressions: {', '.join(name_expressions) or 'none'})",
            _clean_log(log.getvalue()) or _log_of_error(exc)) from exc
    symbols = {expression: mangled.decode() if isinstance(mangled, bytes) else mangled
               for expression, mangled in code.symbol_mapping.items()}
    return bytes(code.code), symbols, _clean_log(log.getvalue())


def _clean_log(text: str) -> str:
    # NVRTC's log buffer is NUL-terminated and cuda.core keeps the terminator.
    return text.replace("\x00", "").strip()


def _log_of_error(exc: Exception) -> str:
    # On failure cuda.core puts the NVRTC log into the exception text, after this marker.
    text = str(exc)
    _, marker, log = text.partition("compilation log:")
    return _clean_log(log if marker else text)


def _encode_entry(module: CompiledModule) -> bytes:
    header = json.dumps({"format": _FORMAT_VERSION, "key": module.key, "arch": module.arch,
                         "symbols": module.symbols, "log": module.log}).encode("utf-8")
    body = _MAGIC + _HEADER_LENGTH.pack(len(header)) + header + module.cubin
    return body + hashlib.sha256(body).digest()


def _decode_entry(data: bytes, key: str) -> CompiledModule | None:
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    start = len(_MAGIC) + _HEADER_LENGTH.size
    if (len(data) < start + _DIGEST_SIZE or not body.startswith(_MAGIC)
            or hashlib.sha256(body).digest() != digest):
        return None
    (header_length,) = _HEADER_LENGTH.unpack_from(body, len(_MAGIC))
    try:
        header = json.loads(body[start:start + header_length])
        if header["format"] != _FORMAT_VERSION or header["key"] != key:
            return None
        return CompiledModule(cubin=body[start + header_length:], symbols=dict(header["symbols"]),
                              arch=header["arch"], log=header["log"], key=key)
    except (ValueError, KeyError, TypeError):
        return None


def _read_entry(path: Path, key: str) -> CompiledModule | None:
    try:
        data = path.read_bytes()
    except OSError:  # absent, or the directory is unusable: a miss either way
        return None
    return _decode_entry(data, key)


def _new_temp_file(directory: Path, prefix: str) -> tuple[int, str]:
    """A new file in ``directory`` opened for writing, with mode 0666 less the umask (so other
    users can read the cache where the umask lets them), where mkstemp would give 0600."""
    while True:
        path = os.path.join(directory, f"{prefix}{os.urandom(8).hex()}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                           | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue


def _store(directory: Path, module: CompiledModule) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temp_path = _new_temp_file(directory, f".{module.key[:16]}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_encode_entry(module))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp_path, directory / f"{module.key}.cubin")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            raise
    except OSError as exc:
        with _lock:
            first = str(directory) not in _warned_dirs
            _warned_dirs.add(str(directory))
        if first:
            warnings.warn(f"flashdec: cannot write the kernel cache in {directory} ({exc}); "
                          f"kernels will be recompiled in every process", RuntimeWarning,
                          stacklevel=3)
