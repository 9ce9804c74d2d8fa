"""Pre-quantization transforms (edgec.exporters.transforms) against real ONNX Runtime sessions.

CLE must leave the FP32 function unchanged while balancing per-channel weight ranges; bias correction must
remove the systematic output shift that weight rounding adds; both are recorded and optional.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgec.core.errors import OptionError
from edgec.exporters import transforms as tf
from edgec.exporters.compare import ort_session, run_onnx
from edgec.exporters.quantize import QuantOptions, prepare, quantize_int8, write_quantized

DIGITS = Path(__file__).resolve().parents[1] / "models" / "data" / "digits.csv.gz"


def _unbalanced(model, seed=0):
    """Give each conv's output channels ranges spread over 3 decades: what CLE is meant to fix."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                c = m.weight.shape[0]
                m.weight.mul_(torch.logspace(-1.5, 1.5, c)[torch.randperm(c, generator=g)].view(-1, 1, 1, 1))
    return model


def _export(model, x, path):
    import torch
    from edgec.exporters.onnx_export import export_onnx
    export_onnx(model.eval(), torch.from_numpy(x[:2]), path)
    return onnx.load(str(path))


def _run(model_or_path, x, tmp_path, name="m.onnx"):
    path = model_or_path
    if not isinstance(model_or_path, (str, Path)):
        path = tmp_path / name
        onnx.save_model(model_or_path, str(path))
    return run_onnx(ort_session(path, optimize=False), x)[0]


def test_cle_keeps_the_function_and_equalizes_ranges(tmp_path):
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = _unbalanced(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24), nn.ReLU(), nn.Conv2d(24, 8, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    x = np.random.default_rng(0).normal(size=(32, 3, 12, 12)).astype(np.float32)
    model = _export(net, x, tmp_path / "fp32.onnx")
    ref = _run(tmp_path / "fp32.onnx", x, tmp_path)
    record = tf.equalize(model)
    assert record["applied"] and record["pairs"] == 4
    assert record["pairs_by_kind"] == {"relu": 3, "identity": 1} and record["depthwise_pairs"] == 4
    assert record["range_ratio_before"] > 5 and record["range_ratio_after"] < 1.05
    got = _run(model, x, tmp_path)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    for p in tf.find_pairs(model)[0]:     # each pair's two channel ranges now match
        g = tf._Graph(model)
        w1, w2 = g.array(p["a"].input[1]), g.array(p["b"].input[1])
        r1 = np.abs(w1).reshape(len(w1), -1).max(1)
        r2 = tf._in_channel_range(w2, tf._attr(p["b"], "group", 1))
        np.testing.assert_allclose(r1, r2, rtol=0.05)


def test_cle_through_relu6_rescales_only_channels_that_never_clip(tmp_path):
    import torch
    from torch import nn
    torch.manual_seed(1)
    net = _unbalanced(nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), seed=1)
    rng = np.random.default_rng(1)
    calib, held_out = (np.abs(rng.normal(size=(n, 3, 8, 8))).astype(np.float32) for n in (64, 32))
    model = _export(net, calib, tmp_path / "fp32.onnx")
    without = onnx.ModelProto()
    without.CopyFrom(model)
    assert not tf.equalize(without)["applied"]           # no maxima: ReLU6 pairs are left alone
    maxima = tf.channel_max(model, tf.relu6_inputs(model), [calib], 64, tmp_path)
    record = tf.equalize(model, maxima)
    frozen, total = map(int, record["relu6_channels_frozen"].split("/"))
    assert record["pairs_by_kind"] == {"relu6": 2} and 0 < frozen < total  # some channels do reach 6
    assert record["range_ratio_after"] < record["range_ratio_before"]
    for x in (calib, held_out):
        ref, got = _run(tmp_path / "fp32.onnx", x, tmp_path), _run(model, x, tmp_path)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _digits(size=12):
    import torch
    import torch.nn.functional as F
    with gzip.open(DIGITS, "rt") as f:
        d = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = F.interpolate(torch.from_numpy(d[:, :64].reshape(-1, 1, 8, 8) / 16.0), size=size, mode="bilinear")
    return ((x - 0.3) / 0.4).repeat(1, 3, 1, 1).numpy(), d[:, 64].astype(np.int64)



def train_separable(path, seed: int):
    """A depthwise-separable CNN trained 3 epochs on the embedded digits (a few seconds), exported to `path`."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    x, y = _digits()
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400])
    net.train()
    for _ in range(3):
        for i in range(0, 1400, 64):
            loss = F.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    _export(net, x, path)
    return path

def _shift(fp32, int8, x):
    """Systematic output error: mean over outputs of |E[int8 - fp32]| over the samples."""
    ref, got = run_onnx(ort_session(fp32), x)[0], run_onnx(ort_session(int8), x)[0]
    return float(np.abs((got - ref).mean(0)).mean()), float(np.abs(got - ref).mean())


def _bias_correction_errors(fp32, d, calib, x, method):
    errs = {}
    for bc in (False, True):
        # minmax ranges and 7-bit weights everywhere: the weight-rounding shift alone is what is measured (mse
        # ranges add a clipping shift the analytic correction does not model, and 8-bit depthwise weights leave
        # so little rounding shift that the others dominate it on this small CNN)
        opts = QuantOptions(method="minmax", per_channel=False, equalize=False, bias_correction=bc,
                            num_samples=None, bias_method=method, reduce_range=True)
        info = quantize_int8(fp32, d / f"bc{bc}.onnx", [calib], opts)
        errs[bc] = _shift(fp32, d / f"bc{bc}.onnx", x)
        assert info.transforms["bias_correction"]["applied"] is bc
    return errs, info.transforms["bias_correction"]


def test_fast_bias_correction_removes_the_output_shift_of_a_linear_stack(tmp_path):
    """Through linear layers the analytic correction is exact in expectation: each layer's bias absorbs its own
    weight-rounding shift (W_q - W) E[x], so the mean of every layer's output, and so of the model's, is FP32's up
    to the activations' rounding. (Between nonlinearities it is not: what activation noise shifts through a ReLU is
    left, and on a small trained CNN that can outweigh the correction; tests/test_adaround.py checks the shift
    itself, QUANT_RESULTS.md what it gains on real models.)"""
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.Conv2d(16, 16, 1), nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    rng = np.random.default_rng(0)
    offsets = np.array([0.5, 2.0, -1.0], np.float32).reshape(1, 3, 1, 1)
    calib, x = (rng.normal(size=(n, 3, 12, 12)).astype(np.float32) + offsets for n in (256, 256))
    _export(net, calib, tmp_path / "fp32.onnx")
    errs, record = _bias_correction_errors(tmp_path / "fp32.onnx", tmp_path, calib, x, "fast")
    assert record["layers"] == 5 and record["kind"].startswith("analytic"), record
    assert errs[True][0] < 0.3 * errs[False][0], errs         # the systematic part all but goes
    assert errs[True][1] < errs[False][1], errs               # and with it the mean absolute error


def test_sequential_bias_correction_reduces_the_output_error(separable):
    d = separable["dir"]
    errs, record = _bias_correction_errors(separable["fp32"], d, separable["calib"], separable["x"], "empirical")
    assert record["layers"] == 6 and record["mean_abs_shift"] > 0 and record["kind"].startswith("empirical")
    assert record["samples"] == 64
    assert errs[True][0] < 0.7 * errs[False][0]          # the systematic part shrinks
    assert errs[True][1] < errs[False][1]                # and with it the mean absolute error


def test_transforms_are_recorded_with_reasons(separable):
    d = separable["dir"]
    info = quantize_int8(separable["fp32"], d / "default.onnx", [separable["calib"]], QuantOptions())
    t = json.loads(json.dumps(info.to_dict()))["transforms"]     # plain JSON, as the manifest stores it
    assert t["depthwise_convs"] == 2
    # the measured defaults: bias correction on for depthwise models, CLE off (benchmarks/QUANT_RESULTS.md)
    assert t["bias_correction"]["applied"] and "depthwise" in t["bias_correction"]["reason"]
    assert not t["equalize"]["applied"] and t["equalize"]["reason"].startswith("off by default")
    info = quantize_int8(separable["fp32"], d / "cle.onnx", [separable["calib"]],
                         QuantOptions(equalize=True, bias_correction=False))
    eq = info.transforms["equalize"]
    assert eq["applied"] and eq["pairs"] == 4 and eq["reason"] == "set by option"
    assert eq["range_ratio_after"] < eq["range_ratio_before"]
    assert not info.transforms["bias_correction"]["applied"]


def test_a_layer_left_in_fp32_gets_its_original_bias_back(separable):
    from onnx import numpy_helper
    p = prepare(separable["fp32"], [separable["calib"]], QuantOptions(equalize=False, bias_correction=True))
    try:
        node = next(n for n in p.node_ops if p.node_ops[n] == "Conv")
        bias_name, original = p.bias_originals[node]
        out = write_quantized(p, separable["dir"] / "excl.onnx", [node])
        assert node in out.float_nodes
        model = onnx.load(str(separable["dir"] / "excl.onnx"))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        conv = next(n for n in model.graph.node if n.name == node)
        np.testing.assert_array_equal(inits[conv.input[2]], original)
        corrected = onnx.load(str(p.model_path))
        assert not np.array_equal(numpy_helper.to_array(
            next(i for i in corrected.graph.initializer if i.name == bias_name)), original)
    finally:
        p.cleanup()


def test_bias_correction_adds_a_bias_where_there_was_none_and_removes_it_for_fp32_layers(tmp_path):
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(), nn.Flatten())
    x = np.abs(np.random.default_rng(0).normal(size=(64, 3, 6, 6))).astype(np.float32)
    _export(net, x, tmp_path / "fp32.onnx")
    p = prepare(tmp_path / "fp32.onnx", [x], QuantOptions(force_calibration_data=True))  # default: depthwise
    try:
        assert p.transforms["bias_correction"]["layers"] == 2
        assert all(old is None for _, old in p.bias_originals.values())
        for exclude in ([], list(p.bias_originals)):
            write_quantized(p, tmp_path / "int8.onnx", exclude)
            convs = [n for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if n.op_type == "Conv"]
            assert all((len(n.input) > 2) == (n.name not in exclude) for n in convs)
            got = _run(tmp_path / "int8.onnx", x, tmp_path)
            ref = _run(tmp_path / "fp32.onnx", x, tmp_path)
            assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()
    finally:
        p.cleanup()


@pytest.mark.parametrize("kw, match", [
    (dict(equalize="yes"), "equalize must be true, false or unset"),
    (dict(bias_correction=1), "bias_correction must be"),
    (dict(transform_samples=0), "transform_samples must be"),
    (dict(transform_samples=True), "transform_samples must be"),
    (dict(bias_method="exact"), "unknown bias correction method"),
])
def test_bad_transform_options_are_clean_errors(kw, match, tmp_path):
    with pytest.raises(OptionError, match=match):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "out.onnx", [], QuantOptions(**kw))


def _weight_grids(int8_path):
    """Per Conv node: (is depthwise, largest |integer| of its INT8 weight)."""
    from onnx import numpy_helper
    q = onnx.load(str(int8_path))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    out = []
    for n in q.graph.node:
        if n.op_type == "Conv":
            wq = inits[producers[n.input[1]].input[0]]
            out.append((tf._attr(n, "group", 1) > 1 and wq.shape[1] == 1, int(np.abs(wq).max())))
    return out


def test_depthwise_weights_keep_8_bits_under_reduce_range_and_run_exactly(separable):
    """Without VNNI the GEMM-based U8S8 kernels saturate, so weights get 7 bits; ORT's depthwise kernel does not
    (it widens before multiplying): there the weights keep all 8 bits, and the fused INT8 model computes exactly
    what the unfused QDQ graph says."""
    from edgec.exporters.target import scheme_for
    assert scheme_for("cpu-avx2").full_range_depthwise and not scheme_for("cpu-vnni").full_range_depthwise
    d, calib, x = separable["dir"], [separable["calib"]], separable["x"]
    quantize_int8(separable["fp32"], d / "dw8.onnx", calib, QuantOptions(target="cpu-avx2", bias_correction=False))
    grids = _weight_grids(d / "dw8.onnx")
    assert sorted(top for dw, top in grids if dw) == [127, 127]
    assert {top for dw, top in grids if not dw} == {64}
    fused = run_onnx(ort_session(d / "dw8.onnx"), x)[0]
    exact = run_onnx(ort_session(d / "dw8.onnx", optimize=False), x)[0]
    off = np.abs(fused - exact) > 1e-4 * np.abs(exact).max()   # a saturating kernel is off almost everywhere
    assert off.mean() < 0.005, f"{off.mean():.2%} of the outputs differ"   # (fixed-point rounding: a few)
    # an explicit reduce_range holds for every layer
    quantize_int8(separable["fp32"], d / "rr.onnx", calib, QuantOptions(target="cpu-avx2", reduce_range=True,
                                                                          bias_correction=False))
    assert {top for _, top in _weight_grids(d / "rr.onnx")} == {64}


def test_histograms_do_not_alias_with_the_tensor_layout():
    """Large values in one column of every row (a stride of 8 over a 16-wide NCHW tensor never sees them) must
    reach the histogram, so that MSE ranges keep them instead of clipping them away."""
    from edgec.exporters.calibration import TensorStats, mse_range
    v = np.zeros((32, 64, 16, 16), np.float32)
    v[..., 3] = 5.0
    v[..., 4] = np.random.default_rng(0).uniform(0, 1, v[..., 4].shape)
    st = TensorStats(2048, histogram=True)
    st.update(v)
    assert st.hist.sum() == v.size
    top = st.edges[1:][st.hist > 0].max()
    assert 4.9 < top <= 5.01
    share = st.hist[st.edges[:-1] >= 4.9].sum() / v.size
    assert 0.04 < share < 0.09          # 1/16 of the values
    lo, hi = mse_range(st, 0, 255, False)
    assert lo == 0 and hi > 4.9


def test_mse_ranges_survive_an_infinite_attention_mask():
    """A transformer's additive attention mask can hold -inf beside values near 0 (MiniLM's TorchScript does):
    the MSE search must not turn that into NaN errors and an arbitrary range; it keeps minmax's range there."""
    import warnings
    from edgec.exporters.calibration import TensorStats, mse_range
    v = np.random.default_rng(0).normal(size=(8, 4, 16, 16)).astype(np.float32)
    v[:, :, :, -3:] = -np.inf
    st = TensorStats(2048, histogram=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.update(v)
        lo, hi = mse_range(st, 0, 255, False)
    assert (lo, hi) == st.minmax() and lo == -np.inf


def test_auto_bias_method_is_empirical_where_its_passes_are_cheap(separable, monkeypatch):
    """The default method: the sequential correction (it also removes the shift that activation noise gets
    through hard-swish / ReLU: PP-OCR cls 0.9855 -> 0.9899) where levels x activation bytes per sample is small,
    the analytic one on big models (EfficientNet-Lite0: 2.5 GiB, minutes), each with its reason recorded."""
    from edgec.exporters import quantize as q
    d, calib = separable["dir"], [separable["calib"]]
    info = quantize_int8(separable["fp32"], d / "auto.onnx", calib, QuantOptions(num_samples=None))
    bc = info.transforms["bias_correction"]
    assert bc["applied"] and bc["method"] == "empirical" and "cheap" in bc["method_reason"]
    assert bc["kind"].startswith("empirical") and bc["samples"] == 64
    monkeypatch.setattr(q, "EMPIRICAL_BIAS_MAX_MB", 0.01)   # as if the model were large
    info = quantize_int8(separable["fp32"], d / "auto-big.onnx", calib, QuantOptions(num_samples=None))
    bc = info.transforms["bias_correction"]
    assert bc["method"] == "fast" and bc["kind"].startswith("analytic") and "levels x" in bc["method_reason"]
