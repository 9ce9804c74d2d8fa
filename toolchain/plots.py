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
    if row.get("accuracy") is not None:
        return row["accuracy"], "accuracy on eval data (%)"
    return (row.get("agreement") or {}).get("top1_agreement", 100.0), "top-1 agreement with FP32 (%)"


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

    timed = [r for r in rows if r.get("p50_ms") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        max_bytes = max(r["bytes"] for r in timed)
        ylabel = _quality(timed[0])[1]
        for r in timed:
            acc = _quality(r)[0]
            ax.scatter(r["p50_ms"], acc, s=60 + 1400 * r["bytes"] / max_bytes, alpha=0.55,
                       edgecolors="black", linewidths=2.5 if r["recipe"] == winner else 0.8)
            ax.annotate(f"{r['recipe']}\n{r['bytes'] / 1e6:.1f} MB", (r["p50_ms"], acc), textcoords="offset points",
                        xytext=(8, 6), fontsize=8)
        front = pareto_front([(r["p50_ms"], _quality(r)[0], r["recipe"]) for r in timed])
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red", label="Pareto front")
        ax.set_xlabel(f"median latency on {ep} (ms, lower is better)")
        ax.set_ylabel(ylabel)
        title = "accuracy vs latency (marker area = file size)"
        if winner:
            title += f"\nrecommended: {winner} (thick outline)"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.12)  # room for the labels beside the markers
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
