"""``flashdec.precompile`` without a GPU (explicit arch): every argument checked before any
compile, the cache written or a CacheError, entries readable as the umask allows, the merge and
combine kernels included, progress on stderr."""

from __future__ import annotations

import inspect
import os
import stat

import pytest

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install 'flashdec[cuda]')")

import flashdec  # noqa: E402
from flashdec.backends.cuda import _modules  # noqa: E402
from flashdec import CacheError, ContractError, DType  # noqa: E402
from flashdec.backends.cuda import _compiler  # noqa: E402
from flashdec.backends.cuda._compiler import clear_memory_cache, compile_cubin  # noqa: E402
from flashdec.backends.cuda._kernels import combine_kernel, kernels_for, merge_kernel  # noqa: E402

SMALL = dict(dtypes=["bfloat16"], head_dims=[64], group_sizes=[4], arch="sm_90")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private cache, and no kernels this process compiled before."""
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_modules, "_compiled", {})
    clear_memory_cache()
    yield tmp_path / "cache" / "kernels"
    clear_memory_cache()


@pytest.fixture
def no_compile(monkeypatch):
    """Any compile fails the test: the argument checks must come first."""
    def refuse(name, arch):
        raise AssertionError(f"compiled {name} for {arch} although an argument is bad")
    monkeypatch.setattr(_modules, "compile_kernel", refuse)


def test_signature_is_typed_and_documented() -> None:
    params = inspect.signature(flashdec.precompile).parameters
    assert list(params) == ["dtypes", "head_dims", "group_sizes", "kv_dtypes", "arch", "progress"]
    assert params["dtypes"].default == ("float16", "bfloat16", "float32")
    assert params["kv_dtypes"].default is None and params["arch"].default is None
    assert params["progress"].kind is inspect.Parameter.KEYWORD_ONLY
    assert all(p.annotation is not inspect.Parameter.empty for p in params.values())
    for word in ("CacheError", "ContractError", "merge_states", "Returns"):
        assert word in flashdec.precompile.__doc__


BAD = [
    ("dtypes-str", dict(dtypes="float16"), r"\bdtypes must be a sequence, got str 'float16' "
                                            r"\(write \['float16'\] for one\)"),
    ("dtypes-empty", dict(dtypes=[]), r"\bdtypes is empty: nothing to compile"),
    ("dtypes-float64", dict(dtypes=["float64"]), r"\bdtypes: 'float64' is not one of float16, "
                                                 r"bfloat16, float32"),
    ("dtypes-fp8", dict(dtypes=["float8_e4m3fn"]), r"\bdtypes: 'float8_e4m3fn' is not one of"),
    ("dtypes-object", dict(dtypes=[object()]), r"\bdtypes: <object object"),
    ("head-dims-float", dict(head_dims=[64.0]), r"\bhead_dims: each must be an int in \[1, 256\], "
                                                r"got float 64.0"),
    ("head-dims-zero", dict(head_dims=[0]), r"\bhead_dims: each must be an int in \[1, 256\]"),
    ("head-dims-too-wide", dict(head_dims=[64, 512]), r"\bhead_dims: .*got int 512"),
    ("head-dims-int", dict(head_dims=64), r"\bhead_dims must be a sequence, got int 64"),
    ("group-sizes-zero", dict(group_sizes=[0]), r"\bgroup_sizes: each must be an int >= 1, got "
                                                r"int 0"),
    ("group-sizes-bool", dict(group_sizes=[True]), r"\bgroup_sizes: .*got bool True"),
    ("kv-dtypes-str", dict(kv_dtypes="float8_e4m3fn"), r"\bkv_dtypes must be a sequence"),
    ("kv-dtypes-int32", dict(kv_dtypes=["int32"]), r"\bkv_dtypes: 'int32' is not one of"),
    ("kv-dtypes-no-pair", dict(dtypes=["float32"], kv_dtypes=["float8_e4m3fn"]),
     r"\bkv_dtypes: float8_e4m3fn pairs with none of dtypes \(float32\)"),
    ("kv-dtypes-other-16-bit", dict(dtypes=["bfloat16"], kv_dtypes=["float16"]),
     r"\bkv_dtypes: float16 pairs with none of dtypes \(bfloat16\)"),
    ("arch-three-digits", dict(arch="sm_900"), r"\barch 'sm_900' is not one flashdec compiles "
                                               r"for with NVRTC"),
    ("arch-too-old", dict(arch="sm_75"), r"\barch 'sm_75' is not one flashdec compiles for"),
    ("arch-a-before-90", dict(arch="sm_80a"), r"\barch 'sm_80a'"),
    ("arch-no-underscore", dict(arch="sm90"), r"\barch must look like 'sm_90' or 'sm_90a', got "
                                              r"str 'sm90'"),
    ("arch-int", dict(arch=90), r"\barch must look like 'sm_90' or 'sm_90a', got int 90"),
]


@pytest.mark.parametrize("over, match", [pytest.param(o, m, id=i) for i, o, m in BAD])
def test_bad_arguments_are_refused_before_any_compile(no_compile, cache, over, match) -> None:
    with pytest.raises(ContractError, match=match):
        flashdec.precompile(**(SMALL | over))
    assert not cache.exists() or not os.listdir(cache)


def test_unwritable_cache_is_an_error_before_any_compile(no_compile, tmp_path, monkeypatch) -> None:
    # Tests may run as root, for whom a chmod'ed directory stays writable: a path under a
    # regular file cannot be created by anyone.
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(CacheError, match=r"precompile cannot write the kernel cache in .*file/sub"
                                         r"/kernels .*set FLASHDEC_CACHE_DIR"):
        flashdec.precompile(**SMALL)


def test_an_entry_that_cannot_be_stored_is_an_error(cache, monkeypatch) -> None:
    """The directory was writable when checked, but an entry did not land there (disk full,
    a racing cleanup): precompile fails instead of counting a kernel that is not cached."""
    monkeypatch.setattr(_compiler, "_store", lambda directory, module: None)
    with pytest.raises(CacheError, match=r"precompile could not write .*\.cubin"):
        flashdec.precompile(**SMALL)


def test_fills_the_cache_with_every_kernel_readable_as_the_umask_allows(cache, capsys) -> None:
    expected = {merge_kernel(DType.bfloat16), combine_kernel(DType.bfloat16, 64)}
    expected |= {s.name_expression for s in kernels_for(DType.bfloat16, DType.bfloat16, 64, 4)}
    old = os.umask(0o022)
    try:
        count = flashdec.precompile(**SMALL, progress=True)
    finally:
        os.umask(old)
    # MMA + CUDA-core (paged, page size not a multiple of 16) + element-wise decode, combine,
    # merge_states
    assert count == len(expected) == 5
    files = sorted(cache.glob("*.cubin"))
    assert len(files) == count
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # was 0600 whatever the umask
    err = capsys.readouterr().err.splitlines()
    assert len(err) == count
    for i, name in enumerate(sorted(expected), 1):
        assert err[i - 1].startswith(f"flashdec precompile: [{i}/{count}] {name} for sm_90 (")
    # a second run finds them all in the cache, and says nothing without progress=True
    assert flashdec.precompile(**SMALL) == count
    assert capsys.readouterr().err == ""


def test_kernels_compiled_before_the_cache_moved_are_written_to_the_new_one(
        cache, tmp_path, monkeypatch) -> None:
    assert flashdec.precompile(**SMALL) == 5
    moved = tmp_path / "moved"
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(moved))
    assert flashdec.precompile(**SMALL) == 5  # from this process's memory, stored anew
    assert sorted(p.name for p in (moved / "kernels").glob("*.cubin")) == \
        sorted(p.name for p in cache.glob("*.cubin"))


def test_fp8_pairs_skip_float32_and_merge_kernels_cover_every_dtype(monkeypatch) -> None:
    compiled = []

    class Module:
        def __init__(self, name):
            self.key = str(len(compiled))

    def record(name, arch):
        compiled.append(name)
        return Module(name)

    monkeypatch.setattr(_modules, "compile_kernel", record)
    monkeypatch.setattr(_compiler, "_store",
                        lambda directory, module: (directory / f"{module.key}.cubin").touch())
    count = flashdec.precompile(dtypes=["float16", "float32"], kv_dtypes=["float8_e5m2"],
                                head_dims=[128], group_sizes=[8], arch="sm_90a")
    assert count == len(compiled) == len(set(compiled))
    assert merge_kernel(DType.float32) in compiled  # merge_states of float32 outputs
    assert combine_kernel(DType.float16, 128) in compiled
    assert combine_kernel(DType.float32, 128) not in compiled  # no float32 decode with fp8
    decode = {s.name_expression for s in kernels_for(DType.float16, DType.float8_e5m2, 128, 8)}
    assert decode <= set(compiled)
    assert not [n for n in compiled if "_kernel<float," in n and "decode" in n]


def test_cache_entries_follow_the_umask(cache) -> None:
    old = os.umask(0o027)
    try:
        module = compile_cubin("__global__ void k() {}\n", ["k"], "sm_90")
    finally:
        os.umask(old)
    entry = cache / f"{module.key}.cubin"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o640
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]
