"""Fake-quantized torch model -> QDQ ONNX model that ONNX Runtime runs as INT8.

torch's exporter turns fake_quantize_* into QuantizeLinear/DequantizeLinear pairs, but leaves every weight
as a float initializer followed by its QuantizeLinear (an FP32-sized file, quantized again at every load)
and every bias in float (ORT's QDQ Conv fusion needs an int32 bias behind a DequantizeLinear). This module
folds each weight's QuantizeLinear into an int8 initializer and stores biases as int32 with
scale = input_scale * weight_scale (as onnxruntime.quantization does), then reports what ORT's optimizer
really fused.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from edgec.core.errors import ExportError
from edgec.core.fsutil import atomic_path

FUSED_INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat")
FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul")


def _constants(model) -> dict:
    """Values of initializers, Constant nodes and Cast/Identity of those (the zero points arrive as Casts when
    constant folding is off)."""
    import onnx
    from onnx import numpy_helper
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "Cast" and node.input[0] in values:
            to = onnx.helper.tensor_dtype_to_np_dtype(node.attribute[0].i)
            values[node.output[0]] = values[node.input[0]].astype(to)
    return values


def _materialize_constants(model, consts: dict) -> None:
    """Constant/Cast/Identity nodes with known values -> initializers, so ORT's QDQ fusion sees constant
    scales and zero points without relying on its own constant folding."""
    from onnx import numpy_helper
    graph = model.graph
    keep = []
    for node in graph.node:
        if node.op_type in ("Constant", "Cast", "Identity") and node.output[0] in consts \
                and node.output[0] not in {o.name for o in graph.output}:
            graph.initializer.append(numpy_helper.from_array(np.asarray(consts[node.output[0]]), node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _ort_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None, dtype) -> np.ndarray:
    """QuantizeLinear's arithmetic: saturate(round_half_even(x / scale) + zp)."""
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zp.astype(np.float64)
    return np.clip(q, info.min, info.max).astype(dtype)


def fold_weight_quantizers(model) -> dict:
    """QuantizeLinear(float initializer) -> int8 initializer; float biases of Conv/Gemm -> int32 + DQ."""
    from onnx import helper, numpy_helper
    consts = _constants(model)
    _materialize_constants(model, consts)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    dead, new_inits, folded = set(), [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x, scale = consts[node.input[0]], consts[node.input[1]]
        zp = consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = _ort_quantize(x, scale, zp, axis if scale.ndim == 1 and scale.size > 1 else None, zp.dtype)
        name = f"{node.input[0]}_quantized"
        new_inits.append(numpy_helper.from_array(q, name))
        for user in graph.node:  # the DequantizeLinear(s) now read the int8 initializer
            for i, inp in enumerate(user.input):
                if inp == node.output[0]:
                    user.input[i] = name
        dead.add(id(node))
        folded += 1
    biases = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        bias = consts[node.input[2]]
        bscale = (consts[dq_x.input[1]].astype(np.float32) * consts[dq_w.input[1]].astype(np.float32)).reshape(-1)
        bscale = np.broadcast_to(bscale, bias.shape).astype(np.float32)
        q = np.clip(np.round(bias.astype(np.float64) / bscale.astype(np.float64)), -2 ** 31, 2 ** 31 - 1)
        base = node.input[2]
        new_inits += [numpy_helper.from_array(q.astype(np.int32), f"{base}_quantized"),
                      numpy_helper.from_array(bscale, f"{base}_scale"),
                      numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{base}_zero_point")]
        dq = helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                              [f"{base}_dequantized"], name=f"{base}_DequantizeLinear", axis=0)
        graph.node.append(dq)
        node.input[2] = f"{base}_dequantized"
        biases += 1
    kept = [n for n in graph.node if id(n) not in dead]
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # folded weights
    del graph.node[:]
    graph.node.extend(_toposort(kept))
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return {"weights_folded": folded, "biases_int32": biases}


def _toposort(nodes):
    produced = {o: n for n in nodes for o in n.output}
    done, out, seen = set(), [], set()

    def visit(n):
        if id(n) in seen:
            return
        seen.add(id(n))
        for i in n.input:
            if i in produced:
                visit(produced[i])
        out.append(n)
    for n in nodes:
        visit(n)
    return out


def ort_fusion(path, level: str = "extended") -> dict:
    """What ORT's CPU optimizer turns the QDQ graph into: fused INT8 kernels vs float compute nodes left."""
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4   # fatal only: errors come back as exceptions (one line)
    so.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    with tempfile.TemporaryDirectory(prefix="edgec-ortopt-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {"level": level, "int8_compute": {k: ops[k] for k in FUSED_INT8_OPS if ops[k]},
            "float_compute": {k: ops[k] for k in FLOAT_COMPUTE_OPS if ops[k]},
            "quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "op_types": dict(sorted(ops.items()))}


def _trace_export(model, example, path, opset: int, inputs=None) -> None:
    """The TorchScript exporter (the one that maps fake_quantize_* to Q/DQ), without constant folding: folding
    would turn each weight's Q/DQ pair back into a float weight. `example`: one tensor or a tuple (several
    inputs); `inputs`: their InputSpecs (names and dynamic axes, as export_onnx writes them)."""
    import torch

    from edgec.exporters.onnx_export import _quiet, default_output_names, example_specs
    was_training = model.training
    model.eval()
    try:
        args, specs = example_specs(example, "input", inputs)
        with torch.no_grad():
            outs = model(*args)
        names = default_output_names(len(outs) if isinstance(outs, (tuple, list)) else 1)
        axes = {s.name: s.dynamic_axes for s in specs} | {name: {0: "batch"} for name in names}
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                              input_names=[s.name for s in specs], output_names=names, dynamic_axes=axes,
                              do_constant_folding=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"QDQ export failed: {str(e).strip().splitlines()[0][:200] if str(e).strip() else e}") from e
    finally:
        model.train(was_training)


def export_qdq(model, example, path, *, opset: int = 17, force: bool = True, inputs=None) -> dict:
    """Export a fake-quantized module (see edgec.qat) to a QDQ ONNX file with int8 weights."""
    import onnx

    from edgec.exporters.quantize import quantized_ops
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.qdq-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        _trace_export(model, example, raw, opset, inputs)
        proto = onnx.load(str(raw))
        raw_bytes = raw.stat().st_size
        folded = fold_weight_quantizers(proto)
        staged = Path(tmp) / "qdq.onnx"
        onnx.save_model(proto, str(staged))
        onnx.checker.check_model(str(staged))
        counts = Counter(n.op_type for n in proto.graph.node)
        int8_inits = sum(1 for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8)
        ops, float_nodes = quantized_ops(staged)
        with atomic_path(path, force=force) as out:
            os.replace(staged, out)
    return {"exporter": "torchscript+qdq-fold", "opset": opset, "path": str(path),
            "file_bytes": path.stat().st_size, "unfolded_bytes": raw_bytes,
            "quantize_linear": counts["QuantizeLinear"], "dequantize_linear": counts["DequantizeLinear"],
            "int8_initializers": int8_inits, **folded, "qdq_ops": ops, "float_compute_nodes": float_nodes,
            "ort_fused": ort_fusion(path)}


__all__ = ["export_qdq", "fold_weight_quantizers", "ort_fusion"]
