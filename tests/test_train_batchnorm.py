"""BatchNorm layers whose running statistics never follow training (momentum 0, as in torchcrepe's converted Keras
layers) train with those statistics fixed: the student is trained as it runs in eval mode. Trained with batch
statistics instead, the eval-mode student stays far from the teacher (CREPE: 186 cents vs 42)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.errors import OptionError
from edgec.data import Dataset
from edgec.train import TrainConfig, batchnorm_choice, train


class Pitchy(nn.Module):
    """A tiny CREPE: conv -> relu -> BatchNorm(momentum 0) -> sigmoid bins."""

    def __init__(self, momentum=0.0):
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 9, stride=4)
        self.bn = nn.BatchNorm1d(16, momentum=momentum)
        self.head = nn.Linear(16 * 14, 24)

    def forward(self, x):
        h = self.bn(F.relu(self.conv(x[:, None])))
        return torch.sigmoid(self.head(h.flatten(1)))


def _frames(n, seed):
    g = np.random.default_rng(seed)
    t = np.arange(64)
    f = g.uniform(0.05, 0.4, (n, 1))
    return (np.sin(2 * np.pi * f * t + g.uniform(0, 6, (n, 1))) * g.uniform(0.5, 2, (n, 1))
            + g.normal(0, 0.05, (n, 64))).astype(np.float32)


def _teacher():
    """Trained-looking: running statistics estimated on the data, as a converted pretrained model carries them."""
    torch.manual_seed(0)
    teacher = Pitchy()
    with torch.no_grad():
        teacher.head.weight.mul_(6)
        bn, teacher.bn.momentum = teacher.bn, None   # cumulative average over the data, then fixed again
        teacher.train()(torch.from_numpy(_frames(512, 1)))
        bn.momentum = 0.0
        bn.weight.uniform_(0.5, 2)
    return teacher.eval()


def _gap(student, teacher, x) -> float:
    """BCE of the eval-mode student to the teacher: what the deployed student is."""
    with torch.no_grad():
        return float(F.binary_cross_entropy(student.eval()(x), teacher.eval()(x)) - F.binary_cross_entropy(
            teacher(x), teacher(x)))


def _student(teacher):
    student = copy.deepcopy(teacher)
    with torch.no_grad():   # what pruning does to a layer's output scale: its fixed statistics are now wrong
        student.conv.weight.mul_(1.6)
        student.conv.bias.add_(0.3)
    return student


@pytest.mark.parametrize("mode", ["auto", "frozen"])
def test_batchnorm_with_momentum_0_trains_as_it_runs(mode):
    teacher = _teacher()
    x_eval = torch.from_numpy(_frames(256, 2))
    data = Dataset({"x": _frames(1024, 3)}, None, "frames")
    cfg = dict(epochs=6, lr=3e-3, optimizer="adamw", weight_decay=0.0, batch_size=64, threads=1)
    runs = {}
    for bn in (mode, "train"):
        student = _student(teacher)
        before = _gap(student, teacher, x_eval)
        record = train(student, data, TrainConfig(**cfg, batchnorm=bn), teacher=teacher, label="kd")
        runs[bn] = (before, _gap(student, teacher, x_eval), record["batchnorm"], student)
    before, fixed, rec, student = runs[mode]
    assert rec["mode"] == "frozen" and rec["frozen_layers"] == 1
    assert ("momentum 0" in rec["reason"]) == (mode == "auto")
    assert fixed < 0.25 * before, (before, fixed)
    assert torch.equal(student.bn.running_mean, teacher.bn.running_mean), "fixed statistics stay fixed"
    _, with_batch_stats, rec, _ = runs["train"]
    assert rec["mode"] == "train"
    assert with_batch_stats > 3 * fixed, (with_batch_stats, fixed)   # the mismatch the option removes


def test_batchnorm_choice_and_option():
    assert batchnorm_choice(TrainConfig(), Pitchy(momentum=0.1))[1]["mode"] == "train"
    frozen, rec = batchnorm_choice(TrainConfig(batchnorm="frozen"), Pitchy(momentum=0.1))
    assert len(frozen) == 1 and rec["reason"] == "set by option"
    assert batchnorm_choice(TrainConfig(), nn.Linear(2, 2))[1]["mode"] == "none"
    with pytest.raises(OptionError, match="--batchnorm 'fix'"):
        TrainConfig(batchnorm="fix").validate()
