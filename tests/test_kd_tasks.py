"""Distillation by task: each output gets the loss of what it holds (KL for logits, BCE for probabilities,
MSE / cosine for regression and embeddings), augmentation only for images, the kept epoch only by a score,
training threads from the cores really free, progress that shows the epoch's own accuracy."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec import kdloss
from edgec.core.errors import OptionError
from edgec.data import Dataset
from edgec.train import TrainConfig, train, training_threads


class MultiHead(nn.Module):
    """Several outputs of several tasks from one (N, T) signal: logits, sigmoid probabilities, an embedding,
    a regression, and an integer output that cannot be distilled."""

    def __init__(self, width=32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU())
        self.cls, self.tags, self.emb, self.reg = (nn.Linear(width, 5), nn.Linear(width, 12), nn.Linear(width, 8),
                                                   nn.Linear(width, 1))

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.cls(h) * 4, "tags": torch.sigmoid(self.tags(h)), "emb": F.normalize(self.emb(h), dim=-1),
                "score": self.reg(h) * 3 - 1, "argmax": self.cls(h).argmax(-1)}


def test_losses_follow_each_outputs_task_and_can_be_set():
    torch.manual_seed(0)
    out = MultiHead()(torch.randn(16, 64))
    chosen = {s.output: s for s in kdloss.choose(out)}
    assert {k: s.kind for k, s in chosen.items()} == {"logits": "mse", "tags": "bce", "emb": "cosine", "score": "mse"}
    assert "independent probabilities" in chosen["tags"].reason and "argmax" not in chosen
    given = kdloss.parse(["logits=kl", "output_3=mse:0.25"])
    chosen = {s.output: s for s in kdloss.choose(out, given)}
    assert chosen["logits"].kind == "kl" and chosen["score"].weight == 0.25 and chosen["logits"].reason == "set by --kd-loss"
    one = kdloss.choose(torch.randn(4, 10) * 3)[0]
    assert one.kind == "kl" and one.output == "0", "the only output, unbounded: class logits"
    probs = kdloss.choose(torch.softmax(torch.randn(4, 10), 1))[0]
    assert probs.kind == "kl" and probs.probabilities
    t = torch.softmax(torch.randn(4, 10), 1)
    assert float(kdloss.term(probs, t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    for bad, msg in (("x", "OUTPUT=KIND"), ("0=softmax", "not one of"), ("0=bce:-1", "negative"), ("0=mse:a", "number")):
        with pytest.raises(OptionError, match=msg):
            kdloss.parse([bad])
    with pytest.raises(OptionError, match="no output 'nope'"):
        kdloss.choose(out, kdloss.parse(["nope=mse"]))


def _signals(n, seed):
    g = np.random.default_rng(seed)
    t = np.linspace(0, 1, 64, dtype=np.float32)
    f = g.uniform(1, 12, (n, 1)).astype(np.float32)
    return (np.sin(2 * np.pi * f * t) + 0.1 * g.standard_normal((n, 64))).astype(np.float32)


def _sigmoid_teacher():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 60))
    with torch.no_grad():
        teacher[2].weight.mul_(4)
    return nn.Sequential(teacher, nn.Sigmoid()).eval()


def _gap(student, teacher, x):
    with torch.no_grad():
        return float((student(x) - teacher(x)).abs().mean())


def test_sigmoid_outputs_are_learnt_with_bce_where_a_temperature_softmax_barely_moves():
    teacher = _sigmoid_teacher()
    data = Dataset({"input": _signals(512, 0)}, None, "signals")
    held = torch.from_numpy(_signals(256, 1))
    gaps = {}
    for how in ("auto", "kl"):
        torch.manual_seed(2)
        student = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 60), nn.Sigmoid())
        before = _gap(student, teacher, held)
        cfg = TrainConfig(epochs=8, lr=2.0, batch_size=32,
                          kd_loss=() if how == "auto" else (("0", "kl", 1.0),))
        rec = train(student, data, cfg, teacher=teacher, label="kd")
        gaps[how] = _gap(student, teacher, held) / before
        if how == "auto":
            assert [s["kind"] for s in rec["kd_loss"]] == ["bce"]
            assert rec["augment"]["applied"] is False and "(N, C, H, W)" in rec["augment"]["reason"]
            assert rec["best_epoch"] is None and rec["kept_epoch"]["epoch"] == 8
            assert "no epoch has an eval score" in rec["kept_epoch"]["reason"]
    assert gaps["auto"] < 0.6, f"BCE closes much of the gap to the teacher ({gaps})"
    assert gaps["kl"] > 1.5 * gaps["auto"], f"a temperature softmax over sigmoid bins learns far less ({gaps})"


def test_several_outputs_each_distilled_with_its_weight():
    torch.manual_seed(0)
    teacher = MultiHead(64).eval()
    data = Dataset({"input": _signals(256, 3)}, None, "signals")
    student = MultiHead(16)
    held = torch.from_numpy(_signals(128, 4))
    with torch.no_grad():
        before = {k: float((student(held)[k] - v).abs().mean()) for k, v in teacher(held).items() if k != "argmax"}
    rec = train(student, data, TrainConfig(epochs=5, lr=0.01, optimizer="adamw", batch_size=32,
                                           kd_loss=(("logits", "kl", 1.0), ("score", "mse", 0.5))),
                teacher=teacher, label="kd")
    kinds = {s["output"]: (s["kind"], s["weight"]) for s in rec["kd_loss"]}
    assert kinds == {"logits": ("kl", 1.0), "tags": ("bce", 1.0), "emb": ("cosine", 1.0), "score": ("mse", 0.5)}
    with torch.no_grad():
        after = {k: float((student(held)[k] - v).abs().mean()) for k, v in teacher(held).items() if k != "argmax"}
    assert all(after[k] < before[k] for k in before), (before, after)


def test_images_are_augmented_and_the_progress_line_shows_the_epochs_own_accuracy(digits):
    train_ds, test_ds = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rec = train(model, train_ds.take(np.arange(256)), TrainConfig(epochs=2, lr=0.05, batch_size=64),
                    eval_data=test_ds.take(np.arange(100)), label="t")
    assert rec["augment"]["applied"] and rec["kd_loss"][0]["kind"] == "kl"
    lines = err.getvalue().splitlines()
    for h in rec["epochs"]:
        line = next(x for x in lines if f"epoch {h['epoch']}/2" in x and " acc " in x)
        assert f"acc {h['eval_accuracy']:.2f}%" in line, (line, h)
    assert not any("epoch 2/2" in x and f"acc {rec['epochs'][0]['eval_accuracy']:.2f}%" in x
                   for x in lines if rec["epochs"][0]["eval_accuracy"] != rec["epochs"][1]["eval_accuracy"])
    assert rec["kept_epoch"]["reason"] == "best eval accuracy" and rec["best_epoch"] in (1, 2)
    assert 1 <= rec["threads"]["threads"] <= rec["threads"]["affinity_cores"] and rec["threads"]["reason"]


def test_training_threads_respect_the_cgroup_quota_and_the_load(monkeypatch, tmp_path):
    import os
    from pathlib import Path
    real = Path.read_text

    def fake(self, *a, **k):
        if str(self) == "/sys/fs/cgroup/cpu.max":
            return "150000 100000\n"
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", fake)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    got = training_threads()
    assert got["cgroup_quota_cores"] == 1.5 and got["threads"] == 2, got
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert training_threads()["threads"] == 1, "a busy machine: one thread"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(Path, "read_text", real)
    assert training_threads(world=2)["threads"] == max(1, min(8, training_threads()["threads"]) // 2)
