"""``python -m flashdec info`` and ``python -m flashdec demo`` on a CPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flashdec
from flashdec.__main__ import main

SRC = Path(__file__).resolve().parents[1] / "src"
ERR_RE = re.compile(r"max \|error\| vs float64 reference: (\S+) \(max \|ref\| (\S+)\)")


def _run_module(*args: str, env_extra: dict[str, str] | None = None,
                drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "flashdec", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHDEC_BACKEND", raising=False)
    monkeypatch.setenv("FLASHDEC_CACHE_DIR", str(tmp_path / "fd-cache"))
    return monkeypatch


# -- info -----------------------------------------------------------------------------------------
def test_info(clean_env, capsys, tmp_path) -> None:
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"flashdec {flashdec.__version__}" in text
    lines = text.splitlines()
    for name, (ok, _why) in flashdec.available_backends().items():
        row = [line for line in lines if re.match(rf"\s+{name}\s", line)]
        assert len(row) == 1, f"backend {name} not listed once:\n{text}"
        assert ("unavailable" not in row[0]) == ok
        assert "available" in row[0]
    assert re.search(r"^\s+torch\s+available\s*$", text, re.M)
    assert re.search(r"^\s+cuda\s+(available|unavailable: .+)$", text, re.M)
    assert f"cache: {tmp_path / 'fd-cache'}" in text
    assert "backend choice: auto" in text
    assert "devices: cpu" in text


def test_info_shows_env_choice(clean_env, capsys) -> None:
    clean_env.setenv("FLASHDEC_BACKEND", "Torch")
    assert main(["info"]) == 0
    assert "backend choice: torch" in capsys.readouterr().out


def test_info_as_module(tmp_path) -> None:
    cache = tmp_path / "module-cache"
    proc = _run_module("info", env_extra={"FLASHDEC_CACHE_DIR": str(cache)},
                       drop=("FLASHDEC_BACKEND",))
    assert proc.returncode == 0, proc.stderr
    assert f"flashdec {flashdec.__version__}" in proc.stdout
    assert re.search(r"^\s+torch\s+available", proc.stdout, re.M)
    assert re.search(r"^\s+cuda\s+", proc.stdout, re.M)
    assert f"cache: {cache}" in proc.stdout


# -- demo -----------------------------------------------------------------------------------------
def _parse_demo(text: str) -> tuple[str, float, float]:
    backend = re.search(r"^backend: (\S+)$", text, re.M)
    err = ERR_RE.search(text)
    assert backend and err, f"unexpected demo output:\n{text}"
    return backend.group(1), float(err.group(1)), float(err.group(2))


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 2.0**-8), ("float32", 1e-5)])
def test_demo_cpu(clean_env, capsys, dtype, tol) -> None:
    args = ["demo", "--iters", "1"] + ([] if dtype == "bfloat16" else ["--dtype", dtype])
    assert main(args) == 0
    text = capsys.readouterr().out
    backend, err, ref_max = _parse_demo(text)
    import torch
    if torch.cuda.is_available():  # the demo runs on the GPU when there is one
        assert f"{dtype} on cuda" in text and backend in ("cuda", "torch")
    else:
        assert backend == "torch"
        assert f"{dtype} on cpu" in text
    assert ref_max > 0
    assert 0 <= err < tol * ref_max, f"error {err} vs max|ref| {ref_max}"


def test_demo_explicit_torch_backend(clean_env, capsys) -> None:
    clean_env.setenv("FLASHDEC_BACKEND", "nope")  # --backend wins over the environment
    assert main(["demo", "--iters", "1", "--backend", "torch"]) == 0
    backend, err, ref_max = _parse_demo(capsys.readouterr().out)
    assert backend == "torch" and err < 2.0**-8 * ref_max


def test_demo_bad_backend_env_as_module(tmp_path) -> None:
    proc = _run_module("demo", "--iters", "1",
                       env_extra={"FLASHDEC_BACKEND": "nope",
                                  "FLASHDEC_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "nope" in proc.stderr
    assert re.search(r"valid choices: auto, cuda, torch", proc.stderr), proc.stderr


def test_demo_bad_backend_argument(clean_env, capsys) -> None:
    assert main(["demo", "--iters", "1", "--backend", "nope"]) != 0
    err = capsys.readouterr().err
    assert "valid choices: auto, cuda, torch" in err


def test_demo_explicit_cuda_on_cpu_machine_fails_cleanly(clean_env, capsys) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda may run")
    assert main(["demo", "--iters", "1", "--backend", "cuda"]) != 0
    captured = capsys.readouterr()
    assert "error:" in captured.err and "cuda" in captured.err
    assert "backend: torch" not in captured.out  # no silent fallback


def test_no_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code != 0


# -- bench ----------------------------------------------------------------------------------------
def test_bench_without_gpu_fails_cleanly(tmp_path) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run")
    proc = _run_module("bench", "--quick", "--json", str(tmp_path / "r.json"),
                       env_extra={"FLASHDEC_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_bench_help(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--shapes", "--dtype", "--peers", "--json", "--png", "--plot"):
        assert flag in text


# -- issue 11 section 5 ---------------------------------------------------------------------------
@pytest.mark.parametrize("iters", ["0", "-1", "abc", "2.5"])
def test_demo_iters_must_be_positive(clean_env, capsys, iters) -> None:
    """--iters 0 divided by zero; --iters -1 printed a negative time."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--iters", iters])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "argument --iters: expected an int >= 1, got" in captured.err
    assert "time:" not in captured.out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flashdec {flashdec.__version__}"


def test_help_names_the_command_it_was_run_as(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])  # the console script
    text = capsys.readouterr().out
    assert text.startswith("usage: flashdec ") and "python -m" not in text
    assert "`" not in text
    for command in ("info", "demo", "precompile", "bench"):
        assert command in text
    proc = _run_module("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m flashdec ")
    assert "`" not in proc.stdout


def test_info_reports_an_invalid_backend_choice(clean_env, capsys) -> None:
    clean_env.setenv("FLASHDEC_BACKEND", "nope")
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert "backend choice: invalid" in captured.out
    assert re.search(r"^\s+torch\s+available", captured.out, re.M)  # the rest still printed
    assert ("error: FLASHDEC_BACKEND='nope' is not a flashdec backend; valid choices: auto, "
            "cuda, torch") in captured.err


def test_bench_plot_to_an_unwritable_png_fails_cleanly(tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "h100-2026-11-27.json"
    png = tmp_path / "missing-dir" / "r.png"
    proc = _run_module("bench", "--plot", str(results), "--png", str(png),
                       env_extra={"FLASHDEC_CACHE_DIR": str(tmp_path / "c")})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr and "missing-dir" in proc.stderr


# -- precompile -----------------------------------------------------------------------------------
def _needs_nvrtc() -> None:
    pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install 'flashdec[cuda]')")


def test_precompile_command(clean_env, capsys, tmp_path) -> None:
    _needs_nvrtc()
    args = ["precompile", "--dtypes", "bfloat16", "--head-dims", "64", "--group-sizes", "4",
            "--arch", "sm_90"]
    assert main(args) == 0
    captured = capsys.readouterr()
    kernels = tmp_path / "fd-cache" / "kernels"
    # the tensor-core and CUDA-core decode kernels (the latter for paged caches whose page
    # size is not a multiple of 16), the element-wise one, combine, merge_states
    assert captured.out.strip() == f"5 kernels in {kernels}"
    progress = captured.err.splitlines()
    assert [line.split("]")[0] for line in progress] == [f"flashdec precompile: [{i}/5"
                                                         for i in range(1, 6)]
    assert len(list(kernels.glob("*.cubin"))) == 5


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float64"], "error: dtypes: 'float64' is not one of float16, bfloat16, float32"),
    (["--group-sizes", "0"], "error: group_sizes: each must be an int >= 1, got int 0"),
    (["--arch", "sm_900"], "error: arch 'sm_900' is not one flashdec compiles for"),
    (["--dtypes", "float32", "--kv-dtypes", "float8_e4m3fn"],
     "error: kv_dtypes: float8_e4m3fn pairs with none of dtypes (float32)"),
])
def test_precompile_command_refuses_bad_arguments(clean_env, capsys, args, message) -> None:
    _needs_nvrtc()
    assert main(["precompile", "--arch", "sm_90", *args]) == 2
    assert message in capsys.readouterr().err


def test_precompile_command_head_dims_are_ints(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["precompile", "--head-dims", "64.0"])
    assert info.value.code == 2
    assert "argument --head-dims: invalid int value: '64.0'" in capsys.readouterr().err


def test_precompile_command_fails_when_the_cache_cannot_be_written(tmp_path) -> None:
    _needs_nvrtc()
    (tmp_path / "file").write_text("not a directory")
    proc = _run_module("precompile", "--dtypes", "bfloat16", "--head-dims", "64", "--arch", "sm_90",
                       env_extra={"FLASHDEC_CACHE_DIR": str(tmp_path / "file" / "sub")})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error: precompile cannot write the kernel cache in" in proc.stderr
    assert "flashdec precompile: [" not in proc.stderr  # nothing compiled


def test_precompile_command_without_the_cuda_backend(clean_env, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flashdec.backends.cuda", None)  # import fails
    assert main(["precompile", "--arch", "sm_90"]) == 2
    assert "error: precompile needs the cuda backend" in capsys.readouterr().err
