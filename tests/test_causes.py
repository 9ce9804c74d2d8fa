"""Errors keep their cause: a TorchScript failure names the interpreter's own message and the op that failed;
pruning a model whose forward hard-codes a shape is a model error naming the layer, not an internal error."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import run_cli
from edgec.core.errors import ModelError, cause_line


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(-1)


@pytest.fixture()
def scripted(tmp_path):
    path = tmp_path / "vad.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Conv1dNet()), path)
    return path


def test_torchscript_failure_keeps_the_interpreters_line(scripted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(scripted))
    with pytest.raises(Exception) as info:
        module(torch.zeros(1, 1, 1, 1, 64))
    assert str(info.value).startswith("The following operation failed in the TorchScript interpreter.")
    line = cause_line(info.value)
    assert line.startswith("RuntimeError: Expected 2D (unbatched) or 3D (batched) input to conv1d"), line
    assert "TorchScript op:" in line and "conv1d" in line.split("TorchScript op:")[1]
    assert cause_line(ValueError("first\nsecond")) == "first" and cause_line(KeyError()) == "KeyError"


def test_cli_error_on_a_failing_torchscript_model_names_the_op(scripted, tmp_path):
    # a 1-D conv model fed images: the interpreter says which op refused which shape
    code, _, err = run_cli("export", scripted, "--input-shape", "1,3,32,32", "-o", tmp_path / "m.onnx")
    assert code != 0 and "internal error" not in err
    assert "Expected 2D (unbatched) or 3D (batched) input to conv1d" in err, err
    assert not (tmp_path / "m.onnx").exists()


class HardReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.view(x.shape[0], 16 * 8 * 8))


def test_pruning_a_hard_coded_reshape_is_a_model_error_naming_the_layer():
    from edgec.modelio import LoadedModel
    from edgec.prune import PruneConfig, prune_model
    loaded = LoadedModel(HardReshape(), "checkpoint", "hard.pt", input_shape=(1, 3, 8, 8))
    with pytest.raises(ModelError) as info:
        prune_model(loaded, PruneConfig(ratio=0.5))
    msg = str(info.value)
    assert "after layer conv2 (in_channels 16 -> 8, out_channels 16 -> 8)" in msg and "--ignore conv2" in msg and "invalid" in msg, msg
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5, ignore=("conv2",)))  # the fix it names works
    assert record["params_after"] < record["params_before"]
