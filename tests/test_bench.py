"""The benchmark harness's CPU-testable parts: rows, parsing, n/a handling, summary, table, plot.

The measuring itself needs a GPU (``python -m flashdec bench``); here a fake timer stands in.
"""

from __future__ import annotations

import json
import math

import pytest

from flashdec import bench
from flashdec.bench import Shape, default_shapes, parse_shapes

COPY_BPS = 3.0e12


# -- rows -----------------------------------------------------------------------------------------
def test_parse_shapes_fields_and_aliases() -> None:
    rows = parse_shapes("1,32,8,4096,128; 8,32,8,16384,128,fp16,ragged ;"
                        "1,32,8,32768,128,bf16,fp8;2,4,1,64,64,ragged,float16,e5m2")
    a, b, c, d = rows
    assert (a.batch, a.heads, a.kv_heads, a.kv_len, a.head_dim) == (1, 32, 8, 4096, 128)
    assert (a.dtype, a.kv_dtype, a.ragged) == ("bfloat16", "bfloat16", False)
    assert (b.dtype, b.kv_dtype, b.ragged) == ("float16", "float16", True)
    assert (c.dtype, c.kv_dtype, c.fp8) == ("bfloat16", "float8_e4m3fn", True)
    assert (d.dtype, d.kv_dtype, d.ragged) == ("float16", "float8_e5m2", True)
    assert a.name == "1,32,8,4096,128 bf16"
    assert c.name == "1,32,8,32768,128 bf16 kv=e4m3"
    assert b.name == "8,32,8,16384,128 fp16 ragged"


def test_parse_shapes_default_dtype() -> None:
    (row,) = parse_shapes("1,8,8,16,64", dtype="float16")
    assert row.dtype == row.kv_dtype == "float16"


@pytest.mark.parametrize("text, words", [
    ("1,32,8,4096", "at least"),
    ("1,32,7,4096,128", "multiple"),
    ("1,32,8,x,128", "integers"),
    ("0,32,8,4096,128", ">= 1"),
    ("1,32,8,4096,128,int8", "unknown dtype"),
    ("1,32,8,4096,128,fp8", "Q dtype"),
    ("1,32,8,4096,128,fp32,fp8", "float16 or bfloat16 Q"),
    ("1,32,8,4096,128,bf16,fp16", "only fp8"),
    ("1,32,8,4096,128,bf16,fp8,fp8", "at most two"),
    (" ; ", "no row"),
])
def test_parse_shapes_errors(text, words) -> None:
    with pytest.raises(ValueError) as info:
        parse_shapes(text)
    assert words in str(info.value)


def test_shape_is_frozen() -> None:
    row = Shape.make(1, 8, 8, 16, 64)
    with pytest.raises(AttributeError):
        row.batch = 2


def test_bytes_use_the_kv_itemsize() -> None:
    bf16 = Shape.make(1, 32, 8, 32768, 128)
    fp8 = Shape.make(1, 32, 8, 32768, 128, kv_dtype="fp8")
    assert bf16.kv_bytes() == 2 * 8 * 32768 * 128 * 2
    assert fp8.kv_bytes() == bf16.kv_bytes() // 2
    assert bf16.io_bytes() == bf16.kv_bytes() + 2 * 32 * 128 * 2
    assert fp8.io_bytes() == fp8.kv_bytes() + 2 * 32 * 128 * 2  # Q and Y stay bf16


@pytest.mark.parametrize("batch", [2, 8, 64, 256])
def test_ragged_lengths_match_the_uniform_twin(batch) -> None:
    ragged = Shape.make(batch, 32, 8, 4096, 128, ragged=True)
    twin = Shape.make(batch, 32, 8, 2048, 128)
    lengths = ragged.seqlens()
    assert len(lengths) == batch and min(lengths) == 0 and max(lengths) == 4096
    assert sorted(lengths) == sorted(set(lengths)) or batch > 4096
    assert abs(sum(lengths) - batch * 2048) <= batch  # same total KV, up to rounding
    assert abs(ragged.kv_bytes() / twin.kv_bytes() - 1) < 1e-3
    assert ragged.alloc_bytes() > twin.alloc_bytes()  # the capacity is twice the mean
    if batch >= 8:  # shuffled: the long ones are not all at the end
        assert lengths != sorted(lengths)
    assert twin.seqlens() is None


def test_default_shapes_cover_the_spec() -> None:
    rows = default_shapes()
    assert 25 <= len(rows) <= 32
    names = [r.name for r in rows]
    assert len(set(names)) == len(names)
    dims = {(r.batch, r.heads, r.kv_heads, r.kv_len, r.head_dim) for r in rows
            if r.dtype == "bfloat16" and not r.fp8 and not r.ragged}
    assert set(bench.DESIGN_SHAPES) <= dims
    assert any(r.dtype == "float16" for r in rows)
    assert any(r.kv_dtype == "float8_e4m3fn" for r in rows)
    assert {64, 128, 256} <= {r.head_dim for r in rows}
    assert max(r.batch for r in rows) == 256
    assert min(r.kv_len for r in rows) == 512 and max(r.kv_len for r in rows) == 131072
    groups = {r.heads // r.kv_heads for r in rows}
    assert {1, 4, 8} <= groups and any(r.kv_heads == 1 for r in rows)  # MHA, GQA, MQA
    by_name = {r.name: r for r in rows}
    for r in rows:
        if r.ragged:  # every ragged row has its uniform twin
            twin = Shape.make(r.batch, r.heads, r.kv_heads, r.kv_len // 2, r.head_dim,
                              r.dtype, r.kv_dtype)
            assert twin.name in by_name
        if r.fp8 or r.dtype == "float16":  # and every fp8 / fp16 row its bf16 twin
            twin = Shape.make(r.batch, r.heads, r.kv_heads, r.kv_len, r.head_dim, "bfloat16",
                              ragged=r.ragged)
            assert twin.name in by_name or r.ragged


def test_quick_and_dtype_override() -> None:
    quick = default_shapes(quick=True)
    assert 4 <= len(quick) <= 8
    assert any(r.fp8 for r in quick) and any(r.ragged for r in quick)
    fp16 = default_shapes("fp16")
    assert all(r.dtype == "float16" for r in fp16)
    assert len({r.name for r in fp16}) == len(fp16)  # the fp16 twins merged with the base rows
    fp32 = default_shapes("float32")
    assert fp32 and not any(r.fp8 for r in fp32)


def test_rotation_sets() -> None:
    l2 = 50 * 2**20
    for touched in (2 * 2**20, 16 * 2**20, 60 * 2**20, 150 * 2**20):
        sets = bench.rotation_sets(touched, touched, l2)
        assert sets >= bench.MIN_SETS and sets * touched >= 4 * l2
    assert bench.rotation_sets(537 * 10**6, 537 * 10**6, l2) == 2
    assert bench.rotation_sets(1000, 1000, l2) == bench.MAX_SETS  # capped (cold_l2 says so)
    assert bench.rotation_sets(3 * 2**30, 3 * 2**30, l2) == 1     # memory cap, at least one


# -- one row with a fake timer on the CPU: n/a handling -------------------------------------------
def _fake_timer(fn, sets, graph, iters):
    for i in range(sets):
        fn(i)
    if graph:
        raise RuntimeError("graph capture needs a GPU\nsecond line")
    return [20.0 + i for i in range(iters)]


@pytest.mark.parametrize("spec", ["2,8,2,64,32", "2,8,2,64,32,bf16,fp8", "4,8,8,64,32,ragged"])
def test_bench_row_never_raises_and_reports_na(spec) -> None:
    (shape,) = parse_shapes(spec)
    impls = ["flashdec", "sdpa-cudnn", "flashdec-torch", "nope"]
    row = bench.bench_row(shape, impls, copy_bps=COPY_BPS, iters=5, device="cpu", sets=2,
                          timer=_fake_timer)
    assert row["name"] == shape.name and row["bytes"] == shape.io_bytes()
    assert list(row["impls"]) == impls
    for name, res in row["impls"].items():
        for mode in bench.MODES:
            cell = res[mode]
            assert (cell["us"] is None) != (cell["na"] is None), (name, mode, cell)
            if cell["na"]:
                assert "\n" not in cell["na"] and len(cell["na"]) <= 240
    assert row["impls"]["nope"]["eager"]["na"].startswith("unknown implementation")
    if shape.fp8:
        assert row["impls"]["sdpa-cudnn"]["eager"]["na"] == bench.FP8_NA
    torch_res = row["impls"]["flashdec-torch"]
    if torch_res["eager"]["us"] is not None:  # the torch backend runs on the CPU
        cell = torch_res["eager"]
        assert cell["us"] == 22.0 and cell["n"] == 5
        assert cell["tbps"] == pytest.approx(shape.io_bytes() / 22e-6 / 1e12)
        assert cell["pct_copy"] == pytest.approx(100 * cell["tbps"] * 1e12 / COPY_BPS)
        assert torch_res["graph"]["na"] == "RuntimeError: graph capture needs a GPU"
    json.dumps(row)  # JSON-ready


def test_make_inputs_cpu() -> None:
    import torch

    shape = Shape.make(4, 8, 2, 32, 16, kv_dtype="fp8", ragged=True)
    inp = bench.make_inputs(shape, 3, device="cpu")
    assert len(inp.q) == len(inp.k) == len(inp.v) == len(inp.out) == 3
    assert inp.k[0].dtype == torch.float8_e4m3fn and inp.q[0].dtype == torch.bfloat16
    assert inp.seqlens.dtype == torch.int32 and inp.seqlens.tolist() == shape.seqlens()
    assert inp.k_scale == inp.v_scale == 1.0
    assert not torch.equal(inp.k[0].float(), inp.k[1].float())  # distinct sets, not zeros
    assert inp.k[0].float().abs().sum() > 0


def test_reason_is_one_short_line() -> None:
    text = bench._reason(RuntimeError("No available kernel. Aborting execution.\nmore"),
                         [type("W", (), {"message": "Flash attention does not support\n"
                                                    "non-null attn_mask."})()])
    assert text == ("RuntimeError: No available kernel. Aborting execution. "
                    "[Flash attention does not support non-null attn_mask.]")
    assert len(bench._reason(ValueError("x" * 1000))) <= 240


# -- summary, table, plot on a fake result --------------------------------------------------------
def _cell(us):
    return {"us": us, "na": None} if us else {"us": None, "na": "RuntimeError: no kernel"}


def _row(spec, times):
    """times: impl -> (eager us, graph us) or a reason string."""
    (shape,) = parse_shapes(spec)
    row = bench.row_info(shape, 2, COPY_BPS)
    for name, t in times.items():
        if isinstance(t, str):
            row["impls"][name] = {"eager": {"us": None, "na": t}, "graph": {"us": None, "na": t},
                                  "compile_s": None, "err": None, "note": None}
        else:
            cells = {}
            for mode, us in zip(bench.MODES, t):
                cells[mode] = _cell(us)
                if us:
                    cells[mode].update(bench._rates(us, row["bytes"], COPY_BPS))
            row["impls"][name] = {**cells, "compile_s": 0.1, "err": 1e-3, "note": None}
    return row


@pytest.fixture
def fake_result():
    rows = [
        _row("1,32,8,4096,128", {"flashdec": (10.0, 8.0), "sdpa-cudnn": (33.3, 13.4),
                                 "sdpa-flash": (38.9, 20.2), "flex": (224.0, 40.0),
                                 "flashdec-torch": (300.0, 250.0)}),
        _row("1,32,8,32768,128", {"flashdec": (50.0, 46.0), "sdpa-cudnn": (69.2, 53.6),
                                  "sdpa-flash": (80.2, None), "flex": (1172.0, 1000.0),
                                  "flashdec-torch": (900.0, 880.0)}),
        _row("1,32,8,32768,128,bf16,fp8", {"flashdec": (30.0, 24.0), "sdpa-cudnn": bench.FP8_NA,
                                           "sdpa-flash": bench.FP8_NA, "flex": bench.FP8_NA,
                                           "flashdec-torch": (700.0, 690.0)}),
        _row("1,32,8,65536,128,ragged", {"flashdec": (52.0, 48.0), "sdpa-cudnn": (120.0, 100.0),
                                         "sdpa-flash": "RuntimeError: No available kernel",
                                         "flex": (900.0, 800.0),
                                         "flashdec-torch": (1800.0, 1700.0)}),
        _row("1,32,8,32768,128,fp16", {"flashdec": "CompilationError: boom",
                                       "sdpa-cudnn": (70.0, 54.0), "sdpa-flash": (80.0, 61.0),
                                       "flex": (1100.0, 1000.0), "flashdec-torch": (900.0, 880.0)}),
    ]
    result = {"schema": bench.SCHEMA,
              "environment": {"device": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
                              "torch": "2.11.0", "nvrtc": "13.0"},
              "config": {"iters": 50, "impls": list(bench.IMPLS)},
              "copy": {"bytes": 2**30, "bps": COPY_BPS, "tbps": COPY_BPS / 1e12},
              "host_overhead": {"problem": {"batch": 1, "heads": 8, "kv_heads": 8, "kv_len": 16,
                                            "head_dim": 64, "dtype": "bfloat16"},
                                "calls": 10000, "us_per_call": {"plan.run": 4.2, "decode": 8.9},
                                "na": {"sdpa": "RuntimeError: x"}},
              "rows": rows}
    result["summary"] = bench.summarize(result)
    return result


def test_geomean() -> None:
    assert bench.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert bench.geomean([]) is None
    assert bench.geomean([None, 3.0]) == pytest.approx(3.0)


def test_speedup_and_summary(fake_result) -> None:
    r0, r1, r2, r3, r4 = fake_result["rows"]
    assert bench.speedup(r0, "graph") == pytest.approx(13.4 / 8.0)
    assert bench.speedup(r0, "eager") == pytest.approx(33.3 / 10.0)
    assert bench.speedup(r1, "graph") == pytest.approx(53.6 / 46.0)  # FA2 graph n/a
    assert bench.speedup(r2, "graph") is None  # only the torch reference backend ran
    assert bench.speedup(r2, "graph", bench.PEERS) == pytest.approx(690.0 / 24.0)
    assert bench.speedup(r2, "graph", bench.SDPA_IMPLS) is None
    assert bench.speedup(r4, "graph") is None  # flashdec n/a
    s = fake_result["summary"]["vs_best_sdpa"]
    want = math.exp((math.log(13.4 / 8) + math.log(53.6 / 46) + math.log(100 / 48)) / 3)
    assert s["graph"]["rows"] == 3 and s["graph"]["geomean"] == pytest.approx(want)
    assert s["graph"]["min"] == pytest.approx(53.6 / 46)
    want = math.exp((math.log(33.3 / 10) + math.log(69.2 / 50) + math.log(120 / 52)) / 3)
    assert s["eager"]["geomean"] == pytest.approx(want)
    assert fake_result["summary"]["vs_best_peer"]["graph"]["rows"] == 3


def test_twins(fake_result) -> None:
    twins = {t["what"]: t for t in fake_result["summary"]["twins"]}
    fp8 = twins["fp8 KV vs bf16"]
    assert fp8["row"] == "1,32,8,32768,128 bf16 kv=e4m3" and fp8["twin"] == "1,32,8,32768,128 bf16"
    assert fp8["time_ratio"] == pytest.approx(24 / 46)
    byte_ratio = fake_result["rows"][2]["bytes"] / fake_result["rows"][1]["bytes"]
    assert fp8["pct_copy_ratio"] == pytest.approx(byte_ratio * 46 / 24)
    ragged = twins["ragged vs uniform"]
    assert ragged["twin"] == "1,32,8,32768,128 bf16"
    assert ragged["time_ratio"] == pytest.approx(48 / 46)
    assert "fp16 vs bf16" not in twins  # flashdec n/a on the fp16 row
    json.dumps(fake_result)


def test_format_table(fake_result) -> None:
    text = bench.format_table(fake_result)
    lines = text.splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "3.00 TB/s" in lines[0]
    table = [ln for ln in lines if ln.startswith("| ") and ln[2].isdigit()]
    assert len(table) == 5
    first = table[0].split(" | ")
    assert "10.0 / 8.0" in first and "33.3 / 13.4" in first
    assert "1.68x / 3.33x" in table[0]  # vs the best peer, graph / eager
    tbps = 1e-12 * fake_result["rows"][0]["bytes"] / 8e-6
    assert f"{tbps:.2f}" in first and f"{100 * tbps / 3:.0f}%" in first
    assert "80.2 / n/a" in table[1]
    assert "n/a (fp8)" in table[2] and table[2].count("n/a (fp8)") == 3
    assert "| n/a |" in table[4]
    assert "fp8 KV cache" in text and "CompilationError: boom" in text
    assert "sdpa-flash (row 4): RuntimeError: No available kernel" in text
    assert "plan.run 4.20 us/call" in text and "decode 8.90 us/call" in text
    assert "sdpa n/a (RuntimeError: x)" in text
    geo = [ln for ln in lines if ln.startswith("Geometric-mean speedup of flashdec over the "
                                               "best SDPA")]
    g = fake_result["summary"]["vs_best_sdpa"]["graph"]["geomean"]
    assert len(geo) == 1 and f"graph {g:.2f}x (3 rows" in geo[0]
    assert "fp8 KV vs bf16" in text and "ragged vs uniform" in text


def test_format_table_without_summary_or_host(fake_result) -> None:
    del fake_result["summary"]
    fake_result["host_overhead"] = None
    text = bench.format_table(fake_result)
    assert "Host overhead: not measured" in text and "Geometric-mean" in text


def test_plot_png_from_json(fake_result, tmp_path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_result))
    png = tmp_path / "out.png"
    assert bench.main(["--plot", str(path), "--png", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_without_matplotlib(fake_result, tmp_path, monkeypatch, capsys) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(bench.MissingMatplotlib, match="pip install matplotlib"):
        bench.plot(fake_result, str(tmp_path / "x.png"))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_result))
    assert bench.main(["--plot", str(path), "--png", str(tmp_path / "x.png")]) == 2
    assert "--png needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_needs_png(tmp_path) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--plot", str(tmp_path / "r.json")])
    assert info.value.code == 2


def test_plot_missing_json(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")
    argv = ["--plot", str(tmp_path / "none.json"), "--png", str(tmp_path / "x.png")]
    assert bench.main(argv) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--shapes", "1,32,7,4096,128"], "multiple"),
    (["--peers", "sdpa-cudnn,nope"], "unknown peer"),
    (["--dtype", "int8"], "unknown dtype"),
])
def test_bad_arguments_are_usage_errors(argv, words, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_no_gpu_exits_cleanly(capsys) -> None:
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the bench would run")
    assert bench.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--plot" in err


def test_run_end_to_end_on_cpu_with_fake_timers(tmp_path, monkeypatch, capsys) -> None:
    """The glue of run(): progress, JSON after every row, summary, table, plot."""
    monkeypatch.setattr(bench, "copy_bandwidth", lambda iters=bench.ITERS: COPY_BPS)
    monkeypatch.setattr(bench, "host_overhead", lambda calls: {
        "problem": {"batch": 1, "heads": 8, "kv_heads": 8, "kv_len": 16, "head_dim": 64,
                    "dtype": "bfloat16"}, "calls": calls, "us_per_call": {"plan.run": 4.0},
        "na": {"decode": "BackendUnavailableError: no GPU"}})
    def timer(fn, sets, graph, iters):
        fn(sets - 1)
        return [31.0 if graph else 30.0] * iters
    monkeypatch.setattr(bench, "time_samples", timer)
    shapes = parse_shapes("2,8,2,64,32;2,8,2,128,32,ragged;2,8,2,64,32,bf16,fp8")
    path = tmp_path / "r.json"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        result = bench.run(shapes, ["flashdec", "sdpa-cudnn", "flashdec-torch"], iters=3,
                           host_calls=7, json_path=str(path), log=f, device="cpu",
                           argv=["bench", "--shapes", "..."])
    saved = json.loads(path.read_text())
    assert saved["schema"] == bench.SCHEMA and len(saved["rows"]) == 3
    assert saved["copy"]["tbps"] == pytest.approx(3.0)
    assert saved["host_overhead"]["calls"] == 7
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    torch_cell = saved["rows"][0]["impls"]["flashdec-torch"]["graph"]
    assert torch_cell["us"] == 31.0 and torch_cell["n"] == 3
    assert saved["rows"][2]["impls"]["sdpa-cudnn"]["eager"]["na"] == bench.FP8_NA
    progress = log.read_text()
    assert "[ 1/3]" in progress and "[ 3/3]" in progress and "host overhead" in progress
    text = bench.format_table(saved)
    assert "plan.run 4.00 us/call" in text and "decode n/a" in text
