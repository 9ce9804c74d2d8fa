"""benchmarks/ablate_int8.py: the QDQ graph taken apart must be exact where nothing is quantized (a Relu that
ORT folded into an activation range is put back), and each quantizer removed must bring the model closer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ablate_mod():
    spec = importlib.util.spec_from_file_location("ablate_int8", HERE.parent / "benchmarks" / "ablate_int8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def relu_net(tmp_path_factory):
    """Conv -> ReLU (ORT folds it into the next quantizer's range) -> depthwise Conv -> hard-swish -> Conv."""
    import torch
    from torch import nn
    from test_transforms import _digits, _export

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.dw, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), \
                nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            return self.c2(nn.functional.hardswish(self.dw(h)))

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ablate")
    x, _ = _digits(12)
    _export(Net(), x, d / "fp32.onnx")
    return {"fp32": d / "fp32.onnx", "calib": [x[i:i + 32] for i in range(0, 128, 32)], "x": x[400:464], "dir": d}


@pytest.fixture(scope="module")
def ablated(ablate_mod, relu_net):
    return ablate_mod.ablate(relu_net["fp32"], relu_net["calib"], relu_net["x"], per_tensor=True,
                             workdir=relu_net["dir"] / "work")


def test_ablation_is_exact_where_nothing_is_quantized_and_each_part_lowers_the_error(ablated, relu_net):
    r = ablated
    v = r["variants"]
    # the folded ReLU is restored: without it the "exact" variant would pass negative values on (error ~0.1)
    assert v["exact (nothing quantized: must be ~0)"] < 1e-9
    qdq = onnx.load(str(relu_net["dir"] / "work" / "int8.onnx"))
    assert not any(n.op_type == "Relu" for n in qdq.graph.node), "ORT no longer folds the ReLU: test needs another trap"
    full = v["all INT8 (exact QDQ)"]
    assert full > 0
    assert v["weights only (activations clipped, not rounded)"] < full
    assert v["activations only (FP32 weights)"] < full
    assert v["clipping only (FP32 weights)"] <= v["activations only (FP32 weights)"]
    # every activation quantizer is scored, and rounding them costs something somewhere
    assert len(r["per_tensor"]) == r["activation_quantizers"] > 3
    assert max(d["rounding"] for d in r["per_tensor"]) > 0


def test_variant_keeps_only_the_asked_quantizers(ablate_mod, ablated, relu_net, tmp_path):
    qdq = onnx.load(str(relu_net["dir"] / "work" / "int8.onnx"))
    acts = sorted(ablate_mod.activation_quantizers(qdq))
    one = ablate_mod.variant(qdq, rounded={acts[0]}, clipped=set())
    left = [n.input[0] for n in one.graph.node if n.op_type == "QuantizeLinear"
            and n.input[0] not in {i.name for i in one.graph.initializer}]
    assert left == [acts[0]]
    assert sum(n.op_type == "Clip" for n in one.graph.node) >= len(acts) - 1
    out = tmp_path / "one.onnx"
    onnx.save(one, str(out))
    got = ablate_mod.outputs(out, relu_net["x"], optimize=False)   # a valid graph ORT runs
    assert np.isfinite(got).all()
