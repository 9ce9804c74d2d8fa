"""Token models: the per-output checks leave padded positions (attention mask 0) out, and only those."""
import numpy as np
import pytest
import torch
from torch import nn

from edgec.exporters.metrics import CheckOptions, compare_models, failures
from tests.anyheads import ids_data


class Tokens(nn.Module):
    """ids (N,L), mask (N,L) -> per-token states (N,L,8); `pad_noise` garbles what padding computes,
    `token_noise` what real tokens compute (a broken candidate)."""

    def __init__(self, pad_noise: float = 0.0, token_noise: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8)
        self.pad_noise, self.token_noise = pad_noise, token_noise

    def forward(self, ids, mask):
        h = self.emb(ids)
        m = mask.unsqueeze(-1).to(torch.float32)
        return h + self.pad_noise * (1 - m) * torch.cos(7.0 * h) + self.token_noise * m * torch.sin(5.0 * h)


def _export(model, path):
    d = ids_data(4)
    torch.onnx.export(model, (torch.from_numpy(d["ids"]), torch.from_numpy(d["mask"])), str(path), dynamo=False,
                      opset_version=17, input_names=["ids", "attention_mask"], output_names=["states"],
                      dynamic_axes={"ids": {0: "n", 1: "l"}, "attention_mask": {0: "n", 1: "l"}, "states": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def feeds():
    d = ids_data(64)
    assert (d["mask"] == 0).any()
    return [{"ids": d["ids"][i:i + 16], "attention_mask": d["mask"][i:i + 16]} for i in range(0, 64, 16)]


def test_garbage_at_padding_does_not_fail_a_good_model(tmp_path, feeds):
    ref, cand = _export(Tokens(), tmp_path / "ref.onnx"), _export(Tokens(pad_noise=5.0), tmp_path / "pad.onnx")
    (rec,) = compare_models(ref, cand, feeds, None, CheckOptions())
    assert rec["identical"] and not failures([rec], CheckOptions())
    assert "attention_mask = 0" in rec["why"]


def test_errors_on_real_tokens_still_fail(tmp_path, feeds):
    ref, cand = _export(Tokens(), tmp_path / "ref.onnx"), _export(Tokens(token_noise=5.0), tmp_path / "tok.onnx")
    (rec,) = compare_models(ref, cand, feeds, None, CheckOptions())
    assert rec["sqnr_db"] < CheckOptions().min_sqnr
    assert failures([rec], CheckOptions())


def test_without_a_mask_input_every_position_counts(tmp_path, feeds):
    ref, cand = _export(Tokens(), tmp_path / "ref.onnx"), _export(Tokens(pad_noise=5.0), tmp_path / "pad.onnx")
    # the model's second input carries the mask, but under a name no check may take for one
    import onnx
    for p in (ref, cand):
        m = onnx.load(p)
        for node in m.graph.node:
            node.input[:] = ["lengths_01" if i == "attention_mask" else i for i in node.input]
        m.graph.input[1].name = "lengths_01"
        onnx.save(m, p)
    plain = [{"ids": f["ids"], "lengths_01": f["attention_mask"]} for f in feeds]
    (rec,) = compare_models(ref, cand, plain, None, CheckOptions())
    assert not rec["identical"] and "left out" not in rec["why"]
    assert failures([rec], CheckOptions())
