"""`edgec compare` on a really trained CNN: rows, resumability, failures kept in their row, recommendation."""
import hashlib
import json

import pytest

from conftest import run_cli
from edgec.plots import pareto_front

FAST = ["--bench-seconds", "0.3", "--calibration", "minmax"]


@pytest.fixture(scope="module")
def compared(trained_cnn, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    code, stdout, stderr = run_cli("compare", trained_cnn[0], "-o", out, "--recipes", "fp32,ptq-int8,fp16",
                                   "--json", *FAST)
    assert code == 0, stderr
    return out, json.loads(stdout), stderr


def test_rows_and_fields(compared):
    out, summary, _ = compared
    rows = {r["recipe"]: r for r in summary["recipes"]}
    assert set(rows) == {"fp32", "ptq-int8-minmax", "fp16"}
    for r in rows.values():
        for key in ("params", "flops", "bytes", "compression_ratio", "accuracy", "accuracy_change", "p50_ms",
                    "p90_ms", "speedup", "seconds"):
            assert r[key] is not None, (r["recipe"], key)
        assert (out / r["onnx"]).is_file()
    assert rows["ptq-int8-minmax"]["compression_ratio"] > 2.5 and rows["fp16"]["compression_ratio"] > 1.8
    assert abs(rows["ptq-int8-minmax"]["accuracy_change"]) < 2
    assert summary["recommendation"]["recipe"] in rows
    assert {"report.md", "compare.json", "accuracy_vs_latency.png", "size_flops.png"} <= {p.name for p in out.iterdir()}
    assert "Recommended" in (out / "report.md").read_text()


def test_rerun_reuses_finished_rows(compared, trained_cnn):
    out, first, _ = compared
    code, stdout, stderr = run_cli("compare", trained_cnn[0], "-o", out, "--recipes", "fp32,ptq-int8,fp16",
                                   "--json", *FAST)
    assert code == 0 and stderr.count("reusing the result") == 3
    again = {r["recipe"]: r["accuracy"] for r in json.loads(stdout)["recipes"]}
    assert again == {r["recipe"]: r["accuracy"] for r in first["recipes"]}


def test_constraints_name_what_each_recipe_breaks(compared, trained_cnn):
    out, _, _ = compared
    code, stdout, _ = run_cli("compare", trained_cnn[0], "-o", out, "--recipes", "fp32,ptq-int8,fp16", "--json",
                              "--max-size", "0.2MB", *FAST)
    summary = json.loads(stdout)
    rec = summary["recommendation"]
    sizes = {r["recipe"]: r["bytes"] for r in summary["recipes"]}
    fitting = [k for k, v in sizes.items() if v <= 200_000]
    assert rec["recipe"] in fitting if fitting else rec["recipe"] is None
    for recipe, why in rec["rejected"].items():
        assert sizes[recipe] > 200_000 and "size" in why[0]
    code, stdout, _ = run_cli("compare", trained_cnn[0], "-o", out, "--recipes", "fp32,ptq-int8,fp16", "--json",
                              "--prefer", "size", *FAST)
    assert json.loads(stdout)["recommendation"]["recipe"] == min(sizes, key=sizes.get)


def test_failing_recipe_is_reported_in_its_row(trained_cnn, tmp_path):
    import torch
    from edgec.modelio import load_model
    ts = tmp_path / "ts.pt"  # TorchScript cannot be pruned: that row fails, the others stand
    torch.jit.save(torch.jit.script(load_model(trained_cnn[0]).module), ts)
    code, stdout, stderr = run_cli("compare", ts, "-o", tmp_path / "c", "--recipes", "fp32,prune-kd", "--json", *FAST)
    assert code == 0, stderr
    rows = {r["recipe"]: r for r in json.loads(stdout)["recipes"]}
    assert rows["fp32"]["error"] is None and rows["fp32"]["accuracy"] > 85
    assert "eager" in rows["prune-kd"]["error"]


def test_bad_options(trained_cnn, tmp_path):
    code, _, stderr = run_cli("compare", trained_cnn[0], "-o", tmp_path / "c", "--recipes", "fp32,magic")
    assert code == 2 and "magic" in stderr
    code, _, stderr = run_cli("compare", trained_cnn[0], "-o", tmp_path / "c", "--max-size", "big")
    assert code == 2 and "5MB" in stderr


def test_package_winner(compared, trained_cnn, tmp_path):
    out, _, _ = compared
    pkg = tmp_path / "winner.edgec"
    code, stdout, stderr = run_cli("compare", trained_cnn[0], "-o", out, "--recipes", "ptq-int8", "--package", pkg,
                                   "--json", *FAST)
    assert code == 0, stderr
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["compare"]["recipe"] == "ptq-int8-minmax"
    assert run_cli("verify", pkg)[0] == 0
    # the package ships the very bytes that were measured, not a rebuild
    row = next(r for r in json.loads(stdout)["recipes"] if r["recipe"] == "ptq-int8-minmax")
    assert (pkg / "model.onnx").read_bytes() == (out / row["onnx"]).read_bytes()
    assert manifest["files"]["model.onnx"]["sha256"] == row["sha256"] == hashlib.sha256(
        (out / row["onnx"]).read_bytes()).hexdigest()
    # through build's accuracy gate, recorded like build's; the source is the user's model file
    evaluate = next(s for s in manifest["stages"] if s["name"] == "evaluate")
    assert evaluate["options"]["max_accuracy_drop"] == 1.0 and evaluate["metrics"]["accuracy_drop"] <= 1.0
    assert [s["name"] for s in manifest["stages"]] == ["load", "export", "quantize", "evaluate", "bench"]
    assert manifest["source"]["path"] == str(trained_cnn[0]) and manifest["latency"]["cpu"]["p50_ms"] > 0


def test_a_recipe_over_the_default_drop_is_never_recommended_or_packaged(trained_cnn, outlier_calibration, tmp_path):
    from edgec.compare import CompareOptions, Run, package_row
    from edgec.core.errors import BudgetExceeded
    from edgec.source import SourceSpec, load_source
    out, pkg = tmp_path / "c", tmp_path / "p.edgec"
    args = ["--data", outlier_calibration, "--eval-data", "builtin:digits:test", "--recipes", "ptq-int8"]
    code, stdout, stderr = run_cli("compare", trained_cnn[0], "-o", out, *args, "--json", *FAST)
    assert code == 0, stderr
    summary = json.loads(stdout)
    rec = summary["recommendation"]
    assert rec["constraints"]["max_accuracy_drop"] == 1.0   # build's default
    assert rec["recipe"] == "fp32" and "points lost" in rec["rejected"]["ptq-int8-minmax"][0]
    code, _, stderr = run_cli("compare", trained_cnn[0], "-o", out, *args, "--package", pkg, *FAST)
    assert code == 2 and "nothing to --package" in stderr and not pkg.exists()
    # the package's own gate (build's evaluate stage) applies to whatever row is packaged
    opts = CompareOptions(SourceSpec(str(trained_cnn[0]), data=str(outlier_calibration),
                                     eval_data="builtin:digits:test"), str(out), recipes=("ptq-int8",),
                          calibrations=("minmax",), bench_seconds=0)
    run = Run(opts, load_source(opts.source))
    rows = [run.row(*planned) for planned in run.planned()]  # from the cache of the runs above
    with pytest.raises(BudgetExceeded, match="points lost"):
        package_row(run, rows[1], rows, pkg, max_accuracy_drop=1.0)
    with pytest.raises(BudgetExceeded, match="SQNR"):   # build's per-output check too, whatever the drop budget
        package_row(run, rows[1], rows, pkg, max_accuracy_drop=100.0)
    assert not pkg.exists() and not list(tmp_path.glob(".p.edgec*"))


def test_compare_json_matches_its_schema(compared):
    import jsonschema
    from edgec.core.records import json_schema
    out, summary, _ = compared
    schema = json_schema("compare")
    jsonschema.validate(summary, schema)
    jsonschema.validate(json.loads((out / "compare.json").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):    # the check can fail
        jsonschema.validate({**summary, "recipes": [{"recipe": "x"}]}, schema)


def test_pareto_front():
    pts = [(10, 90, "a"), (5, 80, "b"), (12, 95, "c"), (11, 85, "d"), (5, 70, "e")]
    assert [p[2] for p in pareto_front(pts)] == ["b", "a", "c"]
