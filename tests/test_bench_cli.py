"""`edgec bench` end to end through edgec.cli.main: exit codes, stdout/stderr discipline, JSON, gate, record."""
import json

import onnxruntime as ort
import pytest

from conftest import copy_package, run_cli

FAST = ["--runs", "30", "--warmup", "2", "--threads", "1"]


def test_json_stdout_is_only_the_document(tiny_onnx):
    code, out, err = run_cli("bench", tiny_onnx, *FAST, "--json")
    assert code == 0
    doc = json.loads(out)                                  # nothing but JSON on stdout
    assert doc["schema"] == "edgec.bench/1" and doc["gate"]["passed"] is True
    assert doc["results"][0]["latency_ms"]["n"] == 30 and doc["config"]["runs"] == "30"
    assert "[edgec]" in err                                # progress and warnings went to stderr


def test_table_for_people(tiny_onnx):
    code, out, err = run_cli("bench", tiny_onnx, *FAST)
    assert code == 0 and "tiny.onnx" in out and "p50 [CI]" in out


def test_budget_pass_and_breach_exit_7(tiny_onnx):
    assert run_cli("bench", tiny_onnx, *FAST, "--budget", "p90=10s", "--budget", "load=60s")[0] == 0
    code, out, err = run_cli("bench", tiny_onnx, *FAST, "--json", "--budget", "p90=1us", "--budget", "mean=60s")
    assert code == 7
    lines = [l for l in err.splitlines() if l.startswith("budget breached:")]
    assert len(lines) == 1 and lines[0].startswith("budget breached: p90 measured ") and "> budget 0.00 ms" in lines[0]
    assert err.rstrip().splitlines()[-1].startswith("edgec: error: 1 budget(s) breached")
    doc = json.loads(out)                                  # the data still reaches CI on a breach
    assert doc["gate"]["passed"] is False and doc["gate"]["breaches"][0]["metric"] == "p90"


def test_baseline_regression(tiny_onnx, tmp_path):
    code, out, _ = run_cli("bench", tiny_onnx, *FAST, "--json")
    base = tmp_path / "bench.json"
    base.write_text(out)
    assert run_cli("bench", tiny_onnx, *FAST, "--baseline", base, "--max-regression", "200%")[0] == 0
    doc = json.loads(out)
    doc["results"][0]["latency_ms"]["p50"] /= 50          # the last release was 50x faster
    base.write_text(json.dumps(doc))
    code, _, err = run_cli("bench", tiny_onnx, *FAST, "--baseline", base, "--max-regression", "10%")
    assert code == 7 and "budget breached: p50 regression measured" in err


def test_interleaved_comparison_shows_ratios(tiny_onnx, int8_onnx):
    code, out, _ = run_cli("bench", tiny_onnx, int8_onnx, *FAST, "--json")
    results = json.loads(out)["results"]
    assert [r["model"] for r in results] == ["tiny.onnx", "tiny.int8.onnx"]
    assert results[1]["ratio"]["vs"] == "tiny.onnx [cpu]" and results[1]["ratio"]["median"] > 0
    assert results[1]["graph"]["int8_kernels"]["QLinearConv"] == 1
    code, out, _ = run_cli("bench", tiny_onnx, int8_onnx, *FAST)
    assert "1.00 (ref)" in out and "x [" in out


def test_record_then_inspect_shows_int8_latency(built_package, tiny_onnx, tmp_path):
    """build -> bench --record -> inspect and report rendering still show the INT8 latency (it showed '-')."""
    from edgec.core.package import read_manifest
    from edgec.core.report import render_markdown
    pkg = copy_package(built_package[0], tmp_path / "cnn.edgec")
    code, _, err = run_cli("bench", pkg, *FAST, "--record")
    assert code == 0 and "recorded latency.cpu" in err
    manifest = read_manifest(pkg)
    assert manifest.latency["cpu"].n == 30 and not manifest.latency["cpu"].interleaved
    p50 = f"{manifest.latency['cpu'].p50_ms:.3f} ms"
    code, out, _ = run_cli("inspect", pkg)
    assert code == 0 and "latency p50 (cpu, alone)" in out and p50 in out
    row = next(line for line in render_markdown(manifest).splitlines() if line.startswith("| latency p50"))
    assert p50 in row and "| - |" not in row
    assert run_cli("verify", pkg)[0] == 0          # recording keeps every file hash valid
    assert run_cli("bench", tiny_onnx, *FAST, "--record")[0] == 2          # plain .onnx: nowhere to record


def test_list_providers():
    code, out, _ = run_cli("bench", "--list-providers")
    assert code == 0 and "CPUExecutionProvider" in out and "cuda" in out
    code, out, _ = run_cli("bench", "--list-providers", "--json")
    assert any(p["ort_name"] == "CPUExecutionProvider" and p["available"] for p in json.loads(out)["providers"])


@pytest.mark.parametrize("case, code, needle", [
    ("missing", 3, "model not found"),
    ("not-onnx", 3, "not an ONNX model"),
    ("shape", 4, "axis 2"),
    ("budget", 2, "malformed --budget"),
    ("budget-unit", 2, "missing unit"),
    ("runs", 2, "--runs"),
    ("no-model", 2, "no model given"),
    ("regression-alone", 2, "--max-regression needs --baseline"),
    ("bad-baseline", 2, "not an edgec.bench/1 document"),
])
def test_error_paths_are_one_line(tiny_onnx, tmp_path, case, code, needle):
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not protobuf")
    bad_base = tmp_path / "b.json"
    bad_base.write_text("{}")
    args = {"missing": [tmp_path / "nope.onnx"], "not-onnx": [junk],
            "shape": [tiny_onnx, "--shape", "x=1,3,32,32"], "budget": [tiny_onnx, "--budget", "p90"],
            "budget-unit": [tiny_onnx, "--budget", "p90=12"], "runs": [tiny_onnx, "--runs", "lots"],
            "no-model": [], "regression-alone": [tiny_onnx, "--max-regression", "5%"],
            "bad-baseline": [tiny_onnx, "--baseline", bad_base]}[case]
    got, out, err = run_cli("bench", *args)
    errors = [l for l in err.splitlines() if l.startswith("edgec: error:")]
    assert got == code and len(errors) == 1 and needle in errors[0] and "Traceback" not in err
    assert out == ""


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this box has CUDA")
def test_unavailable_cuda_is_exit_6_naming_the_fix(tiny_onnx):
    code, _, err = run_cli("bench", tiny_onnx, "--ep", "cuda")
    assert code == 6 and "CUDAExecutionProvider" in err
    # the CPU build is installed: the fix is to swap it, not to rerun the [gpu] install that cannot replace it
    assert "pip uninstall -y onnxruntime`, then `pip install onnxruntime-gpu`" in err
