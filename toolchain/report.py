"""Human views of a manifest: the summary table (terminal) and report.md. Rendered from the manifest alone."""
from __future__ import annotations


def _mb(n):
    return f"{n / 1e6:.2f} MB" if n is not None else "-"


def _count(n, unit=""):
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n}{unit}"


def _quality(m):
    if m.get("accuracy") is not None:
        return f"{m['accuracy']:.2f}%"
    agreement = m.get("agreement") or {}
    top1 = agreement.get("top1_agreement")
    return f"{top1:.2f}% agree" if top1 is not None else "-"


def p50_ms(bench: dict | None) -> float | None:
    """The median latency of an edgec.bench/1 result."""
    return ((bench or {}).get("latency_ms") or {}).get("p50")


def _latency(m, ep):
    p50 = p50_ms((m.get("latency") or {}).get(ep))
    return f"{p50:.3f} ms" if p50 is not None else "-"


def summary_rows(manifest: dict) -> list[tuple[str, str, str, str]]:
    """(metric, FP32, INT8, change) rows: what a user wants to see first."""
    m = manifest["metrics"]
    fp, q = m["fp32"], m["int8"]
    rows = [("file size", _mb(fp["bytes"]), _mb(q["bytes"]), f"{m['compression_ratio']:.2f}x smaller")]
    if "original" in m:
        rows.append(("params (original)", _count(m["original"]["params"]), "", ""))
        rows.append(("FLOPs (original)", _count(m["original"]["flops"]), "", ""))
    rows.append(("params", _count(fp["params"]), _count(q["params"]), "INT8 weights"))
    rows.append(("FLOPs / sample", _count(fp["flops"]), _count(q["flops"]), "same ops, 8-bit"))
    change = ""
    if fp.get("accuracy") is not None and q.get("accuracy") is not None:
        change = f"{q['accuracy'] - fp['accuracy']:+.2f} points"
    else:
        cos = (q.get("agreement") or {}).get("mean_cosine")
        change = f"mean cosine {cos:.4f}" if cos is not None else ""
    rows.append(("accuracy" if fp.get("accuracy") is not None else "agreement with FP32",
                 _quality(fp), _quality(q), change))
    fp_lat = fp.get("latency") or {}
    for ep, lat in (manifest.get("latency") or {}).items():
        base = fp_lat.get(ep)
        paired = (base or {}).get("ratio") or {}
        if paired.get("interleaved"):   # FP32/INT8 per interleaved round: robust to machine drift
            speed = f"{paired['median']:.2f}x faster (interleaved)"
        else:
            speed = f"{p50_ms(base) / p50_ms(lat):.2f}x faster" if p50_ms(base) and p50_ms(lat) else ""
        # each model alone, as `edgec bench` measures it: the figure a latency gate on this package will see
        mode = "alone" if lat.get("intra_op_spinning", True) else "interleaved"
        rows.append((f"latency p50 ({ep}, {mode})", _latency({"latency": fp_lat}, ep), _latency(manifest, ep), speed))
    return rows


def print_summary(manifest: dict, title: str, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in ("", "FP32", "INT8", "change"):
        table.add_column(col, justify="left" if not col else "right")
    for row in summary_rows(manifest):
        table.add_row(*row)
    Console(file=file, width=110).print(table)


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(manifest: dict) -> str:
    src = manifest["source"]
    tc = manifest["toolchain"]
    out = [f"# edgec package: {src['path']}", "",
           f"Built {manifest['created']} by edgec {tc['edgec']} (torch {tc['torch']}, onnx {tc['onnx']}, "
           f"onnxruntime {tc['onnxruntime']}) in {manifest.get('build_seconds', 0):.0f} s.", "",
           "## Summary", "", _md_table(["", "FP32", "INT8", "change"], summary_rows(manifest)), "",
           "## Input and output", "",
           f"- input `{manifest['input']['name']}` {manifest['input']['shape']} {manifest['input']['dtype']}; "
           f"preprocess: `{manifest['input'].get('preprocess')}`"]
    out += [f"- output `{o['name']}` {o['shape']} {o['dtype']}" for o in manifest["output"]]
    out += [f"- ONNX opset {manifest['opset']}", ""]
    quant = manifest.get("quantization") or {}
    scheme = quant.get("scheme") or {}
    if scheme:
        out += ["## Quantization", "",
                f"- method {quant.get('method')}, {quant.get('samples')} calibration samples; "
                f"activations {scheme.get('activation_type')}, weights {scheme.get('weight_type')}, "
                f"per-channel {scheme.get('per_channel')}, reduce_range {scheme.get('reduce_range')}, "
                f"format {scheme.get('quant_format')}; target {scheme.get('target')}"]
        out += [f"- why: {r}" for r in scheme.get("reasons", [])]
        ops = quant.get("ops") or {}
        if ops:
            out += [f"- INT8 compute nodes: {ops['int8']} of {ops['int8'] + ops['float']} "
                    f"({100 * ops['int8_weight_share']:.1f}% of Conv/MatMul/Gemm weights)"]
        excluded = quant.get("excluded_nodes") or []
        out += [f"- kept in FP32: {', '.join(map(str, excluded)) if excluded else 'none'}", ""]
        out += _fallback_md(quant.get("sensitivity"))
    out += ["## Stages", "", _md_table(["stage", "needs", "gives", "seconds"],
                                       [(s["name"], s["needs"], s["gives"], f"{s['seconds']:.1f}")
                                        for s in manifest["stages"]]), ""]
    return "\n".join(out) + "\n"


def _fallback_md(report: dict | None) -> list[str]:
    """The accuracy-aware fallback: what it measured and which nodes it kept in FP32, with their error figures."""
    if not report:
        return []
    out = ["### Accuracy-aware fallback", "",
           f"- {report['metric']} on calibration samples: FP32 {100 * report['fp32_score']:.2f}%, all-INT8 "
           f"{100 * report['int8_score']:.2f}%, final {100 * report['final_score']:.2f}% (drop "
           f"{report['drop_points']:.2f} of {report['budget_points']} points allowed); {report['stopped']}; "
           f"{report['nodes_measured']} of {report['nodes_total']} nodes measured in {report['seconds']:.1f} s", ""]
    if report["excluded"]:
        out += [_md_table(["node kept in FP32", "op", "output error when alone in FP32", "error reduction"],
                          [(e["node"], e["op_type"], f"{e['error_when_excluded']:.5f}", f"{e['error_reduction']:.5f}")
                           for e in report["excluded"]]), ""]
    return out


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
