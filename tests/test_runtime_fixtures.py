"""Tiny real ONNX models for the runtime and bench CLI tests (built with onnx.helper: no torch, milliseconds).
Registered once for the whole session in conftest.py; pytest collects no tests here. Packages are never invented
here: tests that need one take conftest's `built_package` (made by the real `edgec build`), or a copy of it."""
from __future__ import annotations

import numpy as np
import pytest


def make_conv_model(path, batch="N", hw=(16, 16), channels=8, seed=0):
    """x[batch,3,H,W] -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[batch,10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((10, channels)).astype(np.float32), "fw"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    h, w = hw
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    return make_conv_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture(scope="session")
def dynamic_hw_onnx(tmp_path_factory):
    return make_conv_model(tmp_path_factory.mktemp("m") / "dyn.onnx", hw=("H", "W"))


@pytest.fixture(scope="session")
def int8_onnx(tmp_path_factory, tiny_onnx):
    """The tiny model quantized the way edgec ships INT8 on x86 (QDQ, per-channel, reduce_range, U8/S8)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    rng = np.random.default_rng(1)
    data = iter([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(data, None)

    out = tmp_path_factory.mktemp("q") / "tiny.int8.onnx"
    quantize_static(str(tiny_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out



def with_dynamic_spatial_axes(onnx_path, names=("height", "width")):
    """Re-declare a conv net's input H and W as dynamic axes, as an exporter with dynamic spatial axes writes it
    (the net is fully convolutional up to its global pooling, so any size runs)."""
    import onnx
    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims[2:], names):
        d.dim_param = name
    del model.graph.value_info[:]   # stale fixed shapes of intermediate tensors
    onnx.save(model, str(onnx_path))
    _relist_in_package(onnx_path)
    return onnx_path


def _relist_in_package(path):
    """A file changed inside a package gets its new hash in the manifest, as a rebuild would give it (bench
    refuses a package whose model.onnx does not match its manifest)."""
    import json
    from pathlib import Path

    from edgec.core.package import MANIFEST_FILE, file_record
    manifest = Path(path).parent / MANIFEST_FILE
    if manifest.is_file():
        doc = json.loads(manifest.read_text())
        doc["files"][Path(path).name] = file_record(Path(path)).to_json()
        manifest.write_text(json.dumps(doc, indent=2))
