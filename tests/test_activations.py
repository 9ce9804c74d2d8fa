"""Hard-swish fusion and saturation-aware ranges (edgec.exporters.activations) against real ONNX Runtime sessions.

Both must leave the FP32 function unchanged and make the INT8 model closer to it: fewer quantizers (a
decomposed hard-swish, as paddle2onnx writes PP-OCR's, has four), and no levels spent on values that a
hard-swish or hard-sigmoid maps to the same output.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgec.exporters.activations import fuse_hard_swish, saturation_bounds
from edgec.exporters.compare import ort_session, run_onnx
from edgec.exporters.quantize import QuantOptions, quantize_int8


@pytest.fixture(scope="module")
def hswish_net(tmp_path_factory):
    """Conv -> decomposed hard-swish (x * clip(x + 3, 0, 6) / 6) -> squeeze-excite gate (hard-sigmoid) -> Conv,
    with the first conv's outputs shifted far below -3 (where hard-swish gives 0), on digit images."""
    import torch
    from torch import nn
    from test_transforms import _digits, _export

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.se, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 1)
            with torch.no_grad():
                self.c1.weight.mul_(4.0)
                self.c1.bias.sub_(8.0)

        def forward(self, x):
            h = self.c1(x)
            h = h * torch.clamp(h + 3, 0, 6) / 6
            gate = nn.functional.hardsigmoid(self.se(h.mean((2, 3), keepdim=True)))
            return self.c2(h * gate)

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hswish")
    x, _ = _digits(16)
    model = _export(Net(), x, d / "fp32.onnx")
    return {"dir": d, "fp32": d / "fp32.onnx", "model": model, "calib": x[:128], "x": x[400:528]}


def test_decomposed_hard_swish_is_fused_without_changing_the_function(hswish_net, tmp_path):
    model = onnx.ModelProto()
    model.CopyFrom(hswish_net["model"])
    ops = [n.op_type for n in model.graph.node]
    assert "Div" in ops and "Clip" in ops   # the exporter wrote the decomposed form
    assert fuse_hard_swish(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Div" not in ops and "Clip" not in ops and ops.count("HardSigmoid") == 2
    onnx.checker.check_model(model)
    onnx.save_model(model, str(tmp_path / "fused.onnx"))
    x = hswish_net["x"]
    ref = run_onnx(ort_session(hswish_net["fp32"]), x)[0]
    got = run_onnx(ort_session(tmp_path / "fused.onnx"), x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_saturation_bounds_follow_the_readers(hswish_net):
    model = onnx.ModelProto()
    model.CopyFrom(hswish_net["model"])
    fuse_hard_swish(model)
    bounds = saturation_bounds(model)
    by_reader = {}
    for n in model.graph.node:
        for i in n.input:
            by_reader.setdefault(i, set()).add(n.op_type)
    hswish_in = [t for t, ops in by_reader.items() if ops == {"HardSigmoid", "Mul"}]
    gate_in = [t for t, ops in by_reader.items() if ops == {"HardSigmoid"}]
    assert len(hswish_in) == 1 and len(gate_in) == 1
    assert bounds[hswish_in[0]] == pytest.approx((-3.0, np.inf))      # x * hardsigmoid(x) is 0 below -3
    assert bounds[gate_in[0]] == pytest.approx((-3.0, 3.0))           # torch's hardsigmoid: x / 6 + 1/2
    assert not any(o.name in bounds for o in model.graph.output)


def test_int8_is_closer_to_fp32_with_fused_hard_swish_and_saturation_ranges(hswish_net):
    d, x, errs, infos = hswish_net["dir"], hswish_net["x"], {}, {}
    ref = run_onnx(ort_session(hswish_net["fp32"]), x)[0]
    for sat in (False, True):
        out = d / f"int8-{sat}.onnx"
        infos[sat] = quantize_int8(hswish_net["fp32"], out, [hswish_net["calib"]],
                                   QuantOptions(num_samples=None, saturation_ranges=sat))
        got = run_onnx(ort_session(out), x)[0]
        errs[sat] = float(((got - ref) ** 2).mean() / (ref ** 2).mean())
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert not ops & {"Add", "Clip", "Div"}   # their three quantizers are gone with them
    assert infos[True].pre_process["hard_swish_fused"] == 1
    assert infos[True].calibration["saturation_bounded"] == 2 and infos[False].calibration["saturation_bounded"] == 0
    # the conv output's range starts at -3 instead of its minimum (about -30 here): finer steps, lower error
    assert errs[True] < 0.7 * errs[False]


def test_auto_bias_correction_is_sequential_on_hard_swish_models(hswish_net, monkeypatch):
    """Activation noise through hard-swish shifts the means downstream, which only the sequential (empirical)
    correction measures: `auto` picks it on hard-swish models even where the cheap-pass bound is passed (PP-OCR
    rec: 0.987 -> 0.995; cls 0.9903 fast -> 0.9914). On this small net, with the hard-swish in float between the
    quantizers (rewrites.float_hard_swishes), the two end within 0.2 % of each other (9.49e-5 vs 9.47e-5)."""
    from edgec.exporters import quantize as q
    d, x = hswish_net["dir"], hswish_net["x"]
    ref = run_onnx(ort_session(hswish_net["fp32"]), x)[0]
    monkeypatch.setattr(q, "EMPIRICAL_BIAS_MAX_MB", 1e-6)   # as if the model were big
    errs = {}
    for method in ("auto", "fast"):
        out = d / f"bc-{method}.onnx"
        info = quantize_int8(hswish_net["fp32"], out, [hswish_net["calib"]],
                             QuantOptions(num_samples=None, bias_correction=True, bias_method=method))
        bc = info.transforms["bias_correction"]
        got = run_onnx(ort_session(out), x)[0]
        errs[method] = float(((got - ref) ** 2).mean() / (ref ** 2).mean())
        if method == "auto":
            assert bc["method"] == "empirical" and "hard-swish" in bc["method_reason"]
        else:
            assert bc["method"] == "fast"
    assert errs["auto"] < 1.02 * errs["fast"]
    monkeypatch.setattr(q, "EMPIRICAL_BIAS_HARD_SWISH_MAX_MB", 1e-6)   # too big even so: analytic
    info = quantize_int8(hswish_net["fp32"], d / "bc-big.onnx", [hswish_net["calib"]],
                         QuantOptions(num_samples=None, bias_correction=True))
    assert info.transforms["bias_correction"]["method"] == "fast"
