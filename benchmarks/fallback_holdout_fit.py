"""Does holding calibration samples out of the fit cost the default quantization? edgec's default all-INT8 model
fitted on all 256 calibration samples vs on the 192 a quarter-holdout leaves (the spread quarter the fallback would
score on), each measured on the eval samples, the 64 held out and the 192 (benchmarks/QUANT_RESULTS.md, label-free
fallback, fifth round).

    python benchmarks/fallback_holdout_fit.py ppocr-cls,ppocr-rec [OUT]
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import agreement, subjects  # noqa: E402

from edgec.exporters.quantize import QuantOptions, quantize_int8  # noqa: E402


def main(models: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for model in models.split(","):
        s = subjects(out, 256, 128)[model]()
        x = s["calib"]
        held = np.unique(np.linspace(0, len(x) - 1, len(x) // 4).astype(int))   # a quarter, spread
        fit = np.setdiff1d(np.arange(len(x)), held)
        for name, fx in (("fit256", x), ("fit192", x[fit])):
            path = out / f"{model}.{name}.onnx"
            t = time.perf_counter()
            quantize_int8(s["fp32"], path, [fx[i:i + 32] for i in range(0, len(fx), 32)],
                          QuantOptions(num_samples=None))
            print(json.dumps({"model": model, "fit": name, "seconds": round(time.perf_counter() - t, 1),
                              "eval": agreement(s["fp32"], path, s["x"])["mean_cos"],
                              "held64": agreement(s["fp32"], path, x[held])["mean_cos"],
                              "fit192_samples": agreement(s["fp32"], path, x[fit])["mean_cos"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/edgec-holdout-fit"))
