"""qat-kd: fake quantization equals ONNX Runtime's QDQ arithmetic, real KD fine-tuning on the digits CNN, and the
exported QDQ model is INT8 in the file and in ORT's optimized graph, with the accuracy measured in torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgec.core.errors import ModelError, OptionError
from edgec.exporters.target import scheme_for
from edgec.qat import (QatConfig, calibrate, export_qat_onnx, fake_quant, observers, prepare_qat, qat_finetune, qrange,
                       scale_zp)


def _ort_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear run by ONNX Runtime itself (graph optimizations off)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("reduce_range", [True, False])
def test_ranges_and_scales_are_ort_s(reduce_range):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
    rng = np.random.default_rng(0)
    for qtype, onnx_type, symmetric in (("int8", TensorProto.INT8, True), ("uint8", TensorProto.UINT8, False)):
        qmin, qmax = get_qmin_qmax_for_qType(onnx_type, reduce_range=reduce_range and qtype == "int8",
                                             symmetric=symmetric)
        assert qrange(qtype, reduce_range and qtype == "int8", symmetric) == (int(qmin), int(qmax))
        for _ in range(50):
            lo, hi = np.float32(rng.normal() * 3), np.float32(abs(rng.normal()) * 5)
            lo = np.float32(min(lo, hi) if rng.random() < 0.8 else abs(lo))  # some ranges above 0 (range gets 0)
            zp, scale = compute_scale_zp(np.array(lo), np.array(hi), qmin, qmax, symmetric)
            s, z = scale_zp(torch.tensor(lo), torch.tensor(hi), int(qmin), int(qmax), symmetric)
            assert s.item() == float(scale) and int(z) == int(zp)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_equals_ort_quantize_dequantize(per_channel):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(8, 6, 5, 5)) * 2).astype(np.float32)
    if per_channel:  # int8 weights, symmetric, reduce_range: [-64, 64]
        qmin, qmax = qrange("int8", True, True)
        flat = torch.from_numpy(x).reshape(8, -1)
        s, z = scale_zp(flat.amin(1), flat.amax(1), qmin, qmax, True)
        # halfway ties (weights never leave [-64, 64]: the scale comes from their own absmax)
        x[0, 0, 0, :3] = [s[0] * 2.5, -s[0] * 3.5, s[0] * 63.5]
        got = fake_quant(torch.from_numpy(x), s, z, qmin, qmax, axis=0).numpy()
        want = _ort_qdq(x, s.numpy(), z.numpy().astype(np.int8), axis=0)
    else:  # uint8 activations, asymmetric
        qmin, qmax = qrange("uint8", False, False)
        s, z = scale_zp(torch.tensor(-1.3), torch.tensor(4.1), qmin, qmax, False)
        x.reshape(-1)[:4] = [s * 0.5, s * 1.5, -5.0, 9.0]  # ties go to even, outside the range saturates
        got = fake_quant(torch.from_numpy(x), s, z, qmin, qmax).numpy()
        want = _ort_qdq(x, s.numpy(), z.numpy().astype(np.uint8), axis=1)
    np.testing.assert_array_equal(got, want)


def test_straight_through_gradient_stops_outside_the_range():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.7, 10.0], requires_grad=True)
    fake_quant(x, torch.tensor(0.01), torch.tensor(128.0), 0, 255).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def qat_cnn(trained_cnn, digits, tmp_path_factory):
    from edgec.modelio import load_model
    train_ds, test_ds = digits
    teacher = load_model(trained_cnn[0]).module
    student = load_model(trained_cnn[0]).module
    qmodel, record = qat_finetune(student, teacher, train_ds, test_ds, QatConfig(epochs=1, calib_batches=4))
    out = tmp_path_factory.mktemp("qat") / "cnn.qat.onnx"
    info = export_qat_onnx(qmodel, torch.from_numpy(test_ds.x[:1]), out, eval_data=test_ds)
    return qmodel, record, info, out, teacher


def test_qat_finetune_record_and_frozen_observers(qat_cnn, trained_cnn):
    qmodel, record, _, _, _ = qat_cnn
    assert record["bn_folded"] == 5 and record["wrapped"] == 6
    assert record["teacher"] and len(record["epochs"]) == 1 and record["scheme"]["reduce_range"] == \
        scheme_for().reduce_range
    assert record["fp32_accuracy"] == pytest.approx(trained_cnn[1])
    # one epoch of KD fine-tuning keeps the quantized model within a point of FP32
    assert record["torch_fake_quant_accuracy"] >= record["fp32_accuracy"] - 1.0
    freeze = record["observer_freeze_step"]
    assert freeze > 0 and all(int(o.steps) == freeze for o in observers(qmodel))
    relu_outputs = [o for o in observers(qmodel) if float(o.min_val) == 0.0]
    assert relu_outputs and all(int(o.zero_point) == 0 for o in relu_outputs)  # lets ORT drop the Relu


def test_exported_model_is_int8_and_fully_fused(qat_cnn, digits, tmp_path):
    from edgec.exporters.onnx_export import export_onnx
    from edgec.modelio import load_model
    import onnx
    _, _, info, path, teacher = qat_cnn
    assert info["weights_folded"] == 6 and info["biases_int32"] == 6
    assert info["quantize_linear"] > 0 and info["dequantize_linear"] > info["quantize_linear"]
    fused = info["ort_fused"]
    assert fused["int8_compute"] == {"QLinearConv": 5, "QGemm": 1} and fused["float_compute"] == {}
    model = onnx.load(str(path))
    floats = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and
              np.prod(i.dims) > 64]  # only scales may stay float
    assert floats == []
    fp32 = export_onnx(teacher, torch.from_numpy(digits[1].x[:1]), tmp_path / "fp32.onnx")
    assert info["file_bytes"] < 0.4 * fp32.file_bytes


def test_torch_accuracy_is_the_onnx_runtime_accuracy(qat_cnn, digits):
    from edgec.exporters.compare import accuracy, output_agreement, ort_session, run_onnx
    qmodel, record, info, path, _ = qat_cnn
    test_ds = digits[1]
    ort_acc = 100 * accuracy(path, test_ds, test_ds.y)
    assert abs(ort_acc - record["torch_fake_quant_accuracy"]) <= 0.3
    check = info["check"]  # the record export_qat_onnx writes says the same
    assert check["ort_accuracy"] == pytest.approx(ort_acc) and check["accuracy_gap"] <= 0.3
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(test_ds.x[:])).numpy()
    agree = output_agreement(ref, run_onnx(ort_session(path), test_ds.x)[0])
    assert agree["mean_cosine"] > 0.9999 and agree["top1_agreement"] >= 0.998


class _TinyResNet(nn.Module):
    """Residual block with a functional ReLU, a strided shortcut conv and average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                               nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.short = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        x = nn.functional.max_pool2d(self.stem(x), 2)
        return self.head(torch.relu(self.a(x) + self.short(x)))


def test_residual_model_trains_exports_and_agrees(digits, tmp_path):
    from edgec.exporters.compare import output_agreement, ort_session, run_onnx
    from edgec.train import TrainConfig, train
    train_ds, test_ds = digits
    torch.manual_seed(0)
    model = _TinyResNet()
    train(model, train_ds, TrainConfig(epochs=3, lr=0.1, batch_size=32), label="tiny")
    qmodel, record = qat_finetune(model, None, train_ds, test_ds, QatConfig(epochs=1, calib_batches=2))
    info = export_qat_onnx(qmodel, torch.from_numpy(test_ds.x[:1]), tmp_path / "tiny.onnx")
    assert record["bn_folded"] == 4 and info["ort_fused"]["int8_compute"] == {"QLinearConv": 4, "QGemm": 1}
    assert info["ort_fused"]["float_compute"] == {} and info["ort_fused"]["op_types"].get("QLinearAdd") == 1
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(test_ds.x[:])).numpy()
    agree = output_agreement(ref, run_onnx(ort_session(tmp_path / "tiny.onnx"), test_ds.x)[0])
    assert agree["mean_cosine"] > 0.9999 and agree["top1_agreement"] >= 0.99
    assert record["torch_fake_quant_accuracy"] > 50  # trained (chance is 10%): activations are not degenerate


def test_torchvision_resnet18_exports_fully_int8(digits, tmp_path):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    qmodel = prepare_qat(model, scheme_for())
    calibrate(qmodel, digits[0], batches=1, batch_size=16)
    info = export_qat_onnx(qmodel.eval(), torch.from_numpy(digits[1].x[:1]), tmp_path / "r18.onnx")
    assert info["weights_folded"] == 21 and info["biases_int32"] == 21
    assert info["ort_fused"]["int8_compute"] == {"QLinearConv": 20, "QGemm": 1}
    assert info["ort_fused"]["float_compute"] == {}


def test_bad_inputs_are_user_errors(digits):
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: torch.fx cannot trace it
    with pytest.raises(ModelError, match="torch.fx"):
        prepare_qat(Branchy(), scheme_for())
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))  # one weight, two input ranges: no single QDQ layer matches both
    with pytest.raises(ModelError, match="called more than once"):
        prepare_qat(Reused(), scheme_for())
    with pytest.raises(OptionError, match="freeze_bn"):
        qat_finetune(nn.Linear(3, 2), None, digits[0], None, QatConfig(freeze_bn=False))


@pytest.mark.parametrize("target, dw_top, other_top", [("cpu-avx2", 127, 64), ("cpu-vnni", 127, 127)])
def test_fake_quant_weight_grids_are_ptq_s(target, dw_top, other_top, digits, tmp_path):
    """QAT trains on the grid PTQ ships (exporters.transforms.weight_reduce_range, one rule for both): without
    VNNI, 7-bit weights except the depthwise ones (ORT's depthwise kernel does not saturate), and the exported
    file keeps those grids."""
    import onnx
    from onnx import numpy_helper
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    qmodel = prepare_qat(model, scheme_for(target))
    layers = [m for m in qmodel.modules() if hasattr(m, "wqmax")]
    assert [(m.wqmin, m.wqmax) for m in layers] == [(-other_top, other_top), (-dw_top, dw_top),
                                                    (-other_top, other_top), (-other_top, other_top)]
    calibrate(qmodel, digits[0], batches=1, batch_size=16)
    export_qat_onnx(qmodel.eval(), torch.from_numpy(digits[1].x[:1]), tmp_path / "dw.onnx")
    g = onnx.load(str(tmp_path / "dw.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    tops = []
    for n in g.node:
        if n.op_type in ("Conv", "Gemm") and n.input[1] in producers:
            w = inits[producers[n.input[1]].input[0]]
            tops.append(int(np.abs(w.astype(np.int32)).max()))
    assert tops == [other_top, dw_top, other_top, other_top]   # each weight's absmax lands on its grid's end
