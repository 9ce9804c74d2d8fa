"""--bce-peak: sigmoid (multi-label) outputs distilled with each label weighed by 1 + W x the teacher's
probability, so that the few likely labels are not drowned by the many near-zero ones (CREPE: 360 pitch bins,
~5 lit per frame)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edgec import kdloss
from edgec.core.errors import OptionError
from edgec.data import Dataset
from edgec.train import TrainConfig, train


def _sparse_teacher_out(n=8, labels=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.full((n, labels), 0.01)
    t[torch.arange(n), torch.randint(0, labels, (n,), generator=g)] = 0.9
    return t


def test_peak_weight_shifts_the_bce_gradient_to_the_teachers_likely_labels():
    t = _sparse_teacher_out()
    spec = kdloss.choose(t)[0]
    assert spec.kind == "bce" and spec.peak_weight == 0
    s = torch.full_like(t, 0.3, requires_grad=True)
    plain = kdloss.term(spec, s, t, 2.0)
    assert plain.item() == pytest.approx(torch.nn.functional.binary_cross_entropy(s, t).item())
    (g_plain,) = torch.autograd.grad(plain, s)
    spec.peak_weight = 20.0
    (g_peak,) = torch.autograd.grad(kdloss.term(spec, s, t, 2.0), s)
    lit = t > 0.5
    share = lambda g: float(g[lit].abs().sum() / g.abs().sum())  # noqa: E731
    assert share(g_peak) > 3 * share(g_plain), (share(g_plain), share(g_peak))
    # the weights keep a mean of 1: on a flat teacher the loss is plain BCE
    flat = torch.full((4, 10), 0.2)
    s2 = torch.rand(4, 10)
    assert float(kdloss.term(spec, s2, flat, 2.0)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy(s2, flat)), rel=1e-5)


def test_bce_peak_is_an_option_recorded_with_the_loss_and_validated():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 30), torch.nn.Sigmoid()).eval()
    student = torch.nn.Sequential(torch.nn.Linear(16, 30), torch.nn.Sigmoid())
    x = torch.randn(64, 16)
    data = Dataset({"input": x.numpy()}, None, "signals")
    rec = train(student, data, TrainConfig(epochs=1, lr=0.01, optimizer="adamw", batch_size=32, bce_peak=8),
                teacher=teacher, label="kd")
    (loss,) = rec["kd_loss"]
    assert loss["kind"] == "bce" and loss["peak_weight"] == 8 and "--bce-peak" in loss["reason"]
    assert rec["config"]["bce_peak"] == 8
    # without a teacher there is no teacher probability to weigh by: plain BCE on the labels
    with torch.no_grad():
        y = teacher(x).numpy()
    alone = train(torch.nn.Sequential(torch.nn.Linear(16, 30), torch.nn.Sigmoid()), Dataset({"input": x.numpy()}, y, "sig"),
                  TrainConfig(epochs=1, lr=0.01, optimizer="adamw", batch_size=32, alpha=0, bce_peak=8), label="ft")
    assert alone["kd_loss"][0]["peak_weight"] == 0 and "--bce-peak" not in alone["kd_loss"][0]["reason"]
    for bad in (-1.0, float("inf")):
        with pytest.raises(OptionError, match="--bce-peak"):
            TrainConfig(bce_peak=bad).validate()
    # logits outputs ignore it: it is a weight of BCE labels
    logits = kdloss.choose(torch.randn(4, 10) * 3)[0]
    assert logits.kind == "kl" and logits.peak_weight == 0


@pytest.mark.parametrize("group", ["TRAIN", "KD"])   # edgec distill; build/compare --distill
def test_bce_peak_flag_reaches_the_training_config(group):
    import click
    from edgec.commands import options as o
    seen = {}

    @click.command()
    @getattr(o, group)
    def cmd(**kw):
        seen["train"] = getattr(o, group).make(kw)
    assert CliRunner().invoke(cmd, ["--bce-peak", "20"]).exit_code == 0
    assert seen["train"].bce_peak == 20.0
    assert CliRunner().invoke(cmd, []).exit_code == 0 and seen["train"].bce_peak == 0
    bad = CliRunner().invoke(cmd, ["--bce-peak", "-2"])
    assert bad.exit_code != 0 and "--bce-peak" in str(bad.exception or bad.output)


def test_bce_peak_is_on_every_command_that_distills():
    from conftest import run_cli
    for command in ("distill", "build", "compare"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "--bce-peak" in out, command
