"""The sensitivity fallback searches when only SQNR fails (no labels, no task figure): an unnormalized input
feature (x200, the first layer's weights /200, so FP32 is unchanged) makes the one per-tensor input scale crush
the other features (SQNR under 1 dB); the fallback finds the first layer, keeps it in FP32, and says so."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

HERE = Path(__file__).resolve().parent
ARCH = f"{HERE / 'anyheads.py'}:tags_and_value"


@pytest.fixture(scope="module")
def unnormalized(tmp_path_factory):
    import anyheads
    root = tmp_path_factory.mktemp("sqnr")
    model = anyheads.train_tags()
    with torch.no_grad():
        model.body[0].weight[:, 15] /= 200
    torch.save(model.state_dict(), root / "m.pt")
    paths = []
    for name, n, seed in (("train.npz", 256, 2), ("val.npz", 200, 3)):
        x = anyheads.tags_data(n, seed=seed)["x"]
        x[:, 15] *= 200
        with open(root / name, "wb") as f:
            np.savez(f, x=x)   # no labels: SQNR is the only check of output_1 (and of output_0, --task none)
        paths.append(root / name)
    return root / "m.pt", *paths


def _build(tmp_path, unnormalized, *extra):
    model, train, val = unnormalized
    return run_cli("build", model, "--arch", ARCH, "--data", train, "--eval-data", val, "--task", "output_0=none",
                   "--bench-seconds", "0", "-o", tmp_path / "m.edgec", "--json", *extra)


def test_sqnr_only_failure_is_searched_and_repaired(tmp_path, unnormalized):
    code, stdout, stderr = _build(tmp_path, unnormalized)
    assert code == 0, stderr
    manifest = json.loads(stdout)
    s = manifest["quantization"]["sensitivity"]
    # no labels: the label-free budget (mean cosine 0.99) and the gate's SQNR; no output has a task figure
    assert s["metric"] == "cosine" and s["min_cosine"] == 0.99 and s["task_metric"] is None
    assert "SQNR" in s["searched_for"] and s["int8_sqnr_db"] < 15 <= s["final_sqnr_db"] and s["sqnr_ok"]
    assert s["within_budget"] and s["final_score"] >= 0.99
    assert [e["node"] for e in s["excluded"]] == ["/body/body.0/Gemm"] == manifest["quantization"]["excluded_nodes"]
    # ranked on the edited INT8 graph, no node quantized again; the shipped file measured again
    assert s["requantized_nodes"] == 0 and all(r["measured_by"] == "qdq_edit" for r in s["ranking"])
    assert s["rank_samples"] == 64 and s["int8_weight_share"] >= 0.9
    # all 256 calibration samples are calibrated on (--samples 256): they score the budget, and it says so
    assert s["scored_samples"] == s["scored_available"] == 256 and not s["scored_held_out"]
    assert manifest["quantization"]["samples"] == 256
    outputs = next(st for st in manifest["stages"] if st["name"] == "evaluate")["metrics"]["outputs"]
    assert all(o["sqnr_db"] > 20 for o in outputs)                         # the honest check on the eval data
    report = (tmp_path / "m.edgec" / "report.md").read_text()
    assert "worst output SQNR on the same samples" in report and "under --min-sqnr 15" in report
    assert ("INT8 fallback (cosine >= 0.99) on 256 calibration samples (calibrated on them: give more than "
            "--samples to score on held-out ones), searched for cosine") in report


def test_without_the_fallback_the_same_build_fails_on_sqnr(tmp_path, unnormalized):
    code, _, stderr = _build(tmp_path, unnormalized, "--fallback-seconds", "0")
    assert code == 7 and "SQNR" in stderr and "dB < 15 dB" in stderr
    assert not (tmp_path / "m.edgec").exists()


def test_printed_summary_and_the_cosine_budget_turned_off(tmp_path, unnormalized):
    model, train, val = unnormalized
    code, stdout, stderr = run_cli("build", model, "--arch", ARCH, "--data", train, "--eval-data", val, "--task",
                                   "output_0=none", "--bench-seconds", "0", "-o", tmp_path / "a.edgec")
    assert code == 0, stderr
    assert "INT8 fallback (cosine >= 0.99) on 256 calibration samples" in stdout
    assert "1 node(s) kept in FP32 (/body/body.0/Gemm)" in stdout and "within cosine 0.99" in stdout
    # --min-cosine 0: no label-free budget, SQNR alone is searched for (no output has a task figure)
    code, _, stderr = _build(tmp_path, unnormalized, "--min-cosine", "0")
    assert code == 0, stderr
    s = json.loads((tmp_path / "m.edgec" / "manifest.json").read_text())["quantization"]["sensitivity"]
    assert s["metric"] == "no task metric" and s["min_cosine"] is None and s["searched_for"].startswith("SQNR")


def test_quantize_runs_the_same_label_free_fallback(tmp_path, unnormalized):
    model, train, _ = unnormalized
    fp32 = tmp_path / "m.onnx"
    code, _, stderr = run_cli("export", model, "--arch", ARCH, "--data", train, "-o", fp32)
    assert code == 0, stderr
    code, stdout, stderr = run_cli("quantize", fp32, "--data", train, "--task", "output_0=none", "-o",
                                   tmp_path / "q.onnx", "--json")
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["fallback"]["metric"] == "cosine" and s["fallback"]["within_budget"]
    assert [e["node"] for e in s["fallback"]["excluded"]] == ["/body/body.0/Gemm"] == s["excluded_nodes"]
    assert s["min_sqnr_db"] > 20                                  # measured on the written file
    # calibrated on the first 192: the other 64 score the budget, held out of the fit
    code, stdout, stderr = run_cli("quantize", fp32, "--data", train, "--task", "output_0=none", "--samples", "192",
                                   "-o", tmp_path / "held.onnx", "--json")
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["samples"] == 192 and s["fallback"]["within_budget"]
    assert s["fallback"]["scored_held_out"] and s["fallback"]["scored_samples"] == 64
    code, stdout, stderr = run_cli("quantize", fp32, "--data", train, "--task", "output_0=none", "-o",
                                   tmp_path / "off.onnx", "--fallback-seconds", "0")
    assert code == 0, stderr
    assert "0 node(s) FP32" in stdout and "INT8 fallback" not in stdout and "SQNR 0." in stdout
