"""The measurement: load each (model, provider), time the first inference, warm up, then time runs interleaved
across all of them (A B B A A B ...: the order flips each round so neither model always runs right after the
other), until a run count or a time budget is reached."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnxruntime as ort

from edgec.core.errors import DataError, OptionError, ort_cause
from edgec.runtime import providers as eps
from edgec.runtime.session import LoadedModel, ModelFile, load, open_model
from edgec.runtime.stats import Summary, paired_ratio, summarize

ProgressFn = Callable[[str, float], None]   # (phase label, fraction done 0..1)


@dataclass(frozen=True)
class Amount:
    """How long a phase lasts: a run count, or seconds (per model)."""
    count: int | None = None
    seconds: float | None = None

    def __str__(self):
        return f"{self.count}" if self.count is not None else f"{self.seconds:g}s"

    def to_json(self) -> dict:
        return {"count": self.count} if self.count is not None else {"seconds": self.seconds}


def parse_amount(text, option: str = "--runs") -> Amount:
    """'200' -> 200 runs; '10s', '500ms', '1.5min' -> a time budget."""
    if isinstance(text, Amount):
        return text
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min)?", s)
    if not m:
        raise OptionError(f"{option} {text!r} is neither a run count (200) nor a duration (10s, 500ms)")
    value, unit = float(m.group(1)), m.group(2)
    if unit is None:
        if value != int(value) or value < 0:
            raise OptionError(f"{option} {text!r}: a run count must be a whole number")
        return Amount(count=int(value))
    seconds = value * {"ms": 1e-3, "s": 1, "sec": 1, "min": 60}[unit]
    if seconds <= 0:
        raise OptionError(f"{option} {text!r}: a duration must be positive")
    return Amount(seconds=seconds)


@dataclass
class BenchResult:
    """One (model, execution provider) measurement. `to_json()` is the `results[]` entry of edgec.bench/1."""
    model: str
    path: str
    ep: str
    providers: list[str]
    inputs: list[dict]
    batch: int
    threads: int | None
    spinning: bool                                # ORT intra-op spin-waiting (off when several sessions interleave)
    load_ms: float
    first_ms: float
    memory_mb: float | None
    latency: Summary
    graph: dict | None = None
    ratio: dict | None = None                     # vs results[0], from paired interleaved rounds
    warnings: list[str] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list, repr=False)   # kept in memory, not in JSON

    @property
    def throughput(self) -> float:
        """items/s at this batch, from the mean latency (what a stream of back-to-back requests sees)."""
        return self.batch * 1e3 / self.latency.mean if self.latency.mean > 0 else math.inf

    def metric(self, name: str) -> float | None:
        """Value of a gate metric: p50 p90 p95 p99 mean min max (ms), load, first (ms), memory (MB)."""
        if name in ("load", "first"):
            return getattr(self, f"{name}_ms")
        if name == "memory":
            return self.memory_mb
        return getattr(self.latency, name)

    def to_json(self) -> dict:
        lat = self.latency.to_json()
        return {
            "model": self.model, "path": self.path, "ep": self.ep, "providers": self.providers,
            "inputs": self.inputs, "batch": self.batch, "threads": self.threads,
            "intra_op_spinning": self.spinning,
            "load_ms": self.load_ms, "first_ms": self.first_ms, "memory_mb": self.memory_mb,
            "latency_ms": {k: lat[k] for k in ("n", "min", "mean", "std", "p50", "p90", "p95", "p99", "max",
                                               "p50_ci", "ci_level")},
            "reliable": lat["reliable"],
            "throughput_ips": self.throughput,
            "graph": self.graph, "ratio": self.ratio,
            "warnings": self.warnings + lat["warnings"],
        }


# ---- peak memory -------------------------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so a peak can be measured per model."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakMemory:
    """Peak host RSS growth (MB, 10^6 bytes) over a block: what loading and running a model adds to the process.
    None where /proc cannot be reset (non-Linux): a process-wide peak would blame earlier models."""

    def __enter__(self):
        self.ok = _reset_peak_rss()
        self.before = _proc_status_kb("VmRSS") if self.ok else None
        return self

    def __exit__(self, *exc):
        peak = _proc_status_kb("VmHWM") if self.before is not None else None
        self.mb = max(0.0, (peak - self.before) * 1024 / 1e6) if peak is not None else None
        return False


# ---- one runner per (model, ep) ----------------------------------------------------------------------------------
class Runner:
    """Holds a session and the callable that is timed. On a GPU provider the inputs are bound on the device once
    (IO binding) and each run synchronises the device, so the time is the inference, not host<->device copies;
    include_copies=True times a plain session.run with host arrays instead (copies in and out included)."""

    def __init__(self, loaded: LoadedModel, include_copies: bool = False):
        self.loaded = loaded
        sess, feed = loaded.session, loaded.feed
        self._keep = None
        if loaded.ep in eps.GPU_EPS and not include_copies:
            binding = sess.io_binding()
            self._keep = [ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0) for arr in feed.values()]
            for name, value in zip(feed, self._keep):
                binding.bind_ortvalue_input(name, value)
            for out in sess.get_outputs():
                binding.bind_output(out.name, "cuda")

            def run_once():
                binding.synchronize_inputs()
                sess.run_with_iobinding(binding)
                binding.synchronize_outputs()
        else:
            run, names = sess.run, None   # names=None: all outputs, no per-call list building

            def run_once():
                run(names, feed)
        self.run_once = run_once

    def time_once(self) -> float:
        t0 = time.perf_counter()
        try:
            self.run_once()
        except Exception as e:
            raise DataError(f"{self.loaded.model.label} failed to run on {self.loaded.ep} with inputs "
                            f"{ {k: list(v.shape) for k, v in self.loaded.feed.items()} }: {ort_cause(e)}") from None
        return time.perf_counter() - t0

    def warm_up(self, amount: Amount) -> int:
        if amount.count is not None:
            for _ in range(amount.count):
                self.run_once()
            return amount.count
        n, end = 0, time.perf_counter() + amount.seconds
        while time.perf_counter() < end:
            self.run_once()
            n += 1
        return n


def measure(runners: list[Runner], runs: Amount, progress: ProgressFn | None = None) -> list[list[float]]:
    """Interleaved timed runs; returns seconds per run, per runner. A time budget is per runner. The loop does
    nothing between the two clock reads but the call; bookkeeping happens outside them."""
    samples: list[list[float]] = [[] for _ in runners]
    calls = [(r.run_once, samples[i].append) for i, r in enumerate(runners)]
    forward, backward = calls, calls[::-1]
    clock = time.perf_counter
    start = clock()
    rounds = runs.count if runs.count is not None else math.inf
    deadline = start + runs.seconds * len(runners) if runs.seconds is not None else math.inf
    next_report, done = start + 0.5, 0
    while done < rounds:
        for run, keep in (forward if done % 2 == 0 else backward):
            t0 = clock()
            run()
            t1 = clock()
            keep(t1 - t0)
        done += 1
        if t1 >= next_report:
            next_report = t1 + 0.5
            if progress:
                frac = done / rounds if runs.count is not None else (t1 - start) / (deadline - start)
                progress("measuring", min(1.0, frac))
        if t1 >= deadline:
            break
    return samples


# ---- graph inspection (profiling) --------------------------------------------------------------------------------
INT8_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul", "QLinearConcat",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def inspect_graph(model: ModelFile, ep: str, threads: int | None, shapes, batch, runs: int = 2) -> dict:
    """Which kernels really run, from ORT's profiler: every executed node of the optimised graph with its op and
    provider. A separate session, so profiling never slows the timed one. Reports nodes that fell back to the CPU
    under a GPU provider, and for a quantized model how many compute nodes run INT8 kernels vs float (QDQ pairs
    that ORT could not fuse leave QuantizeLinear/DequantizeLinear nodes and float Conv/MatMul behind)."""
    with tempfile.TemporaryDirectory(prefix="edgec-profile-") as tmp:
        loaded = load(model, ep, threads, shapes, batch, profile_prefix=os.path.join(tmp, "p"))
        runner = Runner(loaded)
        for _ in range(runs):
            runner.time_once()
        trace = Path(loaded.session.end_profiling())
        events = json.loads(trace.read_text())
    nodes: dict[str, tuple[str, str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and "op_name" in args:
            nodes[ev["name"][: -len("_kernel_time")]] = (args["op_name"], args.get("provider", "?"))
    by_provider: dict[str, int] = {}
    int8: dict[str, int] = {}
    flt: dict[str, int] = {}
    qdq = boundary = 0
    expected = _boundary_qdq(model.onnx_path)
    for name, (op, prov) in nodes.items():
        by_provider[prov] = by_provider.get(prov, 0) + 1
        if op in INT8_OPS:
            int8[op] = int8.get(op, 0) + 1
        elif op in FLOAT_COMPUTE_OPS:
            flt[op] = flt.get(op, 0) + 1
        elif op in QDQ_OPS:
            qdq += 1
            boundary += name in expected
    fallback = []
    if ep in eps.GPU_EPS:
        fallback = sorted(f"{op}:{name}" for name, (op, prov) in nodes.items() if prov == "CPUExecutionProvider")
    return {"nodes": len(nodes), "by_provider": by_provider, "fallback_nodes": fallback,
            "int8_kernels": int8, "float_kernels": flt, "qdq_nodes_left": qdq, "qdq_boundary_nodes": boundary,
            "quantized": bool(int8 or qdq)}


def _boundary_qdq(path) -> set[str]:
    """The Q of a float input and the DQ of a float output: a QDQ model needs them, they are not a fusion miss."""
    from edgec.runtime.onnxgraph import boundary_qdq, read_graph
    try:
        return boundary_qdq(read_graph(path))
    except (OSError, ValueError, IndexError):   # unreadable here: count every Q/DQ left as a miss, as before
        return set()


def graph_warnings(label: str, ep: str, graph: dict) -> list[str]:
    out = []
    if graph["fallback_nodes"]:
        out.append(f"{label}: {len(graph['fallback_nodes'])} of {graph['nodes']} nodes fell back to the CPU under "
                   f"{ep} (e.g. {', '.join(graph['fallback_nodes'][:3])}); the GPU time includes those and copies")
    inside = graph["qdq_nodes_left"] - graph.get("qdq_boundary_nodes", 0)   # the input's Q, output's DQ are expected
    if graph["quantized"] and (graph["float_kernels"] or inside):
        out.append(f"{label}: quantized model on {ep} still runs {sum(graph['float_kernels'].values())} float compute "
                   f"nodes and {inside} Q/DQ nodes inside the graph next to {sum(graph['int8_kernels'].values())} "
                   f"INT8 kernels: some QDQ pairs were not fused")
    return out


# ---- the public entry point --------------------------------------------------------------------------------------
def benchmark(models, providers=("cpu",), *, threads: int | None = None, batch: int | None = None,
              shapes: dict[str, list[int]] | list[str] | None = None, warmup="10", runs="200", include_copies: bool = False,
              inspect: bool = True, progress: ProgressFn | None = None) -> list[BenchResult]:
    """Benchmark every model on every provider, interleaved. `models`: .onnx paths or NAME.edgec folders;
    `providers`: short names (cpu, cuda, tensorrt, auto); `shapes`: {input: dims} or
    ['input=1,3,224,224', ...]; `warmup`/`runs`: a count ('200') or a duration per model
    ('10s'). Returns one BenchResult per (model, provider), in order models x providers; results[0] is the reference
    of every `ratio`. Raises ModelError, DataError, OptionError, ProviderError (edgec.core.errors)."""
    warm, timed = parse_amount(warmup, "--warmup"), parse_amount(runs, "--runs")
    if timed.count == 0:
        raise OptionError("--runs 0 measures nothing; give at least 1 run or a duration like 10s")
    files = [open_model(m) for m in models]
    paths_by_label: dict[str, set] = {}
    for f in files:
        paths_by_label.setdefault(f.label, set()).add(str(f.onnx_path))
    for f in files:   # a/model.onnx and b/model.onnx must stay apart in tables, ratios and baselines
        if len(paths_by_label[f.label]) > 1:
            f.label = str(f.package or f.onnx_path)
    names = [eps.resolve(p)[0] for p in providers]            # fail on a missing provider before loading anything
    names = list(dict.fromkeys(names))                        # 'auto' may repeat an explicit one
    runners, facts = [], []
    pairs = [(f, ep) for f in files for ep in names]
    # Interleaved sessions each own a thread pool; ORT's pools busy-wait after a run, so with spinning on, the idle
    # ones steal cores from the one being timed (measured on 2 cores, MobileNetV2: FP32 5.4 -> 9.5 ms). A lone
    # model keeps ORT's default.
    spinning = len(pairs) == 1
    for i, (f, ep) in enumerate(pairs):
        if progress:
            progress(f"loading {f.label} [{ep}]", i / len(pairs))
        with _PeakMemory() as mem:
            loaded = load(f, ep, threads, shapes, batch, spinning=spinning)
            runner = Runner(loaded, include_copies)
            first_ms = runner.time_once() * 1e3
            runner.warm_up(warm)
        runners.append(runner)
        facts.append((loaded.load_ms, first_ms, mem.mb))
    samples = measure(runners, timed, progress)
    results = []
    for runner, (load_ms, first_ms, mem_mb), s in zip(runners, facts, samples):
        lm = runner.loaded
        ms = [x * 1e3 for x in s]
        label = f"{lm.model.label} [{lm.ep}]"
        graph = inspect_graph(lm.model, lm.ep, threads, shapes, batch) if inspect else None
        results.append(BenchResult(
            model=lm.model.label, path=str(lm.model.package or lm.model.onnx_path), ep=lm.ep,
            providers=lm.session.get_providers(),
            inputs=[{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in lm.feed.items()],
            batch=lm.batch, threads=threads, spinning=spinning, load_ms=load_ms, first_ms=first_ms,
            memory_mb=mem_mb,
            latency=summarize(ms, label), graph=graph,
            warnings=graph_warnings(label, lm.ep, graph) if graph else [], samples_ms=ms))
    if len(results) > 1:
        for r in results:
            ratio = paired_ratio(results[0].samples_ms, r.samples_ms)
            r.ratio = {"vs": f"{results[0].model} [{results[0].ep}]", **ratio} if ratio else None
    return results
