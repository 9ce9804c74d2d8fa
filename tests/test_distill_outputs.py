"""Distillation of a model with several outputs (a detector's class logits and box, trained a few steps): every
output learns from the teacher by its task and from its own labels (y:output_0 class ids, y:output_1 boxes), each
weighed (--kd-loss OUTPUT=KIND[:WEIGHT], auto:WEIGHT keeps the detected loss); a name that matches no output fails
in one line naming the outputs."""
import json
from pathlib import Path

import numpy as np
import pytest

import twoheads
from anyheads import write_case
from conftest import run_cli

HERE = Path(__file__).resolve().parent
ARCH = f"{HERE / 'twoheads.py'}:detector"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("twoheads")
    write_case(root, twoheads.train(twoheads.detector()), twoheads.scenes, (("train.npz", 512, 2), ("val.npz", 300, 3)))
    return root


def _distill(case, out, *extra, data="train.npz"):
    return run_cli("distill", case / "model.pt", "--arch", ARCH, "--student-arch", f"{ARCH}?width=4",
                   "--data", case / data, "--eval-data", case / "val.npz", "--label-output", "output_0",
                   "--optimizer", "adamw", "--lr", "0.02", "--batch-size", "32", "-o", out, "--json", *extra)


def _scores(path):
    from edgec.modelio import load_model
    return twoheads.scores(load_model(path, f"{ARCH}?width=4").module.eval(), twoheads.scenes(300, seed=3))


def test_labels_on_every_output_train_both_heads(case, tmp_path):
    """--alpha 0: no teacher, labels only; the box head can learn only from y:output_1, the class from y:output_0."""
    before = twoheads.scores(twoheads.detector(4), twoheads.scenes(300, seed=3))
    code, stdout, stderr = _distill(case, tmp_path / "s.pt", "--alpha", "0", "--epochs", "6")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["labels"] == {"0": {"shape": [], "dtype": "int64"}, "1": {"shape": [4], "dtype": "float32"}}
    losses = {s["output"]: s["kind"] for s in r["kd_loss"]}
    assert losses == {"0": "kl", "1": "bce"}   # class ids: cross-entropy; sigmoid boxes in [0, 1]: BCE
    assert not r["augment"]["applied"] and "not class ids" in r["augment"]["reason"]  # a shifted image moves its box
    acc, mae = _scores(tmp_path / "s.pt")
    assert acc > before[0] + 0.3 and mae < 0.6 * before[1], (before, (acc, mae))
    # the control: the same run without the box labels leaves the box head where it started
    with np.load(case / "train.npz") as z:
        np.savez(tmp_path / "classes.npz", **{k: z[k] for k in z.files if k != "y:output_1"})
    code, stdout, stderr = _distill(case, tmp_path / "c.pt", "--alpha", "0", "--epochs", "6",
                                    data=tmp_path / "classes.npz")
    assert code == 0, stderr
    assert set(json.loads(stdout)["labels"]) == {"0"}
    _, mae_without = _scores(tmp_path / "c.pt")
    assert mae_without > 0.8 * before[1] > mae, (before, mae, mae_without)


def test_teacher_and_labels_per_output_weighed(case, tmp_path):
    before = twoheads.scores(twoheads.detector(4), twoheads.scenes(300, seed=3))
    code, stdout, stderr = _distill(case, tmp_path / "s.pt", "--epochs", "6", "--kd-loss", "output_1=auto:5")
    assert code == 0, stderr
    r = json.loads(stdout)
    losses = {s["output"]: (s["kind"], s["weight"]) for s in r["kd_loss"]}
    assert losses == {"0": ("kl", 1.0), "1": ("bce", 5.0)} and set(r["labels"]) == {"0", "1"}
    assert "weight set by --kd-loss" in next(s["reason"] for s in r["kd_loss"] if s["output"] == "1")
    acc, mae = _scores(tmp_path / "s.pt")
    assert acc > before[0] + 0.3 and mae < 0.6 * before[1], (before, (acc, mae))
    assert r["teacher_accuracy"] > 80 and r["best_accuracy"] is not None


def test_an_output_name_that_matches_nothing_fails_in_one_line(case, tmp_path):
    code, _, stderr = _distill(case, tmp_path / "s.pt", "--epochs", "1", "--kd-loss", "boxes=mse:2")
    assert code == 2 and "no output 'boxes'; its outputs are output_0, output_1" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "s.pt").exists()
    bad = tmp_path / "bad.npz"
    d = twoheads.scenes(64, seed=4)
    d["y:boxes"] = d.pop("y:output_1")
    np.savez(bad, **d)
    code, _, stderr = _distill(case, tmp_path / "s.pt", "--alpha", "0", "--epochs", "1", data=bad)
    assert code == 4 and "labels 'y:boxes' but the model has no output 'boxes'; outputs: output_0, output_1" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "s.pt").exists()
