"""Pre-quantization transforms on the FP32 ONNX graph (after BatchNorm is folded): cross-layer equalization
and bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction").

Cross-layer equalization (CLE): for Conv A -> (Relu | Clip(0,6) | nothing) -> Conv B, output channel i of A
is divided by s_i and input channel i of B multiplied by s_i, with s_i = sqrt(r1_i / r2_i) (r = max |w| of
the channel), so both channels end up with the same range sqrt(r1_i * r2_i). Exact through Relu and
identity (positively homogeneous). ReLU6 is not: relu6(x / s) != relu6(x) / s once x reaches 6. For a
Clip(0,6) pair a channel is only rescaled when its pre-activation maximum m_i, measured on calibration
samples, stays under 6 / margin; then s_i >= m_i * margin / 6 keeps the clip from ever firing, so the
function is unchanged on every input whose activation stays within margin x the calibrated maximum.
Channels that do reach 6 keep s_i = 1 (exact). Iterated, since a Conv is B of one pair and A of the next.

Bias correction (empirical): the INT8 model's Conv/Gemm outputs are shifted in expectation from FP32 ones
(weight rounding, and upstream noise made one-sided by ReLUs). Layer by layer in dependency order, each bias
is lowered by the mean shift measured on calibration samples through ORT's own QDQ graph. A first version
that removed only each layer's own weight-rounding shift, E[conv(x, W_q - W)] on FP32 inputs, made the
systematic logit error of a weight-rounded (per-tensor) digits CNN worse, 0.028 -> 0.045: the shift that
reaches the output is not the sum of the local ones.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from edgec.core.feeds import batch_len, onnx_input_specs
from edgec.exporters.staged import StagedRun

CONV_LIKE = ("Conv", "Gemm")
RELU6_MARGIN = 1.25        # unseen inputs may exceed the calibrated maximum by this much before ReLU6 differs
MAX_STEP = 100.0           # one rescale is clamped to [1/100, 100]: dead channels must not blow up
ITERATIONS = 8


class _Graph:
    """Initializers as numpy arrays, consumers and use counts of a ModelProto (edited in place)."""

    def __init__(self, model):
        from onnx import numpy_helper
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.consumers = defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in model.graph.output}
        self.np = numpy_helper

    def array(self, name):
        if name in self.inits:
            return self.np.to_array(self.inits[name])
        if name in self.consts:
            for a in self.consts[name].attribute:
                if a.name == "value":
                    return self.np.to_array(a.t)
        return None

    def set(self, name, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(self.np.from_array(value.astype(self.array(name).dtype), name))

    def add(self, name, value: np.ndarray) -> None:
        t = self.np.from_array(value.astype(np.float32), name)
        self.model.graph.initializer.append(t)
        self.inits[name] = self.model.graph.initializer[-1]

    def private(self, name) -> bool:
        """An initializer only one node reads (so rescaling it changes nothing else)."""
        return name in self.inits and len(self.consumers[name]) == 1

    def only_consumer(self, tensor):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else list(a.ints) if a.type == a.INTS else a.f if a.type == a.FLOAT \
                else a.s.decode() if a.type == a.STRING else default
    return default


def is_depthwise_weight(shape, groups: int) -> bool:
    """A depthwise conv's weight (OIHW): one input channel per group."""
    return groups > 1 and shape[1] == 1 and shape[0] % groups == 0


def weight_reduce_range(scheme, depthwise: bool) -> bool:
    """The grid of one weight, for PTQ (exporters/quantize.py) and QAT (toolchain/qat.py) alike: the 7-bit one
    under reduce_range (ORT's U8S8 GEMM kernel on AVX2 saturates with 8-bit weights), except a depthwise conv's
    weights where the target's depthwise kernel does not saturate (`scheme.full_range_depthwise`)."""
    return bool(scheme.reduce_range and not (depthwise and scheme.full_range_depthwise))


def is_depthwise(node, g: _Graph) -> bool:
    w = g.array(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    return w is not None and is_depthwise_weight(w.shape, _attr(node, "group", 1))


def count_depthwise(model) -> int:
    g = _Graph(model)
    return sum(is_depthwise(n, g) for n in model.graph.node if n.op_type == "Conv")


def depthwise_weights(model) -> list[str]:
    """Weight initializers that only depthwise convs read."""
    g = _Graph(model)
    return list(dict.fromkeys(n.input[1] for n in model.graph.node if n.op_type == "Conv" and is_depthwise(n, g)
                              and n.input[1] in g.inits and all(is_depthwise(c, g) for c in g.consumers[n.input[1]])))


def _clip_bounds(node, g: _Graph):
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    lo, hi = _attr(node, "min", None), _attr(node, "max", None)   # opset < 11
    if len(node.input) > 1 and node.input[1]:
        v = g.array(node.input[1])
        lo = None if v is None else float(v)
    if len(node.input) > 2 and node.input[2]:
        v = g.array(node.input[2])
        hi = None if v is None else float(v)
    return (lo, hi) if lo is not None and hi is not None else None


def find_pairs(model) -> tuple[list[dict], dict]:
    """Conv -> (Relu | Clip(0, hi) | nothing) -> Conv pairs whose tensors and weights nothing else reads."""
    g = _Graph(model)
    pairs, skipped = [], defaultdict(int)
    for a in model.graph.node:
        if a.op_type != "Conv" or len(a.input) < 2 or not g.private(a.input[1]):
            continue
        if len(a.input) > 2 and a.input[2] and not g.private(a.input[2]):
            skipped["shared bias"] += 1
            continue
        nxt = g.only_consumer(a.output[0])
        act, kind, clip = None, "identity", None
        if nxt is not None and nxt.op_type in ("Relu", "Clip"):
            bounds = _clip_bounds(nxt, g)
            if bounds is None or bounds[0] != 0.0:
                skipped[f"{nxt.op_type} with min != 0"] += 1
                continue
            act, kind, clip = nxt, ("relu" if bounds[1] == np.inf else "relu6"), bounds[1]
            nxt = g.only_consumer(act.output[0])
        if nxt is None:
            continue
        if nxt.op_type != "Conv" or nxt.input[0] != (act or a).output[0] or not g.private(nxt.input[1]):
            continue
        w1, w2 = g.array(a.input[1]), g.array(nxt.input[1])
        if w2.shape[1] * _attr(nxt, "group", 1) != w1.shape[0]:
            continue
        pairs.append({"a": a, "act": act, "b": nxt, "kind": kind, "clip": clip,
                      "depthwise": is_depthwise(a, g) or is_depthwise(nxt, g)})
    return pairs, dict(skipped)


def _in_channel_range(w2: np.ndarray, groups: int) -> np.ndarray:
    """max |w| per input channel of a (grouped) Conv weight (out, in/groups, ...)."""
    out, cpg = w2.shape[0], w2.shape[1]
    per = np.abs(w2).reshape(groups, out // groups, cpg, -1).max(axis=(1, 3))   # (groups, cpg)
    return per.reshape(-1)


def _scale_in_channels(w2: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    out, cpg = w2.shape[0], w2.shape[1]
    v = w2.reshape(groups, out // groups, cpg, -1) * s.reshape(groups, 1, cpg, 1)
    return v.reshape(w2.shape)


def equalize(model, preact_max: dict | None = None, *, iterations: int = ITERATIONS) -> dict:
    """Cross-layer equalization in place. `preact_max`: A's output tensor -> per-channel max over calibration
    samples, needed for Clip pairs (without it they are left alone). Returns the record."""
    g = _Graph(model)
    pairs, skipped = find_pairs(model)
    preact_max = preact_max or {}
    state = []
    for p in pairs:
        m = preact_max.get(p["a"].output[0]) if p["kind"] == "relu6" else None
        if p["kind"] == "relu6" and m is None:
            skipped["relu6 without calibration maxima"] = skipped.get("relu6 without calibration maxima", 0) + 1
            continue
        frozen = None if m is None else m * RELU6_MARGIN > p["clip"]
        state.append({**p, "m": None if m is None else m.astype(np.float64).copy(), "frozen": frozen})

    def ratio(p):
        r1 = np.abs(g.array(p["a"].input[1])).reshape(g.array(p["a"].input[1]).shape[0], -1).max(1)
        r2 = _in_channel_range(g.array(p["b"].input[1]), _attr(p["b"], "group", 1))
        ok = (r1 > 0) & (r2 > 0)
        return np.exp(np.abs(np.log(r1[ok] / r2[ok])).mean()) if ok.any() else 1.0

    before = [ratio(p) for p in state]
    for _ in range(iterations):
        moved = 0.0
        for p in state:
            a, b = p["a"], p["b"]
            w1 = g.array(a.input[1]).astype(np.float64)
            w2 = g.array(b.input[1]).astype(np.float64)
            groups = _attr(b, "group", 1)
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
            r2 = _in_channel_range(w2, groups)
            live = (r1 > 1e-12 * max(r1.max(), 1e-30)) & (r2 > 1e-12 * max(r2.max(), 1e-30))
            s = np.where(live, np.sqrt(np.where(live, r1, 1) / np.where(live, r2, 1)), 1.0)
            s = np.clip(s, 1 / MAX_STEP, MAX_STEP)
            if p["m"] is not None:     # ReLU6: never let a rescaled channel reach the clip
                s = np.where(p["frozen"], 1.0, np.maximum(s, p["m"] * RELU6_MARGIN / p["clip"]))
                p["m"] = p["m"] / s
            w1 = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
            g.set(a.input[1], w1)
            if len(a.input) > 2 and a.input[2]:
                g.set(a.input[2], g.array(a.input[2]).astype(np.float64) / s)
            g.set(b.input[1], _scale_in_channels(w2, groups, s))
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < 1e-3:
            break
    after = [ratio(p) for p in state]
    kinds = defaultdict(int)
    for p in state:
        kinds[p["kind"]] += 1
    frozen = sum(int(p["frozen"].sum()) for p in state if p["frozen"] is not None)
    total6 = sum(p["frozen"].size for p in state if p["frozen"] is not None)
    return {"applied": bool(state), "pairs": len(state), "pairs_by_kind": dict(kinds),
            "depthwise_pairs": sum(p["depthwise"] for p in state), "skipped": dict(skipped),
            "relu6_channels_frozen": f"{frozen}/{total6}", "relu6_margin": RELU6_MARGIN,
            "range_ratio_before": round(float(np.mean(before)), 3) if before else None,
            "range_ratio_after": round(float(np.mean(after)), 3) if after else None}


def relu6_inputs(model) -> list[str]:
    """Output tensors of the A convs of Clip pairs: their per-channel maxima are needed before equalizing."""
    return [p["a"].output[0] for p in find_pairs(model)[0] if p["kind"] == "relu6"]


def run_collect(model, tensors: list[str], calibration, num_samples: int, workdir, reduce, chunk: int = 8):
    """Run the FP32 model with `tensors` as extra outputs over up to `num_samples` calibration samples;
    `reduce(name, array)` is called per chunk (nothing else is kept). Returns the number of samples seen."""
    import onnx
    import onnxruntime as ort
    from edgec.exporters.calibration import rechunk, stream_samples
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    path = Path(workdir) / "transform-stats.onnx"
    onnx.save_model(m, str(path))
    so = ort.SessionOptions()
    so.log_severity_level = 4   # fatal only: errors come back as exceptions (one line)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the tensors as they are
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names, specs = [o.name for o in sess.get_outputs()], onnx_input_specs(sess.get_inputs())
    wanted, seen = set(tensors), 0
    for x in rechunk(stream_samples(calibration, num_samples, specs), chunk):   # x: a dict feed
        for name, value in zip(names, sess.run(None, x)):
            if name in wanted:
                reduce(name, value)
        seen += batch_len(x)
    path.unlink(missing_ok=True)
    return seen


def channel_max(model, tensors, calibration, num_samples, workdir) -> dict:
    acc: dict = {}

    def reduce(name, v):
        m = v.max(axis=(0, *range(2, v.ndim)))
        acc[name] = m if name not in acc else np.maximum(acc[name], m)
    run_collect(model, tensors, calibration, num_samples, workdir, reduce)
    return acc


def _const(name, producers, inits) -> np.ndarray | None:
    """Value of a constant tensor of a QDQ graph: a float initializer, or DequantizeLinear of one."""
    if name in inits:
        return inits[name].astype(np.float64)
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    q = inits[dq.input[0]].astype(np.float64)
    scale = inits[dq.input[1]].astype(np.float64)
    zp = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[_attr(dq, "axis", 1) % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _levels(model, targets: list) -> list[list]:
    """Group targets so that none depends on another of its group, in dependency order."""
    names = {n.name for n in targets}
    depth: dict = {}
    level: dict = {}
    for n in model.graph.node:
        d = max((depth.get(i, 0) for i in n.input if i), default=0)
        if n.name in names:
            level[n.name] = d
            d += 1
        for o in n.output:
            depth[o] = d
    groups = defaultdict(list)
    for n in targets:
        groups[level[n.name]].append(n)
    return [groups[k] for k in sorted(groups)]


def _channel_means(batches) -> tuple[dict, int]:
    """Per-channel (axis 1) mean of each tensor over every sample of `batches` (dicts of name -> array)."""
    sums, count = {}, 0
    for values in batches:
        for name, v in values.items():
            v = v.astype(np.float64)
            part = v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2).sum(axis=0)   # mean over positions
            sums[name] = sums.get(name, 0) + part
        count += next(iter(values.values())).shape[0]
        del values, v   # before the next batch is computed: one batch of outputs alive at a time
    return {k: v / count for k, v in sums.items()}, count


def _session(model, path: Path | None):
    import onnx
    import onnxruntime as ort
    if path is not None:
        onnx.save_model(model, str(path))
    so = ort.SessionOptions()
    so.log_severity_level = 4   # fatal only: errors come back as exceptions (one line)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # every tensor as it is
    source = str(path) if path is not None else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def bias_correct(model, qdq_model, calibration, num_samples: int, workdir, exclude=()) -> tuple[dict, dict]:
    """Empirical bias correction in place, layer by layer in dependency order: the bias of each quantized
    Conv/Gemm is lowered by E[its output in the INT8 model] - E[its output in FP32] on calibration samples,
    with every earlier layer already corrected (so the shift that reaches a layer from upstream rounding, or
    from noise rectified by ReLUs, is removed too). The INT8 model is ORT's own QDQ graph with each bias fed
    as an input, so one session serves every pass. Returns (record, originals: node -> (bias, old | None))."""
    import onnx
    from edgec.exporters.calibration import rechunk, stream_samples
    q = onnx.ModelProto()
    q.CopyFrom(qdq_model)
    g, pairs, skipped, producers, inits = _targets(model, q, exclude)
    qnodes = {n.name: qn for n, qn in pairs}
    targets = [n for n, _ in pairs]
    if not targets:
        return {"applied": False, "layers": 0, "samples": 0, "skipped": dict(skipped)}, {}
    specs = onnx_input_specs(model.graph.input, [i.name for i in model.graph.initializer])
    chunks = list(rechunk(stream_samples(calibration, num_samples, specs), 16))   # dict feeds

    # FP32 reference: every target's output mean in one pass.
    fp = onnx.ModelProto()
    fp.CopyFrom(model)
    for n in targets:
        fp.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    sess = _session(fp, Path(workdir) / "bc-fp32.onnx")
    outs = [n.output[0] for n in targets]
    ref, seen = _channel_means(dict(zip(outs, sess.run(outs, x))) for x in chunks)
    del sess, fp

    # INT8 graph with each target's bias as an input (its dequantized value to start with).
    beta, current = {}, {}
    for n in targets:
        qn = qnodes[n.name]
        channels = len(ref[n.output[0]])
        value = _const(qn.input[2], producers, inits) if len(qn.input) > 2 and qn.input[2] else None
        beta[n.name] = _attr(n, "beta", 1.0) if n.op_type == "Gemm" else 1.0
        current[n.name] = np.zeros(channels) if value is None else value.reshape(-1)
        feed = f"edgec_bias_correction/{n.name}"
        q.graph.input.append(onnx.helper.make_tensor_value_info(feed, onnx.TensorProto.FLOAT, [channels]))
        while len(qn.input) < 3:
            qn.input.append("")
        qn.input[2] = feed

    def biases(names):
        return {k: current[k[len("edgec_bias_correction/"):]].astype(np.float32) for k in names
                if k.startswith("edgec_bias_correction/")}

    total = {n.name: 0.0 for n in targets}
    levels = _levels(model, targets)
    # One stage per level, in order: a layer's shift is measured with every upstream layer corrected. Correcting
    # all layers at once and repeating (Jacobi sweeps) diverged on EfficientNet-Lite0 (mean cosine 0.98 -> 0.54
    # after one sweep, ~0 after four): shifts grow through the depth. Each stage computes only what the earlier
    # ones did not (exporters/staged.py), so the whole correction costs about one pass over the INT8 graph.
    staged = StagedRun(q, [[qnodes[n.name].output[0] for n in group] for group in levels], chunks,
                       lambda m: _session(m, None))
    for k, group in enumerate(levels):
        got, _ = _channel_means(staged.run(k, biases))
        for n in group:
            out = qnodes[n.name].output[0]
            shift = got[out] - ref[n.output[0]]
            current[n.name] = current[n.name] - shift / beta[n.name]
            total[n.name] = total[n.name] + shift
    (Path(workdir) / "bc-fp32.onnx").unlink(missing_ok=True)

    originals, shifts = {}, []
    for n in targets:
        _set_bias(g, n, total[n.name] / beta[n.name], originals)
        shifts.append(float(np.abs(total[n.name]).mean()))
    record = {"applied": True, "layers": len(originals), "levels": len(levels), "passes": len(levels),
              "samples": seen,
              "skipped": dict(skipped), "mean_abs_shift": round(float(np.mean(shifts)), 6),
              "max_layer_mean_abs_shift": round(float(np.max(shifts)), 6),
              "kind": "empirical, sequential: E[INT8 output] - E[FP32 output] per layer on calibration samples"}
    return record, originals


def correction_levels(model, exclude=()) -> int:
    """How many sequential passes empirical bias correction makes (Conv/Gemm levels in dependency order)."""
    targets = [n for n in model.graph.node if n.op_type in CONV_LIKE and n.name not in set(exclude)]
    return len(_levels(model, targets)) if targets else 0


def bias_inputs(model, exclude=()) -> list[str]:
    """Input tensors of the Conv/Gemm nodes whose per-channel means fast bias correction needs."""
    excluded = set(exclude)
    return list(dict.fromkeys(n.input[0] for n in model.graph.node
                              if n.op_type in CONV_LIKE and n.name not in excluded and n.input))


def _tap_fractions(node, spatial: tuple, kernel: tuple) -> np.ndarray | None:
    """For each kernel tap, the share of output positions where it reads inside the (zero-padded) input:
    a Conv's mean output is sum_taps w * fraction * mean input. None when the spatial shape is unknown."""
    if not spatial or len(spatial) != len(kernel):
        return None
    d = len(kernel)
    strides = _attr(node, "strides", [1] * d)
    dil = _attr(node, "dilations", [1] * d)
    pads = _attr(node, "pads", [0] * 2 * d)
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    per_axis = []
    for a in range(d):
        n_in, k, s, dl, lo = spatial[a], kernel[a], strides[a], dil[a], pads[a]
        n_out = (n_in + lo + pads[a + d] - dl * (k - 1) - 1) // s + 1
        if n_out < 1:
            return None
        pos = np.arange(n_out)[:, None] * s - lo + np.arange(k)[None, :] * dl   # (out, tap) input index
        per_axis.append(((pos >= 0) & (pos < n_in)).mean(axis=0))
    frac = per_axis[0]
    for f in per_axis[1:]:
        frac = np.multiply.outer(frac, f)
    return frac


def _targets(model, q, exclude):
    """Quantized Conv/Gemm nodes whose bias can be corrected: (node, its QDQ twin), skipped counts."""
    from onnx import numpy_helper
    g = _Graph(model)
    producers = {o: n for n in q.graph.node for o in n.output}
    qnodes = {n.name: n for n in q.graph.node}
    excluded, targets, skipped = set(exclude), [], defaultdict(int)
    for n in model.graph.node:
        if n.op_type not in CONV_LIKE or n.name in excluded or len(n.input) < 2:
            continue
        qn = qnodes.get(n.name)
        if qn is None or producers.get(qn.input[1]) is None or producers[qn.input[1]].op_type != "DequantizeLinear":
            skipped["weight not quantized"] += 1
            continue
        if len(n.input) > 2 and n.input[2] and (not g.private(n.input[2]) or g.array(n.input[2]).ndim != 1):
            skipped["bias shared or not 1-D"] += 1
            continue
        if n.op_type == "Gemm" and _attr(n, "transA", 0):
            skipped["Gemm with transA"] += 1
            continue
        if g.array(n.input[1]) is None:
            skipped["weight not a constant"] += 1
            continue
        targets.append((n, qn))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    return g, targets, skipped, producers, inits


def _set_bias(g: _Graph, n, shift: np.ndarray, originals: dict) -> None:
    """Lower node n's bias by `shift` (adding a bias when it has none); remember the original."""
    if len(n.input) > 2 and n.input[2]:
        originals[n.name] = (n.input[2], g.array(n.input[2]).copy())
        g.set(n.input[2], g.array(n.input[2]).astype(np.float64) - shift)
        return
    name = f"{n.name}_bias_corrected"
    while name in g.inits:
        name += "_"
    g.add(name, -shift)
    while len(n.input) < 3:
        n.input.append("")
    n.input[2] = name
    originals[n.name] = (name, None)


def fast_bias_correct(model, qdq_model, input_means: dict, exclude=(), reference: dict | None = None
                      ) -> tuple[dict, dict]:
    """Analytic bias correction in place, from statistics the calibration pass already collected (no
    extra pass): each quantized Conv/Gemm's output is shifted in expectation by its own weight rounding,
    E[(W_q - W) x] = (W_q - W) E[x] for a linear layer, with E[x] the per-channel mean of its FP32 input
    (zero padding accounted per kernel tap); the bias is lowered by that shift. This is what NNCF's fast
    bias correction computes (it runs the layer with quantized weights on a blob of the input means).
    `input_means`: input tensor -> (per-channel mean, spatial shape). W_q is ORT's own rounding, read from
    `qdq_model`. `reference`: weight name -> FP32 value where `model` holds an already rounded weight
    (AdaRound). Returns (record, originals: node -> (bias, old | None))."""
    g, targets, skipped, producers, inits = _targets(model, qdq_model, exclude)
    originals, shifts = {}, []
    for n, qn in targets:
        stat = input_means.get(n.input[0])
        if stat is None:
            skipped["no input statistics"] += 1
            continue
        mean, spatial = stat
        w = (reference or {}).get(n.input[1])
        w = (g.array(n.input[1]) if w is None else w).astype(np.float64)
        wq = _const(qn.input[1], producers, inits)
        if wq is None or wq.shape != w.shape:
            skipped["weight not quantized"] += 1
            continue
        dw = wq - w
        if n.op_type == "Gemm":
            alpha, beta = _attr(n, "alpha", 1.0), _attr(n, "beta", 1.0)
            dw = dw.T if _attr(n, "transB", 0) else dw            # (K, N)
            if mean.shape[0] != dw.shape[0]:
                skipped["input mean does not match the weight"] += 1
                continue
            shift = alpha * (mean @ dw) / beta
        else:
            groups = _attr(n, "group", 1)
            out, cpg = dw.shape[0], dw.shape[1]
            if mean.shape[0] != cpg * groups:
                skipped["input mean does not match the weight"] += 1
                continue
            frac = _tap_fractions(n, spatial, dw.shape[2:])
            taps = dw if frac is None else dw * frac
            per_in = taps.reshape(out, cpg, -1).sum(axis=2)                      # (out, cpg)
            m = mean.reshape(groups, 1, cpg)
            shift = (per_in.reshape(groups, out // groups, cpg) * m).sum(axis=2).reshape(out)
        _set_bias(g, n, shift, originals)
        shifts.append(float(np.abs(shift).mean()))
    record = {"applied": bool(originals), "layers": len(originals), "skipped": dict(skipped),
              "kind": "analytic (fast): (W_int8 - W) E[x] per layer from the calibration pass's channel means"}
    if shifts:
        record.update(mean_abs_shift=round(float(np.mean(shifts)), 6),
                      max_layer_mean_abs_shift=round(float(np.max(shifts)), 6))
    return record, originals


def restore_biases(model, originals: dict, nodes) -> int:
    """Put back the uncorrected bias of `nodes` (layers left in FP32 need no correction)."""
    g = _Graph(model)
    by_name = {n.name: n for n in model.graph.node}
    restored = 0
    for name in nodes:
        if name not in originals or name not in by_name:
            continue
        bias, value = originals[name]
        if value is None:
            del by_name[name].input[2]
        else:
            g.set(bias, value)
        restored += 1
    return restored


__all__ = ["equalize", "find_pairs", "count_depthwise", "depthwise_weights", "relu6_inputs", "channel_max", "bias_correct",
           "fast_bias_correct", "bias_inputs",
           "restore_biases", "run_collect"]
