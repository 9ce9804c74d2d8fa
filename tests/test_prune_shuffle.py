"""Pruning through channel regroupings (edgec.regroup): ShuffleNetV2's channel shuffle, pixel shuffle, a reshape
of the channel axis. The channels that pass through one stay; everything else is really pruned; the pruned
model runs, keeps its outputs and reloads from its replayed record."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgec.modelio import LoadedModel, build_arch, load_model, save_model
from edgec.prune import PruneConfig, prune_model

SHUFFLE = f"{__file__}:small_shufflenet"
SHAPE = (1, 3, 32, 32)


def small_shufflenet():
    """torchvision's ShuffleNetV2 at a small width and depth (7 blocks, 12 channel shuffles)."""
    from torchvision.models import ShuffleNetV2
    return ShuffleNetV2([2, 3, 2], [8, 16, 32, 64, 128], num_classes=10)


def _branch_mids(model):
    """Each InvertedResidual's branch2 bottleneck: (1x1 conv, bn, depthwise conv, bn, 1x1 conv)."""
    return [(b[0], b[1], b[3], b[4], b[5]) for n, b in model.named_modules() if n.endswith("branch2")]


def test_shufflenet_v2_prunes_inside_branches_exactly_and_reloads(tmp_path):
    """Half of every branch's bottleneck channels are dead (their conv, BatchNorm and depthwise weights zero):
    pruning half removes exactly those, so the outputs do not change, which holds only if the channels around
    every channel shuffle were left where the shuffle expects them."""
    torch.manual_seed(0)
    model = build_arch(SHUFFLE).eval()
    with torch.no_grad():
        for m in model.modules():   # trained-like statistics, so that a wrong channel would show
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.2, 0.2)
        for conv1, bn1, dw, bn2, _ in _branch_mids(model):
            dead = torch.arange(conv1.out_channels) % 2 == 1
            for t in (conv1.weight, bn1.weight, bn1.bias, dw.weight, bn2.weight, bn2.bias):
                t[dead] = 0
    loaded = LoadedModel(model, "checkpoint", "mem", arch=SHUFFLE, input_shape=SHAPE)
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5, ignore=("conv1", "conv5")), None)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5), "only dead channels went: the outputs are the same"
    mids = _branch_mids(pruned)
    assert all(c1.out_channels == dw.in_channels == dw.out_channels == dw.groups == c3.in_channels ==
               c3.out_channels // 2 for c1, _, dw, _, c3 in mids), "every bottleneck halved, its output kept"
    assert record["params_after"] < 0.85 * record["params_before"] and record["flops_after"] < record["flops_before"]
    regrouped = record["regroupings"]
    assert regrouped["ops"]["view"] == 14 and "stage2.0" in regrouped["where"]
    assert {"stage2.0.branch1.2", "stage3.1.branch2.5"} <= set(regrouped["kept"])
    assert not any(k.endswith("branch2.0") for k in regrouped["kept"]), "bottlenecks are pruned, not kept"
    # the file: rebuilt from the spec and the replayed structure record (weights_only), the same outputs
    again = load_model(save_model(tmp_path / "s.pt", pruned, SHUFFLE, SHAPE, history=[{"stage": "prune", **record}]),
                       SHUFFLE)
    with torch.no_grad():
        assert torch.equal(again.module(x), pruned(x))


def test_shufflenet_v2_default_prune_via_cli_exports_and_runs_in_onnxruntime(tmp_path, capsys):
    import numpy as np
    import onnxruntime as ort

    from edgec.cli import main
    from edgec.exporters.onnx_export import export_onnx
    torch.manual_seed(0)
    src = save_model(tmp_path / "s.pt", build_arch(SHUFFLE), SHUFFLE, SHAPE)
    with pytest.raises(SystemExit) as e:
        main(["prune", str(src), "--arch", SHUFFLE, "--ratio", "0.5", "-o", str(tmp_path / "p.pt")])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "channel regroupings (view x14" in printed and "keep their output channels" in printed
    pruned = load_model(tmp_path / "p.pt", SHUFFLE).module
    assert pruned.conv5[0].out_channels == 64 and pruned.stage2[1].branch2[0].out_channels == 4
    export_onnx(pruned, torch.zeros(*SHAPE), tmp_path / "p.onnx")
    x = torch.randn(2, *SHAPE[1:])
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], pruned(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("before,after,regroups", [
    ((2, 8, 4, 4), (2, 2, 4, 4, 4), True),    # a channel shuffle's split of the channel axis
    ((2, 2, 4, 4, 4), (2, 8, 4, 4), True),    # and its merge
    ((2, 8, 4, 4), (16, 4, 4, 4), True),      # channel groups into the batch
    ((2, 8, 4, 4), (2, 128), False),          # a flatten: torch-pruning maps it
    ((2, 8, 4, 4), (2, 8, 16), False),        # channels kept
    ((2, 64), (2, 4, 16), False),             # (N, F) tensors: torch-pruning's own
])
def test_which_reshapes_are_regroupings(before, after, regroups):
    from edgec.regroup import regroups_channels
    assert regroups_channels(torch.zeros(before), torch.zeros(after)) is regroups


class SuperRes(nn.Module):
    """A sub-pixel upsampler: the conv before nn.PixelShuffle gives 4 channels per output channel."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU())
        self.up = nn.Conv2d(16, 3 * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.up(self.body(x)))


def test_pixel_shuffle_keeps_the_channels_it_moves_and_prunes_the_rest():
    torch.manual_seed(0)
    loaded = LoadedModel(SuperRes().eval(), "checkpoint", "mem", input_shape=(1, 3, 8, 8))
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5), None)
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 3, 16, 16)
    assert pruned.up.out_channels == 12 and pruned.body[0].out_channels == pruned.body[2].out_channels == 8
    assert record["regroupings"]["ops"] == {"pixel_shuffle": 1} and record["regroupings"]["kept"] == ["up"]


class OnlyShuffled(nn.Module):
    """Every prunable channel goes through a hand-written channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x).mean((2, 3))


def test_a_model_whose_every_channel_is_shuffled_is_a_model_error_naming_the_layer(tmp_path, capsys):
    from edgec.cli import main
    from edgec.core.errors import ModelError
    loaded = LoadedModel(OnlyShuffled().eval(), "checkpoint", "mem", input_shape=(1, 3, 8, 8))
    with pytest.raises(ModelError, match=r"nothing can be pruned: the channels of stem pass through a channel "
                                         r"regrouping .*\(view, reshape in OnlyShuffled\); ship this model unpruned"):
        prune_model(loaded, PruneConfig(ratio=0.5), None)
    arch = f"{__file__}:OnlyShuffled"
    src = save_model(tmp_path / "o.pt", build_arch(arch), arch, (1, 3, 8, 8))
    with pytest.raises(SystemExit) as e:
        main(["prune", str(src), "--arch", arch, "--ratio", "0.5", "-o", str(tmp_path / "p.pt")])
    err = capsys.readouterr().err
    assert e.value.code == ModelError.exit_code and "nothing can be pruned" in err and "internal" not in err
    assert not (tmp_path / "p.pt").exists()
