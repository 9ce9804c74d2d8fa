"""Fewer and finer activation quantizers where activations saturate (hard-swish, hard-sigmoid, ReLU, Clip).

Every float tensor of a QDQ graph gets its own 8-bit quantizer, and on a depthwise model with hard-swish
(PP-OCR's MobileNetV3 classifier: 146 of them) their noise adds up through the depth. Two exact changes:

- `fuse_hard_swish`: the decomposed hard-swish that paddle2onnx and older exporters write,
  x * Clip(x + 3, 0, 6) / 6, becomes x * HardSigmoid(x; 1/6, 1/2) (the same function: two ops and two
  quantizers instead of four; ORT fuses neither form into one kernel).
- `saturation_bounds`: the part of a tensor's range that none of its consumers can tell apart. A tensor read
  only by Relu, Clip, HardSigmoid, HardSwish or x * HardSigmoid(x) is constant-in-effect below the consumers'
  lowest knee (and above the highest, where all saturate): calibrating on the values clamped there is
  lossless, and the 256 levels go to the part that matters. A conv output feeding a hard-swish spans e.g.
  [-20, 12]; below -3 every value gives 0, so [-3, 12] is its range.
"""
from __future__ import annotations

import math

from edgec.exporters.transforms import _attr, _clip_bounds, _Graph


def _scalar(g: _Graph, name: str) -> float | None:
    v = g.array(name) if name else None
    return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None


def fuse_hard_swish(model) -> int:
    """Rewrite every Add(x, 3) -> Clip(0, 6) -> Mul(x, .) -> Div(., 6) (or Mul(., 1/6)) whose inner tensors
    nothing else reads as x * HardSigmoid(x, alpha=1/6, beta=0.5), in place. Returns how many."""
    import onnx
    g = _Graph(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    drop, replace = set(), {}
    for last in model.graph.node:
        if last.op_type not in ("Div", "Mul") or len(last.input) != 2:
            continue
        k = _scalar(g, last.input[1])
        if k is None or not math.isclose(k, 6.0 if last.op_type == "Div" else 1 / 6, rel_tol=1e-6):
            continue
        mul = producers.get(last.input[0])
        if mul is None or mul.op_type != "Mul":
            continue
        for x, c in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            clip = producers.get(c)
            add = producers.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else None
            if add is None or add.op_type != "Add" or x not in add.input or _clip_bounds(clip, g) != (0.0, 6.0):
                continue
            three = _scalar(g, add.input[1] if add.input[0] == x else add.input[0])
            inner = (add.output[0], clip.output[0], mul.output[0])
            if three != 3.0 or any(g.only_consumer(t) is None for t in inner):
                continue
            hs = last.name + "/hard_sigmoid"
            replace[id(last)] = [
                onnx.helper.make_node("HardSigmoid", [x], [hs], name=hs, alpha=1 / 6, beta=0.5),
                onnx.helper.make_node("Mul", [x, hs], list(last.output), name=last.name)]
            drop |= {id(add), id(clip), id(mul)}
            break
    if replace:
        nodes = [m for n in model.graph.node if id(n) not in drop for m in replace.get(id(n), [n])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return len(replace)


def _flat_region(node, tensor: str, g: _Graph, producers: dict) -> tuple[float, float] | None:
    """(a, b): node's output does not change as `tensor` moves below a or above b; None if it always does."""
    if node.op_type in ("Relu", "Clip"):
        return _clip_bounds(node, g) if node.input[0] == tensor else None
    if node.op_type in ("HardSigmoid", "HardSwish"):
        alpha, beta = (_attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)) if node.op_type == "HardSigmoid" \
            else (1 / 6, 0.5)
        if alpha <= 0:
            return None
        return -beta / alpha, ((1 - beta) / alpha if node.op_type == "HardSigmoid" else math.inf)
    if node.op_type == "Mul" and len(node.input) == 2 and tensor in node.input:
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        gate = producers.get(other)
        if gate is not None and gate.op_type == "HardSigmoid" and gate.input[0] == tensor:
            alpha, beta = _attr(gate, "alpha", 0.2), _attr(gate, "beta", 0.5)
            return (-beta / alpha, math.inf) if alpha > 0 else None   # x * 0 below the knee
    return None


def saturation_bounds(model) -> dict[str, tuple[float, float]]:
    """tensor -> (lo, hi) for every tensor all of whose readers ignore values beyond [lo, hi] (see module doc);
    graph outputs and tensors with any other reader are not listed."""
    g = _Graph(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for tensor, readers in g.consumers.items():
        if tensor in g.outputs or tensor in g.inits or not readers:
            continue
        if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
            continue   # ORT folds a lone Relu/Clip into the producer's range already (QDQRemovableActivation)
        regions = [_flat_region(n, tensor, g, producers) for n in readers]
        if all(r is not None for r in regions):
            lo, hi = min(r[0] for r in regions), max(r[1] for r in regions)
            if math.isfinite(lo) or math.isfinite(hi):
                out[tensor] = (lo, hi)
    return out
