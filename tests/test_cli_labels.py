"""Labels of any task through the CLI: `y:OUTPUT` keys for several outputs (0/1 multilabel, float regression
targets), `y` for --label-output; each scored by its task (F1, correlation/abs error vs the truth) and gated by
--max-accuracy-drop; mislabelled data refused in one line before any work."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

HERE = Path(__file__).resolve().parent
ARCH = f"{HERE / 'anyheads.py'}:tags_and_value"
FAST = ["--bench-seconds", "0", "--samples", "128"]


@pytest.fixture(scope="module")
def tags_model(tmp_path_factory):
    import anyheads
    path = tmp_path_factory.mktemp("tags") / "tags.pt"
    torch.save(anyheads.train_tags().state_dict(), path)
    return path


def _save(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture(scope="module")
def tags_npz(tmp_path_factory):
    import anyheads
    root = tmp_path_factory.mktemp("tagsdata")
    return _save(root / "train.npz", anyheads.tags_data(256, seed=2)), _save(root / "val.npz",
                                                                           anyheads.tags_data(200, seed=3))


def _evaluate(manifest: dict) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == "evaluate")["metrics"]


def test_multilabel_and_regression_labels_are_scored_by_task(tmp_path, tags_model, tags_npz):
    train, val = tags_npz
    out = tmp_path / "tags.edgec"
    code, stdout, stderr = run_cli("build", tags_model, "--arch", ARCH, "--data", train, "--eval-data", val,
                                   "--task", "output_1=regress", "-o", out, "--json", *FAST)
    assert code == 0, stderr
    outputs = {o["name"]: o for o in _evaluate(json.loads(stdout))["outputs"]}
    tags, value = outputs["output_0"], outputs["output_1"]
    # the 0/1 labels make output_0 a multilabel output scored by F1 against the truth, FP32 and INT8 both
    assert tags["task"] == "multilabel" and tags["labels"] and tags["metric"] == "f1"
    assert tags["fp32_f1"] > 80 and abs(tags["fp32_f1"] - tags["int8_f1"]) < 2
    # the float targets: correlation and abs error against the truth
    assert value["task"] == "regress" and value["chosen"] == "given" and value["labels"]
    assert value["metric"] == "label_pearson" and value["fp32_label_pearson"] > 0.9
    assert value["int8_label_mae"] < 2 * value["fp32_label_mae"] + 0.05
    assert "output output_0: multilabel" in stderr and "f1 FP32" in stderr


def test_the_gate_uses_the_task_metric(tmp_path, tags_model, tags_npz):
    """An INT8 model calibrated on a range 1000x too wide fails on the labelled task figures, SQNR gate off."""
    import anyheads
    train, val = tags_npz
    d = anyheads.tags_data(256, seed=2)
    d["x"][0] *= 1000
    bad = _save(tmp_path / "outlier.npz", d)
    out = tmp_path / "bad.edgec"
    code, _, stderr = run_cli("build", tags_model, "--arch", ARCH, "--data", bad, "--eval-data", val,
                              "--min-sqnr", "-1000", "--fallback-seconds", "0", "-o", out, *FAST)
    assert code == 7, stderr
    assert "(multilabel): f1" in stderr or "(regress): label_pearson" in stderr
    assert not out.exists()


def test_plain_y_goes_to_the_label_output(tmp_path, tags_model):
    import anyheads
    d = anyheads.tags_data(300, seed=4)
    data = _save(tmp_path / "d.npz", {"x": d["x"], "y": d["y:output_1"]})
    code, stdout, stderr = run_cli("build", tags_model, "--arch", ARCH, "--data", data, "--label-output",
                                   "output_1", "-o", tmp_path / "v.edgec", "--json", *FAST)
    assert code == 0, stderr
    outputs = {o["name"]: o for o in _evaluate(json.loads(stdout))["outputs"]}
    assert outputs["output_1"]["labels"] and outputs["output_1"]["task"] == "regress"   # detected from the labels
    assert not outputs["output_0"]["labels"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update({"y:output_0": d["y:output_0"][:-3]}), "197 labels for 200 samples ('y:output_0')"),
    (lambda d: d.update({"y:output_0": d["y:output_0"][:, :3]}), "labels for output output_0 (multilabel"),
    (lambda d: d["y:output_1"].__setitem__((7, 1), np.nan), "sample 7 has a NaN or Inf label"),
    (lambda d: d.update({"y:output_0": d["y:output_0"] * 0.7}), "multilabel labels must be 0 or 1"),
    (lambda d: d.update({"y:boxes": d.pop("y:output_1")}), "has no output 'boxes'"),
    (lambda d: d.update({"y": d["y:output_1"]}), "--label-output NAME"),
])
def test_mislabelled_data_is_one_line(tmp_path, tags_model, tags_npz, change, message):
    import anyheads
    d = anyheads.tags_data(200, seed=3)
    change(d)
    val = _save(tmp_path / "val.npz", d)
    args = ["--task", "output_0=multilabel"] if "0 or 1" in message else []
    code, stdout, stderr = run_cli("build", tags_model, "--arch", ARCH, "--data", tags_npz[0], "--eval-data", val,
                                   *args, "-o", tmp_path / "m.edgec", *FAST)
    assert code in (2, 4), stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1 and stderr.startswith("edgec: error:")
    assert not (tmp_path / "m.edgec").exists()


def test_a_data_hook_gives_labels_per_output(tmp_path, tags_model):
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import anyheads\n"
        "def batches():\n"
        "    d = anyheads.tags_data(256, seed=6)\n"
        "    return [{k: v[i:i + 64] for k, v in d.items()} for i in range(0, 256, 64)]\n")
    code, stdout, stderr = run_cli("build", tags_model, "--arch", ARCH, "--data", f"{hook}:batches",
                                   "--task", "output_1=regress", "-o", tmp_path / "h.edgec", "--json", *FAST)
    assert code == 0, stderr
    outputs = {o["name"]: o for o in _evaluate(json.loads(stdout))["outputs"]}
    assert outputs["output_0"]["metric"] == "f1" and outputs["output_1"]["metric"] == "label_pearson"
    assert outputs["output_0"]["samples"] == 51   # 20% of the hook's 256 samples held out for evaluation
