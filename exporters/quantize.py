"""ONNX FP32 -> INT8 (QDQ) static quantization with ONNX Runtime, hardware-aware and calibrated by streaming.

Steps: pre-process (ORT's quant_pre_process: shape inference + graph optimisation, which folds BatchNorm into
Conv), calibrate once (edgec.exporters.calibration: bounded memory, any method), quantize with ORT's
quantize_static fed the ranges as a calibration cache, then read the QDQ graph back to report what really
runs in INT8. `Prepared` keeps the pre-processed model and ranges, so sensitivity analysis can re-quantize
with other exclusions without calibrating again.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from edgec.core.errors import ModelError, OptionError
from edgec.exporters.calibration import (METHODS, CalibrationResult, Progress, calibrate, default_progress,
                                         save_ranges)
from edgec.exporters.target import QuantScheme, scheme_for
from edgec.core.fsutil import atomic_path

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# dynamic quantization's integer kernels (their weight, input 1, is the INT8 initializer itself)
_DYNAMIC_OPS = {"MatMulInteger": "MatMul", "DynamicQuantizeMatMul": "MatMul", "ConvInteger": "Conv",
                "DynamicQuantizeLSTM": "LSTM"}
RECURRENT_OPS = ("LSTM", "GRU", "RNN")   # weights W (input 1) and R (input 2) count with the compute ops
_TYPES = ("uint8", "int8")
BIAS_METHODS = ("auto", "fast", "empirical")
# auto: the sequential (empirical) correction where its passes are cheap, levels x activation bytes per sample at
# most this (PP-OCR cls: 53 levels x 7 MB = 0.37 GiB, about 20 s at load 6: mean cosine 0.9855 -> 0.9899 on photo
# strips; EfficientNet-Lite0: 50 x 51 MB = 2.5 GiB, 400 s for 0.9902 -> 0.9907), else the analytic one
EMPIRICAL_BIAS_MAX_MB = 1024
# ... and on models with hard-swish / hard-sigmoid up to this: activation noise through them shifts the means
# downstream, which only the sequential pass measures (the analytic one models weight rounding only). PP-OCR rec
# (PP-LCNetV3, 38 levels x 150 MB = 5.6 GiB): mean cosine 0.9869 fast -> 0.9950 empirical, 135-175 s more at load 8
# when each level ran from the inputs; run stage by stage (transforms.bias_correct) it is 22.6 s at load 3.7
EMPIRICAL_BIAS_HARD_SWISH_MAX_MB = 8192
SATURATING = ("HardSigmoid", "HardSwish")
ADAROUND_OFF = ("off by default: not shown to earn its time on a hard model yet (EfficientNet-Lite0 on a loaded "
                "2-core host: its statistics pass alone overran the 60 s time box, so no layer was rounded, "
                "benchmarks/QUANT_RESULTS.md); adaround=True to use it")


@dataclass
class QuantOptions:
    # minmax | entropy | percentile | auto | mse. mse (per tensor, the range of least expected quantization
    # error, minmax among the candidates): EfficientNet-Lite0 0.989 -> 0.990, PP-OCR cls 0.978 -> 0.985, the demo
    # ResNet18 0.9998 either way (benchmarks/QUANT_RESULTS.md)
    method: str = "mse"
    num_samples: int | None = 256          # None = all calibration samples
    per_channel: bool = True
    quant_format: str = "QDQ"              # QDQ | QOperator
    activation_type: str | None = None     # None = from the target (uint8 on CPUs, int8 on GPUs)
    weight_type: str | None = None         # None = from the target (int8)
    reduce_range: bool | None = None       # None = from the target's CPU features
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    target: str | None = None              # None = this machine; see edgec.exporters.target.TARGETS
    pre_process: bool = True
    percentile: float = 99.999
    histogram_bins: int = 2048
    # chunk size is chosen to keep activations under this; with 1024 a default ResNet18 build at 224 passed 1.9 GB
    # during calibration (benchmarks/memory_build.py, MEMORY_RESULTS.md); 384 keeps chunks of ~20 such samples
    calibration_memory_mb: float = 384
    force_calibration_data: bool = False   # accept random-looking / too few samples
    equalize: bool | None = None           # cross-layer equalization; None = see transforms_default()
    bias_correction: bool | None = None    # bias correction; None = see transforms_default()
    # fast: analytic, from the calibration pass's statistics, seconds (EfficientNet-Lite0 0.943 -> 0.986 mean
    # cosine in 7 s); empirical: sequential passes, 0.989 but in 164 s (benchmarks/QUANT_RESULTS.md); auto:
    # empirical where it is cheap (EMPIRICAL_BIAS_MAX_MB), else fast
    bias_method: str = "auto"
    adaround: bool | None = None           # learned weight rounding (edgec.exporters.adaround); None = default
    adaround_iterations: int = 500
    adaround_seconds: float = 60.0         # time box: past it the remaining layers keep round-to-nearest
    transform_samples: int = 64            # samples for the transforms' statistics (as good as 128 here)
    policy: bool = True                    # keep out what one 8-bit scale breaks; transformers dynamic (policy.py)
    # ranges of the values the readers can tell apart (a hard-swish input clamped at -3: edgec.exporters.activations)
    saturation_ranges: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"unknown --calibration {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise OptionError(f"--samples must be at least 1, got {self.num_samples}")
        if self.quant_format not in ("QDQ", "QOperator"):
            raise OptionError(f"unknown quant format {self.quant_format!r}; choose QDQ or QOperator")
        for what, value in (("activation", self.activation_type), ("weight", self.weight_type)):
            if value is not None and value not in _TYPES:
                raise OptionError(f"unknown {what} type {value!r}; choose uint8 or int8")
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.histogram_bins < 256 or self.histogram_bins & (self.histogram_bins - 1):
            raise OptionError(f"histogram_bins must be a power of two >= 256, got {self.histogram_bins}")
        for name in ("equalize", "bias_correction"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise OptionError(f"{name} must be true, false or unset (automatic), got {getattr(self, name)!r}")
        if self.bias_method not in BIAS_METHODS:
            raise OptionError(f"unknown bias correction method {self.bias_method!r}; choose {' or '.join(BIAS_METHODS)}")
        if isinstance(self.transform_samples, bool) or not isinstance(self.transform_samples, int) \
                or self.transform_samples < 1:
            raise OptionError(f"transform_samples must be a whole number >= 1, got {self.transform_samples!r}")
        if isinstance(self.exclude_nodes, str) or isinstance(self.exclude_op_types, str):
            raise OptionError("exclude_nodes / exclude_op_types take a list of names, not one string")

    def scheme(self) -> QuantScheme:
        """The target's scheme with explicit options laid over it (each override recorded as a reason)."""
        s = scheme_for(self.target)
        for attr in ("activation_type", "weight_type", "reduce_range"):
            value = getattr(self, attr)
            if value is not None and value != getattr(s, attr):
                s.reasons.append(f"{attr}={value} set by option (target default {getattr(s, attr)})")
                setattr(s, attr, value)
        if self.reduce_range is not None:   # an explicit choice holds for every layer
            s.full_range_depthwise = False
        if not self.per_channel and s.per_channel:
            s.per_channel = False
            s.reasons.append("per-tensor weights set by option")
        if self.quant_format != s.quant_format:
            s.reasons.append(f"quant_format={self.quant_format} set by option")
            s.quant_format = self.quant_format
        return s


@dataclass
class QuantInfo:
    method: str
    samples: int
    scheme: dict
    excluded_nodes: list[str]
    ops: dict                              # counts: int8 / float per op type, weight share in INT8
    float_nodes: list[str]
    fp32_bytes: int
    int8_bytes: int
    size_ratio: float
    calibration: dict
    pre_process: dict
    seconds: float
    sensitivity: dict | None = None        # set by edgec.exporters.sensitivity.fallback
    transforms: dict | None = None         # equalization / bias correction: applied or not, counts, why
    policy: dict | None = None             # edgec.exporters.policy: default exclusions with reasons, MatMul mode

    def to_dict(self) -> dict:
        return asdict(self)


class _quiet_ort:
    """quant_pre_process and quantize_static print and log chatter; keep stdout clean for --json."""

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._level)
        return self._stack.__exit__(*exc)


@dataclass
class Prepared:
    """Pre-processed model + calibrated ranges: quantize as often as needed without calibrating again."""
    workdir: Path
    model_path: Path                       # pre-processed FP32
    cache_path: Path                       # ORT calibration cache with our ranges
    fp32_path: Path
    options: QuantOptions
    scheme: QuantScheme
    calibration: CalibrationResult
    pre_process: dict
    node_ops: dict                         # node name -> op type, in the graph that gets quantized
    transforms: dict | None = None
    bias_originals: dict | None = None     # node -> (bias name, uncorrected value): restored when excluded
    weight_originals: dict | None = None   # node -> (weight name, FP32 value) where AdaRound rounded it
    policy: dict | None = None             # edgec.exporters.policy.plan() of the pre-processed graph
    depthwise_weights: tuple = ()          # weights of the depthwise convs (full 8 bits under reduce_range)

    def resolve_exclusions(self, nodes: Iterable[str] = (), op_types: Iterable[str] = ()) -> list[str]:
        nodes, op_types = list(nodes), list(op_types)
        unknown = [n for n in nodes if n not in self.node_ops]
        if unknown:
            raise OptionError(f"--exclude-nodes: {', '.join(unknown[:5])} not in the model; valid names include "
                              f"{', '.join(_examples(self.node_ops))}")
        present = set(self.node_ops.values())
        bad = [t for t in op_types if t not in present]
        if bad:
            raise OptionError(f"--exclude-op-types: {', '.join(bad)} not in the model; it has "
                              f"{', '.join(sorted(present)[:12])}")
        wanted = set(op_types)
        return list(dict.fromkeys([*nodes, *(n for n, t in self.node_ops.items() if t in wanted)]))

    def quantize(self, out_path, exclude: list[str], *, quant_format: str | None = None) -> Path:
        """Quantize the pre-processed model into `out_path` (a plain path; callers make it atomic)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        s = self.scheme
        model_path = self.model_path
        back = set(exclude) & (set(self.bias_originals or {}) | set(self.weight_originals or {}))
        if back:  # a layer left in FP32 has no weight error: its weight and bias must be the original ones
            import onnx
            from edgec.exporters.transforms import restore_biases
            model = onnx.load(str(self.model_path))
            restore_biases(model, self.bias_originals or {}, back)
            restore_biases(model, self.weight_originals or {}, back)
            model_path = self.workdir / "fp32.excluded.onnx"
            onnx.save_model(model, str(model_path))
        user_excluded = set(exclude)   # a node the caller (or the fallback) keeps float is not quantized dynamically
        exclude = list(dict.fromkeys([*exclude, *(self.policy or {}).get("nodes", [])]))
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        fmt = quant_format or s.quant_format
        extra = {"ActivationSymmetric": s.activation_symmetric, "WeightSymmetric": s.weight_symmetric,
                 "DedicatedQDQPair": s.dedicated_qdq_pair}
        from edgec.exporters.transforms import weight_reduce_range
        if weight_reduce_range(s, True) != s.reduce_range and self.depthwise_weights:   # 8-bit depthwise weights
            grid = {"axis": 0, "reduce_range": False} if s.per_channel else {"reduce_range": False}
            extra["TensorQuantOverrides"] = {w: [dict(grid)] for w in self.depthwise_weights}

        def static(src, dst, **kw):
            quantize_static(str(src), str(dst), calibration_data_reader=None,
                            quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
                            per_channel=s.per_channel, reduce_range=s.reduce_range,
                            activation_type=qtype[s.activation_type], weight_type=qtype[s.weight_type],
                            nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=str(self.cache_path), extra_options=extra, **kw)

        if (self.policy or {}).get("mode") == "dynamic":  # the MatMuls get their activation ranges per call
            from onnxruntime.quantization import quantize_dynamic
            convs = [n for n, t in self.node_ops.items() if t == "Conv" and n not in set(exclude)]
            src = model_path
            with _quiet_ort():
                if convs:   # a conv backbone (PP-OCR rec's) keeps static INT8 on its calibrated ranges
                    src = self.workdir / "convs.onnx"
                    static(model_path, src, op_types_to_quantize=["Conv"])
                quantize_dynamic(str(src), str(out_path), per_channel=s.per_channel,
                                 reduce_range=s.reduce_range, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=exclude, op_types_to_quantize=["MatMul", "Gemm"])
            if convs:
                src.unlink(missing_ok=True)
            self._finish(out_path, user_excluded, fmt, dynamic=True)
            return Path(out_path)
        dynamic = [n for n in (self.policy or {}).get("dynamic_nodes", []) if n not in user_excluded]
        static_out = self.workdir / "static.onnx" if dynamic else out_path
        with _quiet_ort():
            static(model_path, static_out)
            if dynamic:  # the policy's LSTM cells and STFT-like Convs: INT8 weights, per-call ranges (policy.py)
                from edgec.exporters.policy import quantize_dynamic_nodes
                quantize_dynamic_nodes(static_out, out_path, dynamic, reduce_range=s.reduce_range,
                                       workdir=self.workdir)
                static_out.unlink(missing_ok=True)
        self._finish(out_path, user_excluded, fmt, dynamic=bool(dynamic))
        return Path(out_path)

    def _finish(self, path, keep, fmt: str, *, dynamic: bool) -> None:
        """Exact moves onto the integers of ORT's output (rewrites.py): the Max of the PRelus rewritten as Max(x, a x)
        (and a MaxPool after it), Pads left in float between equal quantizers, MaxPools as strided Slices' Max (ORT's
        integer MaxPool is slow), dynamic convs that can read a static
        quantizer's codes; and large embedding tables to INT8 rows (policy.py). One load, when there is anything
        to look at."""
        prelu = self.pre_process.get("prelu") or {}
        ops = set(self.node_ops.values())
        if not self.options.policy or not (prelu.get("rewritten") or dynamic
                                           or ops & {"Pad", "Gather", "MaxPool", "HardSigmoid"}):
            return
        import onnx
        from edgec.exporters.policy import drop_unused_initializers, int8_embeddings
        from edgec.exporters.rewrites import (FLOAT_HARD_SWISH_REASON, INTEGER_MAXPOOL_REASON, INTEGER_PAD_REASON,
                                              float_hard_swishes, integer_inputs_from_static_codes, integer_max,
                                              integer_maxpools, integer_pads)
        model = onnx.load(str(path))
        qdq = fmt == "QDQ"
        if prelu.get("rewritten") and qdq:
            prelu["integer_max"] = integer_max(model, prelu["rewritten"])
        pads = integer_pads(model) if qdq else []
        self.pre_process["integer_pads"] = {"pads": pads, "reason": INTEGER_PAD_REASON} if pads else {"pads": []}
        pools = integer_maxpools(model) if qdq else []
        self.pre_process["integer_maxpools"] = ({"pools": pools, "reason": INTEGER_MAXPOOL_REASON} if pools
                                                else {"pools": []})
        swishes = float_hard_swishes(model) if qdq else []
        self.pre_process["float_hard_swishes"] = ({"muls": swishes, "reason": FLOAT_HARD_SWISH_REASON} if swishes
                                                  else {"muls": []})
        self.pre_process["static_code_inputs"] = integer_inputs_from_static_codes(model) if dynamic else []
        self.pre_process["int8_embeddings"] = int8_embeddings(model, keep)
        if prelu.get("integer_max") or any(self.pre_process[k] for k in ("static_code_inputs", "int8_embeddings")) \
                or pads or pools or swishes:
            drop_unused_initializers(model)   # the quantizers' scales the moves left behind
            onnx.save_model(model, str(path))

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _examples(node_ops: dict, k: int = 5) -> list[str]:
    compute = [n for n, t in node_ops.items() if t in COMPUTE_OPS]
    return (compute or list(node_ops))[:k]


def _name_nodes(model) -> int:
    """The quantizer addresses nodes by name: give unnamed nodes a stable one."""
    named = 0
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name, named = name, named + 1
            seen.add(name)
    return named


def _needs_symbolic_shapes(model) -> bool:
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
             if vi.type.tensor_type.HasField("shape")}
    return any(o and o not in known for n in inferred.graph.node for o in n.output)


def _keep_declared_interface(model, before) -> None:
    """The graph inputs and outputs keep the types and shapes the FP32 file declares: ORT's symbolic shape inference
    rewrote PLCMOS's scalar output (a Squeeze without axes, exported at batch 1) to [batch_size], and the INT8 file
    then warned on every run at batch 1."""
    declared = {vi.name: vi.type for vi in [*before.graph.input, *before.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in declared and vi.type != declared[vi.name]:
            vi.type.CopyFrom(declared[vi.name])


def _pre_process(fp32_path: Path, out: Path, enabled: bool) -> dict:
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process
    before = onnx.load(str(fp32_path))
    record = {"enabled": enabled, "symbolic_shape_inference": None, "batchnorm_before": 0, "batchnorm_after": 0}
    opset = next((o.version for o in before.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 13:
        # per-channel DequantizeLinear (its axis attribute) needs opset 13: ORT writes it anyway, and the
        # INT8 file of an opset-11 model then fails to load ("Unrecognized attribute: axis")
        before = onnx.version_converter.convert_version(before, 13)
        fp32_path = out.with_name("fp32.opset13.onnx")
        onnx.save_model(before, str(fp32_path))
        record["opset_upgraded"] = [opset, 13]
    record["batchnorm_before"] = sum(n.op_type == "BatchNormalization" for n in before.graph.node)
    if enabled:
        last_error = None
        # ORT's symbolic shape inference imports onnxruntime.tools, which imports torch (6 s, ~500 MB here):
        # only pay for it when ONNX's own inference leaves activations without a shape (then they could not be
        # calibrated); retry without it when it fails.
        first = (False, True) if _needs_symbolic_shapes(before) else (True,)
        for skip_symbolic in first:
            try:
                with _quiet_ort():
                    quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=skip_symbolic)
                record["symbolic_shape_inference"] = not skip_symbolic
                last_error = None
                break
            except Exception as e:  # noqa: BLE001
                last_error = e
        if last_error is not None:
            record["error"] = str(last_error).splitlines()[0][:200] if str(last_error) else type(last_error).__name__
            record["enabled"] = False
    model = onnx.load(str(out)) if record["enabled"] else before
    if record["enabled"]:
        _keep_declared_interface(model, before)
    if record["enabled"]:  # the optimiser copies weights that If branches share into each branch: share them again
        from edgec.exporters.policy import dedupe_initializers
        record["shared_initializers"] = dedupe_initializers(model)
    record["batchnorm_after"] = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    record["batchnorm_folded"] = record["batchnorm_before"] - record["batchnorm_after"]
    if record["batchnorm_before"] == 0:
        record["note"] = "no BatchNormalization in the FP32 graph: eval-mode BN was folded into Conv at export"
    record["nodes_named"] = _name_nodes(model)
    onnx.save_model(model, str(out))
    return record


def prepare(fp32_path, calibration, options: QuantOptions, *, progress: Progress | None = None) -> Prepared:
    """Pre-process and calibrate once. The caller must call .cleanup() (quantize_int8 does)."""
    import onnx
    options.validate()
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise ModelError(f"{fp32_path} does not exist; export the model first (edgec export)")
    scheme = options.scheme()
    workdir = Path(tempfile.mkdtemp(prefix="edgec-quant-"))
    try:
        pre = workdir / "fp32.pre.onnx"
        record = _pre_process(fp32_path, pre, options.pre_process)
        from edgec.exporters.activations import fuse_hard_swish, saturation_bounds
        model, changed = onnx.load(str(pre)), False   # the exact rewrites, on one load of the graph
        if options.policy:   # no INT8 kernel for PRelu or a lone BatchNorm: equal functions that have one
            from edgec.exporters.rewrites import (affines_into_convs, batchnorms_as_convs, prelus_as_max,
                                                  strided_convs_as_frames, strided_convs_as_phases)
            record["prelu"] = prelus_as_max(model, keep=options.exclude_nodes)
            record["affine_into_conv"] = affines_into_convs(model, keep=options.exclude_nodes)
            record["batchnorm_as_conv"] = batchnorms_as_convs(model, keep=options.exclude_nodes)
            # edgec's export did these already; a file from elsewhere gets them here (QLinearConv 0.95 -> 0.33 ms,
            # ConvInteger 37.5 -> 12.7 us)
            record["strided_convs_as_phases"] = strided_convs_as_phases(model, keep=options.exclude_nodes)
            record["strided_convs_as_frames"] = strided_convs_as_frames(model, keep=options.exclude_nodes)
            changed = any(record[k]["rewritten"] for k in ("prelu", "affine_into_conv", "batchnorm_as_conv",
                                                           "strided_convs_as_phases", "strided_convs_as_frames"))
        record["hard_swish_fused"] = fuse_hard_swish(model)   # exact: two quantizers fewer per hard-swish
        from edgec.exporters.rewrites import one_dim_biases, unshare_biases
        record["unshared_biases"] = unshare_biases(model)     # exact: ORT's own copies can take a used name
        record["one_dim_biases"] = one_dim_biases(model)      # exact: ORT's quantizer indexes a bias as (N,)
        if changed or record["hard_swish_fused"] or record["unshared_biases"] or record["one_dim_biases"]:
            onnx.save_model(model, str(pre))
        del model
        transforms, bias = _equalize(pre, calibration, options, workdir)
        model = onnx.load(str(pre), load_external_data=False)
        node_ops = {n.name: n.op_type for n in model.graph.node}
        from edgec.exporters.transforms import bias_inputs, depthwise_weights
        wanted = bias_inputs(model) if bias and options.bias_method != "empirical" else []
        bounds = saturation_bounds(model) if options.saturation_ranges else {}
        del model
        qrange = (0, 255) if scheme.activation_type == "uint8" else (-128, 127)
        calib = calibrate(pre, calibration, method=options.method, num_samples=options.num_samples,
                          symmetric=scheme.activation_symmetric, qrange=qrange, percentile=options.percentile,
                          bins=options.histogram_bins, memory_mb=options.calibration_memory_mb, workdir=workdir,
                          force=options.force_calibration_data, progress=default_progress(progress),
                          channel_means=wanted, bounds=bounds)
        cache = workdir / "ranges.json"
        save_ranges(calib.ranges, cache)
        from edgec.exporters.policy import plan
        model = onnx.load(str(pre), load_external_data=False)
        p = Prepared(workdir, pre, cache, fp32_path, options, scheme, calib, record, node_ops, transforms,
                     policy=plan(model, enabled=options.policy, ranges=calib.ranges, underflow=calib.underflow),
                     depthwise_weights=tuple(depthwise_weights(model)))
        del model
        exclude = p.resolve_exclusions(options.exclude_nodes, options.exclude_op_types)  # fail before quantizing
        if options.adaround:
            _adaround(p, calibration, exclude)
        else:
            p.transforms["adaround"] = {"applied": False, "reason": "set by option" if options.adaround is False
                                        else ADAROUND_OFF}
        if bias:
            _bias_correct(p, calibration, exclude)
        return p
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def transforms_default(options: QuantOptions, depthwise: int) -> tuple[bool, str, bool, str]:
    """(equalize, why, bias_correction, why) for this model and scheme, options first. Defaults follow what
    benchmarks/QUANT_RESULTS.md measured (EfficientNet-Lite0 on real photos, the demo ResNet18 on digits)."""
    if options.equalize is not None:
        eq, eq_why = options.equalize, "set by option"
    else:
        eq, eq_why = False, ("off by default: it lowered EfficientNet-Lite0's INT8 mean cosine to FP32 "
                             "(0.981 -> 0.974 per-channel, 0.782 -> 0.753 per-tensor; 42% of its ReLU6 channels reach "
                             "the clip and must keep their scale) and changed nothing on the demo ResNet18")
    if options.bias_correction is not None:
        bc, bc_why = options.bias_correction, "set by option"
    elif depthwise:
        bc, bc_why = True, (f"{depthwise} depthwise convs: on EfficientNet-Lite0 (AVX2 host) it raised the INT8 "
                            "mean cosine to FP32 from 0.943 to 0.986 with 7-bit weights (top-1 agreement 64% -> 77%), "
                            "0.953 -> 0.988 with 8-bit depthwise weights")
    else:
        bc, bc_why = False, "no depthwise convs: no gain measured on ResNet18 (cosine 0.99991 -> 0.99992)"
    return eq, eq_why, bc, bc_why


def _equalize(pre: Path, calibration, options: QuantOptions, workdir: Path):
    """Cross-layer equalization of the pre-processed model in place (before calibration: it changes the
    activations). Returns the transforms record and whether bias correction is to follow calibration."""
    import onnx
    from edgec.exporters import transforms as tf
    model = onnx.load(str(pre))
    depthwise = tf.count_depthwise(model)
    eq, eq_why, bc, bc_why = transforms_default(options, depthwise)
    record = {"depthwise_convs": depthwise, "equalize": {"applied": False, "reason": eq_why},
              "bias_correction": {"applied": False, "reason": bc_why}}
    if eq:
        started = time.perf_counter()
        needed = tf.relu6_inputs(model)
        maxima = tf.channel_max(model, needed, calibration, options.transform_samples, workdir) if needed else {}
        rec = tf.equalize(model, maxima)
        record["equalize"] = {**rec, "reason": eq_why, "seconds": round(time.perf_counter() - started, 2)}
        if rec["applied"]:
            onnx.save_model(model, str(pre))
        else:
            record["equalize"]["reason"] = eq_why + "; no Conv -> (Relu|ReLU6|nothing) -> Conv pair found"
    return record, bc


def _bias_correct(p: Prepared, calibration, exclude: list[str]) -> None:
    """Bias correction after calibration: the weight error is read from a first quantization by ORT itself
    (weights do not depend on activation ranges). Activation ranges are those of the uncorrected model:
    the shift is of the order of the weight rounding error, far below an activation's range."""
    import onnx
    from edgec.exporters import transforms as tf
    started = time.perf_counter()
    probe = p.quantize(p.workdir / "bias-probe.onnx", exclude, quant_format="QDQ")
    model = onnx.load(str(p.model_path))
    method, why = bias_method(p, model, exclude)
    if method == "fast":
        reference = {name: value for name, value in (p.weight_originals or {}).values()}
        rec, originals = tf.fast_bias_correct(model, onnx.load(str(probe)), p.calibration.channel_means, exclude,
                                              reference=reference)
    else:
        rec, originals = tf.bias_correct(model, onnx.load(str(probe)), calibration, p.options.transform_samples,
                                         p.workdir, exclude)
    probe.unlink(missing_ok=True)
    if rec["applied"]:
        onnx.save_model(model, str(p.model_path))
    p.bias_originals = originals
    p.transforms["bias_correction"] = {**rec, "reason": p.transforms["bias_correction"]["reason"],
                                       "method": method, "method_reason": why,
                                       "seconds": round(time.perf_counter() - started, 2)}


def bias_method(p: Prepared, model, exclude) -> tuple[str, str]:
    """The bias correction method for this model, and why."""
    if p.options.bias_method != "auto":
        return p.options.bias_method, "set by option"
    from edgec.exporters.transforms import correction_levels
    levels = correction_levels(model, exclude)
    mb = p.calibration.bytes_per_sample / 2 ** 20
    cost = f"{levels} levels x {mb:.1f} MB per sample"
    if levels * mb <= EMPIRICAL_BIAS_MAX_MB:
        return "empirical", f"sequential passes are cheap here ({cost} <= {EMPIRICAL_BIAS_MAX_MB} MB)"
    saturating = sum(n.op_type in SATURATING for n in model.graph.node)
    if saturating and levels * mb <= EMPIRICAL_BIAS_HARD_SWISH_MAX_MB:
        return "empirical", (f"{saturating} hard-swish/hard-sigmoid: the mean shift activation noise gets through "
                             "them is seen only by the sequential passes (PP-OCR rec mean cosine 0.987 fast -> 0.995); "
                             f"{cost} <= {EMPIRICAL_BIAS_HARD_SWISH_MAX_MB} MB")
    return "fast", f"sequential passes would cost {cost} > {EMPIRICAL_BIAS_MAX_MB} MB: analytic"


def _adaround(p: Prepared, calibration, exclude: list[str]) -> None:
    """Learned rounding of the weights (after calibration: the scales are ORT's, read from a first
    quantization; activation ranges do not depend on the weights' rounding)."""
    import onnx
    from edgec.exporters.adaround import AdaRoundConfig, adaround
    started = time.perf_counter()
    probe = p.quantize(p.workdir / "adaround-probe.onnx", exclude, quant_format="QDQ")
    model = onnx.load(str(p.model_path))
    rec, originals = adaround(model, onnx.load(str(probe)), calibration, reduce_range=p.scheme.reduce_range,
                              weight_type=p.scheme.weight_type, num_samples=p.options.transform_samples,
                              workdir=p.workdir, exclude=exclude,
                              config=AdaRoundConfig(iterations=p.options.adaround_iterations,
                                                    time_budget_s=p.options.adaround_seconds))
    probe.unlink(missing_ok=True)
    if rec["applied"]:
        onnx.save_model(model, str(p.model_path))
    p.weight_originals = originals
    p.transforms["adaround"] = {**rec, "reason": "set by option", "seconds": round(time.perf_counter() - started, 2)}


def quantized_ops(int8_path) -> dict:
    """What really runs in INT8: a Conv/MatMul/Gemm counts as INT8 when its weight (input 1) and its
    activation (input 0) come through DequantizeLinear (or it is a dynamic integer kernel); a recurrent cell
    (LSTM/GRU/RNN, inside If/Loop branches too) counts its W and R, INT8 only as DynamicQuantizeLSTM. Also the
    share of weight parameters in INT8 (a weight that several branches read counted once)."""
    import numpy as np
    import onnx
    model = onnx.load(str(int8_path))
    counts: dict = {}
    float_nodes, sizes, int8_weights = [], {}, set()

    def visit(graph, inits: dict, producers: dict):
        inits = {**inits, **{i.name: i for i in graph.initializer}}
        producers = {**producers, **{o: n for n in graph.node for o in n.output}}
        for node in graph.node:
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    visit(sub, inits, producers)
            op = _DYNAMIC_OPS.get(node.op_type, node.op_type)
            if op in RECURRENT_OPS:
                weights, int8 = [i for i in node.input[1:3] if i in inits], node.op_type != op
            elif op in COMPUTE_OPS and len(node.input) >= 2:
                dq = [op != node.op_type or producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                      for i in node.input[:2]]
                weight = node.input[1]
                weight = producers[weight].input[0] if weight not in inits and dq[1] else weight
                weights, int8 = [weight] if weight in inits else [], all(dq)
            else:
                continue
            c = counts.setdefault(op, {"int8": 0, "float": 0})
            c["int8" if int8 else "float"] += 1
            if not int8:
                float_nodes.append(node.name)
            for w in weights:
                sizes[w] = int(np.prod(inits[w].dims))
                if int8:
                    int8_weights.add(w)
    visit(model.graph, {}, {})
    n8 = sum(c["int8"] for c in counts.values())
    nf = sum(c["float"] for c in counts.values())
    w_int8 = sum(sizes[w] for w in int8_weights)
    return {"by_type": counts, "int8": n8, "float": nf,
            "int8_node_share": round(n8 / max(1, n8 + nf), 4),
            "int8_weight_share": round(w_int8 / max(1, sum(sizes.values())), 4)}, float_nodes


def quantize_int8(fp32_path, out_path, calibration, options: QuantOptions | None = None, *,
                  progress: Progress | None = None, force: bool = True) -> QuantInfo:
    """Static INT8 quantization of an FP32 ONNX model, calibrated on `calibration`: a re-iterable of feeds
    ({input name: array}, any batch sizes; a plain array for a single-input model)."""
    options = options or QuantOptions()
    started = time.perf_counter()
    prepared = prepare(fp32_path, calibration, options, progress=progress)
    try:
        exclude = prepared.resolve_exclusions(options.exclude_nodes, options.exclude_op_types)
        return write_quantized(prepared, out_path, exclude, force=force, started=started)
    finally:
        prepared.cleanup()


def write_quantized(prepared: Prepared, out_path, exclude: list[str], *, force: bool = True,
                    started: float | None = None, extra: dict | None = None) -> QuantInfo:
    """Quantize with `exclude` kept in FP32, write atomically, and describe the result."""
    started = started if started is not None else time.perf_counter()
    out_path = Path(out_path)
    staged = prepared.quantize(prepared.workdir / "int8.onnx", exclude)
    ops, float_nodes = quantized_ops(staged)
    with atomic_path(out_path, force=force) as tmp:
        os.replace(staged, tmp)
    fp32_bytes, int8_bytes = prepared.fp32_path.stat().st_size, out_path.stat().st_size
    calib = prepared.calibration.summary()
    if extra:
        calib.update(extra)
    return QuantInfo(method=prepared.options.method, samples=prepared.calibration.samples,
                     scheme=prepared.scheme.to_dict(), excluded_nodes=list(exclude), ops=ops,
                     float_nodes=float_nodes, fp32_bytes=fp32_bytes, int8_bytes=int8_bytes,
                     size_ratio=round(int8_bytes / max(1, fp32_bytes), 4), calibration=calib,
                     pre_process=prepared.pre_process, seconds=round(time.perf_counter() - started, 2),
                     transforms=prepared.transforms, policy=prepared.policy)


__all__ = ["QuantOptions", "QuantInfo", "Prepared", "prepare", "quantize_int8", "write_quantized",
           "quantized_ops", "transforms_default"]
