"""Quantization that knows the model: what to keep out of INT8 by default, and how to quantize a transformer.

One 8-bit scale per tensor cannot hold some tensors; quantizing them breaks the model however well the rest is
calibrated (benchmarks/ANYMODEL_RESULTS.md, /work/shared/FIELD-NOTES.md):
- spectral magnitude chains: the Pow/Add/Sqrt/Log/Abs/ReduceSum after an STFT-like convolution (a fixed basis of
  long kernels on one channel) span many decades (a VAD's correlation with FP32 fell to 0.07);
- LayerNorm and Softmax: their internals (mean, variance, exp) and inputs (pre-norm residuals with outlier
  channels, attention scores);
- a multirate cascade of STFT-like convs (a CQT resampling its signal octave by octave): the noise compounds;
- a graph output joined (Concat) from parts of very different ranges: a detector's boxes beside its scores;
- the recurrent cells reading an input whose values span decades (a power spectrum fed raw): one scale zeroes most;
- the recurrent state path: LSTM/GRU/RNN (also inside If/Loop branches) and the nodes that carry a state input to
  them and their state back out: an error there is fed back every step;
- and, for speed, a tiny weighted op with float on every side (`_lone_small`): its own quantizer pair costs more.
`plan()` names these nodes, each with its reason (recorded in QuantInfo.policy), and says whether a transformer's
MatMuls are quantized statically or dynamically (per-call activation ranges: `quantize_dynamic`) by what was
measured. Two of them still get INT8 weights, dynamically, after the static pass (`quantize_dynamic_nodes`):
LSTM cells (ORT's DynamicQuantizeLSTM) and the STFT-like Conv (ConvInteger, or MatMulInteger as
rewrites.strided_convs_as_frames writes it: its output stays float, feeding the FP32 magnitude chain).
`dedupe_initializers()` undoes a pre-processing side effect: ORT's graph optimiser constant-folds a weight that both
branches of an `If` read from the outer graph into a copy per branch (the INT8 file grew).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict, deque

COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
RECURRENT = ("LSTM", "GRU", "RNN")
SPECTRAL = ("Pow", "Sqrt", "Log", "Abs", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Add", "Mul", "Div", "Clip",
            "Max", "Exp")
# nodes that only move or reshape data: they pass a tensor's range along unchanged
MOVES = ("Slice", "Gather", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Split", "Identity",
         "Flatten", "Cast", "Expand", "Pad")
NORMS = ("LayerNormalization", "Softmax", "SimplifiedLayerNormalization", "SkipLayerNormalization")
# decomposed LayerNorm: ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div (-> Mul -> Add)
_LN_PARTS = ("ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div", "Mul", "Reciprocal")

# measured on all-MiniLM-L6-v2, 128 real sentences, mean-pooled embedding cosine to FP32, 2 threads
# (benchmarks/ANYMODEL_RESULTS.md): ORT quantize_static defaults 0.32; static U8S8 per-channel of every node 0.34,
# LayerNorm/Softmax kept float 0.34, and only the weight MatMuls 0.927 (1.35x); dynamic MatMuls 0.991 (1.46x)
DYNAMIC_REASON = ("transformer (LayerNorm/Softmax and MatMuls on activations): dynamic INT8 of the weight MatMuls "
                  "(activation range per call) kept the embedding of all-MiniLM-L6-v2 at mean cosine {dynamic} to "
                  "FP32 (1.46x faster); static INT8 with calibrated ranges reached {static} at best "
                  "(weight MatMuls only, LayerNorm/Softmax float) and {static_all} quantizing every node")
MEASURED = {"static": "0.927", "static_all": "0.34", "dynamic": "0.991"}

# measured on silero-vad 6.2.3, 16 clips x 40 frames streamed with their own state (benchmarks/ANYMODEL_RESULTS.md):
# correlation with FP32 0.9947 with the STFT Conv and the LSTM float, 0.9960 with the LSTM dynamic, 0.9968 with both;
# the STFT Conv static INT8 instead: 0.956 (one calibrated scale for silent and loud frames). Keeping the signal
# into it (Pad, Unsqueeze) float as well measured worse: 0.9939, SQNR 22.1 vs 25.0 dB
DYNAMIC_CELL_REASON = ("LSTM weights INT8 with dynamic activations (DynamicQuantizeLSTM: ranges per call and step), "
                       "the state path around it float: silero-vad streamed correlation with FP32 0.9947 -> 0.9960")
DYNAMIC_STFT_REASON = ("STFT-like {conv}: INT8 weights and input, its output float (ConvInteger / MatMulInteger): no "
                       "one 8-bit scale for a spectrum whose values span decades (silero-vad 0.956 with a static "
                       "QLinearConv there, 0.9968 so), feeding the FP32 magnitude chain")
# ORT's dynamic quantizer has kernels for these; a GRU/RNN stays float
DYNAMIC_CELLS = ("LSTM",)


def _subgraph_ops(node) -> set[str]:
    import onnx
    ops: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
            if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            for n in g.node:
                ops.add(n.op_type)
                ops |= _subgraph_ops(n)
    return ops


class _Graph:
    def __init__(self, model):
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.cells = _cells(g)
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
            for i in _outer_inputs(n):
                self.consumers[i].append(n)

    def weight(self, node):
        return self.inits.get(node.input[1]) if len(node.input) > 1 else None


def _outer_inputs(node) -> set[str]:
    """Names a control-flow node's branches read from the enclosing graph (implicit inputs)."""
    import onnx
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
            if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            local = {i.name for i in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
            for n in g.node:
                names |= {i for i in n.input if i and i not in local}
                names |= _outer_inputs(n) - local
    return names


def _stft_like(g: _Graph, node) -> bool:
    """A fixed filter bank on a raw signal: a Conv on one input channel with long constant kernels (>= 64), or
    a (taps >= 64, C_out) product over frames cut from one signal: a MatMul (as rewrites.strided_convs_as_frames
    writes it) or a kernel-1 Conv with the taps as channels (as keras2onnx writes a Keras STFT layer: DNSMOS)."""
    w = g.weight(node)
    if node.op_type == "MatMul":
        return w is not None and len(w.dims) == 2 and w.dims[0] >= 64 and _frames(g, node.input[0])
    if node.op_type != "Conv" or w is None or len(w.dims) < 3:
        return False
    if all(d == 1 for d in w.dims[2:]):
        return w.dims[1] >= 64 and _frames(g, node.input[0])
    return w.dims[1] == 1 and max(w.dims[2:]) >= 64


def _frames(g: _Graph, name: str) -> bool:
    """`name` holds frames cut from one signal (through Transposes): a Concat of two or more Slices of one
    Reshape (hops, then a Slice per hop), or of two or more Reshapes of Slices of one tensor (an offset crop per
    hop, each reshaped into frames)."""
    cat = g.producer.get(name)
    while cat is not None and cat.op_type == "Transpose":
        cat = g.producer.get(cat.input[0])
    if cat is None or cat.op_type != "Concat" or len(cat.input) < 2:
        return False
    parts = [g.producer.get(i) for i in cat.input]
    if all(p is not None and p.op_type == "Reshape" for p in parts):
        parts = [g.producer.get(p.input[0]) for p in parts]
        return all(p is not None and p.op_type == "Slice" for p in parts) and len({p.input[0] for p in parts}) == 1
    if any(c is None or c.op_type != "Slice" for c in parts) or len({c.input[0] for c in parts}) != 1:
        return False
    return getattr(g.producer.get(parts[0].input[0]), "op_type", None) == "Reshape"


def _spectral(g: _Graph) -> list[dict]:
    found = []
    for conv in (n for n in g.nodes if _stft_like(g, n)):
        chain, seen = [], set()
        todo = deque(conv.output)
        while todo:
            for n in g.consumers.get(todo.popleft(), []):
                if n.name in seen or n.op_type in COMPUTE or n.op_type not in SPECTRAL + MOVES:
                    continue
                seen.add(n.name)
                chain.append(n)
                todo.extend(n.output)
        magnitude = [n for n in chain if n.op_type in SPECTRAL]
        if not magnitude:
            continue
        w = g.weight(conv)
        found.append({"kind": "spectral", "nodes": [conv.name] + [n.name for n in chain],
                      "reason": f"STFT-like {conv.name} (kernel {list(w.dims)}) and its magnitude chain "
                                f"({', '.join(sorted({n.op_type for n in magnitude}))}): values span decades, "
                                "one 8-bit scale keeps only the largest"})
    return found


CASCADE_REASON = ("{n} STFT-like convs in a multirate cascade ({convs}...): each octave's signal is the output of "
                  "the conv before it, filtered again and again, and 8-bit noise compounds down the cascade "
                  "(basic-pitch's CQT: note posteriorgram SQNR 11.6 dB, F1 0.77 with it INT8, static or dynamic; "
                  "28.7 dB, 0.97 with it float); the cascade stays float, the network after it INT8")


def _cascade(g: _Graph) -> list[dict]:
    """STFT-like convs linked through the signal they read: one reads (through data movement) another's output, or
    both read the same signal. Only a set with such a read of another's output is a cascade."""
    convs = [n for n in g.nodes if _stft_like(g, n)]
    root, via = {}, {}
    for c in convs:   # back from the conv's input through data movement to the tensor the signal comes from
        name, path = c.input[0], []
        while (p := g.producer.get(name)) is not None and p.op_type in MOVES:
            path.append(p.name)
            name = p.input[0]
        root[c.name], via[c.name] = name, path
    parent = {c.name: c.name for c in convs}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    outputs = {o: c.name for c in convs for o in c.output}
    linked = set()
    for c in convs:
        for other in convs:
            if other.name != c.name and root[other.name] == root[c.name]:
                parent[find(other.name)] = find(c.name)
        if root[c.name] in outputs:   # reads another STFT-like conv's output: a resampling stage
            parent[find(c.name)] = find(outputs[root[c.name]])
            linked.add(c.name)
    cascades = {find(c) for c in linked}
    members = [c.name for c in convs if find(c.name) in cascades]
    if not members:
        return []
    keep = set(members) | {m for c in members for m in via[c]}
    return [{"kind": "cascade", "nodes": [n.name for n in g.nodes if n.name in keep],
             "reason": CASCADE_REASON.format(n=len(members), convs=", ".join(members[:2]))}]


def spectral_convs(model) -> set[str]:
    """The STFT-like Convs whose output feeds a magnitude chain or that form a multirate cascade (their form is
    what the policy recognises)."""
    g = _Graph(model)
    stft = {n.name for n in g.nodes if _stft_like(g, n)}
    return {grp["nodes"][0] for grp in _spectral(g)} | {n for grp in _cascade(g) for n in grp["nodes"] if n in stft}


def _downstream(g: _Graph, starts, ops, limit: int, seen=None) -> list:
    """`starts` and what they feed, breadth first, through nodes of `ops` only, at most `limit` nodes."""
    part, seen, todo = [], set(seen or ()), deque(starts)
    while todo and len(part) < limit:
        c = todo.popleft()
        if c.name in seen or c.op_type not in ops:
            continue
        seen.add(c.name)
        part.append(c)
        for o in c.output:
            todo.extend(g.consumers.get(o, []))
    return part


def _norms(g: _Graph) -> list[dict]:
    nodes = [n for n in g.nodes if n.op_type in NORMS]
    # decomposed LayerNorm: ReduceMean whose input is also subtracted from its output, and what follows it
    for n in g.nodes:
        if n.op_type != "ReduceMean":
            continue
        subs = [c for c in g.consumers.get(n.output[0], []) if c.op_type == "Sub" and n.input[0] in c.input]
        if not subs:
            continue
        nodes += [n, *_downstream(g, subs, _LN_PARTS, 11, seen={n.name})]
    nodes += _sum_layernorms(g)
    if not nodes:
        return []
    kinds = sorted({n.op_type for n in nodes})
    return [{"kind": "norm", "nodes": list(dict.fromkeys(n.name for n in nodes)),
             "reason": f"{len(nodes)} LayerNorm/Softmax nodes ({', '.join(kinds)}): mean/variance/exp internals and "
                       "inputs with outlier channels or attention scores do not fit one 8-bit scale"}]


# jax2tf's LayerNorm (Magika): var = Sum(x*x)/n - (Sum(x)/n)^2, Max(0), Rsqrt, (x - mean) * scale + bias
_SUM_LN_PARTS = (*_LN_PARTS, "ReduceSum", "Max", "Expand", "Reshape")


def _sum_layernorms(g: _Graph) -> list:
    """LayerNorms built from ReduceSum: a Sum of x scaled (by 1/n) and broadcast to a Sub from x itself, with
    everything that computes the variance and scales by it. In INT8 the difference E[x^2] - E[x]^2 cancels to
    noise: Magika's first LayerNorm took its top-1 agreement with FP32 to 6 % (float: 98 %)."""
    found = []
    for n in (n for n in g.nodes if n.op_type == "ReduceSum"):
        x, todo, path, hit = n.input[0], deque(n.output), [], False
        while todo and len(path) < 6 and not hit:
            for c in g.consumers.get(todo.popleft(), []):
                if c.op_type == "Sub" and x in c.input:
                    hit = True
                elif c.op_type in ("Mul", "Div", "Reshape", "Expand", "Unsqueeze"):
                    path.append(c)
                    todo.extend(c.output)
        if not hit:
            continue
        starts = [n, *(c for c in g.consumers.get(x, []) if c.op_type in ("Mul", "Pow")
                       and (c.op_type == "Pow" or list(c.input[:2]) == [x, x]))]
        found += _downstream(g, starts, _SUM_LN_PARTS, 24)
    return found


def _recurrent(g: _Graph) -> list[dict]:
    cells = [n for n in g.nodes if n.op_type in RECURRENT or _subgraph_ops(n) & set(RECURRENT)]
    if not cells:
        return []
    path = {n.name for n in cells}
    # state in: back from each cell through data movement to a graph input
    for cell in cells:
        todo = deque([*cell.input, *_outer_inputs(cell)])
        seen = set()
        while todo:
            name = todo.popleft()
            p = g.producer.get(name)
            if p is None or p.name in seen or p.op_type not in MOVES + ("Equal", "Shape", "Size", "ConstantOfShape"):
                continue
            seen.add(p.name)
            if any(i in g.inputs or g.producer.get(i) is not None for i in p.input):
                path.add(p.name)
                todo.extend(p.input)
    # state out: forward from each cell through data movement to a graph output
    for cell in cells:
        todo = deque(cell.output)
        while todo:
            name = todo.popleft()
            for c in g.consumers.get(name, []):
                if c.name in path or c.op_type not in MOVES:
                    continue
                reach, t = False, deque(c.output)
                while t and not reach:  # only a path that ends in a graph output carries the state
                    x = t.popleft()
                    reach = x in g.outputs
                    t.extend(o for cc in g.consumers.get(x, []) if cc.op_type in MOVES for o in cc.output)
                if reach:
                    path.add(c.name)
                    todo.extend(c.output)
    ops = sorted({n.op_type for n in cells})
    inner = sorted(_subgraph_ops(cells[0]) & set(RECURRENT)) if cells[0].op_type not in RECURRENT else []
    return [{"kind": "recurrent", "nodes": sorted(path),
             "reason": f"recurrent state path ({', '.join(ops)}{' holding ' + ', '.join(inner) if inner else ''}, "
                       "state input/output): a quantization error in the state is fed back every step"}]


def _branch_reads(g: _Graph) -> list[dict]:
    """Producers of the tensors an If/Loop/Scan branch reads from the outer graph. ORT's QDQ quantizer rewires
    main-graph consumers only: when it folds such a producer (a Relu after a quantized Gemm) into the
    quantization range, the branch goes on reading the tensor without the Relu (SQNR 1.9 dB on a test model)."""
    read = set()
    for n in g.nodes:
        read |= _outer_inputs(n)
    nodes = sorted({g.producer[name].name for name in read if name in g.producer})
    if not nodes:
        return []
    return [{"kind": "branch_input", "nodes": nodes,
             "reason": f"{len(nodes)} node(s) whose output an If/Loop branch reads: ORT's quantizer does not rewire "
                       "reads inside branches, so a folded Relu/Clip there would be lost"}]


# weights at most this, and under 1 % of the model's: an op so small that the quantizer pair it needs alone costs more
# than INT8 saves
LONE_MAX_WEIGHTS = 4096
LONE_REASON = ("{op} {name}: {weights} weights ({share:.2g} % of the model's) with no INT8 neighbour (float on every "
               "side): the QuantizeLinear/DequantizeLinear pair it needs alone costs more than INT8 saves "
               "(silero-vad's decoder Conv, 128 weights after its LSTM: INT8 batch 1 52.4 -> 49.3 us, 1 thread, "
               "AVX-512 VNNI)")


def _lone_small(g: _Graph, excluded: set) -> list[dict]:
    """Tiny weighted ops that would be an INT8 island of their own: walking from one through the nodes ORT would
    quantize with it (neither excluded nor weighted) reaches no other weighted op."""
    import math
    weighted = [n for n in g.nodes if n.op_type in COMPUTE and g.weight(n) is not None]
    sizes = {n.name: math.prod(g.weight(n).dims) for n in weighted}
    total = sum(sizes.values())
    compute = [n for n in weighted if n.name not in excluded]
    found = []
    for node in compute:
        if sizes[node.name] > LONE_MAX_WEIGHTS or sizes[node.name] * 100 >= total:
            continue
        island, todo, lone = {node.name: None}, deque([node]), True   # a dict: insertion order, set lookups
        while todo and lone:
            n = todo.popleft()
            for m in [g.producer[i] for i in n.input if i in g.producer] + \
                     [c for o in n.output for c in g.consumers.get(o, [])]:
                if m.name in island or m.name in excluded or m.op_type in RECURRENT or _subgraph_ops(m):
                    continue   # the float side
                if m.op_type in COMPUTE:
                    lone = False
                    break
                island[m.name] = None
                todo.append(m)
        if lone:
            found.append({"kind": "lone_small", "nodes": list(island),
                          "reason": LONE_REASON.format(op=node.op_type, name=node.name, weights=sizes[node.name],
                                                       share=100 * sizes[node.name] / total)})
    return found

# a part of a joined output with under 1/8 of the largest part's range keeps under 32 of the 256 levels
MIXED_RANGE_RATIO = 8.0
MIXED_REASON = ("{node} joins parts of very different ranges into graph output {output} (|max| {ranges}): one 8-bit "
                "scale for the joined tensor rounds the small parts away (NudeNet's YOLO head: boxes up to 330 px beside "
                "0-1 class scores, every INT8 score 0 and no detection left); the join stays float, each part keeps "
                "its own INT8 scale")


def _to_output(g: _Graph, name: str) -> tuple[list, str | None]:
    """The data-movement nodes from tensor `name` to a graph output, and that output (None: it reaches none)."""
    if name in g.outputs:
        return [], name
    for c in g.consumers.get(name, []):
        if c.op_type in MOVES and c.op_type != "Concat":
            path, out = _to_output(g, c.output[0])
            if out is not None:
                return [c, *path], out
    return [], None


def _mixed_outputs(g: _Graph, ranges: dict | None) -> list[dict]:
    """Concats that make a graph output from parts whose calibrated ranges differ by MIXED_RANGE_RATIO or more."""
    if not ranges:
        return []
    import numpy as np
    from onnx import numpy_helper
    found = []
    for n in (n for n in g.nodes if n.op_type == "Concat"):
        after, out = _to_output(g, n.output[0])
        if out is None:
            continue
        amax = []
        for i in n.input:
            if i in g.inits:
                v = numpy_helper.to_array(g.inits[i])
                amax.append(float(np.abs(v).max()) if v.size else 0.0)
            elif i in ranges:
                amax.append(max(abs(float(ranges[i][0])), abs(float(ranges[i][1]))))
        parts = [a for a in amax if a > 1e-12]
        if len(parts) < 2 or max(parts) < MIXED_RANGE_RATIO * min(parts):
            continue
        found.append({"kind": "mixed_output", "nodes": [n.name, *(c.name for c in after)],
                      "reason": MIXED_REASON.format(node=n.name, output=out,
                                                    ranges=", ".join(f"{a:.3g}" for a in amax))})
    return found


# over half of an input's nonzero values under half an 8-bit step of its range: measured 85 % on Resemblyzer's raw
# power mels, 11 % on a speech waveform, under 2 % on images, log-mels and basic-pitch's audio
WIDE_INPUT_SHARE = 0.5
WIDE_REASON = ("input {name} spans decades: {share:.0%} of its nonzero calibration values are under half an 8-bit "
               "step of its range (a power spectrum fed raw), so INT8 there, static or dynamic, zeroes them "
               "(Resemblyzer's first LSTM: embedding SQNR 1.2 dB, cosine 0.62; float: 21.2 dB, 0.996); {nodes} "
               "read it float, the layers after them stay INT8")


def _wide_inputs(g: _Graph, underflow: dict | None) -> list[dict]:
    """The data movement from each input that spans decades to the recurrent cells reading it. Only cells: their
    dynamic INT8 weights are most of such a model (Resemblyzer's first LSTM 21 %), more than the fallback may
    keep float; a static Conv/Gemm there is what the fallback finds (tests/test_cli_sqnr_fallback.py)."""
    found = []
    for name, share in (underflow or {}).items():
        if share < WIDE_INPUT_SHARE or name not in g.inputs:
            continue
        path, first, todo, seen = [], [], deque([name]), set()
        while todo:
            for c in g.consumers.get(todo.popleft(), []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type in RECURRENT:
                    first.append(c.name)
                elif c.op_type in MOVES:   # a Conv/Gemm there: static, ranked and repaired by the fallback
                    path.append(c.name)
                    todo.extend(c.output)
        if first:
            found.append({"kind": "wide_input", "nodes": [*path, *first],
                          "reason": WIDE_REASON.format(name=name, share=share, nodes=", ".join(first))})
    return found


def is_transformer(model) -> bool:
    ops = {n.op_type for n in model.graph.node}
    g = _Graph(model)
    act_matmul = sum(1 for n in g.nodes if n.op_type == "MatMul" and all(i not in g.inits for i in n.input[:2]))
    return bool(ops & {"LayerNormalization", "Softmax"}) and act_matmul >= 2


def transformer_mode(model) -> tuple[str, str]:
    """("dynamic" | "static", reason). Dynamic for transformers, as measured; static for everything else."""
    if is_transformer(model):
        return "dynamic", DYNAMIC_REASON.format(**MEASURED)
    return "static", "no attention (Softmax/LayerNorm with activation x activation MatMuls): static INT8"


def plan(model, *, enabled: bool = True, ranges: dict | None = None, underflow: dict | None = None) -> dict:
    """The default exclusions and the MatMul mode for `model` (the graph about to be quantized); `ranges` (tensor ->
    calibrated (lo, hi)) finds the joined outputs whose parts one scale cannot hold, `underflow` (input -> share
    of its values one scale zeroes: CalibrationResult.underflow) the inputs that span decades."""
    mode, mode_reason = transformer_mode(model)
    if not enabled:
        return {"enabled": False, "exclusions": [], "nodes": [], "mode": "static",
                "mode_reason": "policy off by option: static INT8 of every supported node"}
    g = _Graph(model)
    groups = [*_spectral(g), *_cascade(g), *_norms(g), *_recurrent(g), *_branch_reads(g), *_tables(model),
              *_mixed_outputs(g, ranges), *_wide_inputs(g, underflow)]
    if mode == "static":
        groups += _lone_small(g, {n for grp in groups for n in grp["nodes"]})
    nodes = list(dict.fromkeys(n for grp in groups for n in grp["nodes"]))
    dynamic = _dynamic(g, groups) if mode == "static" else []
    return {"enabled": True, "exclusions": groups, "nodes": nodes, "mode": mode, "mode_reason": mode_reason,
            "dynamic": dynamic, "dynamic_nodes": [n for grp in dynamic for n in grp["nodes"]]}


def _cells(graph) -> list:
    """Recurrent cells of ORT's dynamic kernels, in the graph and its If/Loop branches (named ones: the
    quantizer addresses nodes by name)."""
    found = [n for n in graph.node if n.op_type in DYNAMIC_CELLS and n.name]
    for sub in _graphs(graph):
        found += [n for n in sub.node if n.op_type in DYNAMIC_CELLS and n.name]
    return found


def _dynamic(g: _Graph, groups: list[dict]) -> list[dict]:
    """What the static pass leaves float but whose weights still go INT8, dynamically (see the module doc)."""
    out = []
    cascade = {n for grp in groups if grp["kind"] == "cascade" for n in grp["nodes"]}
    for grp in groups:
        if grp["kind"] == "spectral" and grp["nodes"][0] not in cascade:   # a cascade's convs get no INT8 at all
            conv = grp["nodes"][0]   # _spectral puts the STFT-like Conv first
            out.append({"kind": "spectral_conv", "nodes": [conv], "reason": DYNAMIC_STFT_REASON.format(conv=conv)})
    wide = {n for grp in groups if grp["kind"] == "wide_input" for n in grp["nodes"]}
    cells = [n.name for n in g.cells if n.name not in wide]   # no per-call INT8 either: the values span decades
    if cells:
        out.append({"kind": "recurrent_cell", "nodes": cells, "reason": DYNAMIC_CELL_REASON})
    return out


# ---------------------------------------------------------------- shared initializers in control flow

def _graphs(graph):
    import onnx
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield a.g
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield sub
                    yield from _graphs(sub)


def _rename_inputs(graph, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    for sub in _graphs(graph):
        if any(i.name == old for i in sub.initializer) or any(i.name == old for i in sub.input):
            continue  # shadowed there
        for n in sub.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new


def _names(graph) -> set[str]:
    """Every value name in `graph` and its subgraphs."""
    names: set[str] = set()
    for g in [graph, *_graphs(graph)]:
        names |= {i.name for i in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    return names


def dedupe_initializers(model, min_bytes: int = 1024) -> dict:
    """Move initializers that appear identically in several subgraphs (If/Loop branches) to the main graph, once.
    Subgraphs may read outer-scope values, so the branches share one copy. Returns what was merged."""
    from onnx import numpy_helper
    subs = list(_graphs(model.graph))
    if not subs:
        return {"merged": 0, "bytes_saved": 0}
    groups: dict[tuple, list] = defaultdict(list)
    for sub in subs:
        for init in sub.initializer:
            arr = numpy_helper.to_array(init)
            if arr.nbytes < min_bytes:
                continue
            key = (init.data_type, tuple(init.dims), hashlib.sha1(arr.tobytes()).hexdigest())
            groups[key].append((sub, init))
    taken = _names(model.graph)  # every scope: a branch may already hold an `edgec_shared_k` (second pass)
    merged, saved = 0, 0
    for k, (key, members) in enumerate(groups.items()):
        if len(members) < 2:
            continue
        name = f"edgec_shared_{k}"
        while name in taken:
            name += "_"
        taken.add(name)
        shared = type(members[0][1])()
        shared.CopyFrom(members[0][1])
        shared.name = name
        model.graph.initializer.append(shared)
        for sub, init in members:
            old = init.name
            sub.initializer.remove(init)
            _rename_inputs(sub, old, name)
        merged += len(members)
        saved += (len(members) - 1) * numpy_helper.to_array(shared).nbytes
    return {"merged": merged, "bytes_saved": saved}


def _localize(model, nodes: set[str]) -> None:
    """Give each named node in a branch its own copy of the outer-graph weights it reads (inputs 1-3). ORT's
    dynamic quantizer looks a weight up in the node's own graph only; the copies are merged back afterwards."""
    inits = {i.name: i for i in model.graph.initializer}
    taken = _names(model.graph)
    for sub in _graphs(model.graph):
        local = {i.name for i in sub.initializer}
        for n in sub.node:
            if n.name not in nodes:
                continue
            for k in range(1, min(4, len(n.input))):
                name = n.input[k]
                if name in inits and name not in local:
                    copy = type(inits[name])()
                    copy.CopyFrom(inits[name])
                    copy.name = f"{name}_{n.name.strip('/').replace('/', '_')}"
                    while copy.name in taken:
                        copy.name += "_"
                    taken.add(copy.name)
                    sub.initializer.append(copy)
                    n.input[k] = copy.name


def drop_unused_initializers(model) -> None:
    """Initializers no node (in any branch) reads: what a rewrite left; ORT warns about each one on load."""
    graphs = [model.graph, *_graphs(model.graph)]
    used = {i for g in graphs for n in g.node for i in n.input} | {o.name for g in graphs for o in g.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


_HIDDEN = "edgec.hidden"


def _hide_gemms(model, hide: bool) -> None:
    """ORT's dynamic quantizer rewrites every Gemm into Transpose + MatMul before it starts (its ONNXQuantizer,
    `if not static`), also the static pass's QDQ Gemms, which then no longer fuse into INT8 kernels. Out of its
    sight under a private domain for the pass, then back."""
    import onnx
    old, new = (("Gemm", ""), ("EdgecHiddenGemm", _HIDDEN)) if hide else (("EdgecHiddenGemm", _HIDDEN), ("Gemm", ""))
    for g in [model.graph, *_graphs(model.graph)]:
        for n in g.node:
            if n.op_type == old[0] and n.domain == old[1]:
                n.op_type, n.domain = new[0], new[1]
    opsets = [o for o in model.opset_import if o.domain == _HIDDEN]
    if hide and not opsets:
        model.opset_import.append(onnx.helper.make_opsetid(_HIDDEN, 1))
    for o in opsets if not hide else ():
        model.opset_import.remove(o)


def quantize_dynamic_nodes(in_path, out_path, nodes, *, reduce_range: bool, workdir) -> dict:
    """The second pass over a statically quantized model: dynamic INT8 of `nodes` (plan()'s "dynamic_nodes":
    LSTM cells, also inside If branches, and STFT-like Convs), then the branches' copies shared again.
    Returns {"nodes": what was quantized, "shared_initializers": the dedupe record}."""
    import onnx
    from pathlib import Path
    from onnxruntime.quantization import QuantType, quantize_dynamic
    nodes = set(nodes)
    model = onnx.load(str(in_path))
    _localize(model, nodes)
    _hide_gemms(model, True)
    staged = Path(workdir) / "dynamic.in.onnx"
    onnx.save_model(model, str(staged))
    del model
    quantize_dynamic(str(staged), str(out_path), op_types_to_quantize=["LSTM", "Conv", "MatMul"],
                     nodes_to_quantize=sorted(nodes),
                     per_channel=False, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     extra_options={"EnableSubgraph": True})
    staged.unlink(missing_ok=True)
    model = onnx.load(str(out_path))
    _hide_gemms(model, False)
    shared = dedupe_initializers(model)
    drop_unused_initializers(model)
    onnx.save_model(model, str(out_path))
    done = [n.name for g in [model.graph, *_graphs(model.graph)] for n in g.node
            if n.op_type in ("DynamicQuantizeLSTM", "ConvInteger", "MatMulInteger")]
    return {"nodes": done, "shared_initializers": shared}


EMBEDDING_MIN_ELEMENTS = 2 ** 18   # 1 MB of float32: word tables, not position or type tables
TABLE_REASON = ("large word tables read by a Gather: kept out of ORT's static pass (one scale for all rows), then INT8 "
                "per row after it (int8_embeddings)")
EMBEDDING_REASON = ("the {name} table ({rows} x {cols}, {mb:.1f} MB float) read only by a Gather: INT8 rows with one "
                    "scale each (max |w| / 127), gathered and scaled per call ({mb_int8:.1f} MB); ORT's quantizers "
                    "leave such a table float")


def _word_tables(g) -> list[tuple]:
    """(Gather, its table) for each large float 2-D table that one Gather on axis 0 reads, and nothing else."""
    import numpy as np
    from onnx import TensorProto, helper
    inits = {i.name: i for i in g.initializer}
    readers: dict = defaultdict(int)
    for n in g.node:
        for i in n.input:
            readers[i] += 1
    graph_outputs = {o.name for o in g.output}
    found = []
    for node in [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits]:
        table = inits[node.input[0]]
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if table.data_type == TensorProto.FLOAT and len(table.dims) == 2 and axis == 0 and readers[table.name] == 1 \
                and int(np.prod(table.dims)) >= EMBEDDING_MIN_ELEMENTS and table.name not in graph_outputs:
            found.append((node, table))
    return found


def _tables(model) -> list[dict]:
    tables = _word_tables(model.graph)
    return [{"kind": "embedding", "nodes": [n.name for n, _ in tables], "reason": TABLE_REASON}] if tables else []


def int8_embeddings(model, keep=()) -> list[dict]:
    """Gather(W, ids) with W a large float table read by nothing else -> Gather(W_int8, ids) * Gather(scale, ids):
    symmetric INT8 per row (a row's error is at most half its own step). The INT8 file of a text model was
    mostly its float word table (all-MiniLM-L6-v2: 59 of 91 MB). Gathers named in `keep` stay."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    done = []
    for node, table in _word_tables(g):
        if node.name in keep:
            continue
        w = numpy_helper.to_array(table)
        scale = np.abs(w).max(1, keepdims=True) / 127
        scale[scale == 0] = 1
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        base = node.name or node.output[0]
        g.initializer.remove(table)
        g.initializer.extend([numpy_helper.from_array(q, f"{table.name}_int8"),
                              numpy_helper.from_array(scale.astype(np.float32), f"{table.name}_row_scale")])
        at = list(g.node).index(node)
        g.node.remove(node)
        new = [helper.make_node("Gather", [f"{table.name}_int8", node.input[1]], [f"{base}_int8_rows"], name=node.name),
               helper.make_node("Cast", [f"{base}_int8_rows"], [f"{base}_rows"], to=TensorProto.FLOAT,
                                name=f"{base}_cast"),
               helper.make_node("Gather", [f"{table.name}_row_scale", node.input[1]], [f"{base}_scales"],
                                name=f"{base}_scales"),
               helper.make_node("Mul", [f"{base}_rows", f"{base}_scales"], [node.output[0]], name=f"{base}_scaled")]
        for n in reversed(new):
            g.node.insert(at, n)
        mb = w.nbytes / 2 ** 20
        done.append({"node": node.name, "reason": EMBEDDING_REASON.format(
            name=table.name, rows=w.shape[0], cols=w.shape[1], mb=mb, mb_int8=(q.nbytes + scale.size * 4) / 2 ** 20)})
    return done


__all__ = ["plan", "spectral_convs", "dedupe_initializers", "quantize_dynamic_nodes", "int8_embeddings", "drop_unused_initializers", "transformer_mode", "is_transformer"]
