"""Output: the edgec.bench/1 JSON document, the table for people, and recording into a package manifest."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgec.core import __version__
from edgec.core.errors import OptionError
from edgec.core.package import MANIFEST_FILE
from edgec.runtime.gate import SCHEMA

_INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
                      "asimddp", "dotprod", "i8mm", "sve")


def host_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu in ("", platform.machine(), platform.processor()):
                cpu = value.strip()
            elif key in ("flags", "Features") and not flags:
                have = set(value.split())
                flags = [f for f in _INTERESTING_FLAGS if f in have]
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpu_flags": flags, "machine": platform.machine(),
            "os": platform.platform(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "edgec": __version__}


def document(results, config: dict, gate: dict | None = None) -> dict:
    return {"schema": SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": host_info(), "config": config,
            "results": [r.to_json() for r in results],
            "gate": gate}


def render_table(results, console) -> None:
    from rich.table import Table   # rich only for people; the JSON path and the Python API do not need it
    t = Table(title="edgec bench (ms; p50 CI is 95%, distribution-free)", title_justify="left")
    for col in ("model", "ep", "p50 [CI]", "p90", "p95", "p99", "mean", "min", "n", "items/s", "load", "first",
                "mem MB", "ratio"):
        t.add_column(col, justify="left" if col in ("model", "ep") else "right")
    for r in results:
        lat = r.latency
        ci = f" [{lat.p50_ci[0]:.2f}-{lat.p50_ci[1]:.2f}]" if lat.p50_ci else ""
        # a percentile with too few samples beyond it is left out, not printed as if it meant something
        pct = [f"{getattr(lat, k):.2f}" if lat.reliable[k] else "-" for k in ("p90", "p95", "p99")]
        ratio = ""
        if r.ratio and r is not results[0]:
            ci_r = f" [{r.ratio['ci'][0]:.2f}-{r.ratio['ci'][1]:.2f}]" if r.ratio.get("ci") else ""
            ratio = f"{r.ratio['median']:.2f}x{ci_r}"
        elif r.ratio:
            ratio = "1.00 (ref)"
        t.add_row(r.model, r.ep, f"{lat.p50:.2f}{ci}", *pct, f"{lat.mean:.2f}", f"{lat.min:.2f}", str(lat.n),
                  f"{r.throughput:.1f}", f"{r.load_ms:.0f}", f"{r.first_ms:.2f}",
                  "-" if r.memory_mb is None else f"{r.memory_mb:.0f}", ratio)
    console.print(t)
    if any(not all(r.latency.reliable.values()) for r in results):
        console.print("- too few runs to report this percentile (10 samples beyond it: p90 needs 100 runs, p95 200, "
                      "p99 1000; --runs)")
    if len(results) > 1:
        console.print("ratio: median of per-round latency ratios vs the first row (rounds are interleaved)")
    for r in results:
        g = r.graph
        if g and (g["quantized"] or g["fallback_nodes"]):
            int8, flt = sum(g["int8_kernels"].values()), sum(g["float_kernels"].values())
            console.print(f"{r.model} [{r.ep}]: {int8} INT8 kernels, {flt} float compute nodes, "
                          f"{g['qdq_nodes_left']} Q/DQ nodes left; {len(g['fallback_nodes'])} CPU fallback nodes")


def record(result) -> Path:
    """`bench --record`: the result into the package's manifest under latency.<ep>, in the typed record build
    writes (edgec.core.package.Latency), atomically. The manifest does not list itself, so the file hashes stay
    valid; a signature does not (the manifest changed): sign again after recording."""
    from edgec.core.package import Latency, record_latency
    if not result.path or not Path(result.path, MANIFEST_FILE).is_file():
        raise OptionError(f"--record needs a package folder with a {MANIFEST_FILE}; {result.path} is not one")
    latency = Latency.from_bench(result.to_json())
    latency.host = host_info()   # measured here (on the device), not on the machine that built the package
    return record_latency(result.path, result.ep, latency)


def print_json(doc: dict, stream=None) -> None:
    json.dump(doc, stream or sys.stdout, indent=2)
    (stream or sys.stdout).write("\n")
