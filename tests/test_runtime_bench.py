"""edgec.runtime on real ONNX Runtime sessions: the Python API, shapes, graph inspection, the gate, recording."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from edgec.core.errors import DataError, ModelError, OptionError, ProviderError
from edgec.runtime import (SCHEMA, benchmark, check_budgets, check_regression, document, parse_amount, parse_budget,
                           record)
from edgec.runtime.providers import resolve
from conftest import copy_package
from test_runtime_fixtures import with_dynamic_spatial_axes

FAST = dict(warmup="2", runs="30", threads=1)


def test_benchmark_result_fields_and_json(tiny_onnx):
    (r,) = benchmark([tiny_onnx], **FAST)
    assert r.ep == "cpu" and r.providers == ["CPUExecutionProvider"]
    assert r.latency.n == 30 and len(r.samples_ms) == 30
    assert r.latency.min <= r.latency.p50 <= r.latency.p90 <= r.latency.max
    assert r.load_ms > 0 and r.first_ms > 0 and r.throughput > 0
    assert r.inputs == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    j = r.to_json()
    assert set(j) >= {"model", "path", "ep", "providers", "inputs", "batch", "threads", "load_ms", "first_ms",
                      "memory_mb", "latency_ms", "reliable", "throughput_ips", "graph", "ratio", "warnings"}
    assert set(j["latency_ms"]) == {"n", "min", "mean", "std", "p50", "p90", "p95", "p99", "max", "p50_ci",
                                    "ci_level"}
    assert j["graph"]["float_kernels"] == {"Conv": 1, "Gemm": 1} and j["graph"]["quantized"] is False
    doc = json.loads(json.dumps(document([r], {"runs": "30"})))
    assert doc["schema"] == SCHEMA and set(doc) == {"schema", "created", "host", "config", "results", "gate"}
    assert doc["host"]["onnxruntime"] == ort.__version__


def test_interleaved_models_get_paired_ratios(tiny_onnx, int8_onnx):
    results = benchmark([tiny_onnx, int8_onnx], **FAST)
    assert [r.model for r in results] == ["tiny.onnx", "tiny.int8.onnx"]
    assert all(r.latency.n == 30 for r in results)          # same rounds for each: pairs line up
    assert results[0].ratio["median"] == pytest.approx(1.0)
    assert results[1].ratio["vs"] == "tiny.onnx [cpu]" and results[1].ratio["n"] == 30
    s0, s1 = results[0].samples_ms, results[1].samples_ms
    assert results[1].ratio["median"] == pytest.approx(np.median(np.divide(s1, s0)))
    # idle sessions must not busy-wait while another is timed; a lone model keeps ORT's default
    assert [r.to_json()["intra_op_spinning"] for r in results] == [False, False]
    assert benchmark([tiny_onnx], **FAST)[0].to_json()["intra_op_spinning"] is True


def test_int8_model_really_runs_int8_kernels(int8_onnx):
    (r,) = benchmark([int8_onnx], **FAST)
    g = r.graph
    assert g["quantized"] and g["int8_kernels"].get("QLinearConv") == 1
    assert "Conv" not in g["float_kernels"]                 # the QDQ pair around the conv was fused


def test_batch_and_time_budget(tiny_onnx):
    (r,) = benchmark([tiny_onnx], warmup="0.05s", runs="0.2s", batch=4, threads=1, inspect=False)
    assert r.batch == 4 and r.inputs[0]["shape"] == [4, 3, 16, 16] and r.latency.n >= 1 and r.graph is None


def test_dynamic_dims_from_shape_option_or_manifest(dynamic_hw_onnx, tmp_path):
    with pytest.raises(DataError, match=r"dynamic dimension 'H'.*--shape x=1,3,H,W with the sizes it runs at "
                                        r"for H, W"):
        benchmark([dynamic_hw_onnx], **FAST)
    (r,) = benchmark([dynamic_hw_onnx], shapes=["x=2,3,8,8"], inspect=False, **FAST)
    assert r.inputs[0]["shape"] == [2, 3, 8, 8] and r.batch == 2



def test_package_input_shape_drives_dynamic_axes(built_package, tmp_path):
    """The shape the builder recorded (manifest inputs[].example) fills axes the model leaves dynamic."""
    pkg = copy_package(built_package[0], tmp_path / "dyn.edgec")
    with_dynamic_spatial_axes(pkg / "model.onnx")
    with pytest.raises(DataError, match="dynamic dimension 'height'"):   # the bare model cannot say
        benchmark([pkg / "model.onnx"], inspect=False, **FAST)
    (r,) = benchmark([pkg], inspect=False, **FAST)
    assert r.model == "dyn.edgec" and r.inputs[0]["shape"] == [1, 3, 32, 32]
    from conftest import run_cli
    code, stdout, stderr = run_cli("bench", pkg, "--runs", "5", "--warmup", "1", "--json", "--no-inspect")
    assert code == 0, stderr                                               # `edgec bench PKG`, no --shape
    assert json.loads(stdout)["results"][0]["inputs"][0]["shape"] == [1, 3, 32, 32]


def test_error_paths(tiny_onnx, tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        benchmark([tmp_path / "missing.onnx"], **FAST)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(ModelError, match="not an ONNX model"):
        benchmark([junk], **FAST)
    (tmp_path / "empty.edgec").mkdir()
    with pytest.raises(ModelError, match="without model.onnx"):
        benchmark([tmp_path / "empty.edgec"], **FAST)
    with pytest.raises(DataError, match="axis 2"):
        benchmark([tiny_onnx], shapes={"x": [1, 3, 32, 32]}, **FAST)
    with pytest.raises(OptionError, match="does not have"):
        benchmark([tiny_onnx], shapes={"image": [1, 3, 16, 16]}, **FAST)
    with pytest.raises(OptionError):
        benchmark([tiny_onnx], warmup="2", runs="fast", threads=1)
    with pytest.raises(ProviderError, match="unknown execution provider 'npu'"):
        resolve("npu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this box has CUDA")
def test_cuda_missing_names_the_fix():
    # the CPU build is installed: swap it for onnxruntime-gpu (rerunning the [gpu] install would not replace it)
    with pytest.raises(ProviderError, match=r"pip uninstall -y onnxruntime`, then `pip install onnxruntime-gpu"):
        resolve("cuda")
    assert resolve("auto")[0] == "cpu"


def test_parse_amount_and_budget():
    assert parse_amount("200").count == 200 and parse_amount("10s").seconds == 10
    assert parse_amount("500ms").seconds == pytest.approx(0.5)
    b = parse_budget("p90=12ms")
    assert (b.metric, b.limit) == ("p90", 12.0)
    assert parse_budget("load=0.3s").limit == pytest.approx(300)
    assert parse_budget("memory=1GB").limit == pytest.approx(1000)
    assert parse_budget("memory=1MiB").limit == pytest.approx(1.048576)
    for bad in ("p90", "p90=12", "p90=12kg", "p42=1ms", "p90=fast", "=12ms"):
        with pytest.raises(OptionError):
            parse_budget(bad)


def test_budgets_pass_and_breach(tiny_onnx):
    (r,) = benchmark([tiny_onnx], inspect=False, **FAST)
    ok, _ = check_budgets([r], [parse_budget("p90=10s"), parse_budget("load=60s"), parse_budget("memory=100GB")])
    assert ok == []
    bad, warnings = check_budgets([r], [parse_budget("p90=1us"), parse_budget("p99=1000s")])
    assert [(b.metric, b.kind) for b in bad] == [("p90", "budget")]
    assert bad[0].measured == r.latency.p90 and bad[0].limit == pytest.approx(1e-3)
    assert bad[0].line(False).startswith(f"budget breached: p90 measured {r.latency.p90:.2f} ms > budget 0.00 ms")
    assert any("p99" in w and "too few" in w for w in warnings)


def test_baseline_regression_with_confidence(tiny_onnx):
    (r,) = benchmark([tiny_onnx], inspect=False, **FAST)
    base = r.to_json()
    same, _ = check_regression([r], [base], 0.10)
    assert same == []                                       # a run never regresses against itself
    base_fast = json.loads(json.dumps(base))
    base_fast["latency_ms"]["p50"] = r.latency.p50_ci[0] / 10   # "last release was 10x faster"
    (b,), _ = check_regression([r], [base_fast], 0.10)
    assert b.kind == "regression" and b.metric == "p50" and b.limit == pytest.approx(base_fast["latency_ms"]["p50"] * 1.1)
    other_ep = dict(base, ep="cuda")
    none, warnings = check_regression([r], [other_ep], 0.10)
    assert none == [] and any("no baseline" in w for w in warnings)


def test_record_into_package_manifest(built_package, tiny_onnx, tmp_path):
    pkg = copy_package(built_package[0], tmp_path / "cnn.edgec")
    before = json.loads((pkg / "manifest.json").read_text())
    (r,) = benchmark([pkg], inspect=False, **FAST)
    record(r)
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["files"] == before["files"] and m["metrics"] == before["metrics"]     # only latency.cpu changed
    assert {k: v for k, v in m.items() if k != "latency"} == {k: v for k, v in before.items() if k != "latency"}
    cpu = m["latency"]["cpu"]
    assert cpu["p50_ms"] == r.latency.p50 and cpu["n"] == 30 and not cpu["interleaved"] and cpu["host"]["cpu"]
    assert set(cpu) == set(before["latency"]["cpu"])        # the very record build writes, not another shape
    assert {p.name for p in pkg.iterdir()} == {*before["files"], "manifest.json"}      # no temp file left
    (plain,) = benchmark([tiny_onnx], inspect=False, **FAST)
    with pytest.raises(OptionError, match="--record"):
        record(plain)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="no CUDAExecutionProvider in this onnxruntime (the gpu extra, onnxruntime-gpu, on a CUDA box)")
def test_cuda_io_binding_and_fallback_report(tiny_onnx, int8_onnx):
    results = benchmark([tiny_onnx, int8_onnx], ["cpu", "cuda"], warmup="3", runs="30")
    cuda = [r for r in results if r.ep == "cuda"]
    assert all(r.providers[0] == "CUDAExecutionProvider" for r in cuda)
    assert all(isinstance(r.graph["fallback_nodes"], list) for r in cuda)
    (copies,) = benchmark([tiny_onnx], ["cuda"], warmup="3", runs="30", include_copies=True, inspect=False)
    assert copies.latency.n == 30


def test_same_file_names_in_different_folders_stay_apart(tiny_onnx, tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    results = benchmark([tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"], inspect=False, **FAST)
    assert results[0].model != results[1].model and results[1].ratio["vs"].startswith(results[0].model)
