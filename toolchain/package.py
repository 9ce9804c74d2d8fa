"""The package folder NAME.edgec/ and its manifest (schema `edgec.manifest/1`, documented in README).

The report is rendered from the manifest alone, so `inspect` works on any package later.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from edgec.core import __version__
from edgec.core.errors import VerifyError

SCHEMA = "edgec.manifest/1"
# what metrics.outputs keeps of each output's evaluation record (the evaluate stage has every figure)
OUTPUT_KEYS = ("name", "task", "chosen", "why", "labels", "metric", "fp32", "int8", "drop_points", "sqnr_db",
               "identical", "rel_error", "max_abs_error_of_range")
MODEL_FILE, FP32_FILE, MANIFEST_FILE, REPORT_FILE = "model.onnx", "model.fp32.onnx", "manifest.json", "report.md"


def file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def toolchain_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    from edgec.exporters.target import host_cpu
    cpu = host_cpu()
    return {"edgec": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_features": list(cpu.features)}


def _stage(stages, name):
    return next((s for s in stages if s["name"] == name), None)


def make_manifest(folder: Path, inputs, module, stages, *, extra=None, seconds=0.0) -> dict:
    from edgec.metrics import count_flops, count_params
    stages = [s.to_dict() for s in stages]
    export = _stage(stages, "export")["metrics"]["export"]
    evaluation = _stage(stages, "evaluate")["metrics"]
    params, flops = count_params(module), count_flops(module, inputs.input_shape)
    fp32_bytes, int8_bytes = (folder / FP32_FILE).stat().st_size, (folder / MODEL_FILE).stat().st_size

    def quality(kind):
        if "fp32_accuracy" in evaluation:
            return {"accuracy": evaluation[f"{kind}_accuracy"]}
        agreement = evaluation["agreement"]
        return {"agreement": agreement if kind == "int8" else
                {k: 100.0 for k in ("top1_agreement",) if k in agreement}}

    quant = _stage(stages, "quantize")["metrics"]
    manifest = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": inputs.model.describe(),
        "files": {},
        "input": {"name": export["input_name"], "shape": export["input_shape"], "dtype": export["input_dtype"],
                  "preprocess": inputs.calib.preprocess, "classes": inputs.calib.classes},
        "output": [{"name": n, "shape": s, "dtype": d} for n, s, d in
                   zip(export["output_names"], export["output_shapes"], export["output_dtypes"])],
        "opset": export["opset"],
        "toolchain": toolchain_versions(),
        "quantization": {k: quant.get(k) for k in ("scheme", "method", "samples", "excluded_nodes", "ops",
                                                   "pre_process", "transforms", "sensitivity") if k in quant},
        "stages": stages,
        "metrics": {
            "fp32": {**quality("fp32"), "bytes": fp32_bytes, "params": params, "flops": flops},
            "int8": {**quality("int8"), "bytes": int8_bytes, "params": params, "flops": flops},
            "compression_ratio": round(fp32_bytes / int8_bytes, 3),
            "outputs": [{k: o.get(k) for k in OUTPUT_KEYS} for o in evaluation.get("outputs", [])],
        },
        "latency": {},
        "build_seconds": round(seconds, 2),
    }
    original = _stage(stages, "load")["metrics"]
    if original["params"] != params:  # pruned: compare against what the user gave us
        manifest["metrics"]["original"] = {"params": original["params"], "flops": original["flops"]}
    bench = _stage(stages, "bench")
    if bench:
        manifest["latency"] = {ep: r["int8"] for ep, r in bench["metrics"].items()}
        manifest["metrics"]["fp32"]["latency"] = {ep: r["fp32"] for ep, r in bench["metrics"].items()}
    if extra:
        manifest.update(extra)
    return manifest


def write_package_files(folder: Path, manifest: dict) -> None:
    """Render the report, hash every file, write the manifest last."""
    from edgec.report import render_markdown
    (folder / REPORT_FILE).write_text(render_markdown(manifest))
    manifest["files"] = {p.name: file_record(p) for p in sorted(folder.iterdir())
                         if p.is_file() and p.name != MANIFEST_FILE}
    write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.exists():
        raise VerifyError(f"package {folder} not found")
    if not path.is_file():
        raise VerifyError(f"{folder} has no {MANIFEST_FILE}: not an edgec package (build one with edgec build)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerifyError(f"{path} is not valid JSON ({e}); rebuild the package") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise VerifyError(f"{path} has schema {manifest.get('schema') if isinstance(manifest, dict) else None!r}, "
                          f"expected {SCHEMA!r}; rebuild with this edgec version")
    return manifest


def verify_package(folder) -> dict:
    """Hashes match the manifest, the INT8 model loads in ONNX Runtime and runs once with finite outputs."""
    import onnxruntime as ort
    folder = Path(folder)
    manifest = read_manifest(folder)
    checked = []
    for name, rec in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise VerifyError(f"{folder}: {name} is listed in the manifest but missing; rebuild or restore it")
        got = file_record(path)
        if got != rec:
            what = "size" if got["bytes"] != rec["bytes"] else "sha256"
            raise VerifyError(f"{folder}: {name} does not match the manifest ({what} differs): it was modified "
                              "or corrupted; rebuild or restore it")
        checked.append(name)
    for required in (MODEL_FILE, FP32_FILE):
        if required not in checked:
            raise VerifyError(f"{folder}: manifest lists no {required}; rebuild the package")
    try:
        sess = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for unloadable models
        raise VerifyError(f"{folder}/{MODEL_FILE} does not load in ONNX Runtime ({str(e).splitlines()[0]})") from None
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    outs = sess.run(None, {inp.name: x})
    if not all(np.isfinite(o).all() for o in outs):
        raise VerifyError(f"{folder}/{MODEL_FILE} produced NaN/Inf on a test input; rebuild the package")
    return {"package": str(folder), "files_checked": checked, "ran": True,
            "input": {"name": inp.name, "shape": shape}, "outputs": [list(o.shape) for o in outs]}
