"""INT8 quantization against real ONNX Runtime sessions, on a CNN really trained on the embedded digits.

A random-init network gives constant outputs and makes every quality check meaningless, so the subject is
trained for a few seconds on real data (helper below; the official loader lives in edgec.data).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from edgec.core.errors import DataError, OptionError
from edgec.exporters.calibration import TensorStats, check_samples, plan_memory, rechunk
from edgec.exporters.compare import accuracy, compare_outputs
from edgec.exporters.quantize import QuantOptions, quantize_int8, quantized_ops
from edgec.exporters.target import parse_cpuinfo, scheme_for

DIGITS = Path(__file__).resolve().parents[1] / "models" / "data" / "digits.csv.gz"


def load_digits(size: int = 16):
    """(x float32 N,1,size,size normalised, y int64) from the embedded sklearn digits CSV."""
    import torch
    import torch.nn.functional as F
    with gzip.open(DIGITS, "rt") as f:
        d = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(d[:, :64].reshape(-1, 1, 8, 8) / 16.0)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return ((x - 0.3) / 0.4).numpy(), d[:, 64].astype(np.int64)


def digits_cnn():
    """Depthwise-separable CNN with enough weights (~110k) for the size check to mean something; seeded, so
    that its tests see the same model whichever tests ran before them in this process (xdist workers differ)."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 256, 1), nn.BatchNorm2d(256), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(model, x, y, epochs: int = 4, seed: int = 0):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


class Batches:
    """A re-iterable calibration source with unequal batch sizes, as a data loader would give."""

    def __init__(self, x, sizes=(5, 37, 11, 64, 3, 50)):
        self.x, self.sizes = x, sizes

    def __iter__(self):
        start, k = 0, 0
        while start < len(self.x):
            b = self.sizes[k % len(self.sizes)]
            yield self.x[start:start + b]
            start, k = start + b, k + 1


@pytest.fixture(scope="session")
def subject(tmp_path_factory):
    """Trained digits CNN exported to FP32 ONNX, plus calibration / evaluation splits."""
    import torch
    from edgec.exporters.onnx_export import export_onnx
    x, y = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    tr, te = order[:1400], order[1400:]
    model = train(digits_cnn(), x[tr], y[tr])
    d = tmp_path_factory.mktemp("quant")
    export_onnx(model, torch.from_numpy(x[:2]), d / "fp32.onnx")
    return {"dir": d, "fp32": d / "fp32.onnx", "calib": x[tr[:300]], "x": x[te], "y": y[te], "model": model}


@pytest.fixture(scope="session")
def default_int8(subject):
    out = subject["dir"] / "int8.onnx"
    info = quantize_int8(subject["fp32"], out, Batches(subject["calib"]), QuantOptions())
    return out, info


def test_subject_is_really_trained(subject):
    assert accuracy(subject["fp32"], subject["x"], subject["y"]) > 0.9


def test_default_int8_is_small_accurate_and_really_int8(subject, default_int8):
    out, info = default_int8
    assert info.size_ratio < 0.30 and info.int8_bytes == out.stat().st_size
    assert info.ops["float"] == 0 and info.ops["by_type"]["Conv"]["int8"] == 4
    assert info.ops["by_type"]["Gemm"]["int8"] == 2 and info.ops["int8_weight_share"] == 1.0
    fp32_acc = accuracy(subject["fp32"], subject["x"], subject["y"])
    int8_acc = accuracy(out, subject["x"], subject["y"], batch=33)
    assert int8_acc >= fp32_acc - 0.02
    agree = compare_outputs(subject["fp32"], out, subject["x"])["outputs"]["output"]
    assert agree["mean_cosine"] > 0.99 and agree["top1_agreement"] > 0.97


def test_quant_info_records_what_was_done(default_int8):
    _, info = default_int8
    assert info.samples == 256  # the default cap, reached through unequal batches
    assert info.method == "mse" and info.scheme["reasons"]
    # eval-mode BatchNorm is folded into Conv before quantizing (by the exporter's constant folding here)
    assert info.pre_process["batchnorm_after"] == 0
    assert info.calibration["peak_rss_mb"] > 0 and info.calibration["tensors"] > 5
    d = info.to_dict()
    assert d["scheme"]["quant_format"] == "QDQ" and d["scheme"]["activation_type"] == "uint8"


def test_every_method_gives_a_working_model_from_unequal_batches(subject):
    for method in ("entropy", "percentile", "auto"):
        out = subject["dir"] / f"{method}.onnx"
        info = quantize_int8(subject["fp32"], out, Batches(subject["calib"], (7, 1, 30)),
                             QuantOptions(method=method, num_samples=None))
        assert info.samples == len(subject["calib"]) and info.ops["float"] == 0
        agree = compare_outputs(subject["fp32"], out, subject["x"])["outputs"]["output"]
        assert agree["top1_agreement"] > 0.85, method
    assert info.calibration["auto_choices"]  # auto says which candidate won how often


def test_exclusions_are_honoured(subject):
    names = _conv_names(subject["fp32"])
    out = subject["dir"] / "excl.onnx"
    info = quantize_int8(subject["fp32"], out, [subject["calib"][:64]],
        QuantOptions(exclude_nodes=(names[0],), exclude_op_types=("Gemm",), num_samples=64))
    assert names[0] in info.float_nodes and names[0] in info.excluded_nodes
    assert info.ops["by_type"]["Gemm"] == {"int8": 0, "float": 2}
    assert info.ops["by_type"]["Conv"] == {"int8": 3, "float": 1}
    ops, float_nodes = quantized_ops(out)  # read back from the file itself
    assert set(float_nodes) == set(info.float_nodes)


def _conv_names(path):
    import onnx
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def test_unknown_exclusions_are_errors_listing_valid_names(subject):
    with pytest.raises(OptionError, match=r"no_such_node.*valid names include .*Conv"):
        quantize_int8(subject["fp32"], subject["dir"] / "x.onnx", [subject["calib"][:40]],
                      QuantOptions(exclude_nodes=("no_such_node",)))
    with pytest.raises(OptionError, match="LSTM"):
        quantize_int8(subject["fp32"], subject["dir"] / "x.onnx", [subject["calib"][:40]],
                      QuantOptions(exclude_op_types=("LSTM",)))
    assert not (subject["dir"] / "x.onnx").exists()


def test_calibration_guard_refuses_noise_and_too_few_samples(subject):
    noise = np.random.default_rng(0).standard_normal((64, 1, 16, 16)).astype(np.float32)
    with pytest.raises(DataError, match="random noise"):
        quantize_int8(subject["fp32"], subject["dir"] / "n.onnx", [noise], QuantOptions())
    with pytest.raises(DataError, match="only 8 calibration samples"):
        quantize_int8(subject["fp32"], subject["dir"] / "n.onnx", [subject["calib"][:8]], QuantOptions())
    info = quantize_int8(subject["fp32"], subject["dir"] / "n.onnx", [subject["calib"][:8]],
                         QuantOptions(force_calibration_data=True))
    assert info.calibration["sample_check"]["problems"]  # accepted, but recorded
    assert check_samples(subject["calib"][:64], 64).problems == []


def test_bad_calibration_shapes_and_values_are_data_errors(subject):
    with pytest.raises(DataError, match=r"input 'input' has shape \(40, 1, 8, 8\), the model expects"):
        quantize_int8(subject["fp32"], subject["dir"] / "b.onnx", [np.zeros((40, 1, 8, 8), np.float32)])
    bad = subject["calib"][:40].copy()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        quantize_int8(subject["fp32"], subject["dir"] / "b.onnx", [bad])
    with pytest.raises(OptionError, match="unknown --calibration .kl."):
        quantize_int8(subject["fp32"], subject["dir"] / "b.onnx", [bad], QuantOptions(method="kl"))


# ------------------------------------------------------------ pieces, no model needed

def test_rechunk_keeps_every_sample_in_order():
    batches = [np.arange(n, dtype=np.float32)[:, None] + off for n, off in ((5, 0), (37, 5), (1, 42), (20, 43))]
    chunks = list(rechunk(iter(batches), 16))
    assert [len(c) for c in chunks] == [16, 16, 16, 15]
    assert np.array_equal(np.concatenate(chunks)[:, 0], np.arange(63, dtype=np.float32))


def test_streaming_histogram_matches_one_pass_statistics():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(5000).astype(np.float32) * s for s in (0.1, 1.0, 0.5, 8.0, 2.0)]
    st = TensorStats(2048, histogram=True)
    for p in parts:
        st.update(p)
    allv = np.concatenate(parts)
    assert st.minmax() == (float(allv.min()), float(allv.max()))
    assert st.hist.sum() == allv.size and st.hist.size == 2048  # bounded: the range grew, the bins did not
    lo, hi = st.percentile(99.0)
    width = 2 * st.T / 2048
    assert abs(hi - np.percentile(allv, 99.5)) < 2 * width and abs(lo - np.percentile(allv, 0.5)) < 2 * width
    elo, ehi = st.entropy()
    assert allv.min() <= elo < 0 < ehi <= allv.max()


def test_memory_plan_refuses_what_cannot_fit():
    chunk, peak = plan_memory(200_000, memory_mb=100, avail_mb=10_000, current_mb=300)
    assert 1 <= chunk <= 64 and peak > 300
    big = 224 * 224 * 64 * 4 * 60  # ~770 MB of activations per sample
    assert plan_memory(big, memory_mb=1024, avail_mb=64_000, current_mb=300)[0] == 1
    with pytest.raises(OptionError, match="MB per sample"):
        plan_memory(big, memory_mb=1024, avail_mb=1500, current_mb=300)


AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
INTEL_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"
ARM_DOT = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimddp\nCPU implementer\t: 0x41\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize("text,arch,reduce_range", [(AMD_AVX2, "x86_64", True), (INTEL_VNNI, "x86_64", False),
                                                    (ARM_DOT, "aarch64", False), (ARM_OLD, "aarch64", False)])
def test_scheme_from_cpuinfo(text, arch, reduce_range):
    cpu = parse_cpuinfo(text)
    s = scheme_for("host", cpu)
    assert cpu.arch == arch and s.reduce_range is reduce_range
    assert (s.activation_type, s.weight_type, s.per_channel, s.quant_format) == ("uint8", "int8", True, "QDQ")
    assert any(("VNNI" in r) or ("ARM" in r) for r in s.reasons)
    assert s.to_dict()["cpu"]["features"] == cpu.features


def test_named_targets():
    assert scheme_for("cpu-avx2").reduce_range and not scheme_for("cpu-vnni").reduce_range
    for gpu in ("cuda", "tensorrt"):
        s = scheme_for(gpu)
        assert (s.activation_type, s.activation_symmetric, s.weight_symmetric) == ("int8", True, True)
    assert scheme_for("tensorrt").dedicated_qdq_pair
    with pytest.raises(OptionError, match="cpu-avx2"):
        scheme_for("tpu")


def test_gpu_target_writes_symmetric_int8_activations(subject):
    import onnx
    from onnx import numpy_helper
    out = subject["dir"] / "trt.onnx"
    info = quantize_int8(subject["fp32"], out, [subject["calib"][:64]], QuantOptions(target="tensorrt"))
    assert info.scheme["target"] == "tensorrt"
    g = onnx.load(str(out)).graph
    inits = {i.name: i for i in g.initializer}
    zps = [numpy_helper.to_array(inits[n.input[2]]) for n in g.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)


# ------------------------------------------------------------ sensitivity and accuracy-aware fallback

def test_fallback_repairs_the_saturating_layer(subject):
    """reduce_range=False on this AVX2 machine saturates the U8S8 kernels (FIELD-NOTES); the fallback must
    find the node responsible and keep it in FP32 until the drop is within budget."""
    from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
    if not scheme_for(None).reduce_range:  # VNNI / ARM host: U8S8 does not saturate, there is nothing to repair
        pytest.skip("this CPU has VNNI or dot-product: reduce_range=False does not saturate here")
    out = subject["dir"] / "fallback.onnx"
    info, rep = quantize_with_budget(subject["fp32"], out, [subject["calib"][:256]], subject["x"], subject["y"],
                                     QuantOptions(reduce_range=False),
                                     FallbackOptions(max_accuracy_drop=0.5, max_excluded_share=0.5))
    assert rep.metric == "accuracy" and rep.nodes_measured == rep.nodes_total == 6
    assert rep.final_score >= rep.int8_score and rep.ranking[0]["error_reduction"] > 0
    if rep.drop_points <= 0.5 and rep.int8_score < rep.fp32_score - 0.005:
        assert rep.excluded and rep.within_budget
    assert [e["node"] for e in rep.excluded] == info.excluded_nodes
    assert set(info.excluded_nodes) <= set(info.float_nodes)  # the file really has them in FP32
    assert info.sensitivity["stopped"] and accuracy(out, subject["x"], subject["y"]) == pytest.approx(rep.final_score)


def test_fallback_without_labels_uses_agreement_and_keeps_int8_when_within_budget(subject):
    from edgec.exporters.quantize import prepare
    from edgec.exporters.sensitivity import FallbackOptions, fallback
    prepared = prepare(subject["fp32"], [subject["calib"][:128]], QuantOptions())
    try:
        info, rep = fallback(prepared, subject["dir"] / "fb2.onnx", subject["x"], None,
                             FallbackOptions(max_accuracy_drop=5.0))
    finally:
        prepared.cleanup()
    assert rep.metric == "top1_agreement" and rep.fp32_score == 1.0
    assert rep.excluded == [] and info.ops["float"] == 0 and rep.stopped.startswith("all-INT8")
    with pytest.raises(OptionError, match="max-accuracy-drop"):
        FallbackOptions(max_accuracy_drop=-1).validate()


def test_entropy_clips_rare_outliers_of_a_post_relu_tensor():
    rng = np.random.default_rng(0)
    v = np.abs(rng.standard_normal(100_000)).astype(np.float32)
    v[:5] = 50.0  # five outliers far beyond the bulk
    st = TensorStats(2048, histogram=True)
    st.update(v)
    lo, hi = st.entropy()
    assert lo == st.lo >= 0 and np.percentile(v, 99.99) < hi < 50.0


def test_matmul_models_are_counted(tmp_path):
    """Linear layers on a sequence export as MatMul (+Add): they must be quantized and counted as such."""
    import torch
    from torch import nn
    from edgec.exporters.onnx_export import export_onnx
    x, _ = load_digits(8)
    rows = x[:96, 0]  # (N, 8, 8): each digit as a sequence of 8 rows of 8 real pixels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    export_onnx(model, torch.from_numpy(rows[:2]), tmp_path / "mlp.onnx")
    info = quantize_int8(tmp_path / "mlp.onnx", tmp_path / "mlp8.onnx", [rows], QuantOptions())
    assert info.ops["by_type"]["MatMul"] == {"int8": 2, "float": 0}
    agree = compare_outputs(tmp_path / "mlp.onnx", tmp_path / "mlp8.onnx", rows)["outputs"]["output"]
    assert agree["mean_cosine"] > 0.99


def test_fallback_passes_over_nodes_that_would_leave_too_few_int8_weights(subject):
    """No FP32 fallback may bring the INT8 share of Conv/MatMul/Gemm weights under min_int8_weight_share."""
    from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
    # ranges clipped at the 60th percentile: an INT8 model that surely disagrees with FP32 somewhere
    opts = QuantOptions(method="percentile", percentile=60.0, bias_correction=False)
    budget = dict(max_accuracy_drop=0.0, max_excluded_share=0.5, time_budget_s=60)
    info, rep = quantize_with_budget(subject["fp32"], subject["dir"] / "share.onnx", [subject["calib"][:128]],
                                     subject["x"], None, opts, FallbackOptions(**budget, min_int8_weight_share=1.0))
    assert rep.int8_score < 1.0, rep  # the budget of 0 points really asks for a fallback
    assert rep.excluded == [] and rep.passed_over and "passed over" in rep.stopped, rep
    assert info.ops["int8_weight_share"] == 1.0
    info, rep = quantize_with_budget(subject["fp32"], subject["dir"] / "share.onnx", [subject["calib"][:128]],
                                     subject["x"], None, opts, FallbackOptions(**budget, min_int8_weight_share=0.9))
    assert info.ops["int8_weight_share"] >= 0.9
    with pytest.raises(OptionError, match="min_int8_weight_share"):
        FallbackOptions(min_int8_weight_share=1.5).validate()


def test_label_free_fallback_keeps_nodes_in_fp32_until_the_cosine_budget_holds(subject):
    """Without labels, agreement with FP32 is the budget: nodes fall back until the mean cosine reaches it.
    The damage is the saturating U8S8 kernel's (one layer's, as in the test above): a range clipped on every
    tensor alike has no single node whose FP32 fallback helps, and which model that hits depends on the run."""
    from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
    if not scheme_for(None).reduce_range:
        pytest.skip("this CPU has VNNI or dot-product: reduce_range=False does not saturate here")
    opts = QuantOptions(reduce_range=False, bias_correction=False)
    info, rep = quantize_with_budget(subject["fp32"], subject["dir"] / "cos.onnx", [subject["calib"][:128]],
                                     subject["x"][:128], None, opts,
                                     FallbackOptions(min_cosine=0.9999, max_excluded_share=0.5, time_budget_s=120))
    assert rep.metric == "cosine" and rep.fp32_score == 1.0
    assert rep.int8_score < 0.9999 and rep.budget_points == pytest.approx(0.01)
    assert rep.excluded and rep.final_score > rep.int8_score          # FP32 nodes bought agreement back
    assert set(info.excluded_nodes) <= set(info.float_nodes) and info.sensitivity["metric"] == "cosine"
    agree = compare_outputs(subject["fp32"], subject["dir"] / "cos.onnx", subject["x"][:128])["outputs"]["output"]
    assert agree["mean_cosine"] == pytest.approx(rep.final_score, abs=1e-6)
    with pytest.raises(OptionError, match="min-cosine"):
        FallbackOptions(min_cosine=1.5).validate()


def test_qdq_edit_equals_requantizing_with_the_node_excluded(subject):
    """The fast sensitivity: a node put back in FP32 by editing the all-INT8 QDQ graph gives the outputs of ORT's
    quantizer run again with that node excluded, for every node (the first conv reads the float input, the last
    Gemm writes the float graph output, bias-corrected layers get their uncorrected bias back)."""
    from edgec.exporters.compare import ort_session, run_onnx
    from edgec.exporters.quantize import COMPUTE_OPS, prepare
    from edgec.exporters.sensitivity import _QdqBypass
    prepared = prepare(subject["fp32"], [subject["calib"][:128]], QuantOptions(bias_correction=True))
    d, x = subject["dir"], subject["x"][:64]
    run = lambda path: run_onnx(ort_session(path), x, 64)[0]  # noqa: E731
    try:
        assert prepared.bias_originals   # the restore path is exercised
        base = prepared.quantize(d / "edit-base.onnx", [])
        edits, before = _QdqBypass(prepared, base), run(base)
        nodes = [n for n, t in prepared.node_ops.items() if t in COMPUTE_OPS]
        assert len(nodes) == 6
        for node in nodes:
            assert edits.write(node, d / "edit.onnx"), node
            edited, requantized = run(d / "edit.onnx"), run(prepared.quantize(d / "requant.onnx", [node]))
            assert np.abs(edited - requantized).max() <= 1e-5 * np.abs(requantized).max(), node
            assert np.abs(edited - before).max() > 1e-3 * np.abs(before).max(), node   # the node really changed
    finally:
        prepared.cleanup()


def test_label_free_fallback_costs_one_evaluation_when_int8_already_agrees(subject):
    from edgec.exporters.sensitivity import FallbackOptions, quantize_with_budget
    info, rep = quantize_with_budget(subject["fp32"], subject["dir"] / "agrees.onnx", [subject["calib"][:128]],
                                     subject["x"][:128], None, QuantOptions(),
                                     FallbackOptions(max_accuracy_drop=None, min_cosine=0.99))
    assert rep.metric == "cosine" and rep.int8_score == rep.final_score >= 0.99 and rep.within_budget
    assert rep.stopped == "all-INT8 model already within cosine 0.99" and rep.nodes_measured == 0
    assert rep.excluded == [] and info.ops["float"] == 0 and rep.int8_weight_share == 1.0


def test_cosine_budget_judges_one_value_outputs_over_all_samples():
    from edgec.exporters.compare import output_agreement
    from edgec.exporters.sensitivity import cosine_score
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 1))
    noisy = ref + rng.normal(scale=0.5, size=ref.shape)
    assert output_agreement(ref, np.abs(noisy) * np.sign(ref))["mean_cosine"] == 1.0   # per sample: blind
    assert 0.5 < cosine_score([ref], [noisy]) < 0.95                                   # over all samples: not
    assert cosine_score([ref, rng.normal(size=(64, 5))], [ref, rng.normal(size=(64, 5))]) < 0.5  # worst output
    # a 2-value head: samples near the origin swing a per-sample mean; over all samples they cannot
    two = rng.normal(size=(64, 2))
    two[:8] = 1e-3   # an eighth of the samples near the origin
    noisy = two + 1e-3 * rng.normal(size=two.shape)
    assert output_agreement(two, noisy)["mean_cosine"] < 0.99 < cosine_score([two], [noisy])


def test_the_int8_file_declares_the_inputs_and_outputs_the_fp32_file_declares(tmp_path):
    """PLCMOS (speechmos): a Squeeze without axes after its last Gemm, exported at batch 1, declares a scalar
    output; ORT's symbolic shape inference (run because ONNX's leaves the Squeeze's shape unknown) rewrote it to
    [batch_size], and every run of the INT8 file then printed ORT's 'Expected shape ... does not match' warning.
    The file from elsewhere keeps its declared interface."""
    import warnings
    import onnx
    import onnxruntime as ort
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).eval()

    class Score(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return torch.sigmoid(self.net(x).squeeze()) * 4 + 1
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Score(), (torch.zeros(1, 16),), str(tmp_path / "s.onnx"), dynamo=False, opset_version=11,
                          input_names=["x"], output_names=["mos"], dynamic_axes={"x": {0: "batch_size"}})
    declared = onnx.load(str(tmp_path / "s.onnx")).graph.output[0].type
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    info = quantize_int8(tmp_path / "s.onnx", tmp_path / "s8.onnx", [x[i:i + 1] for i in range(64)], QuantOptions())
    assert info.pre_process["symbolic_shape_inference"], "the case needs ORT's symbolic shape inference"
    int8 = onnx.load(str(tmp_path / "s8.onnx"))
    assert int8.graph.output[0].type == declared, int8.graph.output[0]
    assert [i.type for i in int8.graph.input] == [i.type for i in onnx.load(str(tmp_path / "s.onnx")).graph.input]
    out = ort.InferenceSession(str(tmp_path / "s8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})
    assert np.shape(out[0]) == ()
