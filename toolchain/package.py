"""The package writer: a build's stage records -> the typed manifest (edgec.core.package), report.md, hashes.

The only part of the package contract that needs torch and onnx (versions, FLOPs, the model's declared inputs
and outputs); everything that reads a package goes through edgec.core.package without them.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from edgec.core import __version__
from edgec.core.package import (FP32_FILE, MANIFEST_FILE, MODEL_FILE, REPORT_FILE, SCHEMA, SIGNATURE_FILE,  # noqa: F401
                                Agreement, Figures, Latency, Manifest, Metrics, ModelMetrics, OutputCheck,
                                Quantization, Source, StageRecord, TensorSpec, Toolchain, file_record, now,
                                sign_package, write_manifest)


def toolchain_versions() -> Toolchain:
    import onnx
    import onnxruntime
    import torch
    from edgec.exporters.target import host_cpu
    return Toolchain(edgec=__version__, torch=torch.__version__, onnx=onnx.__version__,
                     onnxruntime=onnxruntime.__version__, numpy=np.__version__, python=platform.python_version(),
                     machine=platform.machine(), cpu_features=list(host_cpu().features))


def tensor_specs(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) as the ONNX file declares them: every input, any dtype and rank, dynamic axes by name."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(vi):
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "dynamic") for d in t.shape.dim]
        return TensorSpec(vi.name, shape, np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name)

    return [spec(i) for i in graph.input if i.name not in initializers], [spec(o) for o in graph.output]


def _example_shapes(calib, inputs: list[TensorSpec]) -> dict[str, list[int]]:
    """The concrete shape of one calibration sample per input (a dict feed, or one array for one input)."""
    head = calib.head(1)
    if isinstance(head, dict):
        return {name: list(np.shape(v)) for name, v in head.items()}
    return {inputs[0].name: list(np.shape(head))} if inputs else {}


def _inside(value, folder: str):
    """Paths into the temporary build folder -> names in the package (the folder is renamed at the end)."""
    if isinstance(value, str):
        return value[len(folder) + 1:] if value.startswith(folder + "/") else value
    if isinstance(value, dict):
        return {k: _inside(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_inside(v, folder) for v in value]
    return value


def _stage(stages: list[StageRecord], name: str) -> StageRecord | None:
    return next((s for s in stages if s.name == name), None)


def make_manifest(folder: Path, inputs, module, stages, *, extra=None, seconds=0.0) -> Manifest:
    from edgec.metrics import count_flops, count_params
    records = [StageRecord.from_json(_inside(s.to_dict(), str(folder)), f"stage {s.name}") for s in stages]
    evaluation = _stage(records, "evaluate").metrics
    params, flops = count_params(module), count_flops(module, inputs.example())
    fp32_bytes, int8_bytes = (folder / FP32_FILE).stat().st_size, (folder / MODEL_FILE).stat().st_size
    model_inputs, model_outputs = tensor_specs(folder / MODEL_FILE)
    examples = _example_shapes(inputs.calib, model_inputs)
    for spec in model_inputs:
        spec.example = examples.get(spec.name)

    def model_metrics(kind, size):
        m = ModelMetrics(bytes=size, params=params, flops=flops)
        if "fp32_accuracy" in evaluation:
            m.accuracy = evaluation[f"{kind}_accuracy"]
        else:   # without labels: INT8 against FP32 (FP32 agrees with itself)
            m.agreement = Agreement.from_json(evaluation["agreement"]) if kind == "int8" else \
                Agreement(top1_agreement=100.0 if evaluation["agreement"].get("top1_agreement") is not None else None)
        return m

    metrics = Metrics(fp32=model_metrics("fp32", fp32_bytes), int8=model_metrics("int8", int8_bytes),
                      compression_ratio=round(fp32_bytes / int8_bytes, 3),
                      outputs=[OutputCheck.from_json(o, f"output {o['name']}") for o in evaluation.get("outputs", [])])
    original = _stage(records, "load").metrics
    if original["params"] != params:  # pruned: compare against what the user gave us
        metrics.original = Figures(params=original["params"], flops=original["flops"])
    latency = {}
    bench = _stage(records, "bench")
    if bench:
        measured = now()
        latency = {ep: Latency.from_bench(r["int8"], measured) for ep, r in bench.metrics.items()}
        metrics.fp32.latency = {ep: Latency.from_bench(r["fp32"], measured) for ep, r in bench.metrics.items()}
    quant = _stage(records, "quantize").metrics
    return Manifest(
        schema=SCHEMA, created=now(), source=Source.from_json(inputs.model.describe(), "source"), files={},
        inputs=model_inputs, outputs=model_outputs, opset=_stage(records, "export").metrics["export"]["opset"],
        toolchain=toolchain_versions(),
        quantization=Quantization.from_json({k: v for k, v in quant.items() if k in (
            "scheme", "method", "samples", "excluded_nodes", "ops", "pre_process", "transforms", "sensitivity")},
            "quantization"),
        stages=records, metrics=metrics, latency=latency, build_seconds=round(seconds, 2),
        preprocess=inputs.calib.preprocess or None, classes=inputs.calib.classes, extra=dict(extra or {}))


def write_package_files(folder: Path, manifest: Manifest, sign_key=None) -> None:
    """Render the report, hash every file, write the manifest last; with `sign_key` (a NAME.key path), sign it
    in the same temporary folder, so the package appears complete and signed, or not at all."""
    from edgec.core.report import render_markdown
    (folder / REPORT_FILE).write_text(render_markdown(manifest))
    manifest.files = {p.name: file_record(p) for p in sorted(folder.iterdir())
                      if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)}
    write_manifest(folder, manifest)
    if sign_key is not None:
        sign_package(folder, sign_key)
