"""Quantization quality and calibration memory: ONNX Runtime's defaults vs edgec's, on real data.

    python benchmarks/bench_quant.py quality --out /tmp/qbench      # digits-trained MobileNetV2-style + ResNet-style
    python benchmarks/bench_quant.py memory --samples 512            # 224x224 MobileNetV2, every method

Each quantization runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own.
Prints a markdown table (stdout) for benchmarks/QUANT_RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    # ONNX Runtime's quantize_static with its own defaults: QDQ, S8S8, per-tensor, reduce_range=False, MinMax.
    "ort-defaults": dict(ort=True),
    # The usual CPU recipe from ORT's docs/examples: U8S8 per-channel, reduce_range left False.
    "ort-u8s8-per-channel": dict(ort=True, activation="uint8", per_channel=True),
    "ort-entropy": dict(ort=True, activation="uint8", per_channel=True, method="entropy"),
    "edgec-default": dict(method="minmax"),
    "edgec-percentile": dict(method="percentile"),
    "edgec-entropy": dict(method="entropy"),
    "edgec-auto": dict(method="auto"),
}


class Digits224:
    """Real digits, nearest-upsampled to 3x224x224 chunk by chunk (numpy only, nothing held): calibration
    memory is then the quantizer's own, not the data's."""

    def __init__(self, samples: int, chunk: int = 32):
        import gzip
        src = Path(__file__).resolve().parents[1] / "models" / "data" / "digits.csv.gz"
        with gzip.open(src, "rt") as f:
            self.small = np.loadtxt(f, delimiter=",", dtype=np.float32)[:samples, :64].reshape(-1, 1, 8, 8)
        self.chunk = chunk

    def __len__(self):
        return len(self.small)

    def __iter__(self):
        for i in range(0, len(self.small), self.chunk):
            x = self.small[i:i + self.chunk] / 16.0
            x = x.repeat(28, axis=2).repeat(28, axis=3).repeat(3, axis=1)
            yield ((x - 0.3) / 0.4).astype(np.float32)


def _ort_quantize(fp32, out, calib, cfg: dict) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantType,
                                          quantize_static)
    import onnxruntime as ort
    name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):  # batch-1 samples: ORT's Entropy/Percentile need equal batches
        def __init__(self):
            self.it = (b[i:i + 1] for b in calib for i in range(len(b)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    kw = {}
    if "activation" in cfg:
        kw["activation_type"] = QuantType.QUInt8
    if cfg.get("per_channel"):
        kw["per_channel"] = True
    if cfg.get("method") == "entropy":
        kw["calibrate_method"] = CalibrationMethod.Entropy
    quantize_static(str(fp32), str(out), Reader(), **kw)


def _peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at the parent's
    RSS at fork time (here ~850 MB of torch), VmHWM belongs to the exec'd image alone."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 0)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)


def one(fp32, out, calib_path, config: str, samples: int) -> dict:
    """Quantize once (in this process) and report peak RSS; meant to run in a fresh subprocess."""
    if calib_path == "digits224":
        calib = Digits224(samples)
    else:
        x = np.load(calib_path)["x"][:samples]
        calib = [x[i:i + 32] for i in range(0, len(x), 32)]
    cfg = CONFIGS[config]
    t = time.perf_counter()
    result: dict = {"config": config}
    if cfg.get("ort"):
        _ort_quantize(fp32, out, calib, cfg)
    else:
        from edgec.exporters.quantize import QuantOptions, quantize_int8
        info = quantize_int8(fp32, out, calib, QuantOptions(method=cfg["method"], num_samples=None))
        result["scheme"] = {k: info.scheme[k] for k in ("activation_type", "reduce_range", "per_channel")}
        result["chunk"] = info.calibration["chunk_size"]
    result["seconds"] = round(time.perf_counter() - t, 1)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _run_child(fp32, out, calib_path, config, samples) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "one", str(fp32), str(out), str(calib_path),
           config, str(samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"config": config, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _digits(size=32):
    import gzip
    import torch
    import torch.nn.functional as F
    src = Path(__file__).resolve().parents[1] / "models" / "data" / "digits.csv.gz"
    with gzip.open(src, "rt") as f:
        d = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = F.interpolate(torch.from_numpy(d[:, :64].reshape(-1, 1, 8, 8) / 16.0), size=size, mode="bilinear",
                      align_corners=False)
    x = ((x - 0.3) / 0.4).repeat(1, 3, 1, 1).numpy()
    return x, d[:, 64].astype(np.int64)


def _model(name: str):
    """Small models built from torchvision's own blocks (the 2-core CPU here cannot train the full ones in
    minutes): MobileNetV2 inverted residuals (depthwise, ReLU6, linear bottlenecks) and ResNet basic blocks."""
    from torch import nn
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock

    def cbr(i, o, k=3, s=1, act=nn.ReLU6):
        return [nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), act(inplace=True)]

    if name == "mobilenetv2":
        return nn.Sequential(*cbr(3, 16), InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 6),
                             InvertedResidual(24, 24, 1, 6), InvertedResidual(24, 32, 2, 6),
                             InvertedResidual(32, 32, 1, 6), InvertedResidual(32, 64, 2, 6),
                             InvertedResidual(64, 64, 1, 6), *cbr(64, 256, 1), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(256, 10))

    def down(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 1, 2, bias=False), nn.BatchNorm2d(o))
    return nn.Sequential(*cbr(3, 32, act=nn.ReLU), BasicBlock(32, 32), BasicBlock(32, 64, 2, down(32, 64)),
                         BasicBlock(64, 64), BasicBlock(64, 128, 2, down(64, 128)), BasicBlock(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _train(model, x, y, seconds: float):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    return model.eval(), epochs


def quality(out_dir: Path, train_seconds: float, samples: int, configs) -> list[dict]:
    import torch
    from edgec.exporters.compare import accuracy, compare_outputs
    from edgec.exporters.onnx_export import export_onnx
    from edgec.exporters.quantize import quantized_ops
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = _digits(16)
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:1400], order[1400:]
    np.savez(out_dir / "calib.npz", x=x[tr[:samples]])
    rows = []
    for name in ("mobilenetv2", "resnet"):
        fp32 = out_dir / f"{name}.fp32.onnx"
        model, epochs = _train(_model(name), x[tr], y[tr], train_seconds)
        export_onnx(model, torch.from_numpy(x[:2]), fp32)
        fp32_acc = accuracy(fp32, x[te], y[te])
        for config in configs:
            out = out_dir / f"{name}.{config}.onnx"
            r = _run_child(fp32, out, out_dir / "calib.npz", config, samples)
            r.update(model=name, epochs=epochs, fp32_acc=fp32_acc)
            if "error" not in r:
                agree = compare_outputs(fp32, out, x[te])["outputs"]
                o = next(iter(agree.values()))
                ops, _ = quantized_ops(out)
                r.update(int8_acc=accuracy(out, x[te], y[te]), mean_cos=o["mean_cosine"], min_cos=o["min_cosine"],
                         top1=o["top1_agreement"], int8_weights=ops["int8_weight_share"],
                         int8_nodes=f"{ops['int8']}/{ops['int8'] + ops['float']}")
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def memory(out_dir: Path, samples: int, configs) -> list[dict]:
    """224x224 MobileNetV2 (memory does not depend on the weights), real digits upsampled to 224."""
    import torch
    import torchvision
    from edgec.exporters.onnx_export import export_onnx
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / "mobilenetv2-224.fp32.onnx"
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    export_onnx(model, torch.zeros(2, 3, 224, 224), fp32)
    rows = []
    for config in configs:
        r = _run_child(fp32, out_dir / f"m224.{config}.onnx", "digits224", config, samples)
        r.update(model="mobilenetv2-224", samples=samples)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or ["model", "config", "fp32_acc", "int8_acc", "mean_cos", "min_cos", "top1", "int8_weights",
                    "int8_nodes", "peak_rss_mb", "seconds", "samples", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_quant.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--out", type=Path, default=Path("/tmp/edgec-qbench"))
    q.add_argument("--train-seconds", type=float, default=60)
    q.add_argument("--samples", type=int, default=256)
    q.add_argument("--configs", default=",".join(CONFIGS))
    m = sub.add_parser("memory")
    m.add_argument("--out", type=Path, default=Path("/tmp/edgec-qbench"))
    m.add_argument("--samples", type=int, default=512)
    m.add_argument("--configs", default="edgec-default,edgec-percentile,edgec-entropy,edgec-auto")
    o = sub.add_parser("one")
    for a in ("fp32", "out", "calib", "config"):
        o.add_argument(a)
    o.add_argument("samples", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "one":
        print(json.dumps(one(args.fp32, args.out, args.calib, args.config, args.samples)))
        return
    configs = args.configs.split(",")
    rows = quality(args.out, args.train_seconds, args.samples, configs) if args.cmd == "quality" else \
        memory(args.out, args.samples, configs)
    print(table(rows))


if __name__ == "__main__":
    main()
