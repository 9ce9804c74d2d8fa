"""Where the default --min-sqnr comes from: per-output SQNR and task figures of INT8 vs FP32 on real builds,
properly calibrated and deliberately broken, for the demo ResNet18 and a small model of every output kind.

    .venv/bin/python benchmarks/sqnr_threshold.py [--out benchmarks/SQNR_THRESHOLD.md] [--skip-demo]

Broken INT8 = edgec's own static quantization calibrated on the wrong range (real ORT calibration, min/max):
  wide     calibration inputs x20: every activation range 20x too wide (coarse steps)
  clipped  calibration inputs x0.05: every activation clipped at 5% of its real range
  outlier  one calibration sample x1000 (the failure of tests/test_build.py)
Each build runs with the gates open (--min-sqnr -1000, --max-accuracy-drop 100, no fallback) to measure them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BROKEN = {"wide": lambda x: x * 20, "clipped": lambda x: x * 0.05,
          "outlier": lambda x: np.concatenate([x[:1] * 1000, x[1:]])}
LABEL_OUTPUT = {"multi": "output_1"}


def measure(model_path: Path, calib: Path | str, work: Path, label_output=None) -> list[dict]:
    from edgec.exporters.quantize import QuantOptions
    from edgec.pipeline import BuildOptions, build
    out = work / f"p{time.perf_counter_ns()}.edgec"
    quant = QuantOptions(method="minmax") if str(calib).endswith(".npz") else None
    manifest = build(BuildOptions(model=str(model_path), output=str(out), data=str(calib),
                                  eval_data="builtin:digits:test", quant=quant, min_sqnr=-1000,
                                  max_accuracy_drop=100, fallback_seconds=0, bench_seconds=0,
                                  label_output=label_output))
    return [o.to_json() for o in manifest.metrics.outputs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("SQNR_THRESHOLD.md")))
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--kinds", default=None, help="comma-separated subset of edgec.models.kinds.KINDS")
    args = ap.parse_args(argv)
    from edgec.data import load_data
    from edgec.models.kinds import KINDS, train_kind
    train = load_data("builtin:digits:train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calibs = {}
        for name, f in BROKEN.items():
            calibs[name] = work / f"{name}.npz"
            np.savez(calibs[name], x=f(train.x[0:512]).astype(np.float32))
        models = {}
        for kind in (args.kinds.split(",") if args.kinds else KINDS):
            m = train_kind(kind, train.x[0:len(train)], train.y)
            models[kind] = work / f"{kind}.pt"
            torch.jit.save(torch.jit.trace(m, torch.from_numpy(train.x[0:2])), models[kind])
        if not args.skip_demo:
            from edgec.demo import demo_model
            models["demo ResNet18"] = demo_model()
        for kind, path in models.items():
            for variant, calib in [("good (edgec defaults)", "builtin:digits"), *calibs.items()]:
                for o in measure(path, calib, work, LABEL_OUTPUT.get(kind)):
                    rows.append({"model": kind, "variant": variant, **o})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    lines = ["# Default --min-sqnr: measured", "",
             "`.venv/bin/python benchmarks/sqnr_threshold.py` (eval: builtin:digits:test, 360 samples; broken = real",
             "edgec/ORT static INT8 calibrated on a wrong range, see the script). Task figures in percent (FP32 = 100",
             "against itself without labels; with labels: accuracy, correlation with the labels).", "",
             "| model | INT8 | output | task | figure | FP32 | INT8 | SQNR dB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fig = r["metric"] or "-"
        fp = f"{r['fp32']:.2f}" if r.get("fp32") is not None else "-"
        q = f"{r['int8']:.2f}" if r.get("int8") is not None else "-"
        sq = "identical" if r["identical"] else (f"{r['sqnr_db']:.1f}" if r["sqnr_db"] is not None else "-inf")
        lines.append(f"| {r['model']} | {r['variant']} | {r['name']} | {r['task']} ({r['chosen']}) | {fig} | {fp} | {q} "
                     f"| {sq} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
