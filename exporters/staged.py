"""Run an ONNX graph in stages, each from the tensors the earlier stages left, over fixed input chunks.

Sequential bias correction needs each level's outputs once every level before it is corrected. Running the
graph from its inputs up to each level costs about L/2 full passes for L levels (PP-OCR rec: 50 levels, 136 s
of a 169 s quantization). Here stage k computes only the nodes no earlier stage computed, reading the tensors
it needs from what those stages kept (only until their last reader). Nodes that depend on no input (weights'
DequantizeLinear) are recomputed where needed, never kept; so are the nodes that produce a stage's wanted
tensors: a later stage runs them again from their kept inputs, so a bias corrected between stages is read as it
is then (exactly what the whole graph computes; lowering their kept outputs by the shift instead changed the
float rounding that downstream quantizers see, and PP-OCR rec's biases by up to 10 % of a small layer's).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np


def node_inputs(node) -> list[str]:
    """A node's inputs, with the outer tensors its subgraphs (If/Loop/Scan bodies) read."""
    names = list(node.input)
    for a in node.attribute:
        for sub in [a.g] if a.HasField("g") else list(a.graphs):
            inner = {i.name for i in sub.input} | {i.name for i in sub.initializer}
            inner |= {o for n in sub.node for o in n.output}
            names += [i for n in sub.node for i in node_inputs(n) if i and i not in inner]
    return names


class StagedRun:
    """`stages`: per stage, the tensor names it must produce, in dependency order (no stage may need a later
    stage's tensors). `chunks`: the input feeds (dicts of graph input name -> array), the same for every stage.
    `extra_feeds(names)` gives the other graph inputs (e.g. biases fed as inputs) by name at each stage."""

    def __init__(self, model, stages: list[list[str]], chunks: list[dict], session):
        self.model, self.chunks, self._session = model, chunks, session
        g = model.graph
        self.inits = {i.name for i in g.initializer}
        self.inputs = {i.name: i for i in g.input if i.name not in self.inits}
        producer = {o: n for n in g.node for o in n.output if o}
        constant = set(self.inits)
        for n in g.node:       # graph order is topological
            if all(not i or i in constant for i in node_inputs(n)):
                constant.update(o for o in n.output if o)
        self.plans, made_at, read_last = [], {}, {}
        computed: set[int] = set()
        for k, wanted in enumerate(stages):
            nodes, reads, stack, seen = set(), set(), list(wanted), set()
            while stack:
                t = stack.pop()
                if not t or t in seen or t in self.inputs or t in self.inits:
                    continue
                seen.add(t)
                p = producer[t]
                if id(p) in computed and t not in constant:
                    reads.add(t)                     # kept by the stage that made it
                    read_last[t] = k
                    continue
                nodes.add(id(p))
                stack.extend(node_inputs(p))
            order = [n for n in g.node if id(n) in nodes]
            final = [n for n in order if not all(o in constant for o in n.output if o)
                     and not any(o in wanted for o in n.output)]
            for n in final:
                made_at.update((o, k) for o in n.output if o)
            computed |= {id(n) for n in final}
            self.plans.append({"nodes": order, "reads": sorted(reads), "wanted": list(wanted)})
        for k, plan in enumerate(self.plans):
            keep = [t for t, s in made_at.items() if s == k and t in read_last]
            plan["keep"] = sorted(set(keep) - set(plan["wanted"]))
        self.read_last = read_last
        self.kept: dict[str, list[np.ndarray]] = {}

    def run(self, k: int, extra_feeds):
        """Stage k over every chunk: yields per chunk its wanted tensors (name -> array), one chunk at a time;
        what later stages read is kept until its last reader. Consume it whole before the next stage."""
        import onnx
        plan = self.plans[k]
        needed = {i for n in plan["nodes"] for i in node_inputs(n) if i}
        graph_inputs = [self.inputs[i] for i in self.inputs if i in needed]
        kept_inputs = [onnx.helper.make_tensor_value_info(
            t, onnx.helper.np_dtype_to_tensor_dtype(self.kept[t][0].dtype), [None] * self.kept[t][0].ndim)
            for t in plan["reads"]]
        outputs = plan["wanted"] + plan["keep"]
        graph = onnx.helper.make_graph(
            plan["nodes"], f"stage{k}", graph_inputs + kept_inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
            [i for i in self.model.graph.initializer if i.name in needed])
        sess = self._session(onnx.helper.make_model(graph, opset_imports=self.model.opset_import,
                                                    ir_version=self.model.ir_version))
        names = [i.name for i in sess.get_inputs()]
        kept = defaultdict(list)
        extra = extra_feeds([n for n in names if n not in plan["reads"]])
        for c, chunk in enumerate(self.chunks):
            feeds = {n: self.kept[n][c] if n in self.kept else chunk[n] if n in chunk else extra[n] for n in names}
            values = dict(zip(outputs, sess.run(outputs, feeds)))
            yield {t: values[t] for t in plan["wanted"]}
            for t in outputs:
                if t in self.read_last:
                    kept[t].append(values[t])
        for t in [t for t in self.kept if self.read_last[t] <= k]:
            del self.kept[t]                          # no later stage reads it
        self.kept.update(kept)
