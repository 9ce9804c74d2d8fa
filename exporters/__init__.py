"""torch -> ONNX export and ONNX -> INT8 quantization (see exporters/README.md).

Modules, one job each: onnx_export (export + ORT-vs-torch check), target (CPU features -> INT8 scheme),
calibration (streaming, bounded-memory ranges), quantize (ORT static QDQ + quantized-really report),
compare (ORT sessions and agreement metrics), sensitivity (per-node error, accuracy-aware fallback).
Nothing is imported here so that `import edgec.exporters.target` stays free of torch.
"""
