"""exporters.staged: a graph run stage by stage from kept tensors gives what the whole graph gives, with the
inputs (biases) as they are at each stage, through skip connections and across stages."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgec.exporters.staged import StagedRun
from edgec.exporters.transforms import _session


def _graph():
    """conv1 -> relu -> conv2 -> (+ relu: a skip across a stage) -> conv3 -> If(a branch reading conv3's input)."""
    rng = np.random.default_rng(0)
    w = {f"w{i}": helper.make_tensor(f"w{i}", TensorProto.FLOAT, (4, 4, 3, 3),
                                     rng.normal(size=(4, 4, 3, 3)).astype(np.float32).ravel()) for i in (1, 2, 3)}
    then = helper.make_graph([helper.make_node("Neg", ["sum"], ["branch"])], "then", [],
                             [helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["sum"], ["branch2"])], "else", [],
                              [helper.make_tensor_value_info("branch2", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4),
             helper.make_node("Add", ["c2", "r1"], ["sum"]),
             helper.make_node("Conv", ["sum", "w3", "b3"], ["c3"], pads=[1] * 4),
             helper.make_node("ReduceMean", ["c3"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])]
    inputs += [helper.make_tensor_value_info(f"b{i}", TensorProto.FLOAT, [4]) for i in (1, 2, 3)]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          [*w.values(), helper.make_tensor("zero", TensorProto.FLOAT, (), [0.0])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_stages_give_what_the_whole_graph_gives_with_the_biases_of_their_time():
    model = _graph()
    rng = np.random.default_rng(1)
    chunks = [{"x": rng.normal(size=(n, 4, 6, 6)).astype(np.float32)} for n in (3, 2)]
    biases = {f"b{i}": np.zeros(4, np.float32) for i in (1, 2, 3)}
    staged = StagedRun(model, [["c1"], ["c2"], ["c3"], ["out"]], chunks, lambda m: _session(m, None))
    # a wanted tensor's node runs again in the next stage (its bias may have changed); what it feeds is kept:
    # r1 from stage 1 for the skip connection of stage 2, the If's outer input from stage 2
    assert [p["reads"] for p in staged.plans] == [[], [], ["r1"], ["sum"]]
    assert [[n.op_type for n in p["nodes"]] for p in staged.plans][:2] == [["Conv"], ["Conv", "Relu", "Conv"]]
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("c1", "c2", "c3"))
    whole = _session(full, None)
    for k, wanted in enumerate(["c1", "c2", "c3", "out"]):
        got = list(staged.run(k, lambda names: {n: biases[n] for n in names if n in biases}))
        for chunk, values in zip(chunks, got):
            ref = whole.run([wanted], {**chunk, **biases})[0]
            np.testing.assert_allclose(values[wanted], ref, rtol=1e-6, atol=1e-6)
        if k < 3:
            biases[f"b{k + 1}"] = rng.normal(size=4).astype(np.float32)   # a correction between stages
    assert staged.kept == {}                                                # nothing outlives its last reader
