"""A result shown: the stdout table (:func:`format_table`) and the PNG of % of copy bandwidth
against KV size (:func:`plot`, which needs matplotlib: :func:`require_matplotlib`). Both read
only the results document, so they run without a GPU."""

from __future__ import annotations

from .checks import GEOMEAN_VS_SDPA, summarize, targets
from .compare import head_dim_orphans, impl_us, speedup
from .host import host_overhead_text
from .paged import paged_text
from .peers import FP8_NA, IMPLS, LABELS
from .rows import Shape
from .timing import ITERS


def us_text(cell: dict | None) -> str:
    """A cell's median us as the table shows it (``n/a`` when it has none)."""
    if not cell or cell.get("us") is None:
        return "n/a"
    us = cell["us"]
    return f"{us:.1f}" if us < 1000 else f"{us:.0f}"


def _ratio(value: float | None) -> str:
    """A speedup or ratio as ``1.23x`` (``-`` when there is none)."""
    return "-" if value is None else f"{value:.2f}x"


def format_table(result: dict) -> str:
    """The stdout report: a Markdown table (one line per row, ``eager / graph`` us per
    implementation, flashdec's graph TB/s and % of copy (= % of the floor), best peer's time
    over flashdec's per mode), the n/a reasons, host overhead, twin ratios, the
    geometric-mean speedups and, last, the checks of :func:`targets` that missed."""
    env = result.get("environment", {})
    copy_tbps = result["copy"]["tbps"]
    impls = result.get("config", {}).get("impls") or list(IMPLS)
    iters = result.get("config", {}).get("iters", ITERS)
    lines = [f"# flashdec bench: {env.get('device', '?')}, driver {env.get('driver', '?')}, "
             f"torch {env.get('torch', '?')}, NVRTC {env.get('nvrtc', '?')}; copy bandwidth "
             f"{copy_tbps:.2f} TB/s (read + write)",
             f"# us per call, eager / graph (median of {iters}, cold L2); TB/s and % copy: "
             "flashdec, graph (% copy = % of the floor: floor us / us); ragged: K = capacity, "
             "lengths 0..K (mean K/2); best peer / flashdec > 1: flashdec faster", ""]
    head = ["#", "B,H_q,H_kv,K,D", "dtype", "KV MB", "floor us"] + [LABELS.get(i, i) for i in impls]
    head += ["TB/s", "% copy", "best peer / flashdec (graph / eager)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    na: dict[tuple[str, str], list[int]] = {}
    for n, row in enumerate(result["rows"], 1):
        s = row["shape"]
        dims = f"{s['batch']},{s['heads']},{s['kv_heads']},{s['kv_len']},{s['head_dim']}"
        cells = [str(n), dims, Shape.variant_of(s["dtype"], s["kv_dtype"], s["ragged"]),
                 f"{row['kv_bytes'] / 1e6:.{1 if row['kv_bytes'] >= 1e6 else 3}f}",
                 "-" if row.get("floor_us") is None else f"{row['floor_us']:.1f}"]
        for name in impls:
            res = row["impls"].get(name)
            if not res:
                cells.append("-")
                continue
            e, g = res.get("eager") or {}, res.get("graph") or {}
            for cell in (e, g):
                if cell.get("na"):
                    na.setdefault((name, cell["na"]), [])
                    if n not in na[(name, cell["na"])]:
                        na[(name, cell["na"])].append(n)
            if e.get("na") and e.get("na") == g.get("na"):
                cells.append("n/a (fp8)" if e["na"] == FP8_NA else "n/a")
            else:
                cells.append(f"{us_text(e)} / {us_text(g)}")
        g = (row["impls"].get("flashdec") or {}).get("graph") or {}
        cells += ["-" if g.get("tbps") is None else f"{g['tbps']:.2f}",
                  "-" if g.get("pct_copy") is None else f"{g['pct_copy']:.0f}%",
                  f"{_ratio(speedup(row, 'graph'))} / {_ratio(speedup(row, 'eager'))}"]
        lines.append("| " + " | ".join(cells) + " |")
    if na:
        lines += ["", "n/a:"]
        for (name, reason), rows in sorted(na.items()):
            lines.append(f"  {name} ({_rows(rows)}): {reason}")
    notes = sorted({(n, r["note"]) for row in result["rows"] for n, r in row["impls"].items()
                    if r.get("note")})
    notes = [f"  {name}: {note}" for name, note in notes]
    cold = [n for n, row in enumerate(result["rows"], 1) if not row.get("cold_l2", True)]
    if cold:
        notes.append(f"  {_rows(cold)}: rotation capped, working set < 4x L2 (warm L2)")
    if notes:
        lines += ["", "notes:"] + notes
    lines += ["", "Host overhead: " + host_overhead_text(result.get("host_overhead"))]
    lines += paged_text(result.get("paged"))
    summary = result.get("summary") or summarize(result)
    if summary["twins"]:
        lines += ["", "Twins (flashdec, graph): time ratio, % copy ratio"]
        for t in summary["twins"]:
            lines.append(f"  {t['what']}: {t['row']} / {t['twin']}: {t['time_ratio']:.3f}x time, "
                         f"{_ratio(t['pct_copy_ratio'])} % copy")
    orphans = head_dim_orphans(result)
    if orphans:
        lines += ["", f"No D=128 twin at the same KV bytes in this run: {_rows(orphans)}"]
    lines.append("")
    for key, label in (("vs_best_sdpa", "the best SDPA backend"),
                       ("vs_best_peer", "the best peer (SDPA, Triton, FlexDecoding)")):
        g, e = summary[key]["graph"], summary[key]["eager"]
        want = (f"; targets graph >= {GEOMEAN_VS_SDPA['graph']:.2f}x, eager >= "
                f"{GEOMEAN_VS_SDPA['eager']:.2f}x" if key == "vs_best_sdpa" else "")
        lines.append(f"Geometric-mean speedup of flashdec over {label}: graph "
                     f"{_ratio(g['geomean'])} ({g['rows']} rows, min {_ratio(g['min'])}), eager "
                     f"{_ratio(e['geomean'])} ({e['rows']} rows, min {_ratio(e['min'])}){want}")
    # Recomputed (not read from the summary) so an older JSON gets the current targets.
    checks = targets(result)
    misses = [c for c in checks if not c["ok"]]
    lines += ["", f"Rows that miss a target: {len(misses)} of {len(checks)} checks"
              + ("" if misses else ", none missed")]
    for c in misses:
        where = "all rows" if c["n"] is None else f"row {c['n']} ({c['row']})"
        lines.append(f"  {where}: {c['target']}: measured {c['shown']}")
    return "\n".join(lines)


def _rows(ns: list[int]) -> str:
    """``row 3`` or ``rows 1-4,7``: 1-based row numbers for the notes."""
    return ("row " if len(ns) == 1 else "rows ") + _ranges(ns)


def _ranges(ns: list[int]) -> str:
    ns, parts, i = sorted(ns), [], 0
    while i < len(ns):
        j = i
        while j + 1 < len(ns) and ns[j + 1] == ns[j] + 1:
            j += 1
        parts.append(str(ns[i]) if i == j else f"{ns[i]}-{ns[j]}")
        i = j + 1
    return ",".join(parts)


class MissingMatplotlib(RuntimeError):
    """--png without matplotlib."""


def require_matplotlib() -> None:
    """Raise :class:`MissingMatplotlib` with the install command when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingMatplotlib(
            f"--png needs matplotlib ({exc}); pip install matplotlib "
            "(or pip install -e \".[bench]\")") from None


def plot(result: dict, path: str, mode: str = "graph") -> None:
    """PNG of % of copy bandwidth vs KV size (MB, log x) per implementation, in ``mode``.

    Uses matplotlib's object API (Agg canvas): no display, no pyplot state.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    impls = result.get("config", {}).get("impls") or list(IMPLS)
    copy_bps = result["copy"]["bps"]
    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = dict(zip(IMPLS, "o^sPDv"))
    plotted = False
    for name in impls:
        points = []
        for row in result["rows"]:
            us = impl_us(row, name, mode)
            if us:
                points.append((row["kv_bytes"] / 1e6, 100 * row["bytes"] / (us * 1e-6) / copy_bps))
        if points:
            points.sort()
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=markers.get(name, "x"), linestyle="none", markersize=6,
                    alpha=0.85, label=LABELS.get(name, name), zorder=3 if name == "flashdec" else 2)
            plotted = True
    ax.set_xscale("log")
    xs_all = [row["kv_bytes"] / 1e6 for row in result["rows"]]
    if xs_all:
        lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
        ax.set_xlim(lo, hi)
        ticks = [m * 10**e for e in range(-3, 6) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("KV cache read (MB, log scale)")
    ax.set_ylabel("% of device copy bandwidth")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    env = result.get("environment", {})
    ax.set_title(f"flashdec decode, {mode} mode, cold L2: {env.get('device', '?')}, copy "
                 f"{result['copy']['tbps']:.2f} TB/s", fontsize=10)
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
