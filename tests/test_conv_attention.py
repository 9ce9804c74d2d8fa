"""A conv backbone with attention on top (PP-OCR's recogniser: depthwise convs + SVTR blocks): the transformer
policy quantizes the MatMuls dynamically, and the convs keep static INT8 on their calibrated ranges, so every
weight is INT8 (the MatMul-only dynamic pass left the convs float: 38% of PP-OCR rec's weights INT8)."""
from __future__ import annotations

import numpy as np
import onnx

from edgec.exporters.compare import ort_session, run_onnx
from edgec.exporters.quantize import QuantOptions, quantize_int8


def test_conv_backbone_under_the_transformer_policy_is_all_int8(tmp_path):
    import torch
    from torch import nn
    from test_transforms import _digits, _export

    class ConvAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2,
                                                                                             padding=1, groups=16))
            self.qkv, self.norm, self.head = nn.Linear(16, 48), nn.LayerNorm(16), nn.Linear(16, 10)

        def forward(self, x):
            h = self.conv(x).flatten(2).transpose(1, 2)               # (N, 36 positions, 16)
            q, k, v = self.qkv(h).chunk(3, dim=-1)
            a = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
            return self.head(self.norm(h + a))

    torch.manual_seed(0)
    x, _ = _digits(12)
    _export(ConvAttention(), x, tmp_path / "fp32.onnx")
    info = quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", [x[:128]], QuantOptions(num_samples=None))
    assert info.policy["mode"] == "dynamic"
    assert info.ops["by_type"]["Conv"] == {"int8": 2, "float": 0} and info.ops["int8_weight_share"] == 1.0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    ref = run_onnx(ort_session(tmp_path / "fp32.onnx"), x[400:528])[0].reshape(128, -1)
    got = run_onnx(ort_session(tmp_path / "int8.onnx"), x[400:528])[0].reshape(128, -1)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.mean() > 0.99
