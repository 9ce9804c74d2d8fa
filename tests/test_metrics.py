"""Per-output checks that cannot be fooled (edgec.exporters.metrics), and builds that prove it: for every output
kind, a properly quantized INT8 passes the default checks and a deliberately broken one fails the build."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from edgec.core.errors import DataError, OptionError
from edgec.exporters.metrics import (CandidateScore, CheckOptions, OutputChecks, check_names, detect_task,
                                     failures, parse_tasks)

FAST = ["--bench-seconds", "0", "--samples", "128"]


def _checked(names, refs, gots, y=None, options=None, batch=64, num_classes=None):
    checks = OutputChecks(names, options or CheckOptions(), num_classes)
    for s in range(0, len(refs[0]), batch):
        checks.update([r[s:s + batch] for r in refs], [g[s:s + batch] for g in gots],
                      None if y is None else y[s:s + batch])
    return checks.results()


# ---------------------------------------------------------------- the figures themselves

def test_one_column_output_is_scored_by_correlation_and_sqnr_not_cosine():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 1)).astype(np.float32)
    good = ref + 0.01 * rng.normal(size=ref.shape)
    broken = 0.1 * rng.normal(size=ref.shape) + 0.5  # uncorrelated with the reference: what the VAD looked like
    g, b = (_checked(["p"], [ref], [x])[0] for x in (good, broken))
    assert g["task"] == b["task"] == "score" and g["chosen"] == "auto"
    assert "mean_cosine" not in g and "min_cosine" not in g  # per-sample cosine of one value is always 1
    assert g["pearson"] > 0.999 and abs(b["pearson"]) < 0.2
    assert g["sqnr_db"] > 35 and b["sqnr_db"] < 3
    assert failures([g], CheckOptions()) == []
    assert len(failures([b], CheckOptions())) == 2  # SQNR and correlation both say so


def test_constant_column_sqnr_follows_the_error():
    ref = np.full((200, 1), 0.59, np.float32)  # e.g. a detector that says the same thing on this data
    sq = [_checked(["p"], [ref], [ref + e])[0]["sqnr_db"] for e in (1e-4, 1e-2, 0.3)]
    assert sq[0] > sq[1] > sq[2] and sq[0] - sq[2] > 60
    r = _checked(["p"], [ref], [ref + 0.3])[0]
    assert r["metric"] is None and r["pearson"] is None  # correlation is undefined, SQNR still gates
    assert failures([r], CheckOptions())


def test_streamed_batches_give_the_whole_set_figures():
    rng = np.random.default_rng(1)
    ref = (rng.normal(size=(257, 3)) + 100).astype(np.float64)  # a large offset: naive sums would cancel
    got = ref + 0.05 * rng.normal(size=ref.shape)
    one = _checked(["r"], [ref], [got], options=CheckOptions(tasks={"r": "regress"}), batch=257)[0]
    many = _checked(["r"], [ref], [got], options=CheckOptions(tasks={"r": "regress"}), batch=10)[0]
    whole = min(np.corrcoef(ref[:, i], got[:, i])[0, 1] for i in range(3))
    assert one["pearson"] == many["pearson"] == pytest.approx(whole, abs=1e-4)
    assert one["sqnr_db"] == many["sqnr_db"] and one["chosen"] == "given"


def test_identical_zero_and_non_finite_outputs():
    ref = np.zeros((10, 4), np.float32)
    same = _checked(["z"], [ref], [ref])[0]
    assert same["identical"] and same["sqnr_db"] is None and failures([same], CheckOptions()) == []
    off = _checked(["z"], [ref], [ref + 1e-3])[0]
    assert not off["identical"] and "all zeros" in failures([off], CheckOptions())[0]
    nan = np.ones((10, 4), np.float32)
    bad = nan.copy()
    bad[3, 1] = np.nan
    r = _checked(["n"], [nan], [bad])[0]
    assert r["non_finite"] == 1 and "NaN" in failures([r], CheckOptions())[0]


def test_task_detection_is_recorded_and_safe():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    emb = rng.normal(size=(64, 64))
    assert detect_task(probs)[0] == "classify"
    assert detect_task(1 / (1 + np.exp(-logits)))[0] == "multilabel"
    assert detect_task(emb / np.linalg.norm(emb, axis=1, keepdims=True))[0] == "embed"
    assert detect_task(emb)[0] == "embed"
    # Resemblyzer's speaker embedding: ReLU then L2 norm, every value in [0, 1]; unit rows, not 256 sigmoids
    relu = np.maximum(emb, 0)
    assert detect_task(relu / np.linalg.norm(relu, axis=1, keepdims=True))[0] == "embed"
    assert detect_task(logits[:, :1])[0] == detect_task(logits[:, 0])[0] == "score"
    assert detect_task(logits, np.arange(64) % 10, num_classes=10)[0] == "classify"
    # digits labels on a 64-D embedding are no class ids of it: no fake accuracy
    assert detect_task(emb, np.arange(64) % 10, num_classes=10)[0] == "embed"
    # a small (N,4) head next to other outputs is not taken for class scores (a box regression is not argmaxed)
    assert detect_task(logits[:, :4], only_output=False)[0] == "none"
    assert detect_task(logits.astype(np.int64))[0] == "none"


def test_embedding_figures_and_labels_that_do_not_fit():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 32)).astype(np.float32)
    y = np.arange(200) % 10
    good, broken = emb + 0.01 * rng.normal(size=emb.shape), rng.normal(size=emb.shape)
    g = _checked(["e"], [emb], [good], y=y, num_classes=10)[0]
    b = _checked(["e"], [emb], [broken], y=y, num_classes=10)[0]
    assert g["task"] == "embed" and not g["labels"] and "labels not used" in g["why"]
    assert g["mean_cosine"] > 0.99 and g["nn_agreement"] > 80 and g["nn_samples"] == 200
    assert b["mean_cosine"] < 0.3 and b["nn_agreement"] < 20 and failures([b], CheckOptions())


def test_labels_on_the_named_output_only():
    rng = np.random.default_rng(4)
    box, logits = rng.normal(size=(128, 4)), rng.normal(size=(128, 10))
    y = logits.argmax(1)
    opts = CheckOptions(label_output="cls")
    recs = _checked(["box", "cls"], [box, logits], [box, logits], y=y, options=opts)
    assert [(r["task"], r["labels"]) for r in recs] == [("none", False), ("classify", True)]
    assert recs[1]["metric"] == "accuracy" and recs[1]["fp32"] == 100.0
    multilabel = (rng.random(size=(128, 4)) > 0.5).astype(np.int64)
    probs = 1 / (1 + np.exp(-box))
    r = _checked(["ml"], [probs], [probs], y=multilabel, options=CheckOptions(label_output="ml"))[0]
    assert r["task"] == "multilabel" and r["metric"] == "f1" and r["labels"]
    with pytest.raises(DataError, match="labels for output cls"):  # tied by the user, and they do not fit
        _checked(["box", "cls"], [box, logits], [box, logits], y=y + 20, options=opts)


def test_option_errors_name_the_outputs():
    with pytest.raises(OptionError, match="outputs: a, b"):
        check_names(["a", "b"], CheckOptions(tasks={"c": "score"}), False)
    with pytest.raises(OptionError, match="--label-output NAME"):
        check_names(["a", "b"], CheckOptions(), labelled=True)  # never silently the first
    with pytest.raises(OptionError, match="OUTPUT=TASK"):
        check_names(["a", "b"], CheckOptions(tasks={"": "classify"}), False)
    with pytest.raises(OptionError, match="unknown task"):
        parse_tasks(["a=logits"])
    assert parse_tasks(["classify"]) == {"": "classify"} and parse_tasks(["a=score", "b=none"]) == {"a": "score",
                                                                                                  "b": "none"}
    assert check_names(["only"], CheckOptions(), labelled=True) == "only"
    assert check_names(["a", "b"], CheckOptions(label_output="none"), labelled=True) is None


def test_fallback_score_sees_a_one_column_output():
    """The fallback ranks and accepts candidates with the gate's figures: on a one-column output the old
    1 - cosine was 0 for every candidate; SQNR-based error and correlation are not."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(256, 1)).astype(np.float32)
    scorer = CandidateScore(["p"], [ref], None, CheckOptions())
    assert scorer.metric == "pearson" and scorer.fp32_score == 1.0
    good, bad = ref + 0.01 * rng.normal(size=ref.shape), ref + 1.0 * rng.normal(size=ref.shape)
    assert scorer.error([good]) < 1e-3 < 0.5 < scorer.error([bad])
    assert scorer.score([good]) > 0.999 > 0.9 > scorer.score([bad])


# ---------------------------------------------------------------- builds: broken fails, good passes, every kind

@pytest.fixture(scope="module")
def kind_models(tmp_path_factory, digits):
    from edgec.models.kinds import KINDS, train_kind
    train, _ = digits
    root = tmp_path_factory.mktemp("kinds")
    paths = {}
    for kind in KINDS:
        model = train_kind(kind, train.x[0:len(train)], train.y, epochs=4)
        paths[kind] = root / f"{kind}.pt"
        torch.jit.save(torch.jit.trace(model, torch.from_numpy(train.x[0:2])), paths[kind])
    wide = root / "wide.npz"  # calibration on inputs x50: every activation range 50x too wide
    np.savez(wide, x=(train.x[0:256] * 50).astype(np.float32))
    return paths, wide


KIND_ARGS = {"classify": [], "score": [], "multi": ["--label-output", "output_1"], "multilabel": [], "embed": []}
KIND_TASKS = {"classify": [("output", "classify", True)], "score": [("output", "score", True)],
              "multi": [("output_0", "none", False), ("output_1", "classify", True)],
              "multilabel": [("output", "multilabel", False)], "embed": [("output", "embed", False)]}


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_every_kind_good_passes_and_broken_fails(kind, kind_models, tmp_path):
    paths, wide = kind_models
    out = tmp_path / "good.edgec"
    code, _, stderr = run_cli("build", paths[kind], "-o", out, *KIND_ARGS[kind], *FAST)
    assert code == 0, stderr
    m = json.loads((out / "manifest.json").read_text())
    outputs = m["metrics"]["outputs"]
    assert [(o["name"], o["task"], o["labels"]) for o in outputs] == KIND_TASKS[kind]
    assert all(o["chosen"] == "auto" and o["sqnr_db"] > 15 for o in outputs)
    assert "Checks per output" in (out / "report.md").read_text()
    good_sqnr = [o["sqnr_db"] for o in outputs]

    bad = tmp_path / "broken.edgec"
    code, _, stderr = run_cli("build", paths[kind], "-o", bad, "--data", wide, "--eval-data", "builtin:digits:test",
                              "--calibration", "minmax", "--fallback-seconds", "0", *KIND_ARGS[kind], *FAST)
    assert code == 7, stderr
    assert "INT8 fails the checks" in stderr and not bad.exists()
    assert any(f"output {name}" in stderr for name, _, _ in KIND_TASKS[kind])
    # the same figures of the broken model (measured, not gated) are far from the good one's
    code, _, stderr = run_cli("build", paths[kind], "-o", bad, "--data", wide, "--eval-data", "builtin:digits:test",
                              "--calibration", "minmax", "--fallback-seconds", "0", "--min-sqnr", "-1000",
                              "--max-accuracy-drop", "100", *KIND_ARGS[kind], *FAST)
    assert code == 0, stderr
    broken_sqnr = [o["sqnr_db"] for o in json.loads((bad / "manifest.json").read_text())["metrics"]["outputs"]]
    assert all(b < g - 10 for b, g in zip(broken_sqnr, good_sqnr)), (broken_sqnr, good_sqnr)


def test_build_task_and_label_options(kind_models, tmp_path):
    paths, _ = kind_models
    code, _, stderr = run_cli("build", paths["multi"], "-o", tmp_path / "x.edgec", *FAST)
    assert code == 2 and "--label-output" in stderr and "output_0, output_1" in stderr
    code, _, stderr = run_cli("build", paths["multi"], "-o", tmp_path / "x.edgec", "--task", "boxes=regress", *FAST)
    assert code == 2 and "no output 'boxes'" in stderr
    code, _, stderr = run_cli("build", paths["multi"], "-o", tmp_path / "x.edgec", "--label-output", "output_7", *FAST)
    assert code == 2 and "output_7" in stderr
    assert not (tmp_path / "x.edgec").exists()
    out = tmp_path / "given.edgec"
    code, _, stderr = run_cli("build", paths["multi"], "-o", out, "--label-output", "output_1", "--task",
                              "output_0=regress", "--json", *FAST)
    assert code == 0, stderr
    first = json.loads((out / "manifest.json").read_text())["metrics"]["outputs"][0]
    assert (first["task"], first["chosen"], first["metric"]) == ("regress", "given", "pearson")
    assert first["int8"] > 99  # correlation in percent: the box head survives INT8
