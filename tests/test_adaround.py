"""AdaRound (edgec.exporters.adaround) and the analytic bias correction, against real ORT sessions on a
depthwise-separable CNN trained on the embedded digits."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgec.exporters import transforms as tf
from edgec.exporters.adaround import _patches
from edgec.exporters.compare import ort_session, run_onnx
from edgec.exporters.quantize import QuantOptions, prepare, quantize_int8, write_quantized



@pytest.mark.parametrize("geo", [
    {"kernel": [3, 3], "strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 2], "group": 1},
    {"kernel": [3, 3], "strides": [1, 1], "dilations": [1, 1], "pads": [0, 1, 1, 0], "group": 1},
    {"kernel": [5], "strides": [2], "dilations": [1], "pads": [2, 2], "group": 1},
])
def test_sampled_patches_are_the_convolution_patches(geo):
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    if len(geo["kernel"]) == 1:
        x = rng.normal(size=(2, 4, 13)).astype(np.float32)
        t, k, s, p = torch.from_numpy(x).unsqueeze(2), (1, 5), (1, 2), (0, 2)
        full = F.unfold(t, kernel_size=k, stride=s, padding=p).numpy()
    else:
        x = rng.normal(size=(2, 6, 9, 11)).astype(np.float32)
        pads = geo["pads"]
        t = F.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
        full = F.unfold(t, kernel_size=3, dilation=geo["dilations"], stride=geo["strides"]).numpy()
    every = _patches(x, geo, np.random.default_rng(1), 10 ** 6)
    np.testing.assert_array_equal(every, full)
    some = _patches(x, geo, np.random.default_rng(1), 7)       # a subset of the same columns
    assert some.shape == (*full.shape[:2], 7)
    assert all(any(np.array_equal(some[:, :, j], full[:, :, i]) for i in range(full.shape[2])) for j in range(7))


def _weights(path):
    """Conv/Gemm weights of a QDQ model as their dequantized values, keyed by node name."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    return {n.name: tf._const(n.input[1], producers, inits) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm")}


def test_adaround_writes_integers_ort_keeps_and_lowers_the_output_error(separable):
    d, calib, x = separable["dir"], [separable["calib"]], separable["x"]
    ref = run_onnx(ort_session(separable["fp32"]), x)[0]
    errors, records = {}, {}
    for ada in (False, True):
        opts = QuantOptions(adaround=ada, bias_correction=False, reduce_range=True, adaround_iterations=150,
                            adaround_seconds=1e6)
        p = prepare(separable["fp32"], calib, opts)
        try:
            out = d / f"ada{ada}.onnx"
            info = write_quantized(p, out, [])
            if ada:
                # the rounded FP32 weights are on ORT's grid: quantizing them gives exactly those values back
                model = onnx.load(str(p.model_path))
                inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
                q = _weights(out)
                assert set(p.weight_originals) == set(q)
                for node, (name, _) in p.weight_originals.items():
                    w = inits[name]
                    w = w.T if w.shape != q[node].shape else w
                    np.testing.assert_allclose(q[node], w, rtol=0, atol=1e-6 * np.abs(w).max())
        finally:
            p.cleanup()
        records[ada] = info.transforms.get("adaround")
        got = run_onnx(ort_session(out), x)[0]
        errors[ada] = float(((got - ref) ** 2).mean())
    rec = records[True]
    assert rec["applied"] and rec["layers"] == 6 and rec["weights_flipped_from_nearest"] > 0
    assert rec["mean_layer_error_reduction"] > 0.05, rec
    assert errors[True] < errors[False], errors


def test_adaround_layers_left_in_fp32_get_their_original_weights(separable):
    p = prepare(separable["fp32"], [separable["calib"]],
                QuantOptions(adaround=True, bias_correction=False, adaround_iterations=20, adaround_seconds=1e6))
    try:
        node = next(iter(p.weight_originals))
        name, original = p.weight_originals[node]
        write_quantized(p, separable["dir"] / "ada-excl.onnx", [node])
        model = onnx.load(str(separable["dir"] / "ada-excl.onnx"))
        init = next(i for i in model.graph.initializer if i.name == name)
        np.testing.assert_array_equal(numpy_helper.to_array(init), original)
    finally:
        p.cleanup()


def test_fast_bias_correction_is_the_mean_of_the_weight_rounding_error(tmp_path):
    """The analytic shift (W_q - W) E[x], zero padding included per tap, equals E[conv(x, W_q - W)] measured
    by torch on the calibration data (inputs whose channel means do not depend on the position)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=2, groups=8,
                                                                           dilation=2)).eval()
    rng = np.random.default_rng(0)
    x = (np.abs(rng.normal(size=(256, 3, 7, 7))) + np.array([0.5, 2.0, 1.0]).reshape(1, 3, 1, 1)).astype(np.float32)
    from edgec.exporters.onnx_export import export_onnx
    export_onnx(net, torch.from_numpy(x[:2]), tmp_path / "fp32.onnx")
    p = prepare(tmp_path / "fp32.onnx", [x], QuantOptions(per_channel=False, bias_correction=True,
                                                         force_calibration_data=True, num_samples=None))
    try:
        first = next(n for n in onnx.load(str(p.model_path)).graph.node if n.op_type == "Conv")
        bias_name, original = p.bias_originals[first.name]
        corrected = numpy_helper.to_array(next(i for i in onnx.load(str(p.model_path)).graph.initializer
                                               if i.name == bias_name))
        probe = p.quantize(tmp_path / "probe.onnx", [])
        wq = _weights(probe)[first.name]
    finally:
        p.cleanup()
    w = net[0].weight.detach().numpy()
    measured = F.conv2d(torch.from_numpy(x), torch.from_numpy((wq - w).astype(np.float32)), padding=1).mean((0, 2, 3))
    # the analytic shift uses each channel's mean over all positions, the measurement each position's own sample
    # mean: a few % of the largest shift apart (9 % on one small entry with 8-bit weights, an AVX-512 VNNI host)
    measured = measured.numpy()
    np.testing.assert_allclose(original - corrected, measured, rtol=0.02, atol=0.03 * np.abs(measured).max())
    assert np.abs(original - corrected).max() > 0


def test_mse_calibration_clips_outliers_and_gives_a_working_model(separable):
    from edgec.exporters.calibration import TensorStats, mse_range
    # Laplace(b=1) at 4 bits: the MSE-optimal clip is about 5.0 b (Banner et al. 2019, ACIQ), far inside the
    # sample maximum (~12 b); a few far outliers are kept (clipping them would cost more than the rounding)
    v = np.random.default_rng(0).laplace(size=200_000).astype(np.float32)
    st = TensorStats(2048, histogram=True)
    st.update(v)
    lo, hi = mse_range(st, -8, 7, True)
    assert 4.5 < hi < 5.6 and lo == -hi and st.hi > 10
    info = quantize_int8(separable["fp32"], separable["dir"] / "mse.onnx", [separable["calib"]],
                         QuantOptions(method="mse"))
    ref = run_onnx(ort_session(separable["fp32"]), separable["x"])[0]
    got = run_onnx(ort_session(separable["dir"] / "mse.onnx"), separable["x"])[0]
    assert info.method == "mse" and (got.argmax(1) == ref.argmax(1)).mean() > 0.95
