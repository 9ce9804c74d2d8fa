"""Gate results in the formats CI systems read: JUnit XML (GitLab, Jenkins and GitHub test reporters show one test
case per model, provider and check) and a markdown summary (a pull request's job summary, $GITHUB_STEP_SUMMARY)."""
from __future__ import annotations

import os
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from edgec.core.fsutil import atomic_path
from edgec.runtime.stats import PERCENTILES, min_samples

SUITE = "edgec bench"


def _where(r) -> str:
    return f"{r.model} [{r.ep}]"


def _summary(r) -> str:
    lat = r.latency
    shown = [f"p{q} {getattr(lat, f'p{q}'):.3f} ms" for q in PERCENTILES if lat.reliable[f"p{q}"]]
    ci = f" (95% CI {lat.p50_ci[0]:.3f}-{lat.p50_ci[1]:.3f})" if lat.p50_ci else ""
    return f"{', '.join(shown) or 'no reliable percentile'}{ci}; n={lat.n}, load {r.load_ms:.0f} ms, on {r.ep}"


def junit_xml(results, checks, seconds: float, created: str) -> bytes:
    """One <testcase> per (model, ep, check); a breached check carries a <failure> with the measured figure, the
    limit and the CI. A result with no check is one passing test case, so every measurement appears in the report."""
    failures = sum(not c.passed for c in checks)
    by_result = {(r.model, r.ep): r for r in results}
    cases = [(by_result.get((c.model, c.ep)), c) for c in checks]
    checked = {(c.model, c.ep) for c in checks}
    cases += [(r, None) for r in results if (r.model, r.ep) not in checked]
    root = ET.Element("testsuites", name=SUITE, tests=str(len(cases)), failures=str(failures), errors="0",
                      time=f"{seconds:.3f}")
    suite = ET.SubElement(root, "testsuite", name=SUITE, tests=str(len(cases)), failures=str(failures), errors="0",
                          skipped="0", time=f"{seconds:.3f}", timestamp=created, hostname=socket.gethostname())
    for r, check in cases:
        classname = _where(r) if r is not None else f"{check.model} [{check.ep}]"
        name = check.name if check else "latency measured"
        case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
        if check is not None and not check.passed:
            message = f"{check.metric} {check.figure()}"
            failure = ET.SubElement(case, "failure", message=message, type=f"edgec.{check.kind}")
            failure.text = check.line(True) + (f"\n{_summary(r)}" if r is not None else "")
        if r is not None:
            ET.SubElement(case, "system-out").text = _summary(r) + (f"\n{check.name}: {check.figure()}" if check else "")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def markdown(results, checks, passed: bool) -> str:
    """The pull-request view: the gate's verdict, each check, and the latency table."""
    lines = [f"### edgec bench: {'gate passed' if passed else 'gate FAILED'}" if checks else "### edgec bench", ""]
    if checks:
        lines += ["| model | ep | check | measured | limit | 95% CI | result |", "|---|---|---|---|---|---|---|"]
        for c in checks:
            ci = f"{c.ci[0]:.3f}-{c.ci[1]:.3f}" if c.ci else "-"
            lines.append(f"| {c.model} | {c.ep} | {c.name} | {c.measured:.3f} {c.unit} | {c.limit:.3f} {c.unit} | "
                         f"{ci} | {'pass' if c.passed else '**FAIL**'} |")
        lines.append("")
    cols = ["p50 [95% CI]"] + [f"p{q}" for q in PERCENTILES[1:]]
    lines += ["| model | ep | " + " | ".join(cols) + " | mean | n | load | ratio |", "|---" * (len(cols) + 6) + "|"]
    hidden = False
    for r in results:
        lat = r.latency
        p50 = f"{lat.p50:.3f}" + (f" [{lat.p50_ci[0]:.3f}-{lat.p50_ci[1]:.3f}]" if lat.p50_ci else "")
        cells = []
        for q in PERCENTILES[1:]:
            ok = lat.reliable[f"p{q}"]
            hidden |= not ok
            cells.append(f"{getattr(lat, f'p{q}'):.3f}" if ok else "-")
        ratio = f"{r.ratio['median']:.2f}x" if r.ratio and r is not results[0] else ""
        lines.append(f"| {r.model} | {r.ep} | {p50} | " + " | ".join(cells) +
                     f" | {lat.mean:.3f} | {lat.n} | {r.load_ms:.0f} | {ratio} |")
    lines.append("")
    lines.append("All times in ms." + (f" `-`: too few runs to report (p99 needs {min_samples(99)})." if hidden else ""))
    return "\n".join(lines) + "\n"


def write_report(path, data: bytes | str) -> Path:
    """Write atomically; a CI rerun replaces its own earlier report (like pytest's --junitxml)."""
    with atomic_path(path, force=True) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def append_step_summary(text: str) -> Path | None:
    """Append to GitHub Actions' job summary when running there ($GITHUB_STEP_SUMMARY is set)."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    with open(target, "a", encoding="utf-8") as f:
        f.write(text)
    return Path(target)
