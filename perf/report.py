"""Charts (one PNG per bench) and an HTML summary page for a ``scripts/bench`` run.

The PNGs are drawn with matplotlib's Agg backend (no display needed). Each bench's chart has
one panel per unit: its gated ratios in the first, each absolute figure group after; a bar is
the median over the repeats, dots are the repeats. With a baseline the ratio panel shows each
figure as now / baseline around 1, its band in grey and its verdict in colour (red:
regressed, green: better, grey: too noisy to judge). The HTML page is static
and self-contained apart from the PNGs beside it: machine fingerprint, the comparison table
when there was one, then per bench its figures, its chart and its logs.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

from compare import MAX_BAND, Comparison, FigureSeries, verdict

if TYPE_CHECKING:  # matplotlib is imported only when a chart is drawn
    from matplotlib.axes import Axes

Figures = dict[str, dict[str, FigureSeries]]


class ChartsUnavailable(RuntimeError):
    """matplotlib is not installed (``scripts/bench`` installs it with the bench extras)."""


def chart_path(out_json: Path, bench: str) -> Path:
    """Where the PNG of ``bench`` goes, beside the run's JSON."""
    return out_json.with_name(f"{out_json.stem}.{bench}.png")


def html_path(out_json: Path) -> Path:
    """Where the HTML summary goes, beside the run's JSON."""
    return out_json.with_suffix(".html")


def _groups(named: dict[str, FigureSeries]) -> list[tuple[str, list[tuple[str, FigureSeries]]]]:
    ratios = [(n, s) for n, s in named.items() if s.gated]
    by_unit: dict[str, list[tuple[str, FigureSeries]]] = {}
    for n, s in named.items():
        if not s.gated:
            by_unit.setdefault(s.unit, []).append((n, s))
    out = [("ratio", ratios)] if ratios else []
    return out + [(unit, items) for unit, items in by_unit.items()]


_COLOURS = {"REGRESSED": "#d62728", "better": "#2ca02c", "ok": "#4c78a8", "noisy": "#999999"}


def _against_baseline(ax: Axes, items: list[tuple[str, FigureSeries]],
                      baseline: dict[str, FigureSeries], k: float) -> None:
    """Each gated figure as now / baseline: 1 is the baseline, grey its band."""
    for y, (name, s) in enumerate(items):
        base = baseline.get(name)
        if base is None or not base.gated or not base.median:
            ax.text(1.0, y, "new: no baseline", fontsize=7, va="center")
            continue
        band = max(k * base.spread, base.floor)
        rel = s.median / base.median
        colour = _COLOURS["noisy" if band > MAX_BAND else verdict(base.median, s.median, band)]
        ax.fill_betweenx([y - 0.35, y + 0.35], 1 - band, 1 + band, color="grey", alpha=0.3)
        ax.plot([v / base.median for v in s.values], [y] * len(s.values), "o",
                color=colour, alpha=0.5, markersize=4)
        ax.plot([rel], [y], "D", color=colour, markersize=8)
        ax.annotate(f"{base.median:.3g}x -> {s.median:.3g}x ({rel - 1:+.1%})", (rel, y),
                    xytext=(8, -3), textcoords="offset points", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_title(f"gated ratios, now / baseline (grey: band = max({k:g} x spread, floor))",
                 fontsize=9, loc="left")


def _bars(ax: Axes, items: list[tuple[str, FigureSeries]], title: str, log: bool) -> None:
    ys = range(len(items))
    ax.barh(list(ys), [s.median for _, s in items], color="#4c78a8", height=0.6)
    for y, (_, s) in zip(ys, items):
        ax.plot(s.values, [y] * len(s.values), "o", color="#f58518", markersize=4)
        ax.annotate(f"{s.median:,.3g}", (s.median, y), xytext=(4, -3),
                    textcoords="offset points", fontsize=7)
    if log:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9, loc="left")


def write_chart(bench: str, named: dict[str, FigureSeries], path: Path,
                baseline: dict[str, FigureSeries] | None, k: float) -> None:
    """Draw one bench's figures to ``path`` (PNG).

    Raises:
        ChartsUnavailable: matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ChartsUnavailable("charts need matplotlib: scripts/bench installs it "
                                "(pip install -e '.[bench]')") from exc
    matplotlib.use("Agg")  # files only: never look for a display
    from matplotlib import pyplot as plt

    groups = _groups(named)
    if not groups:
        return
    heights = [max(1.2, 0.45 * len(items) + 0.8) for _, items in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (unit, items) in zip(axes[:, 0], groups):
        if unit == "ratio" and baseline:
            _against_baseline(ax, items, baseline, k)
        elif unit == "ratio":
            _bars(ax, items, "gated ratios vs the rival (x, log scale), higher is better",
                  log=True)
        else:
            _bars(ax, items, f"{unit} (recorded, not compared)", log=False)
        ax.set_yticks(range(len(items)), [n for n, _ in items], fontsize=8)
        ax.set_ylim(len(items) - 0.5, -0.5)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"perf/{bench}_bench.py", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;font-size:90%;text-align:right}"
        "td:first-child,td:nth-child(2),th{text-align:left}"
        ".REGRESSED,.MISSING{background:#fdd}.better{background:#dfd}.noisy{color:#888}"
        "code{background:#f4f4f4}")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.3f}" if abs(x) < 1000 else f"{x:,.0f}"


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "\n".join(out + ["</table>"])


def write_html(path: Path, run: dict[str, object], figures: Figures,
               comparison: Comparison | None, charts: dict[str, Path],
               logs: dict[str, list[Path]]) -> None:
    """Write the summary page of a run to ``path``.

    Args:
        path: the HTML file (PNGs and logs are linked relative to its folder).
        run: the run file's JSON (mode, repeat, fingerprint, benches).
        figures: the run's figures by bench.
        comparison: the result of ``--compare``, if any.
        charts: bench -> PNG written.
        logs: bench -> log files of its runs.
    """
    e = html.escape
    here = path.parent

    def rel(p: Path) -> str:
        return e(os.path.relpath(p, here))

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>fluxrig bench {e(str(run.get('mode')))}</title><style>",
        _CSS,
        "</style></head><body>",
        (f"<h1>fluxrig benchmarks — {e(str(run.get('mode')))} mode, "
         f"{e(str(run.get('repeat')))} repeat(s)</h1>"),
    ]
    if run.get("injected"):
        parts.append(f"<p><b>Slowdown injected: <code>{e(str(run['injected']))}</code></b> "
                     f"(FLUXRIG_BENCH_INJECT)</p>")
    fp = run.get("fingerprint")
    if isinstance(fp, dict):
        rows = [[e(k), e(str(v))] for k, v in fp.items() if k != "packages"]
        pk = fp.get("packages")
        if isinstance(pk, dict):
            rows.append(["packages", e(", ".join(f"{n} {v}" for n, v in pk.items() if v))])
        parts += ["<h2>Machine</h2>", _table(["field", "value"], rows)]
    if comparison is not None:
        verdict = "FAIL" if comparison.failed else "PASS"
        parts.append(f"<h2>Compared with {e(str(run.get('baseline_file')))}: {verdict}</h2>")
        rows = [[e(r.bench), e(r.figure), _fmt(r.baseline), _fmt(r.now),
                 f"{r.change:+.1%}" if r.change is not None else "-",
                 f"±{r.band:.1%}" if r.band is not None else "-", str(r.baseline_runs),
                 e(r.verdict)] for r in comparison.rows]
        parts.append(_table(["bench", "figure", "baseline", "now", "change", "band", "runs",
                             "verdict"], rows, [r.verdict for r in comparison.rows]))
        parts += [f"<p>note: {e(n)}</p>" for n in comparison.notes]
    benches = run.get("benches")
    for bench in sorted(set(figures) | set(benches if isinstance(benches, dict) else ())):
        parts.append(f"<h2 id='{e(bench)}'>{e(bench)}</h2>")
        info = benches.get(bench) if isinstance(benches, dict) else None
        if isinstance(info, dict):
            runs = info.get("runs") or []
            parts.append("<p>" + e(f"perf/{bench}_bench.py {' '.join(info.get('args') or [])}")
                         + " — " + e(", ".join(
                             f"run {i + 1}: exit {r.get('exit')}, {r.get('seconds', 0):.0f} s"
                             + (f", error: {r['error']}" if r.get("error") else "")
                             for i, r in enumerate(runs) if isinstance(r, dict))) + "</p>")
        named = figures.get(bench, {})
        rows = [[e(n), e(s.what), _fmt(s.median), e(s.unit),
                 e(", ".join(_fmt(v) for v in s.values)),
                 f"{s.spread:.1%}" if len(s.values) > 1 else "-", "yes" if s.gated else ""]
                for n, s in named.items()]
        if rows:
            parts.append(_table(["figure", "what", "median", "unit", "values", "spread",
                                 "gated"], rows))
        if bench in charts:
            parts.append(f"<img src='{rel(charts[bench])}' alt='{e(bench)} chart'>")
        if logs.get(bench):
            parts.append("<p>logs: " + ", ".join(f"<a href='{rel(p)}'>{e(p.name)}</a>"
                                                 for p in logs[bench]) + "</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n")
