"""Pruning and distillation of a model with two int64 inputs (token ids + mask), through the CLI: torch-pruning
traces it with a real sample of every input, distillation trains on dict batches, build --prune --distill
packages it."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli

HERE = Path(__file__).resolve().parent
ARCH = f"{HERE / 'anyheads.py'}:ids_mask"


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    import anyheads
    return anyheads.write_case(tmp_path_factory.mktemp("ids"), anyheads.train_ids(), anyheads.ids_data,
                               (("train.npz", 400, 2), ("val.npz", 200, 3)))


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_prune_then_distill_two_int64_inputs(tmp_path, ids, importance):
    from edgec.modelio import load_model
    model, train, val = ids
    pruned = tmp_path / "pruned.pt"
    code, stdout, stderr = run_cli("prune", model, "--arch", ARCH, "--data", train, "--ratio", "0.5",
                                   "--importance", importance, "-o", pruned, "--json")
    assert code == 0, stderr
    record = json.loads(stdout)
    assert record["inputs"] == {"ids": [1, 12], "mask": [1, 12]} and record["input_shape"] is None
    assert record["params_after"] < 0.6 * record["params_before"] and record["flops_after"] < record["flops_before"]
    small = load_model(pruned, ARCH).module
    assert small.mlp[0].out_features == 32 and small.mlp[-1].out_features == 3   # the classifier keeps its classes

    student = tmp_path / "student.pt"
    code, stdout, stderr = run_cli("distill", model, "--arch", ARCH, "--student", pruned, "--student-arch", ARCH,
                                   "--data", train, "--eval-data", val, "--epochs", "3", "-o", student, "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["teacher_accuracy"] > 90 and r["flops"] < r["teacher_flops"]
    assert r["best_accuracy"] > r["student_accuracy_before"] - 1 and r["best_accuracy"] > 80
    assert "augmentation off" in stderr   # token ids are never translated like images
    # the distilled student is a model file that runs on both inputs
    out = load_model(student, ARCH).module(torch.ones(2, 12, dtype=torch.int64), torch.ones(2, 12, dtype=torch.int64))
    assert out.shape == (2, 3)


def test_build_prune_distill_two_inputs(tmp_path, ids):
    model, train, val = ids
    code, stdout, stderr = run_cli("build", model, "--arch", ARCH, "--data", train, "--eval-data", val, "--prune",
                                   "0.5", "--distill", "--epochs", "2", "--bench-seconds", "0", "-o",
                                   tmp_path / "ids.edgec", "--json")
    assert code == 0, stderr
    m = json.loads(stdout)
    names = [s["name"] for s in m["stages"]]
    assert names[:3] == ["load", "prune", "distill"]
    evaluate = next(s for s in m["stages"] if s["name"] == "evaluate")["metrics"]
    assert evaluate["fp32_accuracy"] > 80 and evaluate["gate"]["passed"]


def test_prune_without_data_names_the_fix(tmp_path, ids):
    model, _, _ = ids
    code, _, stderr = run_cli("prune", model, "--arch", ARCH, "--ratio", "0.5", "-o", tmp_path / "p.pt")
    assert code == 2 and "takes several inputs; pass --data" in stderr


def test_compare_qat_kd_on_two_int64_inputs(tmp_path, ids):
    """qat-kd fine-tunes the fake-quantized model on dict batches (ids + mask), exports its QDQ file with both
    int64 inputs, and the accuracy torch measured is the one ONNX Runtime gives."""
    import onnxruntime as ort
    model, train, val = ids
    out = tmp_path / "cmp"
    code, stdout, stderr = run_cli("compare", model, "--arch", ARCH, "--data", train, "--eval-data", val,
                                   "--recipes", "fp32,qat-kd", "--qat-epochs", "1", "--bench-seconds", "0.2",
                                   "-o", out, "--json")
    assert code == 0, stderr
    rows = {r["recipe"]: r for r in json.loads(stdout)["recipes"]}
    qat = rows["qat-kd"]
    assert qat.get("error") is None, qat
    assert qat["accuracy"] > 80 and qat["accuracy"] > rows["fp32"]["accuracy"] - 3, (qat, rows["fp32"])
    sess = ort.InferenceSession(str(out / qat["onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("ids", "tensor(int64)"), ("mask", "tensor(int64)")]
    assert any(n.op_type == "QuantizeLinear" for n in __import__("onnx").load(str(out / qat["onnx"])).graph.node)
    taken = next(s for s in qat["stages"] if s["name"] == "quantize")["metrics"]
    check = taken["export"]["check"]
    assert check["samples"] == 200 and abs(taken["torch_vs_ort_points"]) <= 1.0, check
    assert "augmentation off" in stderr
