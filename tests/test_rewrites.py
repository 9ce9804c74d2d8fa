"""Exact graph rewrites: a strided conv over few channels becomes a stride-1 conv over the stride's phases, the
same function (ORT runs both; outputs compared), and what does not fit the rule stays as it is."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgec.exporters.rewrites import strided_convs_as_phases


def _export(module, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "n"}})
    return path


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


class AudioFront(nn.Module):
    """A CREPE-like front end: a long strided kernel on one channel, padded, then a normal conv."""

    def __init__(self, conv, pad):
        super().__init__()
        self.conv, self.pad = conv, pad
        self.next = nn.Conv1d(conv.out_channels, 4, 3, padding=1) if isinstance(conv, nn.Conv1d) \
            else nn.Conv2d(conv.out_channels, 4, 3, padding=1)

    def forward(self, x):
        return self.next(torch.relu(self.conv(nn.functional.pad(x, self.pad) if self.pad else x)))


@pytest.mark.parametrize("conv, shape, pad", [
    (nn.Conv1d(1, 8, 32, stride=4, padding=5), (1, 203), None),          # Conv pads; 213 samples: 1 cut
    (nn.Conv1d(2, 8, 16, stride=4), (2, 130), (7, 9)),                   # F.pad before, 2 channels
    (nn.Conv2d(1, 8, (64, 1), stride=(4, 1)), (1, 300, 1), (0, 0, 30, 30)),   # torchcrepe's layout (N,1,T,1)
    (nn.Conv2d(1, 8, (3, 24), stride=(1, 3), padding=(1, 0)), (1, 5, 62), None),   # strided on the last axis
])
def test_a_strided_few_channel_conv_becomes_a_stride_1_conv_over_its_phases(tmp_path, conv, shape, pad):
    """Through edgec's export (F.pad's pads are computed at run time in torch's graph: their sizes come from a
    folded copy); the written file computes what torch does, at another batch size too."""
    from edgec.exporters.onnx_export import export_onnx
    torch.manual_seed(0)
    module = AudioFront(conv, pad).eval()
    info = export_onnx(module, torch.randn(2, *shape), tmp_path / "front.onnx")
    rec = info.simplified["strided_convs_as_phases"]
    assert rec["rewritten"] == ["/conv/Conv"] and "phases" in rec["reason"], info.simplified
    model = onnx.load(str(tmp_path / "front.onnx"))
    strided = [onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Conv"
               for a in n.attribute if a.name == "strides"]
    assert all(s == [1] * (len(shape) - 1) for s in strided), strided
    x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-4, atol=1e-4)
    assert strided_convs_as_phases(model)["rewritten"] == []   # nothing strided left to rewrite


@pytest.mark.parametrize("conv", [
    nn.Conv1d(1, 8, 10, stride=5),                 # 2 taps a phase: measured no faster
    nn.Conv1d(8, 8, 16, stride=4),                 # 32 phase channels
    nn.Conv1d(2, 8, 16, stride=4, groups=2),       # grouped
    nn.Conv1d(1, 8, 18, stride=4),                 # taps not a multiple of the stride
    nn.Conv2d(1, 8, 8, stride=4),                  # strided on two axes
])
def test_convs_outside_the_rule_stay(tmp_path, conv):
    shape = (conv.in_channels, 64) if isinstance(conv, nn.Conv1d) else (1, 64, 64)
    model = onnx.load(str(_export(AudioFront(conv, None), torch.randn(2, *shape), tmp_path / "f.onnx")))
    before = model.SerializeToString()
    assert strided_convs_as_phases(model)["rewritten"] == []
    assert model.SerializeToString() == before


def test_a_conv_the_user_keeps_and_a_dynamic_length_stay(tmp_path):
    model = onnx.load(str(_export(AudioFront(nn.Conv1d(1, 8, 32, stride=4), None), torch.randn(2, 1, 200),
                                  tmp_path / "f.onnx")))
    assert strided_convs_as_phases(model, keep=("/conv/Conv",))["rewritten"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(AudioFront(nn.Conv1d(1, 8, 32, stride=4), None), (torch.randn(2, 1, 200),),
                          str(tmp_path / "dyn.onnx"), dynamo=False, opset_version=17, input_names=["input"],
                          dynamic_axes={"input": {0: "n", 2: "t"}})
    assert strided_convs_as_phases(onnx.load(str(tmp_path / "dyn.onnx")))["rewritten"] == []   # length unknown


def test_quantize_rewrites_a_file_from_elsewhere_and_runs_the_phase_conv_in_int8(tmp_path):
    """An ONNX file edgec did not export (torch's own graph, F.pad's pads computed at run time) gets the phase
    form in quantize's pre-processing; the INT8 conv is a QLinearConv and stays close to FP32."""
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    torch.manual_seed(0)
    path = _export(AudioFront(nn.Conv1d(1, 8, 32, stride=4), (14, 14)), torch.randn(2, 1, 256), tmp_path / "f.onnx")
    g = np.random.default_rng(1)
    t = np.arange(256) / 64
    x = (np.sin(2 * np.pi * g.uniform(1, 8, (48, 1, 1)) * t) + 0.1 * g.standard_normal((48, 1, 256))).astype(np.float32)
    info = quantize_int8(path, tmp_path / "int8.onnx", [{"input": x[i:i + 16]} for i in range(0, 32, 16)],
                         QuantOptions(force_calibration_data=True))
    assert info.pre_process["strided_convs_as_phases"]["rewritten"] == ["/conv/Conv"], info.pre_process
    assert info.ops["by_type"]["Conv"] == {"int8": 2, "float": 0}
    ref = _run(onnx.load(str(path)), x[32:])
    got = _run(onnx.load(str(tmp_path / "int8.onnx")), x[32:])
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    assert sqnr > 25, sqnr
    kept = quantize_int8(path, tmp_path / "kept.onnx", [{"input": x[:16]}],
                         QuantOptions(force_calibration_data=True, exclude_nodes=("/conv/Conv",)))
    assert kept.pre_process["strided_convs_as_phases"]["rewritten"] == []   # a conv the user keeps stays as it is


def test_pads_between_equal_quantizers_pad_the_integers_bit_for_bit(tmp_path):
    """ORT's QDQ output keeps F.pad's Pad in float between a DQ and a Q of the same scale: padding the codes with
    the zero point instead gives the same INT8 model outputs, with no float Pad left."""
    from edgec.exporters.quantize import QuantOptions, prepare
    from edgec.exporters.rewrites import integer_pads
    torch.manual_seed(0)

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(2, 8, 5), nn.Conv1d(8, 4, 7)

        def forward(self, x):
            x = torch.relu(self.a(nn.functional.pad(x, (3, 1))))
            return self.b(nn.functional.pad(x, (2, 4)) - 0.5)

    path = _export(Padded(), torch.randn(2, 2, 40), tmp_path / "p.onnx")
    x = np.random.default_rng(2).standard_normal((32, 2, 40)).astype(np.float32)
    prepared = prepare(path, [{"input": x[:16]}], QuantOptions(force_calibration_data=True, policy=False))
    try:
        plain = prepared.quantize(tmp_path / "plain.onnx", [])
    finally:
        prepared.cleanup()
    model = onnx.load(str(plain))
    assert integer_pads(model) == ["/Pad", "/Pad_1"]
    assert all(n.op_type != "Pad" or prod_is_not_dq(model, n) for n in model.graph.node)
    np.testing.assert_array_equal(_run(model, x), _run(onnx.load(str(plain)), x))


def test_maxpools_over_codes_become_strided_slices_bit_for_bit(tmp_path):
    """ORT's integer MaxPool is scalar code: a MaxPool between equal quantizers becomes Pad (lowest code) and the
    Max of strided Slices per axis; the INT8 model's outputs are the same bits. A dilated pool stays."""
    from edgec.exporters.quantize import QuantOptions, prepare
    from edgec.exporters.rewrites import integer_maxpools
    torch.manual_seed(0)

    class Pools(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
            self.d = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.a(x)), 3, stride=2, padding=1)
            x = nn.functional.max_pool2d(self.b(x), (2, 3), stride=(2, 1), padding=(0, 1))
            x = nn.functional.max_pool2d(self.c(x), 2, stride=1, dilation=2)
            return nn.functional.max_pool1d(self.d(x.mean(2)), 3, stride=2)

    path = _export(Pools(), torch.randn(2, 3, 21, 30), tmp_path / "p.onnx")
    x = np.random.default_rng(3).standard_normal((16, 3, 21, 30)).astype(np.float32)
    prepared = prepare(path, [{"input": x}], QuantOptions(force_calibration_data=True, policy=False))
    try:
        plain = prepared.quantize(tmp_path / "plain.onnx", [])
    finally:
        prepared.cleanup()
    model = onnx.load(str(plain))
    done = integer_maxpools(model)
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert len(done) == 3 and len(pools) == 1 and any(a.name == "dilations" for a in pools[0].attribute)
    assert sum(n.op_type == "Slice" for n in model.graph.node) == 3 + 3 + 2 + 3 + 3
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x), _run(onnx.load(str(plain)), x))


def test_quantize_leaves_no_integer_maxpool_after_a_prelu(tmp_path):
    """The default quantization moves a PRelu's Max and the MaxPool after it onto the integers (integer_max), then
    the MaxPool becomes strided Slices: no MaxPool left, recorded, and the model still matches FP32."""
    from edgec.exporters.compare import ort_session, run_onnx
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.PReLU(16), nn.MaxPool2d(3, 2, ceil_mode=False), nn.Conv2d(16, 8, 3),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 5 * 5, 4)).eval()
    path = _export(net, torch.randn(2, 3, 28, 28), tmp_path / "n.onnx")
    x = np.random.default_rng(4).standard_normal((64, 3, 28, 28)).astype(np.float32)
    info = quantize_int8(path, tmp_path / "n.int8.onnx", [{"input": x}], QuantOptions(force_calibration_data=True))
    assert len(info.pre_process["integer_maxpools"]["pools"]) == 2 and info.pre_process["prelu"]["integer_max"]
    assert not [n for n in onnx.load(str(tmp_path / "n.int8.onnx")).graph.node if n.op_type == "MaxPool"]
    ref, got = (run_onnx(ort_session(p), x)[0] for p in (path, tmp_path / "n.int8.onnx"))
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25


def test_hard_swish_runs_in_float_between_the_quantizers(tmp_path, monkeypatch):
    """x * HardSigmoid(x) quantized by ORT rounds the HardSigmoid to 8 bits and multiplies in QLinearMul; as one
    float HardSwish between x's quantizer and the product's it is rounded once: no HardSigmoid left, recorded,
    opset 13 raised to 14, and the INT8 model is closer to FP32 than without the rewrite."""
    import edgec.exporters.rewrites as rewrites
    from edgec.exporters.compare import ort_session, run_onnx
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    torch.manual_seed(2)

    class Swish(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 8, 1)])

        def forward(self, x):
            for conv in self.convs:
                x = conv(x)
                x = x * nn.functional.hardsigmoid(x)
            return x.mean((2, 3))

    path = tmp_path / "s.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Swish().eval(), (torch.randn(2, 3, 20, 20),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "n"}})
    x = np.random.default_rng(5).standard_normal((64, 3, 20, 20)).astype(np.float32)
    ref = run_onnx(ort_session(path), x)[0]

    def sqnr(out):
        got = run_onnx(ort_session(out), x)[0]
        return 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())

    opts = QuantOptions(force_calibration_data=True, bias_correction=False)
    info = quantize_int8(path, tmp_path / "float.onnx", [{"input": x}], opts)
    model = onnx.load(str(tmp_path / "float.onnx"))
    assert len(info.pre_process["float_hard_swishes"]["muls"]) == 3
    assert [n.op_type for n in model.graph.node].count("HardSwish") == 3
    assert "HardSigmoid" not in {n.op_type for n in model.graph.node}
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 14
    monkeypatch.setattr(rewrites, "float_hard_swishes", lambda m: [])
    quantize_int8(path, tmp_path / "rounded.onnx", [{"input": x}], opts)
    assert sqnr(tmp_path / "float.onnx") > sqnr(tmp_path / "rounded.onnx") + 0.3
    old = onnx.load(str(tmp_path / "rounded.onnx"))
    next(o for o in old.opset_import if o.domain in ("", "ai.onnx")).version = 12
    assert rewrites.float_hard_swishes(old) == []     # no HardSwish before opset 14: an opset-12 graph stays


def prod_is_not_dq(model, node):
    producer = {o: n for n in model.graph.node for o in n.output}
    return node.input[0] not in producer or producer[node.input[0]].op_type != "DequantizeLinear"


def test_two_strided_convs_sharing_one_weight_each_get_their_phase_form(tmp_path):
    """A front end applied to two signals (one weight, two Convs): each rewritten, one phase weight for both."""
    from edgec.exporters.onnx_export import export_onnx
    torch.manual_seed(0)

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 32, stride=4)

        def forward(self, x):
            return self.conv(x) - self.conv(x.flip(-1))

    module = Twin().eval()
    info = export_onnx(module, torch.randn(2, 1, 200), tmp_path / "twin.onnx")
    assert len(info.simplified["strided_convs_as_phases"]["rewritten"]) == 2, info.simplified
    model = onnx.load(str(tmp_path / "twin.onnx"))
    onnx.checker.check_model(model)
    names = [i.name for i in model.graph.initializer]
    assert len(names) == len(set(names)) and sum("weight" in n for n in names) == 1, names   # one phase weight
    x = np.random.default_rng(0).standard_normal((3, 1, 200)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x), module(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


class FilterBank(nn.Module):
    """An STFT as a conv (silero-vad's front end): a long window on one channel at a hop of a half or a quarter
    of it, then a normal conv."""

    def __init__(self, conv, pad):
        super().__init__()
        self.conv, self.pad, self.next = conv, pad, nn.Conv1d(conv.out_channels, 4, 3, padding=1)

    def forward(self, x):
        return self.next(torch.relu(self.conv(nn.functional.pad(x, self.pad, mode="reflect") if self.pad else x)))


@pytest.mark.parametrize("conv, length, pad", [
    (nn.Conv1d(1, 16, 64, stride=32, bias=False), 200, (16, 16)),   # F.pad (reflect) before, 2 hops, 8 cut
    (nn.Conv1d(1, 8, 128, stride=32, padding=10), 300, None),       # the Conv's pads and bias, 4 hops
])
def test_a_filter_bank_of_few_hops_becomes_frames_times_one_matrix(tmp_path, conv, length, pad):
    """The rewrite on torch's own export (F.pad's pads are computed at run time: the length comes from a copy with
    them folded, as quantize's pre-processing knows it): no strided Conv left, a MatMul named as the Conv was, and
    the same outputs as torch at another batch size. edgec's FP32 export keeps the Conv (mixed in FP32)."""
    from edgec.exporters.onnx_export import _fold_small_constants, export_onnx
    from edgec.exporters.rewrites import static_shapes, strided_convs_as_frames
    torch.manual_seed(0)
    module = FilterBank(conv, pad).eval()
    model = onnx.load(str(_export(module, torch.randn(2, 1, length), tmp_path / "bank.onnx")))
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    _fold_small_constants(folded)
    rec = strided_convs_as_frames(model, shapes=static_shapes(folded))
    assert rec["rewritten"] == ["/conv/Conv"] and "frames" in rec["reason"], rec
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if n.name == "/conv/Conv"] == ["MatMul"]
    assert [n.op_type for n in model.graph.node].count("Conv") == 1   # the next conv only
    x = np.random.default_rng(0).standard_normal((3, 1, length)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-4, atol=1e-4)
    assert strided_convs_as_frames(model)["rewritten"] == []
    info = export_onnx(module, torch.randn(2, 1, length), tmp_path / "fp32.onnx")
    assert "strided_convs_as_frames" not in info.simplified
    assert "/conv/Conv" in {n.name for n in onnx.load(str(tmp_path / "fp32.onnx")).graph.node if n.op_type == "Conv"}


@pytest.mark.parametrize("conv", [
    nn.Conv1d(2, 8, 64, stride=32),     # two channels
    nn.Conv1d(1, 8, 64, stride=8),      # 8 hops
    nn.Conv1d(1, 8, 32, stride=16),     # a short kernel: not a filter bank
    nn.Conv1d(1, 8, 100, stride=32),    # taps not a multiple of the stride
    nn.Conv1d(1, 8, 64, stride=32, dilation=2),
])
def test_convs_outside_the_frame_rule_stay(tmp_path, conv):
    from edgec.exporters.rewrites import strided_convs_as_frames
    model = onnx.load(str(_export(FilterBank(conv, None), torch.randn(2, conv.in_channels, 400), tmp_path / "f.onnx")))
    before = model.SerializeToString()
    assert strided_convs_as_frames(model)["rewritten"] == []
    assert model.SerializeToString() == before
def test_one_weight_read_by_convs_of_different_strides_gets_a_phase_form_per_stride(tmp_path):
    """basic-pitch's CQT (a TF export) reads one 256-tap kernel with convs of stride 2, 4, ... 256: the phase weight
    of stride 4 has 4 channels, that of stride 2 two; one copy for both made ORT fail (kernel channels 16 vs C 2)."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((4, 1, 1, 32)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], [f"y{s}"], name=f"conv_s{s}", strides=[1, s], kernel_shape=[1, 32])
             for s in (2, 4)]
    nodes.append(helper.make_node("Concat", ["y2", "y4"], ["output"], axis=3))
    graph = helper.make_graph(nodes, "cqt", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 1, 128])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 4, 1, 74])],
                              [numpy_helper.from_array(w, "w")])
    graph.node.insert(0, helper.make_node("Identity", ["input"], ["x"], name="id"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(1).standard_normal((2, 1, 1, 128)).astype(np.float32)
    ref = _run(model, x)
    assert strided_convs_as_phases(model)["rewritten"] == ["conv_s2", "conv_s4"]
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-4, atol=1e-4)


def test_a_bias_two_convs_share_is_copied_under_an_unused_name_before_quantization(tmp_path):
    """ORT's quantizer copies a shared bias as name + "0" (then "1", ...) without checking node outputs: with a conv output already
    called so (basic-pitch's TF names) its INT8 file did not load. edgec gives each conv its own copy first."""
    from onnx import TensorProto, helper, numpy_helper
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    g = np.random.default_rng(0)
    w = numpy_helper.from_array(g.standard_normal((4, 2, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(g.standard_normal((4, 2, 3)).astype(np.float32), "w2")
    b = numpy_helper.from_array(g.standard_normal(4).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["b0"], name="c1", pads=[1, 1]),   # output named as ORT names its copy
             helper.make_node("Tanh", ["b0"], ["r"], name="tanh"),
             helper.make_node("Conv", ["input", "w2", "b"], ["c2"], name="c2", pads=[1, 1]),
             helper.make_node("Add", ["r", "c2"], ["output"], name="add")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 2, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 4, 16])], [w, w2, b])
    path = tmp_path / "shared.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = g.standard_normal((48, 2, 16)).astype(np.float32)
    info = quantize_int8(path, tmp_path / "int8.onnx", [{"input": x[i:i + 16]} for i in range(0, 32, 16)],
                         QuantOptions(force_calibration_data=True))
    assert info.pre_process["unshared_biases"] == ["c2"]
    ref, got = _run(onnx.load(str(path)), x[32:]), _run(onnx.load(str(tmp_path / "int8.onnx")), x[32:])
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25


def test_a_matmul_plus_row_bias_quantizes(tmp_path):
    """Magika's last Dense: MatMul + Add of a (1, N) bias, which ORT's optimiser fuses into a Gemm whose bias its
    quantizer cannot index (an internal error, no INT8 file). The bias is made (N,) first."""
    from onnx import TensorProto, helper, numpy_helper
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    g = np.random.default_rng(0)
    w = numpy_helper.from_array(g.standard_normal((16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(g.standard_normal((1, 8)).astype(np.float32), "b")
    nodes = [helper.make_node("Tanh", ["input"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "w"], ["m"], name="dense"),
             helper.make_node("Add", ["m", "b"], ["output"], name="bias")]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 8])], [w, b])
    path = tmp_path / "dense.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = g.standard_normal((48, 16)).astype(np.float32)
    info = quantize_int8(path, tmp_path / "int8.onnx", [{"input": x[:32]}], QuantOptions(force_calibration_data=True))
    assert len(info.pre_process["one_dim_biases"]) == 1, info.pre_process
    ref, got = _run(onnx.load(str(path)), x[32:]), _run(onnx.load(str(tmp_path / "int8.onnx")), x[32:])
    assert 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) > 25


class AffineAfterConv(nn.Module):
    """PaddlePaddle's learnable affine block (PP-OCRv4's PPLCNetV3) after each conv: scale and bias scalars, here
    also a per-channel bias; and a conv whose output has a second reader (that one cannot fold)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.scale, self.bias = nn.Parameter(torch.tensor([1.7])), nn.Parameter(torch.tensor([-0.4]))
        self.cbias = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        h = torch.relu(self.c1(x) * self.scale + self.bias)
        h = nn.functional.hardswish(self.c2(h) * 0.5 + self.cbias)
        y = self.c3(h)
        return y * 2.0 + y


def test_a_constant_affine_after_a_conv_folds_into_it_and_stays_the_same_function(tmp_path):
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    from edgec.exporters.rewrites import affines_into_convs
    path = _export(AffineAfterConv(), torch.randn(2, 3, 12, 12), tmp_path / "affine.onnx")
    model = onnx.load(str(path))
    before = sum(n.op_type in ("Mul", "Add") for n in model.graph.node)
    x = np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32)
    ref = _run(model, x)
    rec = affines_into_convs(model)
    assert rec["rewritten"] == ["/c1/Conv", "/c2/Conv"] and len(rec["folded"]) == 4, rec
    assert sum(n.op_type in ("Mul", "Add") for n in model.graph.node) == before - 4   # c3's y * 2 + y stays
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, x), ref, rtol=1e-5, atol=1e-5)
    # through quantize: recorded, and each folded Mul/Add is one 8-bit rounding (and Q/DQ pair) fewer
    on = quantize_int8(path, tmp_path / "on.onnx", [{"input": x[i:i + 16]} for i in range(0, 48, 16)],
                       QuantOptions(force_calibration_data=True))
    assert "/c1/Conv" in on.pre_process["affine_into_conv"]["rewritten"]   # (ORT's optimiser may fold c2's first)
    q = onnx.load(str(tmp_path / "on.onnx"))
    assert not {"/Mul", "/Add"} & {n.name for n in q.graph.node}   # c1's affine; c3's y * 2 + y stays
    assert {"/Mul_2", "/Add_2"} <= {n.name for n in q.graph.node}
    got = ort.InferenceSession(str(tmp_path / "on.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x[48:]})[0]
    err = 10 * np.log10((ref[48:] ** 2).sum() / ((ref[48:] - got) ** 2).sum())
    assert err > 25, err
