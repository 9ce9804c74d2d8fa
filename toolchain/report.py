"""The compare report (terminal table and report.md), rendered from the compare summary alone.
A package's views (summary table, report.md) are edgec.core.report's: torch-free, for the device too."""
from __future__ import annotations

from edgec.core.report import count as _count
from edgec.core.report import mb as _mb
from edgec.core.report import _md_table


def compare_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The compare table: one row per recipe, columns a team decides with."""
    eps = summary["providers"]
    header = ["recipe", "params", "FLOPs", "size", "ratio", "accuracy", "Δ acc"] + \
             [f"p50 {ep}" for ep in eps] + [f"p90 {ep}" for ep in eps] + [f"speed-up {ep}" for ep in eps] + ["time"]
    rows = []
    for r in summary["recipes"]:
        if r.get("error"):
            rows.append([r["recipe"], f"failed: {r['error'][:80]}"] + [""] * (len(header) - 2))
            continue
        lat = r.get("latency") or {}
        acc = r.get("accuracy")
        quality = f"{acc:.2f}%" if acc is not None else \
            f"{(r.get('agreement') or {}).get('top1_agreement', 100.0):.2f}% agree"
        change = f"{r['accuracy_change']:+.2f}" if r.get("accuracy_change") is not None else "-"
        rows.append([r["recipe"], _count(r.get("params")), _count(r.get("flops")), _mb(r["bytes"]),
                     f"{r.get('compression_ratio', 1.0):.2f}x", quality, change]
                    + [f"{lat[ep]['p50_ms']:.3f} ms" if ep in lat else "-" for ep in eps]
                    + [f"{lat[ep]['p90_ms']:.3f} ms" if ep in lat else "-" for ep in eps]
                    + [f"{lat[ep]['speedup']:.2f}x" if ep in lat and lat[ep].get("speedup") else "-" for ep in eps]
                    + [f"{r.get('seconds', 0):.0f} s"])
    return header, rows


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
