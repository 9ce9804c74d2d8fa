"""Distillation: the loss, a real student improving, hints, unlabelled data and TorchScript teachers,
exact resume after an interruption, early stopping, 2-process DDP on gloo, clean errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SMALL_ARCH, run_cli
from edgec.core.errors import OptionError
from edgec.modelio import LoadedModel, load_model, save_model
from edgec.train import TrainConfig, kd_loss, train


@pytest.fixture(scope="module")
def small(digits):
    """A 300-sample training set and the test split: enough signal, a few seconds per epoch."""
    train_ds, test_ds = digits
    return train_ds.take(np.arange(300)), test_ds.take(np.arange(200))


@pytest.fixture(scope="module")
def pruned_student(trained_cnn, tmp_path_factory, digits):
    from edgec.prune import PruneConfig, prune_model
    loaded = load_model(trained_cnn[0])
    pruned, record = prune_model(loaded, PruneConfig(ratio=0.5), None)
    path = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    save_model(path, pruned, loaded.arch, loaded.input_shape, history=[{"stage": "prune", **record}])
    return path


def test_kd_loss_terms():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(kd_loss(s, t, y, 0.0, 4.0), F.cross_entropy(s, y))
    kl = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(kd_loss(s, t, y, 1.0, 4.0), kl)
    assert torch.allclose(kd_loss(s, t, y, 0.5, 4.0), 0.5 * kl + 0.5 * F.cross_entropy(s, y))
    assert torch.allclose(kd_loss(s, t, None, 0.3, 4.0), kl), "unlabelled: the soft term alone"
    assert float(kd_loss(t, t, None, 1.0, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_distill_recovers_a_pruned_student_and_saves_self_describing(trained_cnn, pruned_student, tmp_path):
    code, out, err = run_cli("distill", trained_cnn[0], "--student", pruned_student, "--epochs", "2", "--lr", "0.02",
                             "--json", "-o", tmp_path / "s.pt")
    assert code == 0, err
    r = json.loads(out)
    assert r["best_accuracy"] > r["student_accuracy_before"] + 5, "training brings the pruned student back"
    assert r["params"] < r["teacher_params"] / 3 and r["recipe"] == "distill" and r["world_size"] == 1
    again = load_model(tmp_path / "s.pt")  # no --arch: the file says everything
    assert [h["stage"] for h in again.meta["history"]] == ["prune", "distill"]
    assert not (tmp_path / "s.pt.ckpt").exists(), "a finished run removes its checkpoint"


def test_hints_train_adapters_and_leave_no_hooks(trained_cnn, small):
    teacher = load_model(trained_cnn[0]).module
    from edgec.modelio import build_arch
    student = build_arch(SMALL_ARCH + "?width=8")
    rec = train(student, small[0], TrainConfig(epochs=1, hints=(("6", "6"), ("9", "9")), hint_weight=0.5),
                teacher=teacher, eval_data=small[1])
    assert rec["epochs"][0]["loss"] > 0
    assert not any(m._forward_hooks for m in student.modules()) and not any(m._forward_hooks for m in teacher.modules())
    with pytest.raises(OptionError, match="not a layer of the teacher"):
        train(student, small[0], TrainConfig(epochs=1, hints=(("6", "nope"),)), teacher=teacher)


def test_torchscript_teacher_and_unlabelled_data(trained_cnn, tmp_path, digits):
    from edgec.distill import DistillJob, run_job
    teacher = load_model(trained_cnn[0]).module
    ts = tmp_path / "teacher.ts"
    torch.jit.save(torch.jit.trace(teacher, torch.zeros(1, 3, 32, 32)), ts)
    np.savez(tmp_path / "unlabelled.npz", x=digits[0].x[:200])
    job = DistillJob(teacher=str(ts), output=str(tmp_path / "s.pt"), input_shape=[1, 3, 32, 32],
                     student_arch=SMALL_ARCH + "?width=8", data=str(tmp_path / "unlabelled.npz"),
                     eval_data="builtin:digits:test", train={"epochs": 1, "lr": 0.05})
    result = run_job(job)
    assert result["teacher"] and result["best_accuracy"] is not None
    assert load_model(tmp_path / "s.pt").arch == SMALL_ARCH + "?width=8"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_interruption_equals_uninterrupted_run(trained_cnn, pruned_student, small, tmp_path):
    teacher = load_model(trained_cnn[0]).module
    cfg = dict(epochs=3, lr=0.02, batch_size=64)
    full = load_model(pruned_student).module
    ref = train(full, small[0], TrainConfig(**cfg, checkpoint=str(tmp_path / "a.ckpt")), eval_data=small[1],
                teacher=teacher)
    part = load_model(pruned_student).module
    first = train(part, small[0], TrainConfig(**cfg, checkpoint=str(tmp_path / "b.ckpt")), eval_data=small[1],
                  teacher=teacher, stop_after=1)
    assert first["interrupted"] and len(first["epochs"]) == 1 and (tmp_path / "b.ckpt").exists()
    resumed_model = load_model(pruned_student).module  # a fresh process would start from the file again
    resumed = train(resumed_model, small[0], TrainConfig(**cfg, checkpoint=str(tmp_path / "b.ckpt"), resume=True),
                    eval_data=small[1], teacher=teacher)
    assert resumed["resumed_from_epoch"] == 1 and not resumed["interrupted"]
    assert [h["loss"] for h in resumed["epochs"]] == [h["loss"] for h in ref["epochs"]]
    a, b = _state(full), _state(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a), "resume repeats the uninterrupted run exactly"
    with pytest.raises(OptionError, match="other options"):
        train(load_model(pruned_student).module, small[0],
              TrainConfig(**(cfg | {"lr": 0.5}), checkpoint=str(tmp_path / "b.ckpt"), resume=True), teacher=teacher)


def test_cli_resume_continues_from_checkpoint(trained_cnn, pruned_student, tmp_path):
    from edgec.distill import DistillJob, run_job
    out = tmp_path / "s.pt"
    job = DistillJob(teacher=str(trained_cnn[0]), output=str(out), student=str(pruned_student),
                     train={"epochs": 2, "lr": 0.02}, stop_after=1)
    assert run_job(job)["output"] is None and not out.exists() and (tmp_path / "s.pt.ckpt").exists()
    code, stdout, err = run_cli("distill", trained_cnn[0], "--student", pruned_student, "--epochs", "2", "--lr", "0.02",
                                "--resume", "--json", "-o", out)
    assert code == 0, err
    r = json.loads(stdout)
    assert r["resumed_from_epoch"] == 1 and [h["epoch"] for h in r["epochs"]] == [1, 2] and out.exists()


def test_early_stopping_when_eval_stops_improving(small):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    rec = train(model, small[0], TrainConfig(epochs=6, lr=1e-12, patience=2, augment=False, schedule="constant"),
                eval_data=small[1])
    assert rec["stopped_early"] and len(rec["epochs"]) == 3


def test_two_process_ddp_on_gloo(trained_cnn, pruned_student, tmp_path):
    code, out, err = run_cli("distill", trained_cnn[0], "--student", pruned_student, "--epochs", "1",
                             "--nproc-per-node", "2", "--device", "cpu", "--json", "-o", tmp_path / "ddp.pt")
    assert code == 0, err
    r = json.loads(out)
    assert r["world_size"] == 2 and r["replicas_identical"] is True
    assert load_model(tmp_path / "ddp.pt").meta["history"][-1]["world_size"] == 2


@pytest.mark.parametrize("args,code,message", [
    (["--alpha", "2"], 2, "outside 0..1"),
    (["--epochs", "0"], 2, "must be positive"),
    ([], 2, "--student FILE"),
    (["--student-arch", SMALL_ARCH, "--resume"], 2, "no checkpoint"),
    (["--student-arch", SMALL_ARCH, "--nnodes", "2"], 2, "--master-addr"),
    (["--student-arch", SMALL_ARCH + "?num_classes=5"], 2, "10 outputs, the student 5"),
    (["--student-arch", SMALL_ARCH, "--hint", "9:nope"], 2, "not a layer of the teacher"),
])
def test_bad_options_fail_cleanly(trained_cnn, tmp_path, args, code, message):
    got, out, err = run_cli("distill", trained_cnn[0], "--epochs", "1", *args, "-o", tmp_path / "x.pt") \
        if "--epochs" not in args else run_cli("distill", trained_cnn[0], *args, "-o", tmp_path / "x.pt")
    assert got == code and message in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()


def test_pruned_student_file_keeps_structure_after_loading(pruned_student):
    loaded = load_model(pruned_student)
    assert isinstance(loaded, LoadedModel) and loaded.module[0][0].out_channels == 8


def test_a_fresh_student_starts_from_seeded_weights():
    # two runs (or two DDP ranks) of `edgec distill --student-arch` must start from the same weights
    from edgec.distill import DistillJob, load_student
    job = DistillJob(teacher="unused.pt", output="unused.pt", student_arch=SMALL_ARCH, train={"seed": 3})
    a, _, _ = load_student(job, (1, 3, 32, 32))
    torch.manual_seed(123)  # whatever ran before must not matter
    b, _, _ = load_student(job, (1, 3, 32, 32))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
