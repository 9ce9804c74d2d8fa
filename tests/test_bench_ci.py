"""CI-native gate output: JUnit XML (one test case per model x provider x check, failures with figure, limit and CI),
markdown and $GITHUB_STEP_SUMMARY, the one-line confirmation of a passing gate, and run counts that make every
reported percentile reliable."""
import json
import xml.etree.ElementTree as ET

from conftest import run_cli

FAST = ["--runs", "40", "--warmup", "2", "--threads", "1"]


def test_junit_one_case_per_model_provider_check(tiny_onnx, int8_onnx, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    code, out, _ = run_cli("bench", tiny_onnx, *FAST, "--json")
    base = tmp_path / "base.json"
    base.write_text(out)
    junit = tmp_path / "reports" / "bench.xml"
    code, out, err = run_cli("bench", tiny_onnx, int8_onnx, *FAST, "--budget", "p50=10s", "--budget", "p90=1us",
                         "--baseline", base, "--max-regression", "1000%", "--junit", junit)
    assert code == 7
    root = ET.parse(junit).getroot()                      # well-formed XML, the layout GitLab/Jenkins/GitHub read
    assert root.tag == "testsuites" and root.get("tests") == "6" and root.get("failures") == "2"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") and suite.get("errors") == "0" and float(suite.get("time")) > 0
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("tiny.onnx [cpu]", "budget p50=10s"), ("tiny.onnx [cpu]", "budget p90=1us"),
        ("tiny.int8.onnx [cpu]", "budget p50=10s"), ("tiny.int8.onnx [cpu]", "budget p90=1us"),
        ("tiny.onnx [cpu]", "regression p50 +1000% vs baseline"),
        ("tiny.int8.onnx [cpu]", "regression p50 +1000% vs baseline")]  # the baseline's only cpu result
    failed = {c.get("classname"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"tiny.onnx [cpu]", "tiny.int8.onnx [cpu]"}
    msg = failed["tiny.onnx [cpu]"].get("message")
    assert msg.startswith("p90 ") and "> budget 0.001 ms" in msg and "(95% CI " in msg   # figure, limit, CI
    assert all(c.find("failure") is None for c in cases if c.get("name").startswith(("budget p50", "regression")))
    assert not [line for line in err.splitlines() if line.startswith("gate passed")]


def test_junit_without_checks_lists_each_measurement(tiny_onnx, tmp_path):
    junit = tmp_path / "bench.xml"
    junit.write_text("an earlier run's report")           # a CI rerun replaces its own report
    assert run_cli("bench", tiny_onnx, *FAST, "--junit", junit)[0] == 0
    (case,) = ET.parse(junit).getroot().iter("testcase")
    assert case.get("name") == "latency measured" and case.find("failure") is None
    assert "p50 " in case.find("system-out").text


def test_markdown_and_github_step_summary(tiny_onnx, tmp_path, monkeypatch):
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    md = tmp_path / "bench.md"
    code, out, err = run_cli("bench", tiny_onnx, *FAST, "--budget", "p50=10s", "--markdown", md, "--json")
    assert code == 0 and json.loads(out)["gate"]["passed"]          # stdout is still only JSON
    text = md.read_text()
    assert text.startswith("### edgec bench: gate passed") and "| tiny.onnx | cpu | budget p50=10s |" in text
    assert "| pass |" in text and "p99 needs 1000" in text          # 40 runs: p90, p95, p99 left out, said why
    assert summary.read_text() == "earlier step\n" + text           # appended, never replacing other steps
    passed = [line for line in err.splitlines() if line.startswith("gate passed")]
    assert len(passed) == 1 and "1 check(s)" in passed[0] and "<= budget 10000.000 ms" in passed[0]


def test_default_runs_make_reported_and_gated_percentiles_reliable(tiny_onnx):
    code, out, err = run_cli("bench", tiny_onnx, "--warmup", "2", "--threads", "1", "--json")
    r = json.loads(out)["results"][0]
    assert code == 0 and r["latency_ms"]["n"] == 200
    assert r["reliable"] == {"p50": True, "p90": True, "p95": True, "p99": False}
    assert "too few" not in err                            # p99 is not reported (table: '-'), so nothing to warn
    code, out, err = run_cli("bench", tiny_onnx, "--warmup", "2", "--threads", "1", "--json", "--budget", "p99=10s")
    doc = json.loads(out)
    assert code == 0 and doc["config"]["runs"] == "1000" and doc["results"][0]["reliable"]["p99"]
    code, out, _ = run_cli("bench", tiny_onnx, "--warmup", "2", "--threads", "1")
    cells = [c.strip() for c in next(line for line in out.splitlines() if "tiny.onnx" in line).split("│")]
    assert cells[4] != "-" and cells[5] != "-" and cells[6] == "-"   # p90, p95 shown; p99 from 200 runs left out
