"""Peak memory of a default `edgec build` on large data (issue 10 section 3).

Writes 4,000 calibration images as a 224x224x3 uint8 .npz (602 MB, np.savez: memory-mapped) and a 2,000-image
labelled folder (10 classes, JPEG, decoded at 224), then runs a default build of ResNet18 (10 classes) in a
subprocess and reads its peak resident size (ru_maxrss of the child). Also measured in the same run: the
resident size of a process that only imports the toolchain (the floor), and the model's own size.

    .venv/bin/python benchmarks/memory_build.py --out /tmp/edgec-mem   # writes benchmarks/MEMORY_RESULTS.md

Goal: peak RSS under 1.5 GB on top of the model's size (before: 5.9 GB for the npz, 4.4 GB for the folder).
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

HERE = Path(__file__).resolve().parent
ARCH = "torchvision:resnet18?num_classes=10"


def images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random scenes (blobs and gradients) plus a little noise: neighbouring pixels correlate like photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))
        img = np.stack([blob * rng.uniform(0.3, 1), xx * rng.uniform(0, 1), yy * rng.uniform(0, 1)], -1)
        img = img + 0.03 * rng.standard_normal(img.shape)
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def write_data(out: Path, n_calib: int, n_eval: int) -> tuple[Path, Path]:
    from PIL import Image
    npz, folder = out / "calib.npz", out / "eval"
    if not npz.exists():
        x = np.lib.format.open_memmap(out / "x.npy", mode="w+", dtype=np.uint8, shape=(n_calib, 224, 224, 3))
        for i in range(0, n_calib, 500):
            x[i:i + 500] = images(min(500, n_calib - i), 224, seed=i)
        x.flush()
        del x
        import zipfile
        with zipfile.ZipFile(npz, "w", zipfile.ZIP_STORED) as zf:   # exactly what np.savez writes
            zf.write(out / "x.npy", "x.npy")
        (out / "x.npy").unlink()
    if not folder.exists():
        tmp = out / "eval.tmp"
        for c in range(10):
            (tmp / f"c{c}").mkdir(parents=True, exist_ok=True)
        imgs = images(n_eval, 256, seed=10_000)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(tmp / f"c{i % 10}" / f"{i:05d}.jpg", quality=90)
        tmp.rename(folder)
    return npz, folder


def child_peak_mb(cmd: list[str]) -> tuple[float, float, int, str]:
    """(peak RSS MB of the child, seconds, exit code, stderr tail): one child per call, so RUSAGE_CHILDREN's
    maximum is this child's."""
    t0 = time.perf_counter()
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(p.stderr[-2000:]); "
               "sys.exit(p.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    peak_kb = int(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else 0
    return peak_kb / 1024, time.perf_counter() - t0, done.returncode, done.stderr[-1500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgec-memory-bench"))
    ap.add_argument("--calib", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--results", type=Path, default=HERE / "MEMORY_RESULTS.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch
    import torchvision
    npz, folder = write_data(args.out, args.calib, args.eval)
    model = args.out / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), model)
    edgec = str(Path(sys.executable).parent / "edgec")
    pkg = args.out / "r18.edgec"
    floor, _, _, _ = child_peak_mb([sys.executable, "-c", "import edgec.pipeline, edgec.exporters.quantize, "
                                    "onnxruntime, torch, torchvision"])
    cmd = [edgec, "build", str(model), "--arch", ARCH, "--data", str(npz), "--eval-data", str(folder), "-o", str(pkg),
           "--force", "--json"]
    peak, seconds, code, err = child_peak_mb(cmd)
    if code != 0:
        raise SystemExit(f"build failed ({code}): {err}")
    manifest = json.loads((pkg / "manifest.json").read_text())
    model_mb = model.stat().st_size / 2 ** 20
    row = {"calib_samples_in_data": args.calib, "eval_images": args.eval, "npz_mb": round(npz.stat().st_size / 2 ** 20),
           "model_mb": round(model_mb, 1), "import_floor_mb": round(floor), "build_peak_rss_mb": round(peak),
           "peak_minus_model_mb": round(peak - model_mb), "goal_mb": 1536, "met": peak - model_mb < 1536,
           "build_seconds": round(seconds, 1),
           "stages": {s["name"]: round(s["seconds"], 1) for s in manifest["stages"]},
           "calibration": {k: next(s for s in manifest["stages"] if s["name"] == "quantize")["metrics"]
                           .get("calibration", {}).get(k)
                           for k in ("samples", "chunk_size", "estimated_peak_mb", "peak_rss_mb")},
           "command": " ".join(["edgec", *cmd[1:]])}
    print(json.dumps(row, indent=2))
    args.results.write_text(f"""# Peak memory of a default build (issue 10 section 3)

`{Path(sys.argv[0]).name}` in one run: ResNet18 (10 classes, {row['model_mb']} MB), {args.calib} calibration
images 224x224x3 uint8 in an uncompressed .npz ({row['npz_mb']} MB, memory-mapped, converted per batch),
{args.eval} labelled JPEGs decoded at 224 (streamed in batches of 64). Peak RSS is the build child's ru_maxrss.

| what | MB |
|---|---|
| import floor (torch, torchvision, onnxruntime, edgec) | {row['import_floor_mb']} |
| **default build, peak RSS** | **{row['build_peak_rss_mb']}** |
| peak minus the model's size (goal < 1536) | {row['peak_minus_model_mb']} ({'met' if row['met'] else 'NOT met'}) |
| before this change (issue 10): npz / folder | 5,900 / 4,400 |

Build {row['build_seconds']} s; stages (s): {row['stages']}; calibration: {row['calibration']}.

Command: `.venv/bin/python benchmarks/memory_build.py --out {args.out}`, which runs
`{row['command']}`.
""")


if __name__ == "__main__":
    main()
