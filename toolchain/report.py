"""The compare report (terminal table and report.md), rendered from the compare summary alone.
A package's views (summary table, report.md) are edgec.core.report's: torch-free, for the device too."""
from __future__ import annotations

from edgec.core.report import count as _count
from edgec.core.report import mb as _mb
from edgec.core.report import _md_table


def compare_rows(summary) -> tuple[list[str], list[list[str]]]:
    """The compare table of an edgec.compare.CompareSummary: one row per recipe, columns a team decides with."""
    eps = summary.providers
    named = {r.quality.metric if r.quality else None for r in summary.recipes if not r.error} == {"accuracy"}
    header = ["recipe", "params", "FLOPs", "size", "ratio", "accuracy" if named else "quality",
              "Δ acc" if named else "Δ points"] + \
             [f"p50 {ep}" for ep in eps] + [f"p90 {ep}" for ep in eps] + [f"speed-up {ep}" for ep in eps] + ["time"]
    rows = []
    for r in summary.recipes:
        if r.error:
            rows.append([r.recipe, f"failed: {r.error[:80]}"] + [""] * (len(header) - 2))
            continue
        quality, change = _quality_cells(r, named)
        ratio = r.compression_ratio if r.compression_ratio is not None else 1.0
        lat = r.latency
        rows.append([r.recipe, _count(r.params), _count(r.flops), _mb(r.bytes), f"{ratio:.2f}x", quality, change]
                    + [f"{lat[ep].p50_ms:.3f} ms" if ep in lat else "-" for ep in eps]
                    + [f"{lat[ep].p90_ms:.3f} ms" if ep in lat else "-" for ep in eps]
                    + [f"{lat[ep].speedup:.2f}x" if ep in lat and lat[ep].speedup else "-" for ep in eps]
                    + [f"{r.seconds:.0f} s"])
    return header, rows


def _quality_cells(r, named: bool) -> tuple[str, str]:
    """The headline output's task figure (`quality` of edgec.stages.Score) and its change in points; without any
    task figure, the worst SQNR against FP32 (never a made-up agreement)."""
    q = r.quality
    if q:
        what = "" if named else f" {q.metric}" + (f" ({q.output})" if q.output else "")
        return f"{q.value:.2f}%{what}", f"{-q.drop_points:+.2f}"
    sqnr = r.agreement.min_sqnr_db if r.agreement else None
    return ("identical" if sqnr is None and r.recipe == "fp32" else
            f"SQNR {sqnr:.1f} dB" if sqnr is not None else "-"), "-"


def _rejected(summary) -> list[str]:
    return [f"{recipe}: {'; '.join(why)}" for recipe, why in summary.recommendation.rejected.items()]


def print_compare(summary, file=None) -> None:
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
    rec = summary.recommendation
    console.print(f"recommended: [bold]{rec.recipe or 'none'}[/bold] — {rec.reason}")
    for line in _rejected(summary):
        console.print(f"  {line}")


def render_compare_markdown(summary) -> str:
    header, rows = compare_rows(summary)
    rec = summary.recommendation
    out = ["# edgec compare", "",
           f"Model `{summary.model.path}`; evaluated on {summary.eval.source} ({summary.eval.samples} samples); "
           f"latency on {', '.join(summary.providers)}, all recipes interleaved in one run.", "",
           _md_table(header, rows), "", f"**Recommended: {rec.recipe or 'none'}** — {rec.reason}", ""]
    out += [f"- {line}" for line in _rejected(summary)]
    out.append("")
    out += [f"![{p}]({p})" for p in summary.plots]
    return "\n".join(out) + "\n"
