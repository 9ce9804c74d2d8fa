"""One latency figure per package and provider means one thing: build and inspect report each model measured alone,
the way `edgec bench PKG` (the gate) measures it, and the FP32/INT8 speed-up from interleaved rounds; each labelled."""
import json

from conftest import run_cli


def test_build_records_the_figure_the_gate_measures(built_package):
    m = json.loads((built_package / "manifest.json").read_text())
    int8, fp32 = m["latency"]["cpu"], m["metrics"]["fp32"]["latency"]["cpu"]
    assert int8["intra_op_spinning"] is True and fp32["intra_op_spinning"] is True      # alone, like the gate
    assert int8["ratio"] is None and fp32["ratio"]["interleaved"] is True and fp32["ratio"]["median"] > 0
    assert fp32["ratio"]["vs"] == "model.onnx [cpu]"                                     # FP32 time / INT8 time
    code, out, _ = run_cli("bench", built_package, "--runs", "30", "--warmup", "2", "--json")
    (gate,) = json.loads(out)["results"]
    assert code == 0 and gate["intra_op_spinning"] is int8["intra_op_spinning"] and gate["threads"] == int8["threads"]


def test_inspect_labels_each_figure(built_package):
    code, out, err = run_cli("inspect", built_package)
    assert code == 0, err
    row = next(line for line in out.splitlines() if "latency p50" in line)
    assert "(cpu, alone)" in row and "x faster (interleaved)" in row
