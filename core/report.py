"""Human views of a package, rendered from its typed manifest alone: the summary table (build, inspect), the
inspect listing and report.md. Torch-free (rich only for the terminal table), so the lean device install
renders them too. Every text that comes from a manifest is escaped: a crafted one cannot drive the terminal."""
from __future__ import annotations

from edgec.core.package import Latency, Manifest, ModelMetrics, OutputCheck, Sensitivity, TensorSpec, escape

# INT8 slower than FP32 by more than bench noise (p50 of runs alone): said under the summary
SLOWER_NOTE_RATIO = 0.95


def mb(n) -> str:
    return f"{n / 1e6:.2f} MB" if n is not None else "-"


def count(n, unit="") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n}{unit}"


def shape_text(shape) -> str:
    return "[" + ", ".join(escape(d) for d in shape) + "]"


def tensor_text(t: TensorSpec) -> str:
    return f"{escape(t.name)} {shape_text(t.shape)} {escape(t.dtype)}"


def _quality(m: ModelMetrics) -> str:
    if m.accuracy is not None:
        return f"{m.accuracy:.2f}%"
    top1 = m.agreement.top1_agreement if m.agreement else None
    return f"{top1:.2f}% agree" if top1 is not None else "-"


def _figure(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"


def _sqnr(o: OutputCheck) -> str:
    return "identical" if o.identical else f"SQNR {o.sqnr_db:.1f} dB" if o.sqnr_db is not None else "SQNR -inf dB"


def outputs_md(outputs: list[OutputCheck]) -> list[str]:
    """Every output's check: what it was taken for (given or detected, and why), its task figure and its SQNR."""
    if not outputs:
        return []
    rows = [(f"`{escape(o.name)}`", escape(o.task), escape(o.chosen) + (f": {escape(o.why)}" if o.why else ""),
             escape(o.metric or "-") + (" (labels)" if o.labels else ""), _figure(o.fp32), _figure(o.int8),
             _figure(o.drop_points), _sqnr(o), f"{o.rel_error:.4f}" if o.rel_error is not None else "-",
             f"{o.max_abs_error_of_range:.4f}" if o.max_abs_error_of_range is not None else "-") for o in outputs]
    return ["## Checks per output", "",
            "INT8 against FP32 on the eval data. Task figures in percent (without labels FP32 scores 100 against "
            "itself); SQNR over the whole eval set.", "",
            _md_table(["output", "task", "chosen", "figure", "FP32", "INT8", "drop (points)", "SQNR",
                       "relative error", "max error / range"], rows), ""]


def _latency(lat: Latency | None) -> str:
    return f"{lat.p50_ms:.3f} ms" if lat is not None else "-"


def _speed(fp32_over_int8: float) -> str:
    return f"{fp32_over_int8:.2f}x faster" if fp32_over_int8 >= 1 else f"{1 / fp32_over_int8:.2f}x slower"


def slower_notes(manifest: Manifest) -> list[str]:
    """One line per provider where the INT8 model ran clearly slower than FP32 (measured the same way): the user
    should know before shipping it, and has the FP32 file in the package."""
    lines = []
    for ep, lat in manifest.latency.items():
        base = manifest.metrics.fp32.latency.get(ep)
        if base is None or base.how != lat.how or not lat.p50_ms or base.p50_ms / lat.p50_ms >= SLOWER_NOTE_RATIO:
            continue
        lines.append(f"note: INT8 ran {lat.p50_ms / base.p50_ms:.2f}x slower than FP32 on {escape(ep)} here (p50 "
                     f"{lat.p50_ms:.3f} vs {base.p50_ms:.3f} ms); the package holds the FP32 model too "
                     f"(model.fp32.onnx): compare both where it will run with `edgec bench PKG/model.onnx "
                     f"PKG/model.fp32.onnx`")
    return lines


def summary_rows(manifest: Manifest) -> list[tuple[str, str, str, str]]:
    """(metric, FP32, INT8, change) rows: what a user wants to see first."""
    m = manifest.metrics
    fp, q = m.fp32, m.int8
    rows = [("file size", mb(fp.bytes), mb(q.bytes), f"{m.compression_ratio:.2f}x smaller")]
    if m.original is not None:
        rows.append(("params (original)", count(m.original.params), "", ""))
        rows.append(("FLOPs (original)", count(m.original.flops), "", ""))
    rows.append(("params", count(fp.params), count(q.params), "INT8 weights"))
    rows.append(("FLOPs / sample", count(fp.flops), count(q.flops), "same ops, 8-bit"))
    if fp.accuracy is not None and q.accuracy is not None:
        change = f"{q.accuracy - fp.accuracy:+.2f} points"
    else:
        change = ""
    rows.append(("accuracy" if fp.accuracy is not None else "agreement with FP32", _quality(fp), _quality(q), change))
    rows += [(f"{escape(o.name)}: {escape(o.metric or 'SQNR only')} ({escape(o.task)}, {escape(o.chosen)})",
              _figure(o.fp32), _figure(o.int8), _sqnr(o)) for o in m.outputs]
    for ep, lat in manifest.latency.items():
        base = fp.latency.get(ep)
        same = base is not None and base.how == lat.how   # a ratio only of figures measured the same way
        speed = _speed(base.p50_ms / lat.p50_ms) if same and lat.p50_ms else ""
        fp_text = _latency(base) + (f" ({base.how})" if base is not None and not same else "")
        rows.append((f"latency p50 ({escape(ep)}, {lat.how})", fp_text, _latency(lat), speed))
    return rows


def print_summary(manifest: Manifest, title: str, file=None) -> None:
    from rich.console import Console
    from rich.markup import escape as markup
    from rich.table import Table
    table = Table(title=markup(escape(title)))
    for col in ("", "FP32", "INT8", "change"):
        table.add_column(col, justify="left" if not col else "right")
    for row in summary_rows(manifest):
        table.add_row(*(markup(c) for c in row))
    console = Console(file=file, width=110)
    console.print(table)
    for line in slower_notes(manifest):
        console.print(markup(line), highlight=False)


def inspect_lines(manifest: Manifest) -> list[str]:
    """The plain lines `edgec inspect` prints under the table."""
    out = [f"input  {tensor_text(i)}" for i in manifest.inputs]
    out += [f"output {tensor_text(o)}" for o in manifest.outputs]
    q = manifest.quantization
    if q.scheme is not None:
        s = q.scheme
        out.append(f"quantization: {escape(q.method)} calibration, {q.samples} samples, activations "
                   f"{escape(s.activation_type)}, weights {escape(s.weight_type)}, reduce_range={s.reduce_range}")
    out.append("stages: " + " -> ".join(f"{escape(s.name)} ({s.seconds:.1f}s)" for s in manifest.stages))
    out += [f"  {escape(name):18} {rec.bytes:>12,d} B  sha256 {escape(rec.sha256[:16])}…"
            for name, rec in manifest.files.items()]
    for ep, lat in manifest.latency.items():
        out.append(f"latency {escape(ep)}: p50 {lat.p50_ms:.3f} ms, p90 {lat.p90_ms:.3f} ms, n={lat.n}, "
                   f"batch {lat.batch}, {lat.how}, measured {escape(lat.measured or '-')}")
    return out


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pairs(d: dict | None) -> str:
    return ", ".join(f"{escape(k)} {_value(v)}" for k, v in (d or {}).items()) or "none recorded"


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return escape(v)


def render_markdown(manifest: Manifest) -> str:
    src, tc = manifest.source, manifest.toolchain
    out = [f"# edgec package: {escape(src.path)}", "",
           f"Built {escape(manifest.created)} by edgec {escape(tc.edgec)} (torch {escape(tc.torch)}, onnx "
           f"{escape(tc.onnx)}, onnxruntime {escape(tc.onnxruntime)}) in {manifest.build_seconds:.0f} s.", "",
           "## Summary", "", _md_table(["", "FP32", "INT8", "change"], summary_rows(manifest)), "",
           "Latency: \"alone\" is one model in its session, as `edgec bench` and the gate measure it; "
           "\"interleaved\" alternates INT8 and FP32 runs (for their ratio).", "",
           *[f"{line}\n" for line in slower_notes(manifest)],
           "## Inputs and outputs", ""]
    out += [f"- input `{escape(i.name)}` {shape_text(i.shape)} {escape(i.dtype)}"
            + (f" (built with {shape_text(i.example)})" if i.example else "") for i in manifest.inputs]
    out += [f"- output `{escape(o.name)}` {shape_text(o.shape)} {escape(o.dtype)}" for o in manifest.outputs]
    out += [f"- preprocess: {_pairs(manifest.preprocess)}", f"- ONNX opset {manifest.opset}", ""]
    out += outputs_md(manifest.metrics.outputs)
    q = manifest.quantization
    if q.scheme is not None:
        s = q.scheme
        yes = {True: "yes", False: "no", None: "-"}
        out += ["## Quantization", "",
                f"- method {escape(q.method)}, {q.samples} calibration samples; activations "
                f"{escape(s.activation_type)}, weights {escape(s.weight_type)}, per-channel {yes[s.per_channel]}, "
                f"reduce_range {yes[s.reduce_range]}, format {escape(s.quant_format)}; target {escape(s.target)}"]
        out += [f"- why: {escape(r)}" for r in s.reasons]
        if q.ops is not None:
            share = f" ({100 * q.ops.int8_weight_share:.1f}% of Conv/MatMul/Gemm/LSTM weights)" \
                if q.ops.int8_weight_share is not None else ""
            out += [f"- INT8 compute nodes: {q.ops.int8} of {q.ops.int8 + q.ops.float}{share}"]
        out += [f"- kept in FP32: {', '.join(escape(n) for n in q.excluded_nodes) or 'none'}", ""]
        out += _fallback_md(q.sensitivity)
    out += ["## Stages", "", _md_table(["stage", "needs", "gives", "seconds"],
                                       [(escape(s.name), escape(s.needs), escape(s.gives), f"{s.seconds:.1f}")
                                        for s in manifest.stages]), ""]
    return "\n".join(out) + "\n"


def scored_samples(x: dict) -> str:
    """Which samples the fallback's budget was scored on: held out of the calibration's fit or not, and how many
    of those offered (fewer where the FP32 reference's per-sample cost sized them to the time box)."""
    n, offered = x.get("scored_samples"), x.get("scored_available")
    if not n:
        return "calibration samples"
    kind = "held-out calibration samples" if x.get("scored_held_out") else "calibration samples"
    out = f"{n} of {offered} {kind}" if offered and offered > n else f"{n} {kind}"
    if offered and offered > n and x.get("sample_ms") is not None:
        out += f" (time box: {x['sample_ms']:.3g} ms a sample)"
    if "scored_held_out" in x and not x["scored_held_out"]:
        out += " (calibrated on them: give more than --samples to score on held-out ones)"
    return out


def fallback_summary(report: Sensitivity) -> str:
    """One line: what the fallback was for, what it kept in FP32 and the figure before and after (or that the
    all-INT8 model needed none)."""
    x = report.extra
    cosine = report.metric == "cosine"
    value = (lambda v: f"{v:.4f}") if cosine else (lambda v: f"{100 * v:.2f}%")  # noqa: E731
    figure = "mean cosine to FP32" if cosine else escape(report.metric)
    on = " on " + scored_samples(x)
    budget = (f"cosine >= {x['min_cosine']:g}" if cosine else f"drop <= {report.budget_points:g} points") + (
        f", {escape(x['task_metric'])} drop <= {x['task_budget_points']:g} points" if x.get("task_metric") else "")
    if not report.nodes_measured and not x.get("searched_for"):
        return (f"INT8 fallback ({budget}){on}: none needed, all-INT8 {figure} {value(report.int8_score)}; "
                f"{escape(report.stopped)}")
    kept = ", ".join(escape(e.node) for e in report.excluded) or "none"
    share = f", {100 * x['int8_weight_share']:.1f}% of weights INT8" if x.get("int8_weight_share") is not None else ""
    return (f"INT8 fallback ({budget}){on}"
            + (f", searched for {escape(x['searched_for'])}" if x.get("searched_for") else "")
            + f": {len(report.excluded)} node(s) kept in FP32 ({kept}); {figure} {value(report.int8_score)} -> "
            f"{value(report.final_score)}{share}; {report.nodes_measured} of {report.nodes_total} nodes ranked"
            + (f" on {x['rank_samples']} samples" if x.get("rank_samples") else "")
            + f"; {escape(report.stopped)}; {report.seconds:.1f} s")


def _fallback_md(report: Sensitivity | None) -> list[str]:
    """The accuracy-aware fallback: what it measured and which nodes it kept in FP32, with their error figures."""
    if report is None:
        return []
    figures = (f"{escape(report.metric)} on calibration samples: FP32 {100 * report.fp32_score:.2f}%, all-INT8 "
               f"{100 * report.int8_score:.2f}%, final {100 * report.final_score:.2f}% (drop "
               f"{report.drop_points:.2f} of {report.budget_points} points allowed)"
               if report.metric != "no task metric" else "no output has a task figure: SQNR alone")
    out = ["### Accuracy-aware fallback", "", f"- {fallback_summary(report)}",
           f"- {figures}; {escape(report.stopped)}; "
           f"{report.nodes_measured} of {report.nodes_total} nodes measured in {report.seconds:.1f} s", ""]
    x = report.extra
    if x.get("min_sqnr_db") is not None:   # the gate's SQNR bar, searched for like the task figure
        sqnr = lambda v: "identical" if v is None else f"{v} dB"  # noqa: E731
        out[-1:-1] = [f"- worst output SQNR on the same samples: all-INT8 {sqnr(x.get('int8_sqnr_db'))}, final "
                      f"{sqnr(x.get('final_sqnr_db'))} (--min-sqnr {x['min_sqnr_db']:g} dB)"
                      + (f"; searched for: {escape(x['searched_for'])}" if x.get("searched_for") else "")]
    if report.excluded:
        out += [_md_table(["node kept in FP32", "op", "output error when alone in FP32", "error reduction"],
                          [(escape(e.node), escape(e.op_type), f"{e.error_when_excluded:.5f}",
                            f"{e.error_reduction:.5f}") for e in report.excluded]), ""]
    return out
