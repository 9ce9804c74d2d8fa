"""The onnx-free graph reader agrees with onnx, and bench's fusion warning counts only Q/DQ nodes inside the graph
(a QDQ model's input Q and output DQ are expected to stay)."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.runtime.bench import graph_warnings, inspect_graph
from edgec.runtime.onnxgraph import boundary_qdq, read_graph
from edgec.runtime.session import open_model


def test_reader_agrees_with_onnx(int8_onnx):
    g, m = read_graph(int8_onnx), onnx.load(str(int8_onnx))
    assert g.inputs == [i.name for i in m.graph.input] and g.outputs == [o.name for o in m.graph.output]
    assert [(n.name, n.op_type, n.inputs, n.outputs) for n in g.nodes] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in m.graph.node]


def test_boundary_qdq_of_a_quantized_model_is_not_a_fusion_miss(int8_onnx):
    graph = inspect_graph(open_model(int8_onnx), "cpu", 1, None, None)
    assert graph["int8_kernels"] and graph["qdq_nodes_left"] == graph["qdq_boundary_nodes"] == 2
    assert graph_warnings("tiny.int8.onnx [cpu]", "cpu", graph) == []


def _qdq(name, src, dst, q):
    scale, zero = f"{name}_s", f"{name}_z"
    return helper.make_node("QuantizeLinear" if q else "DequantizeLinear", [src, scale, zero], [dst], name=name)


def test_an_unfused_pair_inside_the_graph_warns(tmp_path):
    """x -Q-DQ- Sin -Q-DQ- Conv-free graph: Sin has no INT8 kernel, so the DQ before it and the Q after it stay."""
    nodes = [_qdq("q_in", "x", "xq", True), _qdq("dq_in", "xq", "xf", False),
             helper.make_node("Sin", ["xf"], ["s"], name="sin"),
             _qdq("q_mid", "s", "sq", True), _qdq("dq_mid", "sq", "sf", False),
             helper.make_node("MaxPool", ["sf"], ["p"], kernel_shape=[2, 2], name="pool"),
             _qdq("q_out", "p", "pq", True), _qdq("dq_out", "pq", "y", False)]
    inits = []
    for n in ("q_in", "dq_in", "q_mid", "dq_mid", "q_out", "dq_out"):
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), f"{n}_s"),
                  numpy_helper.from_array(np.array(128, np.uint8), f"{n}_z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    path = tmp_path / "sin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert boundary_qdq(read_graph(path)) == {"q_in", "dq_out"}
    g = inspect_graph(open_model(path), "cpu", 1, None, None)
    inside = g["qdq_nodes_left"] - g["qdq_boundary_nodes"]
    assert g["qdq_boundary_nodes"] == 2 and inside >= 2
    (warning,) = graph_warnings("sin.onnx [cpu]", "cpu", g)
    assert f"{inside} Q/DQ nodes inside the graph" in warning
