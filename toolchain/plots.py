"""The compare plots (matplotlib, Agg): accuracy vs latency with size as marker area and the Pareto front;
size and FLOPs bars. A person should see the answer before reading a number."""
from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (latency, accuracy, name) that no other point beats on both: lower latency, higher accuracy."""
    front, best = [], float("-inf")
    for lat, acc, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc, name))
            best = acc
    return front


def _quality(row):
    """(figure, axis label): the row's gated task figure (edgec.stages.Score.quality); None without one."""
    q = row.get("quality")
    if not q:
        return None, "no task figure"
    what = "on eval data" if q.get("labels") else "vs FP32"
    return q["value"], f"{q['metric']} of {q['output']} {what} (%)"


def _label(fig, ax, points: list[tuple[float, float, str, float]], gap: float = 13.0) -> None:
    """One label per marker; a label that would overlap one already placed moves down (with a leader line)."""
    fig.canvas.draw()  # fixes the scales so data -> pixel positions are final
    placed: list[tuple[float, float]] = []
    for x, y, text, radius in sorted(points, key=lambda p: -p[1]):  # radius of the marker, in points
        px, py = ax.transData.transform((x, y))
        dy = 0.0
        while any(abs(px - qx) < 150 and abs(py + dy - qy) < gap for qx, qy in placed):
            dy -= gap
        placed.append((px, py + dy))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(radius + 4, dy * 72 / fig.dpi), fontsize=8,
                    va="center", arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"} if dy else None)


def write_plots(summary: dict, root: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["recipes"] if r.get("onnx")]
    if not rows:
        return []
    ep = summary["providers"][0]
    winner = (summary.get("recommendation") or {}).get("recipe")
    written = []

    timed = [r for r in rows if r.get("p50_ms") is not None and _quality(r)[0] is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        max_bytes = max(r["bytes"] for r in timed)
        ylabel = _quality(timed[0])[1]
        area = {r["recipe"]: 60 + 1400 * r["bytes"] / max_bytes for r in timed}  # points^2
        for r in timed:
            ax.scatter(r["p50_ms"], _quality(r)[0], s=area[r["recipe"]], alpha=0.55,
                       edgecolors="black", linewidths=2.5 if r["recipe"] == winner else 0.8)
        front = pareto_front([(r["p50_ms"], _quality(r)[0], r["recipe"]) for r in timed])
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red", label="Pareto front")
        lats = [r["p50_ms"] for r in timed]
        if max(lats) > 5 * min(lats):  # speed-ups are ratios: a log axis keeps the fast recipes apart
            from matplotlib.ticker import ScalarFormatter
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.margins(x=0.15, y=0.12)  # room for the labels beside the markers
        _label(fig, ax, [(r["p50_ms"], _quality(r)[0], f"{r['recipe']} ({r['bytes'] / 1e6:.1f} MB)",
                          (area[r["recipe"]] / 3.1416) ** 0.5) for r in timed])
        ax.set_xlabel(f"median latency on {ep} (ms, lower is better)")
        ax.set_ylabel(ylabel)
        title = f"{ylabel.split(' of ')[0]} vs latency (marker area = file size)"
        if winner:
            title += f"\nrecommended: {winner} (thick outline)"
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(root / "accuracy_vs_latency.png", dpi=110)
        plt.close(fig)
        written.append("accuracy_vs_latency.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["recipe"] for r in rows]
    a1.barh(names, [r["bytes"] / 1e6 for r in rows], color="tab:blue")
    a1.set_xlabel("file size (MB)")
    flops = [(r.get("flops") or 0) / 1e6 for r in rows]
    a2.barh(names, flops, color="tab:green")
    a2.set_xlabel("MFLOPs per sample")
    a2.set_yticklabels([])
    for ax in (a1, a2):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("size and compute per recipe")
    fig.tight_layout()
    fig.savefig(root / "size_flops.png", dpi=110)
    plt.close(fig)
    written.append("size_flops.png")
    return written
