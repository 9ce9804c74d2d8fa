"""The compare report (terminal table and report.md), rendered from the compare summary alone.
A package's views (summary table, report.md) are edgec.core.report's: torch-free, for the device too."""
from __future__ import annotations

from edgec.core.report import count as _count
from edgec.core.report import mb as _mb
from edgec.core.report import _md_table


def compare_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The compare table: one row per recipe, columns a team decides with."""
    eps = summary["providers"]
    metrics = {(r.get("quality") or {}).get("metric") for r in summary["recipes"] if not r.get("error")}
    named = metrics == {"accuracy"}   # a labelled classifier: the figure needs no name
    header = ["recipe", "params", "FLOPs", "size", "ratio", "accuracy" if named else "quality",
              "Δ acc" if named else "Δ points"] + \
             [f"p50 {ep}" for ep in eps] + [f"p90 {ep}" for ep in eps] + [f"speed-up {ep}" for ep in eps] + ["time"]
    rows = []
    for r in summary["recipes"]:
        if r.get("error"):
            rows.append([r["recipe"], f"failed: {r['error'][:80]}"] + [""] * (len(header) - 2))
            continue
        lat = r.get("latency") or {}
        quality, change = _quality_cells(r, named)
        rows.append([r["recipe"], _count(r.get("params")), _count(r.get("flops")), _mb(r["bytes"]),
                     f"{r.get('compression_ratio', 1.0):.2f}x", quality, change]
                    + [f"{lat[ep]['p50_ms']:.3f} ms" if ep in lat else "-" for ep in eps]
                    + [f"{lat[ep]['p90_ms']:.3f} ms" if ep in lat else "-" for ep in eps]
                    + [f"{lat[ep]['speedup']:.2f}x" if ep in lat and lat[ep].get("speedup") else "-" for ep in eps]
                    + [f"{r.get('seconds', 0):.0f} s"])
    return header, rows


def _quality_cells(r: dict, named: bool) -> tuple[str, str]:
    """The headline output's task figure (`quality` of edgec.stages.Score) and its change in
    points; without any task figure, the worst SQNR against FP32 (never a made-up agreement)."""
    q = r.get("quality")
    if q:
        what = "" if named else f" {q['metric']}" + (f" ({q['output']})" if q.get("output") else "")
        return f"{q['value']:.2f}%{what}", f"{-q['drop_points']:+.2f}"
    sqnr = (r.get("agreement") or {}).get("min_sqnr_db")
    return ("identical" if sqnr is None and r.get("recipe") == "fp32" else
            f"SQNR {sqnr:.1f} dB" if sqnr is not None else "-"), "-"


def print_compare(summary: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    header, rows = compare_rows(summary)
    table = Table(title="edgec compare")
    for col in header:
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(file=file, width=160)
    console.print(table)
    rec = summary.get("recommendation") or {}
    console.print(f"recommended: [bold]{rec.get('recipe') or 'none'}[/bold] — {rec.get('reason', '')}")
    for recipe, why in (rec.get("rejected") or {}).items():
        console.print(f"  {recipe}: {'; '.join(why)}")


def render_compare_markdown(summary: dict) -> str:
    header, rows = compare_rows(summary)
    rec = summary.get("recommendation") or {}
    out = ["# edgec compare", "",
           f"Model `{summary['model']['path']}`; evaluated on {summary['eval']['source']} "
           f"({summary['eval']['samples']} samples); latency on {', '.join(summary['providers'])}, all recipes "
           "interleaved in one run.", "", _md_table(header, rows), "",
           f"**Recommended: {rec.get('recipe') or 'none'}** — {rec.get('reason', '')}", ""]
    for recipe, why in (rec.get("rejected") or {}).items():
        out.append(f"- {recipe}: {'; '.join(why)}")
    out.append("")
    out += [f"![{p}]({p})" for p in summary.get("plots", [])]
    return "\n".join(out) + "\n"
