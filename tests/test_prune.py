"""Structured pruning: channels really removed, dependency groups consistent, the saved file reloads equal,
options validated loudly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgec.core.errors import OptionError
from edgec.modelio import LoadedModel, build_arch, load_model, save_model
from edgec.prune import PruneConfig, describe_groups, prune_model

SMALL_ARCH = "edgec.models.zoo:digits_cnn"
SHAPE = (1, 3, 32, 32)


def _loaded(arch, seed=0):
    torch.manual_seed(seed)
    model = build_arch(arch).eval()
    with torch.no_grad():  # BatchNorm scales of a trained model differ; all-ones would tie every channel
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
    return LoadedModel(model, "checkpoint", "mem", arch=arch, input_shape=SHAPE)


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.fixture(scope="module")
def resnet_pruned():
    loaded = _loaded("torchvision:resnet18?num_classes=10")
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5, round_to=8), None)
    return loaded, pruned, record


def test_resnet18_half_channels_cuts_flops_3x_and_keeps_residuals_consistent(resnet_pruned, tmp_path):
    loaded, pruned, record = resnet_pruned
    assert record["flops_reduction"] >= 3.0 and record["params_after"] < record["params_before"] / 3
    assert record["flops_after"] == pytest.approx(record["flops_before"] / record["flops_reduction"], rel=0.01)
    convs = _convs(pruned)
    # a residual addition ties the stem, every layer1 block's output and the next block's input together
    assert convs["conv1"].out_channels == convs["layer1.0.conv2"].out_channels == convs["layer1.1.conv2"].out_channels \
        == convs["layer2.0.conv1"].in_channels == 32
    assert convs["layer4.1.conv2"].out_channels == pruned.fc.in_features
    assert pruned.fc.out_features == 10, "the classifier's outputs are the classes: never pruned"
    assert all(c.out_channels % 8 == 0 for c in convs.values()), "--round-to 8"
    assert loaded.module.fc.in_features == 512, "the caller's model is not changed"
    # saved and reloaded from the spec + structure alone (weights_only), outputs identical
    path = save_model(tmp_path / "r.pt", pruned, loaded.arch, SHAPE, history=[{"stage": "prune", **record}])
    again = load_model(path)
    x = torch.randn(2, *SHAPE[1:])
    assert torch.equal(pruned(x), again.module(x)) and again.meta["history"][0]["ratio"] == 0.5
    assert again.input_shape == SHAPE and again.arch == loaded.arch


def test_resnet18_dependency_groups_printable_before_any_change():
    loaded = _loaded("torchvision:resnet18?num_classes=10")
    groups = describe_groups(loaded, PruneConfig(ratio=0.5))
    stem = next(g for g in groups if "conv1 (out_channels)" in g["members"])
    assert {"layer1.0.conv2 (out_channels)", "layer1.1.conv2 (out_channels)", "bn1 (out_channels)",
            "layer2.0.conv1 (in_channels)"} <= set(stem["members"])
    assert not any(m.startswith("fc (out") for g in groups for m in g["members"])
    assert loaded.module.conv1.out_channels == 64


def test_mobilenet_v2_depthwise_pruned_saved_and_reloaded(tmp_path):
    loaded = _loaded("torchvision:mobilenet_v2?num_classes=10&width_mult=0.5")
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.4), None)
    depthwise = [c for c in _convs(pruned).values() if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert record["flops_after"] < record["flops_before"]
    again = load_model(save_model(tmp_path / "m.pt", pruned, loaded.arch, SHAPE))
    x = torch.randn(2, *SHAPE[1:])
    assert torch.equal(pruned(x), again.module(x))


@pytest.mark.parametrize("importance,global_pruning,steps", [("l1", False, 1), ("bn", True, 1), ("taylor", False, 2)])
def test_criteria_prune_and_keep_output_shape(importance, global_pruning, steps, digits):
    loaded = _loaded(SMALL_ARCH)
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5, importance=importance, global_pruning=global_pruning,
                                                     steps=steps), digits[0])
    assert pruned(torch.randn(3, *SHAPE[1:])).shape == (3, 10)
    assert record["params_after"] < 0.6 * record["params_before"]
    if not global_pruning:  # uniform: every hidden layer keeps half its channels
        assert [c.out_channels for c in _convs(pruned).values()] == [8, 8, 16, 16, 32]


def test_untrained_bn_scales_tie_and_fail_loudly():
    loaded = LoadedModel(build_arch(SMALL_ARCH).eval(), "checkpoint", "mem", arch=SMALL_ARCH, input_shape=SHAPE)
    with pytest.raises(OptionError, match="nothing was pruned"):
        prune_model(loaded, PruneConfig(ratio=0.5, importance="bn", global_pruning=True), None)


def test_taylor_ranks_by_data():
    """A dead channel (zero weights and scale) is the first to go under L2 and under Taylor (gradient x weight)."""
    from edgec.data import load_data
    loaded = _loaded(SMALL_ARCH)
    with torch.no_grad():
        loaded.module[0][0].weight[3].zero_()
        loaded.module[0][1].weight[3] = 0.0
    data = load_data("builtin:digits:test")
    for importance in ("l2", "taylor"):
        pruned, record = prune_model(loaded, PruneConfig(ratio=0.5, importance=importance), data)
        assert record["channels"]["0.0"]["out_channels"] == [16, 8]
        kept = pruned[0][0].weight.abs().sum((1, 2, 3))
        assert bool((kept > 0).all()), f"{importance} kept the dead channel"
    with pytest.raises(OptionError, match="needs --data"):
        prune_model(loaded, PruneConfig(ratio=0.5, importance="taylor"), None)


def test_target_flops_is_met_and_unreachable_target_says_best():
    loaded = _loaded(SMALL_ARCH)
    _, record = prune_model(loaded, PruneConfig(target_flops=0.4), None)
    assert record["flops_after"] <= 0.4 * record["flops_before"]
    assert record["flops_after"] > 0.25 * record["flops_before"], "bisection lands close to the target"
    _, record = prune_model(loaded, PruneConfig(target_params=0.5), None)
    assert record["params_after"] <= 0.5 * record["params_before"]
    with pytest.raises(OptionError, match=r"unreachable.*at least 0\.\d+"):
        prune_model(loaded, PruneConfig(target_flops=0.001), None)


def test_ignore_keeps_layer_and_bad_options_fail_loudly():
    loaded = _loaded(SMALL_ARCH)
    pruned, _ = prune_model(loaded, PruneConfig(ratio=0.5, ignore=("3",)), None)
    assert pruned[3][0].out_channels == 32
    for cfg, pattern in [(PruneConfig(ratio=0.5, ignore=("layer9",)), "matches no layer"),
                         (PruneConfig(ratio=1.2), r"outside \(0, 1\)"),
                         (PruneConfig(ratio=0.0), r"outside \(0, 1\)"),
                         (PruneConfig(ratio=0.5, target_flops=0.5), "exactly one"),
                         (PruneConfig(), "exactly one"),
                         (PruneConfig(ratio=0.9, round_to=8), "would empty"),
                         (PruneConfig(ratio=0.5, steps=0), "--steps")]:
        with pytest.raises(OptionError, match=pattern):
            prune_model(loaded, cfg, None)


def test_cli_dry_run_writes_nothing_then_prune_writes_a_self_describing_file(tmp_path, capsys):
    from edgec.cli import main
    src = tmp_path / "sd.pt"
    torch.save(build_arch(SMALL_ARCH).state_dict(), src)
    out = tmp_path / "p.pt"
    common = [str(src), "--arch", SMALL_ARCH, "--input-shape", "1,3,32,32", "--ratio", "0.5"]
    with pytest.raises(SystemExit) as e:
        main(["prune", *common, "--dry-run", "-o", str(out)])
    assert e.value.code == 0 and not out.exists()
    printed = capsys.readouterr().out
    assert "dependency groups" in printed and "out_channels 16 -> 8" in printed
    with pytest.raises(SystemExit) as e:
        main(["prune", *common, "--json", "-o", str(out)])
    assert e.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["flops_after"] < result["flops_before"] and out.exists()
    # no --arch, no --input-shape: everything is in the file; pruning again chains the history
    with pytest.raises(SystemExit) as e:
        main(["prune", str(out), "--ratio", "0.5", "-o", str(tmp_path / "p2.pt")])
    assert e.value.code == 0
    again = load_model(tmp_path / "p2.pt")
    assert [h["stage"] for h in again.meta["history"]] == ["prune", "prune"]
    with pytest.raises(SystemExit) as e:  # exists without --force
        main(["prune", str(out), "--ratio", "0.5", "-o", str(tmp_path / "p2.pt")])
    assert e.value.code == 8
    with pytest.raises(SystemExit) as e:
        main(["prune", str(out), "--ratio", "2", "-o", str(tmp_path / "p3.pt")])
    assert e.value.code == 2 and "outside (0, 1)" in capsys.readouterr().err


def test_a_conv_classifier_pooled_after_it_keeps_its_classes():
    # SqueezeNet's head: the last conv gives the classes, then ReLU + global pooling; its output (N, 10, H, W) has
    # not the model's output shape (N, 10), so the output layer is found by its channels
    loaded = _loaded("torchvision:squeezenet1_1?num_classes=10")
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.3), None)
    assert pruned.classifier[1].out_channels == 10
    assert record["params_after"] < record["params_before"]
    assert pruned(torch.randn(2, *SHAPE[1:])).shape == (2, 10)


class LayerScaled(nn.Module):
    """A parameter outside any layer (ConvNeXt's layer_scale): torch-pruning shrinks it with its group."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16).view(16, 1, 1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head((self.scale * self.conv(x)).mean((2, 3)))


def test_a_pruned_parameter_outside_any_layer_is_replayed_on_load(tmp_path):
    arch = f"{__file__}:LayerScaled"
    torch.manual_seed(0)
    loaded = LoadedModel(build_arch(arch).eval(), "checkpoint", "mem", arch=arch, input_shape=(1, 3, 8, 8))
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5), None)
    assert pruned.scale.shape == (8, 1, 1) and pruned.conv.out_channels == 8
    again = load_model(save_model(tmp_path / "l.pt", pruned, arch, (1, 3, 8, 8)), arch)
    x = torch.randn(2, 3, 8, 8)
    assert again.module.scale.shape == (8, 1, 1) and torch.equal(again.module(x), pruned(x))


def test_a_dependency_analysis_that_does_not_end_is_stopped_with_a_model_error(monkeypatch):
    """torch-pruning's analysis of a graph it cannot map (Swin-T: 4 GB in two minutes, no end) is stopped by time
    or by memory growth, whichever comes first, with a model error; the timer is gone afterwards."""
    import signal
    import time
    from edgec.core.errors import ModelError
    from edgec import prune
    monkeypatch.setattr(prune, "ANALYSIS_SECONDS", 1)
    started = time.monotonic()
    with pytest.raises(ModelError, match="dependency analysis of this model ran"):
        with prune._bounded_analysis():
            while time.monotonic() - started < 30:
                sum(range(1000))
    assert time.monotonic() - started < 10
    monkeypatch.setattr(prune, "ANALYSIS_SECONDS", 600)
    monkeypatch.setattr(prune, "ANALYSIS_GROWTH_MB", 64)
    held = []
    with pytest.raises(ModelError, match="grew by"):
        with prune._bounded_analysis():
            while time.monotonic() - started < 30:
                held.append(bytearray(8 * 2 ** 20))   # 8 MB a step, touched
                held[-1][::4096] = b"x" * len(held[-1][::4096])
                time.sleep(0.02)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with prune._bounded_analysis():   # a normal analysis passes through untouched
        assert sum(range(10)) == 45
