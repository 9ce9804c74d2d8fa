"""`edgec compare`: compression recipes side by side on the same model, data and execution providers.

Every recipe ends in an ONNX file that goes through the same evaluation (accuracy on the same eval data)
and the same benchmark (all recipes interleaved in one run, so their ratios survive machine drift).
Each recipe's result is saved as it finishes (results/<row>.json) and reused by a rerun unless --fresh;
a recipe that fails is reported in its row and does not lose the others.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgec.core.errors import EdgecError, OptionError
from edgec.pipeline import Inputs, load_inputs, plain, training_split
from edgec.core.progress import note

RECIPES = {
    "fp32": "the original model in ONNX Runtime (baseline)",
    "ptq-int8": "static INT8, ONNX Runtime calibration (one row per calibration method)",
    "fp16": "FP16 weights and activations (onnxruntime.transformers.float16); meant for GPU providers",
    "prune-kd": "structured pruning + knowledge distillation, FP32",
    "prune-kd-ptq": "structured pruning + distillation, then static INT8",
    "qat-kd": "quantization-aware fine-tuning with the teacher's soft targets, exported as INT8 QDQ",
}
RESULT_SCHEMA = "edgec.compare/1"
COMPARE_MARKER = ".edgec-compare"  # in every folder compare writes: a rerun may reuse and overwrite it


@dataclass
class CompareOptions:
    model: str
    output: str
    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple | None = None
    data: str = "builtin:digits"
    eval_data: str | None = None
    image_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    recipes: tuple = tuple(RECIPES)
    calibrations: tuple = ("minmax", "entropy", "percentile")
    providers: tuple = ("cpu",)
    prune_ratio: float = 0.5
    epochs: int = 10                 # distillation epochs after pruning
    qat_epochs: int = 3
    lr: float = 0.01
    alpha: float = 0.5               # distillation weight and temperature (edgec.train.TrainConfig's defaults)
    temperature: float = 2.0
    bench_seconds: float = 3.0
    seed: int = 0
    fresh: bool = False
    # constraints for the recommendation
    max_accuracy_drop: float | None = None
    budgets: tuple = ()              # e.g. ("p90=10ms",), on the first provider
    max_size: int | None = None      # bytes
    prefer: str = "latency"          # latency | size

    def validate(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown or not self.recipes:
            raise OptionError(f"unknown recipe(s) {unknown or '(none)'}; choose from {', '.join(RECIPES)}")
        if self.prefer not in ("latency", "size"):
            raise OptionError(f"--prefer {self.prefer!r}: choose latency or size")
        if not 0 < self.prune_ratio < 1:
            raise OptionError(f"--prune-ratio {self.prune_ratio} must be between 0 and 1")

    def key(self, recipe: str) -> str:
        """What a saved row depends on: a rerun with other options recomputes it."""
        relevant = {"model": os.path.abspath(self.model), "mtime": os.path.getmtime(self.model), "arch": self.arch,
                    "data": self.data, "eval_data": self.eval_data, "seed": self.seed, "recipe": recipe,
                    "input_shape": self.input_shape, "image_size": self.image_size, "mean": self.mean, "std": self.std}
        if recipe.startswith("prune"):
            relevant.update(prune_ratio=self.prune_ratio, epochs=self.epochs, lr=self.lr, alpha=self.alpha,
                            temperature=self.temperature)
        if recipe == "qat-kd":
            relevant.update(qat_epochs=self.qat_epochs)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Workspace:
    """The compare folder: artifacts/<row>/ for models, results/<row>.json for finished rows."""
    root: Path
    opts: CompareOptions
    inputs: Inputs
    shared: dict = field(default_factory=dict)   # artifacts several recipes reuse (fp32 onnx, student)

    def dir(self, row: str) -> Path:
        d = self.root / "artifacts" / row
        d.mkdir(parents=True, exist_ok=True)
        return d

    def result_path(self, row: str) -> Path:
        return self.root / "results" / f"{row}.json"

    def load_result(self, row: str, key: str) -> dict | None:
        path = self.result_path(row)
        if self.opts.fresh or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        onnx = saved.get("onnx")
        if saved.get("key") != key or (onnx and not (self.root / onnx).is_file()):
            return None
        return saved

    def save_result(self, row: str, result: dict) -> None:
        path = self.result_path(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(plain(result), indent=2))
        os.replace(tmp, path)


# ---------------------------------------------------------------- recipes

def _eval_onnx(ws: Workspace, onnx_path: Path, reference: Path | None) -> dict:
    from edgec.exporters.compare import accuracy, compare_outputs
    from edgec.pipeline import agreement
    data = ws.inputs.eval if ws.inputs.eval is not None else ws.inputs.calib
    out = {}   # the data is streamed batch by batch
    if data.labelled:
        out["accuracy"] = 100 * accuracy(onnx_path, data, data.y)
    if reference is not None and reference != onnx_path:
        out["agreement"] = agreement(compare_outputs(reference, onnx_path, data))
    return out


def _fp32_onnx(ws: Workspace) -> Path:
    if "fp32_onnx" not in ws.shared:
        from edgec.exporters.onnx_export import export_onnx
        path = ws.dir("fp32") / "model.onnx"
        if not path.is_file() or ws.opts.fresh:
            export_onnx(ws.inputs.model.module, ws.inputs.calib.head(1), path, inputs=ws.inputs.specs)
        ws.shared["fp32_onnx"] = path
    return ws.shared["fp32_onnx"]


def _module_figures(module, shape) -> dict:
    from edgec.metrics import count_flops, count_params
    return {"params": count_params(module), "flops": count_flops(module, shape)}


def recipe_fp32(ws: Workspace, row: str) -> dict:
    path = _fp32_onnx(ws)
    return {"onnx": path, **_module_figures(ws.inputs.model.module, ws.inputs.input_shape),
            **_eval_onnx(ws, path, None), "precision": "fp32"}


def recipe_ptq(ws: Workspace, row: str, method: str, source: Path | None = None, figures: dict | None = None) -> dict:
    from edgec.exporters.quantize import QuantOptions, quantize_int8
    src = source or _fp32_onnx(ws)
    path = ws.dir(row) / "model.onnx"
    info = quantize_int8(src, path, ws.inputs.calib, QuantOptions(method=method))
    figures = figures or _module_figures(ws.inputs.model.module, ws.inputs.input_shape)
    return {"onnx": path, **figures, **_eval_onnx(ws, path, src), "precision": "int8",
            "details": {"calibration": method, "quantization": plain(info)}}


def recipe_fp16(ws: Workspace, row: str) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    src = _fp32_onnx(ws)
    path = ws.dir(row) / "model.onnx"
    # keep_io_types: callers still feed and read float32, the graph inside runs in float16
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(path))
    return {"onnx": path, **_module_figures(ws.inputs.model.module, ws.inputs.input_shape),
            **_eval_onnx(ws, path, src), "precision": "fp16",
            "details": {"note": "CPU providers have few FP16 kernels: expect FP16 to be slower than FP32 there; "
                                "it is meant for CUDA/TensorRT"}}


def _student(ws: Workspace) -> tuple[Path, dict]:
    """Prune + distill once; prune-kd and prune-kd-ptq share the student."""
    if "student" in ws.shared:
        return ws.shared["student"]
    opts, inputs = ws.opts, ws.inputs
    if not inputs.model.eager:
        raise OptionError(f"pruning needs an eager model (checkpoint + --arch or an edgec model file); "
                          f"{inputs.model.path} is {inputs.model.kind}")
    from edgec.modelio import save_model
    from edgec.prune import PruneConfig, prune_model
    from edgec.distill import distill
    from edgec.train import TrainConfig
    student_path = ws.dir("prune-kd") / "student.pt"
    pruned, prune_record = prune_model(copy.deepcopy(inputs.model), PruneConfig(ratio=opts.prune_ratio), inputs.calib)
    cfg = TrainConfig(epochs=opts.epochs, lr=opts.lr, alpha=opts.alpha, temperature=opts.temperature, seed=opts.seed)
    train_data, validation = training_split(inputs.calib)
    record = distill(inputs.model.module, pruned, train_data, validation, cfg, label="prune-kd: distill")
    save_model(student_path, pruned, inputs.model.arch, inputs.input_shape, force=True,
               history=list(inputs.model.meta.get("history", [])) + [
                   {"stage": "prune", **plain(prune_record)}, {"stage": "distill", **plain(record)}])
    ws.shared["student"] = (student_path, {"prune": plain(prune_record), "distill": plain(record)})
    return ws.shared["student"]


def recipe_prune_kd(ws: Workspace, row: str) -> dict:
    import torch
    from edgec.exporters.onnx_export import export_onnx
    from edgec.modelio import load_model
    student_path, details = _student(ws)
    student = load_model(student_path, ws.inputs.model.arch).module  # the spec the user already trusted
    path = ws.dir(row) / "model.onnx"
    export_onnx(student, ws.inputs.calib.head(1), path, inputs=ws.inputs.specs)
    return {"onnx": path, **_module_figures(student, ws.inputs.input_shape), **_eval_onnx(ws, path, None),
            "precision": "fp32", "details": details}


def recipe_prune_kd_ptq(ws: Workspace, row: str) -> dict:
    fp32 = ws.root / "artifacts" / "prune-kd" / "model.onnx"
    if not fp32.is_file():
        recipe_prune_kd(ws, "prune-kd")
    from edgec.modelio import load_model
    student_path, details = _student(ws)
    figures = _module_figures(load_model(student_path, ws.inputs.model.arch).module, ws.inputs.input_shape)
    result = recipe_ptq(ws, row, "minmax", source=fp32, figures=figures)
    result["details"] = {**details, **result["details"]}
    return result


def recipe_qat(ws: Workspace, row: str) -> dict:
    import torch
    from edgec.qat import QatConfig, export_qat_onnx, qat_finetune
    inputs = ws.inputs
    if not inputs.model.eager:
        raise OptionError(f"qat-kd needs an eager model; {inputs.model.path} is {inputs.model.kind}")
    cfg = QatConfig(epochs=ws.opts.qat_epochs, seed=ws.opts.seed)
    train_data, validation = training_split(inputs.calib)
    qat_model, record = qat_finetune(copy.deepcopy(inputs.model.module), inputs.model.module, train_data,
                                     validation, cfg, inputs.input_shape)
    path = ws.dir(row) / "model.onnx"
    # torch (fake quant) and ORT measured on the same eval samples: the QAT promise is that they agree
    export = export_qat_onnx(qat_model, torch.from_numpy(inputs.calib.x[0:1]), path,
                             eval_data=inputs.eval if inputs.eval is not None else inputs.calib)
    result = {"onnx": path, **_module_figures(inputs.model.module, inputs.input_shape),
              **_eval_onnx(ws, path, _fp32_onnx(ws)), "precision": "int8",
              "details": {"qat": plain(record), "export": plain(export)}}
    check = export.get("check") or {}
    if check.get("torch_accuracy") is not None:
        result["details"]["torch_vs_ort_points"] = round(check["torch_accuracy"] - check["ort_accuracy"], 4)
    return result


def planned_rows(opts: CompareOptions) -> list[tuple[str, callable]]:
    rows = []
    for recipe in opts.recipes:
        if recipe == "ptq-int8":
            rows += [(f"ptq-int8-{m}", lambda ws, row, m=m: recipe_ptq(ws, row, m)) for m in opts.calibrations]
        else:
            rows.append((recipe, {"fp32": recipe_fp32, "fp16": recipe_fp16, "prune-kd": recipe_prune_kd,
                                  "prune-kd-ptq": recipe_prune_kd_ptq, "qat-kd": recipe_qat}[recipe]))
    if "fp32" not in opts.recipes:  # every ratio is against FP32: it is always measured
        rows.insert(0, ("fp32", recipe_fp32))
    return rows


# ---------------------------------------------------------------- run

def run_compare(opts: CompareOptions) -> dict:
    from edgec.recommend import recommend
    from edgec.core.fsutil import claim_folder
    opts.validate()
    claim_folder(opts.output, COMPARE_MARKER, create=False)  # before minutes of work: never someone else's files
    inputs = load_inputs(opts.model, arch=opts.arch, trust_pickle=opts.trust_pickle, input_shape=opts.input_shape,
                         data=opts.data, eval_data=opts.eval_data, image_size=opts.image_size, mean=opts.mean,
                         std=opts.std)
    root = claim_folder(opts.output, COMPARE_MARKER)
    ws = Workspace(root, opts, inputs)
    rows = []
    for row, fn in planned_rows(opts):
        key = opts.key(row)
        saved = ws.load_result(row, key)
        if saved is not None:
            note(f"{row}: reusing the result saved in {ws.result_path(row)} (--fresh recomputes)")
            rows.append(saved)
            continue
        note(f"{row}: {RECIPES.get(row, RECIPES['ptq-int8'])}")
        started = time.perf_counter()
        try:
            result = fn(ws, row)
            result["onnx"] = str(Path(result["onnx"]).relative_to(root))
            result["bytes"] = (root / result["onnx"]).stat().st_size
            result["error"] = None
        except EdgecError as e:
            result = {"onnx": None, "error": f"{type(e).__name__}: {e}"}
            note(f"{row} failed: {e}")
        result.update(recipe=row, key=key, seconds=round(time.perf_counter() - started, 2))
        ws.save_result(row, result)
        rows.append(result)
    _bench(ws, rows)
    _relative(rows, opts.providers[0])
    summary = {"schema": RESULT_SCHEMA, "model": inputs.model.describe(),
               "eval": (inputs.eval or inputs.calib).describe(), "providers": list(opts.providers),
               "recipes": rows}
    summary["recommendation"] = recommend(rows, opts)
    from edgec.plots import write_plots
    from edgec.report import render_compare_markdown
    summary["plots"] = write_plots(summary, root)
    tmp = root / ".compare.json.tmp"
    tmp.write_text(json.dumps(plain(summary), indent=2))
    os.replace(tmp, root / "compare.json")
    (root / "report.md").write_text(render_compare_markdown(summary))
    return plain(summary)


def _bench(ws: Workspace, rows: list[dict]) -> None:
    """All successful rows, interleaved, per provider, in one run: the ratios are what to trust."""
    from edgec.runtime import benchmark
    ok = [r for r in rows if r.get("onnx")]
    if not ok or ws.opts.bench_seconds <= 0:
        return
    note(f"benchmarking {len(ok)} models interleaved on {', '.join(ws.opts.providers)}")
    results = benchmark([ws.root / r["onnx"] for r in ok], providers=list(ws.opts.providers),
                        runs=f"{ws.opts.bench_seconds}s", warmup="5", inspect=False)
    n_ep = len(results) // len(ok)
    for i, row in enumerate(ok):
        row["latency"] = {}
        for res in results[i * n_ep:(i + 1) * n_ep]:
            data = res.to_json()
            lat = {f"{k}_ms": v for k, v in data["latency_ms"].items() if k in ("min", "mean", "p50", "p90",
                                                                               "p95", "p99", "max", "p50_ci")}
            row["latency"][res.ep] = {**lat, "runs": data["latency_ms"]["n"], "reliable": data["reliable"]}


def _relative(rows: list[dict], first_ep: str) -> None:
    """Compression, accuracy change and speed-up against the FP32 row; the first provider's figures on top."""
    base = next((r for r in rows if r["recipe"] == "fp32" and r.get("onnx")), None)
    if base is None:
        return
    for r in rows:
        if not r.get("onnx"):
            continue
        r["compression_ratio"] = round(base["bytes"] / r["bytes"], 3)
        if r.get("accuracy") is not None and base.get("accuracy") is not None:
            r["accuracy_change"] = round(r["accuracy"] - base["accuracy"], 4)
        for ep, lat in (r.get("latency") or {}).items():
            b = (base.get("latency") or {}).get(ep)
            if b and lat.get("p50_ms"):
                lat["speedup"] = round(b["p50_ms"] / lat["p50_ms"], 3)
        first = (r.get("latency") or {}).get(first_ep) or {}
        r.update(p50_ms=first.get("p50_ms"), p90_ms=first.get("p90_ms"), speedup=first.get("speedup"))


def package_winner(opts: CompareOptions, summary: dict, path, force: bool) -> str:
    """Write the recommended recipe as a normal .edgec package (its model.onnx is INT8)."""
    from edgec.exporters.quantize import QuantOptions
    from edgec.pipeline import BuildOptions, build
    from edgec.recommend import recommend
    winner = (summary.get("recommendation") or {}).get("recipe")
    rows = {r["recipe"]: r for r in summary["recipes"]}
    if winner is not None and rows[winner].get("precision") != "int8":
        # a package's model.onnx is INT8: ship the best INT8 recipe, and say it was not the overall winner
        overall, winner = winner, recommend([r for r in rows.values() if r.get("precision") == "int8"], opts)["recipe"]
        if winner is not None:
            note(f"--package: {overall} is recommended but is not INT8; packaging {winner}, the best INT8 recipe")
    if winner is None:
        raise OptionError("no INT8 recipe meets the constraints, so there is nothing to --package; relax them")
    row = rows[winner]
    root = Path(opts.output)
    common = dict(output=str(path), arch=opts.arch, trust_pickle=opts.trust_pickle, input_shape=opts.input_shape,
                  data=opts.data, eval_data=opts.eval_data, image_size=opts.image_size, mean=opts.mean, std=opts.std,
                  # ungated: the comparison applied its constraints (and qat-kd's FP32 is the original model)
                  providers=opts.providers, force=force, max_accuracy_drop=None, min_sqnr=float("-inf"),
                  extra={"compare": {"recipe": winner, "folder": str(root)}})
    if winner.startswith("ptq-int8-"):
        opts_build = BuildOptions(model=opts.model, quant=QuantOptions(method=row["details"]["calibration"]), **common)
    elif winner == "prune-kd-ptq":
        opts_build = BuildOptions(model=str(root / "artifacts" / "prune-kd" / "student.pt"), **common)
    elif winner == "qat-kd":
        opts_build = BuildOptions(model=opts.model, prebuilt_int8=(root / row["onnx"], row.get("details", {})),
                                  **common)
    else:
        raise OptionError(f"edgec cannot rebuild a package for recipe {winner}; use its ONNX file {root / row['onnx']}")
    build(opts_build)
    return str(path)
