"""`edgec compare` and `build --distill` on a model that is no classifier: two outputs (sigmoid tags, a
regression) with labels for both, the same per-output options as build (--task, --label-output, --min-sqnr),
rows scored per output against FP32 (never a made-up accuracy), --kd-loss reaching the distillation."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

HERE = Path(__file__).resolve().parent
ARCH = f"{HERE / 'anyheads.py'}:tags_and_value"


@pytest.fixture(scope="module")
def tags(tmp_path_factory):
    import anyheads
    return anyheads.write_case(tmp_path_factory.mktemp("tagscmp"), anyheads.train_tags(), anyheads.tags_data,
                               (("train.npz", 320, 2), ("val.npz", 200, 3)))


def _stage(stages, name):
    return next(s for s in stages if s["name"] == name)


def test_compare_scores_every_output_and_takes_kd_loss(tmp_path, tags):
    model, train, val = tags
    out = tmp_path / "cmp"
    code, stdout, stderr = run_cli("compare", model, "--arch", ARCH, "--data", train, "--eval-data", val,
                                   "--task", "output_1=regress", "--min-sqnr", "12",
                                   "--recipes", "fp32,ptq-int8,prune-kd", "--calibration", "minmax",
                                   "--prune-ratio", "0.25", "--epochs", "2", "--kd-loss", "output_1=mse:2",
                                   "--bench-seconds", "0.2", "-o", out, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    rows = {r["recipe"]: r for r in summary["recipes"]}
    assert set(rows) == {"fp32", "ptq-int8-minmax", "prune-kd"}
    for r in rows.values():
        assert r.get("error") is None, r
        assert r["accuracy"] is None and "top1_agreement" not in r["agreement"]   # no classifier: no accuracy
        by_name = {o["name"]: o for o in r["outputs"]}
        assert by_name["output_0"]["metric"] == "f1" and by_name["output_1"]["metric"] == "label_pearson"
        assert by_name["output_1"]["chosen"] == "given"
        assert r["quality"]["metric"] == "f1" and r["quality"]["output"] == "output_0" and r["quality"]["labels"]
    assert rows["fp32"]["quality"]["drop_points"] == 0
    assert rows["ptq-int8-minmax"]["quality"]["value"] > 80
    # the distilled student's loss is the one asked for, on the output asked for; the other one detected
    distill = _stage(rows["prune-kd"]["stages"], "distill")["metrics"]
    losses = {s["output"]: (s["kind"], s["weight"], s["reason"]) for s in distill["kd_loss"]}
    assert losses["1"] == ("mse", 2.0, "set by --kd-loss") and losses["0"][0] == "bce"
    report = (out / "report.md").read_text()
    assert "quality" in report and "f1 (output_0)" in report and "accuracy" not in report.split("\n\n")[2]


def test_compare_constraints_use_the_per_output_checks(tmp_path, tags):
    """--min-sqnr is a constraint on quantized rows like build's gate: a bar no INT8 model reaches rejects them."""
    model, train, val = tags
    code, stdout, stderr = run_cli("compare", model, "--arch", ARCH, "--data", train, "--eval-data", val,
                                   "--min-sqnr", "90", "--recipes", "fp32,ptq-int8", "--calibration", "minmax",
                                   "--bench-seconds", "0", "-o", tmp_path / "c", "--json")
    assert code == 0, stderr
    rec = json.loads(stdout)["recommendation"]
    assert rec["recipe"] == "fp32"
    assert any("SQNR" in line and "< 90 dB" in line for line in rec["rejected"]["ptq-int8-minmax"])


def test_compare_refuses_an_unknown_output_before_any_work(tmp_path, tags):
    model, train, val = tags
    code, _, stderr = run_cli("compare", model, "--arch", ARCH, "--data", train, "--task", "boxes=regress",
                              "-o", tmp_path / "c")
    assert code == 2 and "no output 'boxes'" in stderr and not (tmp_path / "c").exists()


def test_build_distill_takes_kd_loss(tmp_path, tags):
    model, train, val = tags
    code, stdout, stderr = run_cli("build", model, "--arch", ARCH, "--data", train, "--eval-data", val,
                                   "--prune", "0.25", "--distill", "--epochs", "1", "--kd-loss", "output_0=bce:0.5",
                                   "--kd-loss", "output_1=mse", "--bench-seconds", "0", "-o", tmp_path / "p.edgec",
                                   "--json")
    assert code == 0, stderr
    distill = _stage(json.loads(stdout)["stages"], "distill")
    losses = {s["output"]: (s["kind"], s["weight"]) for s in distill["metrics"]["kd_loss"]}
    assert losses == {"0": ("bce", 0.5), "1": ("mse", 1.0)}
    assert distill["options"]["kd_loss"] == [["output_0", "bce", 0.5], ["output_1", "mse", 1.0]]


def test_compare_without_any_task_figure_shows_sqnr_never_an_accuracy(tmp_path, tags):
    import anyheads
    model, _, _ = tags
    with open(tmp_path / "x.npz", "wb") as f:
        np.savez(f, x=anyheads.tags_data(256, seed=7)["x"])   # no labels; output_1 (N,2) has no detectable task
    out = tmp_path / "c"
    code, stdout, stderr = run_cli("compare", model, "--arch", ARCH, "--data", tmp_path / "x.npz", "--task",
                                   "output_0=none", "--recipes", "fp32,ptq-int8", "--calibration", "minmax",
                                   "--bench-seconds", "0.2", "-o", out, "--json")
    assert code == 0, stderr
    rows = {r["recipe"]: r for r in json.loads(stdout)["recipes"]}
    int8 = rows["ptq-int8-minmax"]
    assert int8.get("quality") is None and int8["accuracy"] is None and not int8["failures"]
    assert {o["task"] for o in int8["outputs"]} == {"none"} and int8["agreement"]["min_sqnr_db"] > 20
    table = (out / "report.md").read_text()
    assert f"SQNR {int8['agreement']['min_sqnr_db']:.1f} dB" in table and "% agree" not in table
    assert "accuracy_vs_latency.png" not in json.loads(stdout)["plots"]   # nothing to plot latency against


def test_distillation_learns_from_the_named_labels_of_the_label_output(tmp_path, tags):
    """--label-output output_0 with y:output_0 (0/1 tags): build --distill trains on those labels (BCE)."""
    model, train, val = tags
    code, stdout, stderr = run_cli("build", model, "--arch", ARCH, "--data", train, "--eval-data", val,
                                   "--prune", "0.25", "--distill", "--epochs", "1", "--alpha", "0.5",
                                   "--label-output", "output_0", "--task", "output_1=regress", "--bench-seconds", "0",
                                   "-o", tmp_path / "p.edgec", "--json")
    assert code == 0, stderr
    distill = _stage(json.loads(stdout)["stages"], "distill")["metrics"]
    # the tags on output_0 (y:output_0, the label output) and the values on output_1 (y:output_1): both learnt
    assert distill["labels"] == {"0": {"shape": [5], "dtype": "float32"}, "1": {"shape": [2], "dtype": "float32"}}
    assert {s["output"]: s["kind"] for s in distill["kd_loss"]} == {"0": "bce", "1": "mse"}
