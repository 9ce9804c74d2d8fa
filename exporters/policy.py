"""Quantization that knows the model: what to keep out of INT8 by default, and how to quantize a transformer.

One 8-bit scale per tensor cannot hold some tensors; quantizing them breaks the model however well the rest is
calibrated (benchmarks/ANYMODEL_RESULTS.md, /work/shared/FIELD-NOTES.md):
- spectral magnitude chains: the Pow/Add/Sqrt/Log/Abs/ReduceSum after an STFT-like convolution (a fixed basis of
  long kernels on one channel) span many decades (a VAD's correlation with FP32 fell to 0.07);
- LayerNorm and Softmax: their internals (mean, variance, exp) and inputs (pre-norm residuals with outlier
  channels, attention scores);
- the recurrent state path: LSTM/GRU/RNN (also inside If/Loop branches) and the nodes that carry a state input to
  them and their state back out: an error there is fed back every step.
`plan()` names these nodes, each with its reason (recorded in QuantInfo.policy), and says whether a transformer's
MatMuls are quantized statically or dynamically (per-call activation ranges: `quantize_dynamic`) by what was
measured. `dedupe_initializers()` undoes a pre-processing side effect: ORT's graph optimiser constant-folds a
weight that both branches of an `If` read from the outer graph into a copy per branch (the INT8 file grew).
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
    """A fixed filter bank on a raw signal: a Conv on one input channel with long constant kernels (>= 64)."""
    w = g.weight(node)
    return (node.op_type == "Conv" and w is not None and len(w.dims) >= 3 and w.dims[1] == 1
            and max(w.dims[2:]) >= 64)


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


def _norms(g: _Graph) -> list[dict]:
    nodes = [n for n in g.nodes if n.op_type in NORMS]
    # decomposed LayerNorm: ReduceMean whose input is also subtracted from its output, and what follows it
    for n in g.nodes:
        if n.op_type != "ReduceMean":
            continue
        subs = [c for c in g.consumers.get(n.output[0], []) if c.op_type == "Sub" and n.input[0] in c.input]
        if not subs:
            continue
        part, todo = [n], deque(subs)
        seen = {n.name}
        while todo and len(part) < 12:
            c = todo.popleft()
            if c.name in seen or c.op_type not in _LN_PARTS:
                continue
            seen.add(c.name)
            part.append(c)
            for o in c.output:
                todo.extend(g.consumers.get(o, []))
        nodes += part
    if not nodes:
        return []
    kinds = sorted({n.op_type for n in nodes})
    return [{"kind": "norm", "nodes": list(dict.fromkeys(n.name for n in nodes)),
             "reason": f"{len(nodes)} LayerNorm/Softmax nodes ({', '.join(kinds)}): mean/variance/exp internals and "
                       "inputs with outlier channels or attention scores do not fit one 8-bit scale"}]


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


def plan(model, *, enabled: bool = True) -> dict:
    """The default exclusions and the MatMul mode for `model` (the graph about to be quantized)."""
    mode, mode_reason = transformer_mode(model)
    if not enabled:
        return {"enabled": False, "exclusions": [], "nodes": [], "mode": "static",
                "mode_reason": "policy off by option: static INT8 of every supported node"}
    g = _Graph(model)
    groups = [*_spectral(g), *_norms(g), *_recurrent(g), *_branch_reads(g)]
    nodes = list(dict.fromkeys(n for grp in groups for n in grp["nodes"]))
    return {"enabled": True, "exclusions": groups, "nodes": nodes, "mode": mode, "mode_reason": mode_reason}


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
    taken = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input} | \
        {o for n in model.graph.node for o in n.output}
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


__all__ = ["plan", "dedupe_initializers", "transformer_mode", "is_transformer"]
