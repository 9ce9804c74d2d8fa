"""One latency figure per package and provider means one thing: build and inspect report each model measured alone,
the way `edgec bench PKG` (the gate) measures it, labelled so; the FP32/INT8 ratio from interleaved rounds is kept
in the bench stage's record."""
import json

from conftest import run_cli


def test_build_records_the_figure_the_gate_measures(built_package):
    m = json.loads((built_package[0] / "manifest.json").read_text())
    int8, fp32 = m["latency"]["cpu"], m["metrics"]["fp32"]["latency"]["cpu"]
    for lat in (int8, fp32):   # alone, with ORT's spinning, like `edgec bench PKG`
        assert lat["intra_op_spinning"] is True and lat["interleaved"] is False
    (bench,) = [s for s in m["stages"] if s["name"] == "bench"]
    paired = bench["metrics"]["cpu"]["fp32_over_int8_interleaved"]
    assert paired["vs"] == "model.onnx [cpu]" and paired["median"] > 0 and paired["n"] > 10
    code, out, _ = run_cli("bench", built_package[0], "--runs", "30", "--warmup", "2", "--json")
    (gate,) = json.loads(out)["results"]
    assert code == 0 and gate["intra_op_spinning"] is True and gate["ratio"] is None and gate["threads"] == int8["threads"]


def test_inspect_labels_each_figure(built_package):
    code, out, err = run_cli("inspect", built_package[0])
    assert code == 0, err
    row = next(line for line in out.splitlines() if "latency p50" in line)
    assert "(cpu, alone)" in row and ("x faster" in row or "x slower" in row) and "interleaved" not in row


def test_an_int8_model_slower_than_fp32_is_said_so(built_package, tmp_path):
    """The ratio row never reads "0.80x faster", and a clearly slower INT8 model gets a note naming the FP32 file."""
    import shutil
    from edgec.core.package import read_manifest
    from edgec.core.report import render_markdown
    pkg = tmp_path / "slow.edgec"
    shutil.copytree(built_package[0], pkg)
    m = json.loads((pkg / "manifest.json").read_text())
    m["latency"]["cpu"]["p50_ms"] = 1.25 * m["metrics"]["fp32"]["latency"]["cpu"]["p50_ms"]
    (pkg / "manifest.json").write_text(json.dumps(m))
    code, out, err = run_cli("inspect", pkg)
    assert code == 0, err
    row = next(line for line in out.splitlines() if "latency p50" in line)
    assert "1.25x slower" in row and "faster" not in row
    assert "note: INT8 ran 1.25x slower than FP32 on cpu" in out and "model.fp32.onnx" in out
    assert "INT8 ran 1.25x slower" in render_markdown(read_manifest(pkg))
    code, out, _ = run_cli("inspect", built_package[0])
    ratio = m["metrics"]["fp32"]["latency"]["cpu"]["p50_ms"] / json.loads(
        (built_package[0] / "manifest.json").read_text())["latency"]["cpu"]["p50_ms"]
    assert ("note: INT8 ran" in out) == (ratio < 0.95)
