"""NVRTC compile and the on-disk kernel cache, with no GPU: the arch is always explicit."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import warnings

import pytest

pytest.importorskip("cuda.core", reason="cuda-python (cuda-core) is not installed")

from flashdec._errors import CompilationError  # noqa: E402
from flashdec.backends.cuda import _compiler  # noqa: E402
from flashdec.backends.cuda._compiler import (clear_memory_cache, compile_cubin,  # noqa: E402
                                              nvrtc_version)

HEADER_NAME = "flashdec/scale.cuh"
HEADER = """\
#pragma once
template <int N>
__device__ float scaled(float x) { return x * N + SCALE_BIAS; }
"""
SOURCE = """\
#ifndef SCALE_BIAS
#define SCALE_BIAS 0.0f
#endif
#include "flashdec/scale.cuh"

template <int N>
__global__ void scale(float* __restrict__ out, const float* __restrict__ in, int n) {
    __shared__ float tile[64];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x % 64] = i < n ? in[i] : 0.0f;
    __syncthreads();
    if (i < n) out[i] = scaled<N>(tile[(threadIdx.x + 1) % 64]);
}
"""
NAMES = ("scale<2>", "scale<4>")
ELF_MAGIC = b"\x7fELF"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield tmp_path / "cache" / "kernels"
    clear_memory_cache()


@pytest.fixture
def nvrtc_calls(monkeypatch):
    """Counts the NVRTC compiles; set ``forbid`` to make any further compile fail the test."""
    real = _compiler._run_nvrtc
    state = {"count": 0, "forbid": False}

    def counting(*args, **kwargs):
        assert not state["forbid"], "NVRTC ran although the cache should have answered"
        state["count"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_compiler, "_run_nvrtc", counting)
    return state


def compile_default(**kwargs):
    args = dict(source=SOURCE, name_expressions=NAMES, arch="sm_90",
                headers={HEADER_NAME: HEADER})
    args.update(kwargs)
    return compile_cubin(args.pop("source"), args.pop("name_expressions"), args.pop("arch"),
                         **args)


def entries(directory):
    return sorted(os.listdir(directory)) if directory.exists() else []


def test_helpers():
    major, minor = nvrtc_version()
    assert major >= 12 and minor >= 0
    assert os.path.isfile(os.path.join(_compiler.cuda_include_dir(), "cuda_bf16.h"))
    assert _compiler.arch_of(9, 0) == "sm_90"
    assert _compiler.arch_of(12, 0) == "sm_120"
    with pytest.raises(ValueError, match="compute capability"):
        _compiler.arch_of(9, 10)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_gives_cubin_and_lowered_names(arch, cache_dir):
    module = compile_default(arch=arch)
    assert module.cubin.startswith(ELF_MAGIC)
    assert module.arch == arch
    assert set(module.symbols) == set(NAMES)
    assert module.symbols["scale<2>"] == "_Z5scaleILi2EEvPfPKfi"
    assert module.symbols["scale<4>"] == "_Z5scaleILi4EEvPfPKfi"
    assert entries(cache_dir) == [f"{module.key}.cubin"]


def test_cuda_headers_are_on_the_include_path():
    source = '#include <cuda_bf16.h>\n__global__ void to_bf16(__nv_bfloat16* y, const float* x)' \
             ' { y[threadIdx.x] = __float2bfloat16(x[threadIdx.x]); }\n'
    module = compile_cubin(source, ["to_bf16"], "sm_90")
    assert module.symbols == {"to_bf16": "_Z7to_bf16P13__nv_bfloat16PKf"}


def test_resources_parsed_from_ptxas_report():
    module = compile_default()
    assert "Compiling entry function" in module.log
    resources = module.resources()
    assert set(resources) == set(NAMES)
    for r in resources.values():
        assert 0 < r.registers <= 255
        assert (r.spill_stores, r.spill_loads, r.stack_frame) == (0, 0, 0)
        assert r.shared_bytes == 64 * 4


def test_resources_under_register_pressure():
    source = """
__global__ void pressured(float* y, const float* x, int n) {
    float acc[64];  // 64 values live at once cannot fit in 24 registers
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = x[threadIdx.x + i * n];
    float s = 1.0f;
#pragma unroll
    for (int i = 0; i < 64; i++) s = s * acc[i] + acc[63 - i];
    y[threadIdx.x] = s;
}
"""
    module = compile_cubin(source, ["pressured"], "sm_90", options=["--maxrregcount=24"])
    (resources,) = module.resources().values()
    assert resources.registers <= 24
    assert resources.stack_frame > 0
    assert resources.spill_stores > 0 and resources.spill_loads > 0


# Verbatim ptxas -v output (NVRTC 13.5) for a kernel calling a non-inlined device function.
PTXAS_LOG = """\
ptxas info    : Overriding maximum register limit 256 for '_Z6spillyPfPKfi' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6spillyPfPKfi' for 'sm_90'
ptxas info    : Function properties for _Z6spillyPfPKfi
ptxas         .     432 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 432 bytes cumulative stack size
ptxas info    : Compile time = 21.524 ms
ptxas info    : Function properties for _Z6helperPKfi
ptxas         .     0 bytes stack frame, 352 bytes spill stores, 392 bytes spill loads
"""


def test_resources_attribute_device_function_spills_to_the_callee():
    module = _compiler.CompiledModule(cubin=b"", symbols={"spilly": "_Z6spillyPfPKfi"},
                                      arch="sm_90", log=PTXAS_LOG, key="")
    assert module.resources() == {"spilly": _compiler.KernelResources(
        registers=24, spill_stores=4, spill_loads=4, stack_frame=432, shared_bytes=0)}


def test_options_reach_nvrtc():
    capped = compile_default(options=["--maxrregcount=16", "-DSCALE_BIAS=1.0f",
                                      "--use_fast_math", "-Xptxas=-O3"])
    assert all(r.registers <= 16 for r in capped.resources().values())
    with pytest.raises(ValueError, match="headers="):
        compile_default(options=["-I/usr/include"])
    with pytest.raises(ValueError, match="arch="):
        compile_default(options=["-arch=sm_80"])


def test_second_call_is_a_hit(cache_dir, nvrtc_calls):
    first = compile_default()
    assert nvrtc_calls["count"] == 1
    assert compile_default() is first  # in-process memo
    nvrtc_calls["forbid"] = True
    clear_memory_cache()
    from_disk = compile_default()  # from the disk entry
    assert from_disk is not first
    assert (from_disk.cubin, from_disk.symbols, from_disk.log, from_disk.key) == \
        (first.cubin, first.symbols, first.log, first.key)
    assert from_disk.resources() == first.resources()


@pytest.mark.parametrize("change", [
    {"options": ["-DSCALE_BIAS=1.0f"]},
    {"headers": {HEADER_NAME: HEADER.replace("x * N", "x * (N + 1)")}},
    {"arch": "sm_80"},
    {"name_expressions": ("scale<2>",)},
    {"source": SOURCE + "\n// edited\n"},
], ids=["options", "header", "arch", "names", "source"])
def test_any_input_change_is_a_miss(change, cache_dir, nvrtc_calls):
    base = compile_default()
    changed = compile_default(**change)
    assert changed.key != base.key
    assert nvrtc_calls["count"] == 2
    assert entries(cache_dir) == sorted([f"{base.key}.cubin", f"{changed.key}.cubin"])


def test_use_cache_false_neither_reads_nor_writes(cache_dir, nvrtc_calls):
    compile_default(use_cache=False)
    compile_default(use_cache=False)
    assert nvrtc_calls["count"] == 2
    assert entries(cache_dir) == []


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_byte(data: bytes) -> bytes:
    i = len(data) - 100  # inside the cubin, before the checksum
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


@pytest.mark.parametrize("corrupt", [
    _truncate, _flip_byte, lambda data: b"", lambda data: b"\0" * len(data),
], ids=["truncated", "flipped-byte", "empty", "zeroed"])
def test_corrupt_entry_is_a_miss_and_rewritten(corrupt, cache_dir, nvrtc_calls):
    good = compile_default()
    path = cache_dir / f"{good.key}.cubin"
    path.write_bytes(corrupt(path.read_bytes()))
    clear_memory_cache()
    again = compile_default()
    assert nvrtc_calls["count"] == 2
    assert again.cubin == good.cubin
    # The rewritten entry is valid: the next process-level miss is served from disk.
    nvrtc_calls["forbid"] = True
    clear_memory_cache()
    assert compile_default().cubin == good.cubin
    assert entries(cache_dir) == [path.name]


def test_compile_error_raises_with_log_and_caches_nothing(cache_dir):
    bad = SOURCE.replace("int i =", "int i = ;")
    with pytest.raises(CompilationError) as info:
        compile_default(source=bad, source_name="broken.cu")
    message = str(info.value)
    assert "broken.cu" in message and "sm_90" in message and "scale<2>" in message
    assert "expected an expression" in info.value.log
    assert "broken.cu" in info.value.log
    assert entries(cache_dir) == []


def test_concurrent_threads_share_one_entry(cache_dir):
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def work(index: int) -> None:
        barrier.wait(timeout=60)
        results[index] = compile_default()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    assert len({r.cubin for r in results}) == 1
    assert entries(cache_dir) == [f"{results[0].key}.cubin"]


def _compile_in_child(cache_root: str, barrier, results) -> None:
    os.environ["FLASHDEC_CACHE_DIR"] = cache_root
    barrier.wait(timeout=120)
    module = compile_default()
    results.put((module.key, hashlib.sha256(module.cubin).hexdigest()))


def test_concurrent_processes_share_one_entry(cache_dir):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    results = context.Queue()
    processes = [context.Process(target=_compile_in_child,
                                 args=(str(cache_dir.parent), barrier, results))
                 for _ in range(4)]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(outcomes)) == 1
    key, digest = outcomes[0]
    assert entries(cache_dir) == [f"{key}.cubin"]
    assert hashlib.sha256(compile_default().cubin).hexdigest() == digest


def test_unwritable_cache_dir_still_compiles_and_warns_once(tmp_path, monkeypatch, nvrtc_calls):
    # Tests run as root, where a chmod'ed directory stays writable; a path under a regular
    # file cannot be created by anyone.
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "file" / "sub"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compile_default()
        second = compile_default(arch="sm_80")
    assert first.cubin.startswith(ELF_MAGIC) and second.cubin.startswith(ELF_MAGIC)
    assert nvrtc_calls["count"] == 2
    cache_warnings = [w for w in caught if issubclass(w.category, RuntimeWarning)
                      and "kernel cache" in str(w.message)]
    assert len(cache_warnings) == 1
    assert cache_warnings[0].filename == __file__


@pytest.mark.parametrize("name", ["/abs/x.cuh", "../up.cuh", ""])
def test_header_names_must_be_relative(name):
    with pytest.raises(ValueError, match="header name"):
        compile_default(headers={name: HEADER})


def test_includes_do_not_reach_the_working_directory(tmp_path, monkeypatch):
    # A header the cache key does not cover must not be found next to the caller.
    (tmp_path / "stray.cuh").write_text("#error stray header\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompilationError) as info:
        compile_cubin('#include "stray.cuh"\n__global__ void k() {}\n', ["k"], "sm_90")
    assert "stray.cuh" in info.value.log and "#error" not in info.value.log
