"""Read an ONNX file's graph inputs, outputs and nodes without the onnx package (edgec.runtime runs where only
onnxruntime and numpy are installed). A few lines of protobuf wire format: ModelProto.graph (7) -> GraphProto
node (1), input (11), output (12); NodeProto input (1), output (2), name (3), op_type (4); ValueInfoProto name (1).
Initializers and attributes are skipped by their length, so a large model is walked, not decoded."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Node:
    name: str = ""
    op_type: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class Graph:
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, payload start, payload end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
            yield number, wire, pos, nxt
        elif wire == 2:
            length, pos = _varint(buf, pos)
            nxt = pos + length
            yield number, wire, pos, nxt
        elif wire == 1:
            nxt = pos + 8
        elif wire == 5:
            nxt = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        pos = nxt


def _text(buf, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", "replace")


def _name(buf, a: int, b: int) -> str:
    return next((_text(buf, x, y) for n, w, x, y in _fields(buf, a, b) if n == 1 and w == 2), "")


def read_graph(path) -> Graph:
    """The main graph of an ONNX model file (subgraphs of If/Loop are not walked)."""
    buf = memoryview(Path(path).read_bytes())
    graph = next(((a, b) for n, w, a, b in _fields(buf, 0, len(buf)) if n == 7 and w == 2), None)
    if graph is None:
        raise ValueError(f"{path} has no graph")
    inputs, outputs, nodes = [], [], []
    for n, w, a, b in _fields(buf, *graph):
        if w != 2:
            continue
        if n == 1:
            node = Node()
            for m, v, x, y in _fields(buf, a, b):
                if v == 2 and m in (1, 2, 3, 4):
                    if m == 1:
                        node.inputs.append(_text(buf, x, y))
                    elif m == 2:
                        node.outputs.append(_text(buf, x, y))
                    elif m == 3:
                        node.name = _text(buf, x, y)
                    else:
                        node.op_type = _text(buf, x, y)
            nodes.append(node)
        elif n == 11:
            inputs.append(_name(buf, a, b))
        elif n == 12:
            outputs.append(_name(buf, a, b))
    return Graph(inputs, outputs, nodes)


def boundary_qdq(graph: Graph) -> set[str]:
    """Names of the QuantizeLinear nodes that read a graph input and the DequantizeLinear nodes that write a graph
    output: a QDQ model with float inputs and outputs needs them, so they are expected to stay unfused."""
    inputs, outputs = set(graph.inputs), set(graph.outputs)
    return {n.name for n in graph.nodes if
            (n.op_type == "QuantizeLinear" and n.inputs[:1] and n.inputs[0] in inputs) or
            (n.op_type == "DequantizeLinear" and set(n.outputs) & outputs)}
