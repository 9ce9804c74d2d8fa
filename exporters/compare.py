"""Real ONNX Runtime sessions, batched inference and agreement metrics between two sets of outputs.

Shared by the export check (ORT vs torch) and the quantization check (INT8 vs FP32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgec.core.errors import DataError


def ort_session(path, *, optimize: bool = True, threads: int | None = None):
    """A CPU session: graph optimizations on (that is how the model will run, fused INT8 kernels included)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(path)), so, providers=["CPUExecutionProvider"])


def iter_batches(x, batch_size: int) -> Iterable[np.ndarray]:
    for start in range(0, len(x), batch_size):
        yield np.ascontiguousarray(np.asarray(x[start:start + batch_size], dtype=np.float32))


def run_onnx(session, x, batch_size: int = 64) -> list[np.ndarray]:
    """All outputs for all samples, evaluated batch by batch (the model has a dynamic batch axis)."""
    if len(x) == 0:
        raise DataError("no samples to run the model on; pass at least one sample")
    inp = session.get_inputs()[0]
    name, fixed = inp.name, inp.shape[0] if isinstance(inp.shape[0], int) else None
    if fixed is not None:  # a model exported with a static batch only takes exactly that many rows
        if len(x) % fixed:
            raise DataError(f"the model has a fixed batch of {fixed} and {len(x)} samples were given; "
                            "export it with a dynamic batch axis or give a multiple of it")
        batch_size = fixed
    parts = [session.run(None, {name: b}) for b in iter_batches(x, batch_size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def output_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-sample cosine of flattened outputs, max abs error, and top-1 agreement for (N, classes) logits."""
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    num = (ref * got).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    # Two all-zero vectors agree perfectly; one zero vector against a non-zero one does not.
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(ref - got).max(1) == 0, 1.0, 0.0))
    out = {"max_abs_err": float(np.abs(ref - got).max()), "mean_cosine": float(cos.mean()),
           "min_cosine": float(cos.min()),
           "ref_abs_max": float(np.abs(ref).max())}
    if ref.shape[1] > 1:
        out["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    return out


def compare_outputs(fp32_path, int8_path, samples, *, batch_size: int = 64) -> dict:
    """Agreement of the INT8 model with the FP32 model on real samples, per output name."""
    a, b = ort_session(fp32_path), ort_session(int8_path)
    ra, rb = run_onnx(a, samples, batch_size), run_onnx(b, samples, batch_size)
    names = [o.name for o in a.get_outputs()]
    return {"samples": int(len(samples)),
            "outputs": {n: output_agreement(x, y) for n, x, y in zip(names, ra, rb)}}


def accuracy(onnx_path, x, y: Sequence[int], batch: int = 64, *, output: int = 0) -> float:
    """Top-1 accuracy of output `output` against integer labels."""
    y = np.asarray(y)
    if len(y) != len(x):
        raise DataError(f"{len(y)} labels for {len(x)} samples; give one label per sample")
    logits = run_onnx(ort_session(onnx_path), x, batch)[output]
    return float((logits.reshape(len(logits), -1).argmax(1) == y).mean())
