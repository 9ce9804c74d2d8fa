"""Quantization that knows the model: what one 8-bit scale breaks stays float by default, each exclusion with
its reason in QuantInfo.policy; If branches sharing a recurrent cell's weights do not grow the INT8 file;
transformers get dynamic INT8 MatMuls. Real exports, real ORT quantization and sessions."""
from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgec.exporters.policy import dedupe_initializers, plan
from edgec.exporters.quantize import QuantOptions, prepare, quantize_int8, write_quantized


def _export(module, example, path, script=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.script(module.eval()) if script else module.eval()
        torch.onnx.export(m, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _sqnr(ref, got):
    return 10 * math.log10(float((ref ** 2).sum()) / max(1e-30, float(((ref - got) ** 2).sum())))


def _signals(n, length=64, seed=0):
    g = np.random.default_rng(seed)
    t = np.linspace(0, 1, length, dtype=np.float32)
    f = g.uniform(1, 12, (n, 1)).astype(np.float32)
    return (np.sin(2 * np.pi * f * t) + 0.1 * g.standard_normal((n, length))).astype(np.float32)


class Recurrent(nn.Module):
    """An LSTM cell called in both branches of an `if` (as silero-vad's decoder does): both ONNX branches read one
    set of outer-graph weights, which ORT's optimiser folds into a copy per branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rnn, self.out = nn.Linear(64, 128), nn.LSTMCell(128, 128), nn.Linear(128, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if bool(x.sum() > 0):
            a, b = self.rnn(h)
        else:
            a, b = self.rnn(h, (h, h))
        return self.out(a + b)


def test_if_branches_share_the_recurrent_weights_and_int8_is_smaller(tmp_path):
    fp32 = _export(Recurrent(), torch.randn(2, 64), tmp_path / "rec.onnx", script=True)
    x = _signals(256)
    info = quantize_int8(fp32, tmp_path / "rec.int8.onnx", [x[i:i + 32] for i in range(0, 256, 32)])
    shared = info.pre_process["shared_initializers"]
    assert shared["merged"] >= 2 and shared["bytes_saved"] > 4 * 128 * 128 * 4, shared
    int8_bytes = (tmp_path / "rec.int8.onnx").stat().st_size
    assert info.int8_bytes == int8_bytes and info.int8_bytes < info.fp32_bytes, "INT8 must not grow the file"
    assert info.size_ratio == round(int8_bytes / fp32.stat().st_size, 4)
    recurrent = [g for g in info.policy["exclusions"] if g["kind"] == "recurrent"]
    assert recurrent and "LSTM" in recurrent[0]["reason"] and any("If" in n for n in recurrent[0]["nodes"])
    assert _sqnr(_run(fp32, x), _run(tmp_path / "rec.int8.onnx", x)) > 25
    # the LSTM inside both branches: INT8 weights, dynamic activations, one shared copy; its state path float
    cells = [g for g in info.policy["dynamic"] if g["kind"] == "recurrent_cell"]
    assert cells and len(cells[0]["nodes"]) == 2 and "DynamicQuantizeLSTM" in cells[0]["reason"]
    assert info.ops["by_type"]["LSTM"] == {"int8": 2, "float": 0} and info.ops["int8_weight_share"] == 1.0
    branches = [n for b in _branches(tmp_path / "rec.int8.onnx") for n in b.node]
    assert sum(n.op_type == "DynamicQuantizeLSTM" for n in branches) == 2
    assert not any(n.op_type == "LSTM" for n in branches)
    assert info.int8_bytes < 0.35 * info.fp32_bytes, "INT8 LSTM weights, stored once"
    off = quantize_int8(fp32, tmp_path / "off.onnx", [x[i:i + 32] for i in range(0, 256, 32)], QuantOptions(policy=False))
    assert off.ops["by_type"]["LSTM"] == {"int8": 0, "float": 2} and off.ops["int8_weight_share"] < 0.1, \
        "an FP32 LSTM counts in the weight share"
    # a Gemm the static pass quantized stays one fused QDQ Gemm (ORT's dynamic pass would rewrite it)
    assert info.ops["by_type"]["Gemm"] == {"int8": 2, "float": 0}


def _branches(path):
    from edgec.exporters.policy import _graphs
    return list(_graphs(onnx.load(str(path)).graph))


def test_dedupe_does_not_reuse_a_name_a_branch_already_holds(tmp_path):
    """Second pass (after the dynamic quantizer): branches hold copies named like the first pass's shared
    weights; merging them again must not give two weights one name (the LSTM read W where R was)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    fp32 = _export(Recurrent(), torch.randn(2, 64), tmp_path / "rec.onnx", script=True)
    quant_pre_process(str(fp32), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    model = onnx.load(str(tmp_path / "pre.onnx"))
    assert dedupe_initializers(model)["merged"] >= 4
    shared = [i for i in model.graph.initializer if i.name.startswith("edgec_shared_")]
    names = [i.name for i in shared]
    swap = dict(zip(names, reversed(names)))   # the copies' names in another order than the merge will use
    for sub in _graphs_of(model):   # back into every branch that reads them
        reads = {i for n in sub.node for i in n.input}
        for init in shared:
            if init.name in reads:
                copy = onnx.TensorProto()
                copy.CopyFrom(init)
                copy.name = swap[init.name]
                sub.initializer.append(copy)
        for n in sub.node:
            n.input[:] = [swap.get(i, i) for i in n.input]
    for i in shared:
        model.graph.initializer.remove(i)
    assert len(names) >= 2
    onnx.save(model, str(tmp_path / "copies.onnx"))
    rec = dedupe_initializers(model)
    onnx.save(model, str(tmp_path / "again.onnx"))
    assert rec["merged"] >= 4
    x = _signals(8)
    np.testing.assert_array_equal(_run(tmp_path / "copies.onnx", x), _run(tmp_path / "again.onnx", x))


def _graphs_of(model):
    from edgec.exporters.policy import _graphs
    return list(_graphs(model.graph))


def test_dedupe_keeps_outputs_exact(tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process
    fp32 = _export(Recurrent(), torch.randn(2, 64), tmp_path / "rec.onnx", script=True)
    quant_pre_process(str(fp32), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    grown = (tmp_path / "pre.onnx").stat().st_size
    model = onnx.load(str(tmp_path / "pre.onnx"))
    rec = dedupe_initializers(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "dedup.onnx"))
    assert grown > 1.5 * fp32.stat().st_size, "the optimiser's copy per branch (what this fixes)"
    assert (tmp_path / "dedup.onnx").stat().st_size < grown - rec["bytes_saved"] * 0.9
    x = _signals(8)
    np.testing.assert_array_equal(_run(tmp_path / "pre.onnx", x), _run(tmp_path / "dedup.onnx", x))


class Spectral(nn.Module):
    """A fixed DFT filter bank (long kernels on one channel) -> magnitude -> log -> a learnt conv: an audio
    front end like silero-vad's."""

    def __init__(self, n_fft=64, bins=33, pad=0):
        super().__init__()
        k = torch.arange(n_fft, dtype=torch.float32)
        f = torch.arange(bins, dtype=torch.float32)[:, None]
        basis = torch.cat([torch.cos(2 * math.pi * f * k / n_fft), -torch.sin(2 * math.pi * f * k / n_fft)])
        self.stft = nn.Conv1d(1, 2 * bins, n_fft, stride=16, bias=False)
        self.stft.weight.data = (basis * torch.hann_window(n_fft))[:, None, :]
        torch.manual_seed(0)
        self.enc, self.bins, self.pad = nn.Conv1d(bins, 16, 3), bins, pad

    def forward(self, x):
        x = nn.functional.pad(x.unsqueeze(1), (self.pad, self.pad), mode="reflect") if self.pad else x.unsqueeze(1)
        s = self.stft(x)
        mag = torch.sqrt(s[:, :self.bins] ** 2 + s[:, self.bins:] ** 2 + 1e-9)
        return torch.relu(self.enc(torch.log(mag + 1e-6))).mean(-1)


def test_spectral_chain_stays_float_by_default_and_that_is_what_keeps_the_output(tmp_path):
    fp32 = _export(Spectral(), torch.randn(2, 1024), tmp_path / "spec.onnx")
    g = np.random.default_rng(0)
    x = (_signals(128, 1024) * g.uniform(0.001, 1.0, (128, 1))).astype(np.float32)  # quiet to loud frames
    batches = [x[i:i + 32] for i in range(0, 128, 32)]
    on = quantize_int8(fp32, tmp_path / "on.onnx", batches)
    off = quantize_int8(fp32, tmp_path / "off.onnx", batches, QuantOptions(policy=False))
    spectral = [grp for grp in on.policy["exclusions"] if grp["kind"] == "spectral"]
    assert spectral and "magnitude chain (Add, Log, Pow, Sqrt)" in spectral[0]["reason"]
    assert off.policy == {"enabled": False, "exclusions": [], "nodes": [], "mode": "static",
                          "mode_reason": "policy off by option: static INT8 of every supported node"}
    ref = _run(fp32, x)
    s_on, s_off = _sqnr(ref, _run(tmp_path / "on.onnx", x)), _sqnr(ref, _run(tmp_path / "off.onnx", x))
    assert s_on > s_off + 3, (s_on, s_off)
    assert on.ops["by_type"]["Conv"]["int8"] >= 1, "the learnt conv after the front end is still INT8"
    # the filter bank itself: INT8 weights and input, its output float (ConvInteger) into the float magnitude;
    # one calibrated scale for quiet and loud frames (the STFT Conv static) holds less
    dyn = [grp for grp in on.policy["dynamic"] if grp["kind"] == "spectral_conv"]
    assert dyn and dyn[0]["nodes"] == [spectral[0]["nodes"][0]] and on.ops["int8_weight_share"] == 1.0
    # as frames times one matrix (rewrites.strided_convs_as_frames: ConvInteger was the slow node), the name kept
    assert on.pre_process["strided_convs_as_frames"]["rewritten"] == ["/stft/Conv"] == dyn[0]["nodes"]
    assert {n.op_type for n in onnx.load(str(tmp_path / "on.onnx")).graph.node} >= {"MatMulInteger", "Sqrt"}
    prepared = prepare(fp32, batches, QuantOptions())
    try:
        prepared.policy["nodes"].remove(dyn[0]["nodes"][0])
        prepared.policy["dynamic_nodes"] = []
        static = write_quantized(prepared, tmp_path / "static_stft.onnx", [])
    finally:
        prepared.cleanup()
    assert static.ops["by_type"]["Conv"] == static.ops["by_type"]["MatMul"] == {"int8": 1, "float": 0}
    s_static = _sqnr(ref, _run(tmp_path / "static_stft.onnx", x))
    assert s_on > s_static + 3, (s_on, s_static)


def test_a_filter_bank_after_a_static_pad_reads_its_codes_without_requantizing(tmp_path):
    """silero-vad's front end: reflect Pad (static INT8: it only moves codes) -> STFT Conv (dynamic, as frames times
    one matrix). The MatMulInteger reads the frames' uint8 codes with their static scale instead of a
    DequantizeLinear and a per-call DynamicQuantizeLinear of the same values (two nodes fewer, one rounding fewer)."""
    fp32 = _export(Spectral(pad=32), torch.randn(2, 1024), tmp_path / "spec.onnx")
    g = np.random.default_rng(0)
    x = (_signals(96, 1024) * g.uniform(0.05, 1.0, (96, 1))).astype(np.float32)
    info = quantize_int8(fp32, tmp_path / "int8.onnx", [x[i:i + 32] for i in range(0, 64, 32)])
    model = onnx.load(str(tmp_path / "int8.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    assert "DynamicQuantizeLinear" not in {n.op_type for n in model.graph.node}
    assert producer[conv.input[0]].op_type in ("Concat", "QuantizeLinear"), producer[conv.input[0]]
    assert info.pre_process["static_code_inputs"] == [conv.name]
    assert info.ops["int8_weight_share"] == 1.0
    ref = _run(fp32, x[64:])
    assert _sqnr(ref, _run(tmp_path / "int8.onnx", x[64:])) > 30   # 35.6 dB, as with the requantization



class KerasStft(nn.Module):
    """DNSMOS's front end as keras2onnx writes a Keras STFT layer: two offset crops of the signal, each reshaped into
    frames, joined, transposed, then a kernel-1 Conv per real and imaginary basis (the taps as channels) ->
    magnitude -> log power -> a learnt conv."""

    def __init__(self, n_fft=128, bins=65, frames=15):
        super().__init__()
        k = torch.arange(n_fft, dtype=torch.float32)
        f = torch.arange(bins, dtype=torch.float32)[:, None]
        win = torch.hann_window(n_fft)
        self.re, self.im = nn.Conv1d(n_fft, bins, 1, bias=False), nn.Conv1d(n_fft, bins, 1, bias=False)
        self.re.weight.data = (torch.cos(2 * math.pi * f * k / n_fft) * win)[:, :, None]
        self.im.weight.data = (-torch.sin(2 * math.pi * f * k / n_fft) * win)[:, :, None]
        torch.manual_seed(0)
        self.enc, self.n_fft, self.frames = nn.Conv1d(bins, 16, 3), n_fft, frames

    def forward(self, x):
        n, hop, span = self.n_fft, self.n_fft // 2, self.frames * self.n_fft
        fr = torch.cat([x[:, :span].reshape(-1, self.frames, n), x[:, hop:hop + span].reshape(-1, self.frames, n)], 1)
        fr = fr.transpose(1, 2)
        mag = torch.sqrt(self.re(fr) ** 2 + self.im(fr) ** 2)
        return torch.relu(self.enc(torch.log(torch.clamp(mag ** 2, min=1e-12)) / 2.3)).amax(-1)


def test_a_filter_bank_over_frames_as_keras_writes_it_stays_out_of_static_int8(tmp_path):
    """DNSMOS (speechmos' sig_bak_ovr.onnx): the STFT is two kernel-1 Convs over frames of 320 taps; taken for
    plain convs, they and the log-power chain were static INT8 and the MOS scores fell to 5.8 dB SQNR (27.4 dB with
    the front end float). Now found as STFT-like: the magnitude chain float, the Convs dynamic INT8."""
    fp32 = _export(KerasStft(), torch.randn(2, 2048), tmp_path / "keras_stft.onnx")
    ops = {n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert {"Slice", "Reshape", "Concat", "Transpose", "Conv"} <= ops
    g = np.random.default_rng(0)
    x = (_signals(128, 2048) * g.uniform(0.001, 1.0, (128, 1))).astype(np.float32)   # quiet to loud clips
    batches = [x[i:i + 32] for i in range(0, 96, 32)]
    on = quantize_int8(fp32, tmp_path / "on.onnx", batches)
    off = quantize_int8(fp32, tmp_path / "off.onnx", batches, QuantOptions(policy=False))
    spectral = [grp for grp in on.policy["exclusions"] if grp["kind"] == "spectral"]
    assert sorted(grp["nodes"][0] for grp in spectral) == ["/im/Conv", "/re/Conv"], on.policy["exclusions"]
    dyn = [grp["nodes"][0] for grp in on.policy["dynamic"] if grp["kind"] == "spectral_conv"]
    assert sorted(dyn) == ["/im/Conv", "/re/Conv"] and on.ops["int8_weight_share"] == 1.0
    ref = _run(fp32, x[96:])
    s_on, s_off = _sqnr(ref, _run(tmp_path / "on.onnx", x[96:])), _sqnr(ref, _run(tmp_path / "off.onnx", x[96:]))
    assert s_on > s_off + 3, (s_on, s_off)
    # a kernel-1 Conv over ordinary channels (not frames) is no filter bank
    plain = nn.Sequential(nn.Conv1d(128, 64, 1), nn.ReLU(), nn.Conv1d(64, 8, 1))
    assert not _excluded(_export(plain, torch.randn(2, 128, 10), tmp_path / "p.onnx"), "spectral")


def _excluded(path, kind: str) -> list:
    """The policy's exclusion groups of this kind for the ONNX file at `path`."""
    return [grp for grp in plan(onnx.load(str(path)))["exclusions"] if grp["kind"] == kind]


class Detector(nn.Module):
    """A keyword detector's shape: convs, an LSTM, then a one-unit head on the LSTM's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv1d(1, 32, 9, stride=4), nn.ReLU(), nn.Conv1d(32, 64, 5), nn.ReLU())
        self.rnn, self.head = nn.LSTM(64, 64, batch_first=True), nn.Linear(64, 1)

    def forward(self, x):
        h, _ = self.rnn(self.conv(x.unsqueeze(1)).transpose(1, 2))
        return torch.sigmoid(self.head(torch.relu(h[:, -1])))


def test_a_tiny_op_with_float_on_every_side_stays_float(tmp_path):
    """The one-unit head after the LSTM would be an INT8 island of its own (its own Quantize/Dequantize pair for 64
    weights): the policy keeps it float and says why; the convs stay INT8, the weight share stays above 99 %."""
    fp32 = _export(Detector(), torch.randn(2, 256), tmp_path / "det.onnx")
    x = _signals(64, 256)
    info = quantize_int8(fp32, tmp_path / "det.int8.onnx", [x[i:i + 16] for i in range(0, 64, 16)])
    lone = [grp for grp in info.policy["exclusions"] if grp["kind"] == "lone_small"]
    assert len(lone) == 1 and "64 weights" in lone[0]["reason"] and "no INT8 neighbour" in lone[0]["reason"], lone
    head = lone[0]["nodes"][0]
    assert {n.name: n.op_type for n in onnx.load(str(fp32)).graph.node}[head] in ("Gemm", "MatMul")
    assert info.ops["by_type"]["Conv"] == {"int8": 2, "float": 0} and info.ops["int8_weight_share"] > 0.99
    assert _sqnr(_run(fp32, x), _run(tmp_path / "det.int8.onnx", x)) > 20
    # the same head after INT8 convs is not alone: nothing excluded for its size
    conv_head = nn.Sequential(nn.Conv1d(1, 32, 9), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 56, 1))
    assert not _excluded(_export(conv_head, torch.randn(2, 1, 64), tmp_path / "c.onnx"), "lone_small")


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


def test_transformer_matmuls_are_dynamic_int8_and_norms_stay_float(tmp_path):
    fp32 = _export(Encoder(), torch.randn(2, 16, 32), tmp_path / "enc.onnx")
    x = _signals(64, 16 * 32).reshape(64, 16, 32)
    info = quantize_int8(fp32, tmp_path / "enc.int8.onnx", [x[i:i + 16] for i in range(0, 64, 16)])
    assert info.policy["mode"] == "dynamic" and "cosine" in info.policy["mode_reason"]
    norm = [grp for grp in info.policy["exclusions"] if grp["kind"] == "norm"]
    assert norm and "LayerNorm" in norm[0]["reason"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "enc.int8.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"} and "LayerNormalization" in ops
    assert info.ops["int8_weight_share"] >= 0.9 and info.ops["by_type"]["MatMul"]["int8"] >= 2
    ref, got = _run(fp32, x), _run(tmp_path / "enc.int8.onnx", x)
    assert _sqnr(ref, got) > 20


def test_plan_of_a_plain_cnn_excludes_nothing(tmp_path):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = onnx.load(str(_export(cnn, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx")))
    p = plan(model)
    assert p["exclusions"] == [] and p["mode"] == "static"


class PReluNet(nn.Module):
    """MTCNN-like: Conv -> per-channel PRelu (negative slopes too) -> MaxPool, a Conv -> PRelu -> mean, and a
    Linear -> PRelu -> Linear."""

    def __init__(self, big_slope=False):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.p1 = nn.Conv2d(3, 8, 3), nn.PReLU(8)
        self.c2, self.p2 = nn.Conv2d(8, 16, 3), nn.PReLU(16)
        self.fc, self.p3, self.head = nn.Linear(16, 4), nn.PReLU(4), nn.Linear(4, 3)
        with torch.no_grad():
            self.p1.weight.copy_(torch.linspace(-0.4, 0.7, 8))
            self.p2.weight.copy_(torch.linspace(-0.2, 1.5 if big_slope else 0.6, 16))

    def forward(self, x):
        x = nn.functional.max_pool2d(self.p1(self.c1(x)), 2)
        x = self.p2(self.c2(x)).mean((2, 3))
        return self.head(self.p3(self.fc(x)))


def _images(n, seed=0):
    g = np.random.default_rng(seed)
    base = g.standard_normal((n, 3, 4, 4)).astype(np.float32)
    return np.kron(base, np.ones((1, 1, 4, 4), np.float32)) + 0.1 * g.standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_prelu_becomes_max_of_x_and_its_slope_times_x_bit_for_bit(tmp_path):
    from edgec.exporters.rewrites import prelus_as_max
    fp32 = _export(PReluNet(), torch.randn(2, 3, 16, 16), tmp_path / "prelu.onnx")
    x = _images(64)
    model = onnx.load(str(fp32))
    rec = prelus_as_max(model)
    assert len(rec["rewritten"]) == 3 and "no INT8 kernel" in rec["reason"], rec
    onnx.save(model, str(tmp_path / "max.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "PRelu" not in ops and ops.count("Max") == 3 and ops.count("Mul") == 3
    for a, b in zip([_run(tmp_path / "max.onnx", x)], [_run(fp32, x)]):
        np.testing.assert_array_equal(a, b)   # the same products, the same comparisons

    model = onnx.load(str(_export(PReluNet(big_slope=True), torch.randn(2, 3, 16, 16), tmp_path / "p.onnx")))
    assert prelus_as_max(model)["rewritten"] == ["/p1/PRelu", "/p3/PRelu"]   # p2's slopes reach 1.5: x < 1.5 x
    model = onnx.load(str(tmp_path / "p.onnx"))
    assert "/p1/PRelu" not in prelus_as_max(model, keep=("/p1/PRelu",))["rewritten"]   # kept float by the user


def test_the_max_and_the_maxpool_after_it_run_on_the_next_quantizers_integers(tmp_path):
    """integer_max on ORT's own QDQ output: same result as the float Max, one rounding fewer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from edgec.exporters.rewrites import integer_max, prelus_as_max
    fp32 = _export(PReluNet(), torch.randn(2, 3, 16, 16), tmp_path / "prelu.onnx")
    x = _images(64)
    model = onnx.load(str(fp32))
    names = prelus_as_max(model)["rewritten"]
    onnx.save(model, str(tmp_path / "max.onnx"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x[i:i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(tmp_path / "max.onnx"), str(tmp_path / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    qdq = onnx.load(str(tmp_path / "qdq.onnx"))
    moved = integer_max(qdq, names)
    onnx.checker.check_model(qdq)
    onnx.save(qdq, str(tmp_path / "int.onnx"))
    # p1 -> MaxPool -> a quantizer, p3 -> the head's quantizer: moved; p2 feeds a float ReduceMean
    assert moved == ["/p1/PRelu", "/p3/PRelu"], moved
    q_out = {n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    by_name = {n.name: n for n in qdq.graph.node}
    assert all(i in q_out for i in by_name["/p1/PRelu"].input), "the Max reads two quantizers' integers"
    pool = next(n for n in qdq.graph.node if n.op_type == "MaxPool")
    assert pool.input[0] == by_name["/p1/PRelu"].output[0], "the MaxPool runs on the Max's integers"
    ref, before, after = _run(fp32, x), _run(tmp_path / "qdq.onnx", x), _run(tmp_path / "int.onnx", x)
    assert _sqnr(before, after) > 30 and _sqnr(ref, after) > _sqnr(ref, before) - 0.5


def test_quantize_int8_runs_prelu_models_with_one_int8_conv_per_conv(tmp_path):
    fp32 = _export(PReluNet(), torch.randn(2, 3, 16, 16), tmp_path / "prelu.onnx")
    x = _images(64)
    info = quantize_int8(fp32, tmp_path / "int8.onnx", [x[i:i + 16] for i in range(0, 64, 16)],
                         QuantOptions(force_calibration_data=True))
    prelu = info.pre_process["prelu"]
    assert len(prelu["rewritten"]) == 3 and prelu["integer_max"] == ["/p1/PRelu", "/p3/PRelu"], prelu
    assert info.ops["by_type"]["Conv"] == {"int8": 2, "float": 0}
    assert _sqnr(_run(fp32, x), _run(tmp_path / "int8.onnx", x)) > 25
    g = onnx.load(str(tmp_path / "int8.onnx")).graph   # nothing the moves left behind (ORT warns about each)
    assert {i.name for i in g.initializer} <= {i for n in g.node for i in n.input}
    off = quantize_int8(fp32, tmp_path / "off.onnx", [x[i:i + 16] for i in range(0, 64, 16)],
                        QuantOptions(policy=False, force_calibration_data=True))
    assert "prelu" not in off.pre_process


class ActThenBatchNorm(nn.Module):
    """CREPE-like: Conv -> ReLU -> BatchNorm -> MaxPool, twice (the BN follows no Conv: nothing folds it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        with torch.no_grad():   # statistics and affine far from identity, as a trained BN's
            for bn in (self.b1, self.b2):
                bn.running_mean.uniform_(0.2, 1.5)
                bn.running_var.uniform_(0.05, 2.0)
                bn.weight.uniform_(0.3, 3.0)
                bn.bias.uniform_(-1.0, 1.0)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.b1(torch.relu(self.c1(x))), 2)
        return self.b2(torch.relu(self.c2(x))).mean((2, 3))


def test_a_batchnorm_after_an_activation_becomes_a_depthwise_conv_and_runs_in_int8(tmp_path):
    from edgec.exporters.rewrites import batchnorms_as_convs
    fp32 = _export(ActThenBatchNorm(), torch.randn(2, 3, 16, 16), tmp_path / "bn.onnx")
    x = _images(64)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp32)))
    rec = batchnorms_as_convs(model)
    assert len(rec["rewritten"]) == 2 and "no INT8 kernel" in rec["reason"], rec
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 0
    onnx.save(model, str(tmp_path / "conv.onnx"))
    np.testing.assert_allclose(_run(tmp_path / "conv.onnx", x), _run(fp32, x), rtol=1e-5, atol=1e-5)
    from onnx import TensorProto, helper, numpy_helper
    conv_bn = helper.make_graph(   # right after a Conv a BN folds into it: left to the folding
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node(
            "BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")], "cb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w"),
         *(numpy_helper.from_array(np.full(2, v, np.float32), n) for n, v in zip("gbmv", (2, 1, 0, 1)))],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 2, 4, 4])])
    assert batchnorms_as_convs(helper.make_model(conv_bn))["rewritten"] == []

    calib = [x[i:i + 16] for i in range(0, 64, 16)]
    # with reduce_range (7-bit weights: AVX2 hosts without VNNI, where the rewrite was measured); without it the
    # float BN between a DQ and a Q measured 53.7 dB, the depthwise conv 50.1 dB (both far above any gate)
    info = quantize_int8(fp32, tmp_path / "int8.onnx", calib, QuantOptions(force_calibration_data=True,
                                                                          reduce_range=True))
    assert info.pre_process["batchnorm_as_conv"]["rewritten"] == rec["rewritten"]
    assert info.ops["by_type"]["Conv"] == {"int8": 4, "float": 0}
    assert not [n for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if n.op_type == "BatchNormalization"]
    kept = quantize_int8(fp32, tmp_path / "kept.onnx", calib, QuantOptions(
        force_calibration_data=True, exclude_nodes=tuple(rec["rewritten"]), reduce_range=True))
    assert kept.pre_process["batchnorm_as_conv"]["rewritten"] == []   # a BN the user keeps float stays a BN
    ref = _run(fp32, x)
    rewritten, float_bn = _sqnr(ref, _run(tmp_path / "int8.onnx", x)), _sqnr(ref, _run(tmp_path / "kept.onnx", x))
    assert rewritten > float_bn + 1, (rewritten, float_bn)   # exact per-channel weights vs one 7-bit BN grid
    quantize_int8(fp32, tmp_path / "host.onnx", calib, QuantOptions(force_calibration_data=True))
    assert _sqnr(ref, _run(tmp_path / "host.onnx", x)) > 45   # this host's default scheme


class BagOfWords(nn.Module):
    """A text model whose file is mostly its word table (5000 x 64 floats: 1.2 MB)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.words, self.head = nn.Embedding(5000, 64), nn.Linear(64, 8)

    def forward(self, ids):
        return self.head(self.words(ids).mean(1))


def test_a_large_word_table_becomes_int8_rows_with_a_scale_each(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(BagOfWords().eval(), (torch.zeros(2, 12, dtype=torch.int64),), str(tmp_path / "bow.onnx"),
                          dynamo=False, opset_version=17, input_names=["ids"], dynamic_axes={"ids": {0: "n", 1: "l"}})
    ids = np.random.default_rng(0).integers(0, 5000, (64, 12)).astype(np.int64)
    info = quantize_int8(tmp_path / "bow.onnx", tmp_path / "int8.onnx", [{"ids": ids[i:i + 16]} for i in (0, 16)],
                         QuantOptions(force_calibration_data=True))
    tables = info.pre_process["int8_embeddings"]
    assert len(tables) == 1 and "INT8 rows with one scale each" in tables[0]["reason"], tables
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    gathered = [inits[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    assert any(t.data_type == onnx.TensorProto.INT8 and list(t.dims) == [5000, 64] for t in gathered)
    assert info.int8_bytes < 0.35 * info.fp32_bytes   # the table was 98 % of the file
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"ids": ids[32:]})[0]  # noqa: E731
    assert _sqnr(run(tmp_path / "bow.onnx"), run(tmp_path / "int8.onnx")) > 30
    kept = quantize_int8(tmp_path / "bow.onnx", tmp_path / "kept.onnx", [{"ids": ids[:16]}],
                         QuantOptions(force_calibration_data=True, exclude_nodes=(tables[0]["node"],)))
    assert kept.pre_process["int8_embeddings"] == [] and kept.int8_bytes > 0.9 * info.fp32_bytes


class DetectHead(nn.Module):
    """A YOLO-like head (NudeNet's YOLOv8): boxes in pixels (up to ~300) joined with sigmoid class scores into one
    output, (N, 4 + classes, anchors)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.box, self.cls = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 6, 1)

    def forward(self, x):
        f = self.stem(x)
        box = torch.sigmoid(self.box(f)) * 320
        return torch.cat([box.reshape(-1, 4, 64), torch.sigmoid(self.cls(f) - 2).reshape(-1, 6, 64)], 1)


def test_an_output_joining_boxes_and_scores_keeps_its_scores_in_int8(tmp_path):
    """One 8-bit scale over boxes (0-320) and scores (0-1) rounded every INT8 score of NudeNet to 0 while the whole
    output's SQNR read 29.9 dB: the join stays float (policy group mixed_output), each part keeps its own scale."""
    fp32 = _export(DetectHead(), torch.rand(2, 3, 32, 32), tmp_path / "det.onnx")
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    info = quantize_int8(fp32, tmp_path / "det.int8.onnx", [{"input": x[i:i + 16]} for i in range(0, 48, 16)],
                         QuantOptions(force_calibration_data=True))
    mixed = [g for g in info.policy["exclusions"] if g["kind"] == "mixed_output"]
    assert len(mixed) == 1 and "scale" in mixed[0]["reason"], info.policy["exclusions"]
    ref, got = _run(fp32, x[48:]), _run(tmp_path / "det.int8.onnx", x[48:])
    assert _sqnr(ref[:, 4:], got[:, 4:]) > 25, _sqnr(ref[:, 4:], got[:, 4:])   # scores, not only boxes
    assert _sqnr(ref[:, :4], got[:, :4]) > 25
    assert info.ops["by_type"]["Conv"]["float"] == 0   # the convs stay INT8


class PowerSpectrumLSTM(nn.Module):
    """Resemblyzer's speaker encoder in small: an LSTM reading raw (not log) power mels, its last hidden state
    projected, ReLU'd and L2-normed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm, self.linear = nn.LSTM(16, 32, 2, batch_first=True), nn.Linear(32, 32)
        with torch.no_grad():   # trained on raw power: input weights that make its quiet frames count
            self.lstm.weight_ih_l0.mul_(300)

    def forward(self, mels):
        _, (h, _) = self.lstm(mels)
        e = torch.relu(self.linear(h[-1]))
        return e / torch.norm(e, dim=1, keepdim=True)


def _power_mels(n, seed):
    """(n, 20, 16) power spectra: loud and quiet frames, decades apart (speech and its pauses)."""
    g = np.random.default_rng(seed)
    level = 10.0 ** g.uniform(-5, 1, (n, 20, 1))
    return (g.standard_normal((n, 20, 16)) ** 2 * level * g.uniform(0.1, 1, (n, 1, 16))).astype(np.float32)


def test_the_first_lstm_reading_a_raw_power_spectrum_stays_float(tmp_path):
    """Most values of a raw power spectrum are under half of one 8-bit step of its range: the dynamic INT8 LSTM
    there zeroed them (Resemblyzer: cosine 0.62). The layers reading such an input stay float (policy group
    wide_input), the LSTM after them dynamic INT8."""
    fp32 = _export(PowerSpectrumLSTM(), torch.from_numpy(_power_mels(2, 0)), tmp_path / "spk.onnx")
    x = _power_mels(96, 1)
    info = quantize_int8(fp32, tmp_path / "spk.int8.onnx", [{"input": x[i:i + 32]} for i in range(0, 64, 32)],
                         QuantOptions(force_calibration_data=True))
    wide = [g for g in info.policy["exclusions"] if g["kind"] == "wide_input"]
    assert len(wide) == 1 and "spans decades" in wide[0]["reason"], info.policy["exclusions"]
    lstms = [n for n in onnx.load(str(fp32)).graph.node if n.op_type == "LSTM"]
    assert lstms[0].name in wide[0]["nodes"] and lstms[1].name in info.policy["dynamic_nodes"]
    ref, got = _run(fp32, x[64:]), _run(tmp_path / "spk.int8.onnx", x[64:])
    cos = (ref * got).sum(1) / np.linalg.norm(got, axis=1)
    assert cos.mean() > 0.995 and _sqnr(ref, got) > 25, (cos.mean(), _sqnr(ref, got))   # before: 0.985, 15.2 dB
    # images, log-spectra and waveforms keep their INT8 first layer: this input only is that wide
    log = np.log(x + 1e-6)
    info = quantize_int8(fp32, tmp_path / "log.int8.onnx", [{"input": log[:64]}], QuantOptions(force_calibration_data=True))
    assert not [g for g in info.policy["exclusions"] if g["kind"] == "wide_input"]


class Octaves(nn.Module):
    """basic-pitch's CQT in small: a half-band low-pass (64 taps, stride 2) resamples the signal octave by octave
    and one filter bank (64 taps) reads every octave; magnitudes, log, a learnt conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        t = torch.arange(64) - 31.5
        lp = torch.sinc(t / 2) * torch.hann_window(64, periodic=False) / 2
        self.down = nn.Conv1d(1, 1, 64, stride=2, padding=31, bias=False)
        self.down.weight.data = lp.view(1, 1, 64)
        f = torch.linspace(0.05, 0.45, 8)[:, None]
        bank = torch.cat([torch.cos(2 * np.pi * f * t), torch.sin(2 * np.pi * f * t)]) * torch.hann_window(64)
        self.bank = nn.Conv1d(1, 16, 64, stride=16, bias=False)
        self.bank.weight.data = bank.view(16, 1, 64)
        self.enc = nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        x, feats = x.unsqueeze(1), []
        for _ in range(4):
            s = self.bank(x)[..., :8]
            feats.append(torch.log(s[:, :8] ** 2 + s[:, 8:] ** 2 + 1e-6))
            x = self.down(x)
        return self.enc(torch.cat(feats, -1))


def test_a_multirate_cascade_of_filters_stays_float(tmp_path):
    """The resampling convs and the filter bank reading their octaves are one cascade: kept float (no dynamic
    INT8 either), not rewritten to the phase form, the learnt conv after it INT8."""
    fp32 = _export(Octaves(), torch.randn(2, 1024), tmp_path / "oct.onnx")
    x = (_signals(96, 1024) * np.random.default_rng(1).uniform(0.05, 1.0, (96, 1))).astype(np.float32)
    batches = [x[i:i + 32] for i in range(0, 64, 32)]
    info = quantize_int8(fp32, tmp_path / "oct.int8.onnx", batches, QuantOptions(force_calibration_data=True))
    cascade = [g for g in info.policy["exclusions"] if g["kind"] == "cascade"]
    assert len(cascade) == 1 and "multirate cascade" in cascade[0]["reason"], info.policy["exclusions"]
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    assert sum(c in cascade[0]["nodes"] for c in convs) == len(convs) - 1 == 7   # 4 banks, 3 resamplers
    assert not set(info.policy["dynamic_nodes"]) & set(cascade[0]["nodes"])
    assert info.pre_process["strided_convs_as_phases"]["rewritten"] == []
    assert info.ops["by_type"]["Conv"]["int8"] == 1
    ref, got = _run(fp32, x[64:]), _run(tmp_path / "oct.int8.onnx", x[64:])
    assert _sqnr(ref, got) > 25, _sqnr(ref, got)


class SumLayerNorm(nn.Module):
    """Magika's (jax2tf) LayerNorm between two Dense layers: var = E[x^2] - E[x]^2 from ReduceSums."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 8)
        with torch.no_grad():
            self.a.bias.add_(4.0)   # a mean well above the spread: the difference is what INT8 loses

    def forward(self, x):
        h = self.a(x)
        mean = h.sum(-1, keepdim=True) * (1 / 64)
        var = torch.clamp((h * h).sum(-1, keepdim=True) * (1 / 64) - mean * mean, min=0)
        return self.b((h - mean) * torch.rsqrt(var + 1e-6))


def test_a_layernorm_built_from_sums_stays_float(tmp_path):
    fp32 = _export(SumLayerNorm(), torch.randn(2, 16), tmp_path / "ln.onnx")
    x = np.random.default_rng(0).standard_normal((96, 16)).astype(np.float32)
    info = quantize_int8(fp32, tmp_path / "ln.int8.onnx", [x[:64]], QuantOptions(force_calibration_data=True))
    norm = [g for g in info.policy["exclusions"] if g["kind"] == "norm"]
    assert norm and {"ReduceSum", "Sub"} <= set(_ops(fp32, norm[0]["nodes"])), norm
    ref, got = _run(fp32, x[64:]), _run(tmp_path / "ln.int8.onnx", x[64:])
    assert _sqnr(ref, got) > 25, _sqnr(ref, got)
    assert info.ops["by_type"]["Gemm"]["int8"] == 2   # the Dense layers around it stay INT8


def _ops(path, names):
    names = set(names)
    return [n.op_type for n in onnx.load(str(path)).graph.node if n.name in names]


def test_the_checks_score_each_part_of_a_joined_output(tmp_path):
    """The whole output's SQNR is its boxes' (NudeNet: 29.9 dB while every score was 0): an output a Concat joins
    from parts of different ranges is also scored part by part, and a part under --min-sqnr fails the gate."""
    from edgec.exporters.metrics import CheckOptions, compare_models, failures
    fp32 = _export(DetectHead(), torch.rand(2, 3, 32, 32), tmp_path / "det.onnx")
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    calib = [{"input": x[i:i + 16]} for i in range(0, 48, 16)]
    quantize_int8(fp32, tmp_path / "on.onnx", calib, QuantOptions(force_calibration_data=True))
    quantize_int8(fp32, tmp_path / "off.onnx", calib, QuantOptions(force_calibration_data=True, policy=False))
    checks = CheckOptions(tasks={"output": "none"})
    off = compare_models(fp32, tmp_path / "off.onnx", [x[48:]], None, checks)[0]
    assert off["sqnr_db"] > 25 and [p["slice"] for p in off["parts"]] == ["0:4", "4:10"], off
    assert off["worst_part"]["slice"] == "4:10" and off["worst_part"]["sqnr_db"] < 1
    assert any("part [4:10] on axis 1" in f for f in failures([off], checks)), failures([off], checks)
    on = compare_models(fp32, tmp_path / "on.onnx", [x[48:]], None, checks)[0]
    assert on["worst_part"]["sqnr_db"] > 25 and not failures([on], checks)


def test_the_fallback_scores_the_parts_of_a_joined_output_too(tmp_path):
    """The fallback ranks and stops by the worst output's error: for a joined output that is each part's, as the
    gate scores them (the crushed scores of a policy-less INT8 head: noise as large as the signal)."""
    from edgec.exporters.sensitivity import _Evaluator
    fp32 = _export(DetectHead(), torch.rand(2, 3, 32, 32), tmp_path / "det.onnx")
    x = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    quantize_int8(fp32, tmp_path / "off.onnx", [{"input": x[:48]}], QuantOptions(force_calibration_data=True,
                                                                                  policy=False))
    ev = _Evaluator(fp32, x[48:], None, 8, cosine=True)
    assert [name for name, _, _ in ev.joined] == ["output[0:4]", "output[4:10]"]
    m = ev(tmp_path / "off.onnx")
    assert m.error > 0.5 and m.score < 0.5, m   # whole output alone: error ~1e-3, cosine ~1
