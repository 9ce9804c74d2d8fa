"""qat-kd: quantization-aware fine-tuning with the teacher's soft targets.

Fake quantization here reproduces ONNX Runtime's static QDQ scheme bit for bit where it can:
- ranges and scales as `onnxruntime.quantization.quant_utils.compute_scale_zp` / `get_qmin_qmax_for_qType`
  (weights: symmetric, per output channel, int8 [-127, 127], or [-64, 64] with reduce_range except depthwise
  weights where the target allows 8 bits, the grid PTQ gives each weight: transforms.weight_reduce_range; activations:
  uint8 [0, 255] asymmetric, range widened to include 0; scale computed in float64, stored as float32);
- rounding as ORT's QuantizeLinear: x / scale (a division, not torch's x * (1/scale)), round half to even,
  + zero point, saturate; dequantize as (q - zp) * scale;
- biases as ORT's quantize_bias_static: int32 with scale = input_scale * weight_scale.
BatchNorm is folded into the preceding conv first (ORT's pre-processing folds it too), so the weights that
are fake-quantized are the weights ORT will quantize.

Where tensors are quantized (chosen so ORT's CPU backend fuses every Conv/Gemm into QLinearConv/QGemm):
the input of every Conv/Linear, and the output of every Conv/Linear (after its ReLU when a ReLU is its only
consumer: ORT drops a Relu before a Q whose zero point is 0). A tensor is quantized once and every consumer
sees the quantized value, as in ORT's QDQ graphs. Ops that keep values on the grid (max-pool, flatten, ...)
pass the quantization through; a Q/DQ pair with the same parameters is re-inserted before the consumer so ORT
can still fuse it.

Observers: min/max over `calib_batches` batches (fake quantization off), then an EMA of batch min/max
during training, frozen after `freeze_observers_after` epochs (counted inside the observers: no hook into the
training loop is needed). Training is edgec.train.train (one loop, Hinton KD loss).
Models may take several inputs of any dtype (int64 ids + mask): batches are dict feeds, as everywhere in edgec.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgec.core.errors import ModelError, OptionError, cause_line
from edgec.exporters.transforms import is_depthwise_weight, weight_reduce_range

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_F32_TINY = float(np.finfo(np.float32).tiny)


@dataclass
class QatConfig:
    epochs: int = 3
    lr: float = 1e-3                  # fine-tuning: ~1/50 of a from-scratch SGD rate
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 5e-5        # weights are already trained; strong decay only drags them to 0
    alpha: float = 0.9
    temperature: float = 4.0
    augment: bool | None = None       # None: only image inputs are translated (edgec.train)
    calib_batches: int = 8            # batches of batch_size for the initial min/max ranges
    ema: float = 0.01                 # observer EMA weight of each new batch
    freeze_observers_after: float = 1.0  # epochs; the remaining epochs train the weights on fixed ranges
    freeze_bn: bool = True            # BN is folded (eval statistics) before QAT; False is not supported
    target: str | None = None         # -> edgec.exporters.target.scheme_for
    seed: int = 0

    def validate(self) -> None:
        if not self.freeze_bn:
            raise OptionError("qat-kd folds BatchNorm into its conv before fine-tuning (as ONNX Runtime does "
                              "before quantizing); freeze_bn=False is not supported")
        if self.calib_batches < 1:
            raise OptionError("calib_batches must be at least 1")
        if self.freeze_observers_after < 0 or not 0 < self.ema <= 1:
            raise OptionError("freeze_observers_after must be >= 0 and ema in (0, 1]")


# ---------------------------------------------------------------- ORT's arithmetic

def qrange(qtype: str, reduce_range: bool, symmetric: bool) -> tuple[int, int]:
    """get_qmin_qmax_for_qType: reduce_range wins over symmetric (int8 reduced is [-64, 64])."""
    if qtype == "uint8":
        return (0, 127) if reduce_range else (0, 255)
    if qtype == "int8":
        return (-64, 64) if reduce_range else ((-127, 127) if symmetric else (-128, 127))
    raise OptionError(f"qat-kd supports uint8/int8, not {qtype!r}")


def scale_zp(rmin: torch.Tensor, rmax: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """compute_scale_zp, elementwise (per tensor or per channel): returns (float32 scale, float32 zero point)."""
    rmin = torch.clamp(rmin.float(), max=0.0).double()
    rmax = torch.clamp(rmax.float(), min=0.0).double()
    if symmetric:
        absmax = torch.maximum(rmin.abs(), rmax.abs())
        rmin, rmax = -absmax, absmax
    scale64 = (rmax - rmin) / float(qmax - qmin)
    if symmetric:
        zp = torch.full_like(scale64, float(round((qmin + qmax) / 2.0)))
    else:
        zp = torch.round(qmin - rmin / torch.where(scale64 > 0, scale64, torch.ones_like(scale64)))
    tiny = scale64 < _F32_TINY
    scale = torch.where(tiny, torch.ones_like(scale64), scale64).float()
    zp = torch.where(tiny, torch.zeros_like(zp), zp).clamp(qmin, qmax).float()
    return scale, zp


class _FakeQuant(torch.autograd.Function):
    """QuantizeLinear -> DequantizeLinear with a straight-through gradient inside the range."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax):
        q = torch.round(x / scale) + zp
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (q.clamp(qmin, qmax) - zp) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quant(x, scale, zp, qmin: int, qmax: int, axis: int | None = None):
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zp = scale.view(shape), zp.view(shape)
    return _FakeQuant.apply(x, scale, zp, qmin, qmax)


# ---------------------------------------------------------------- activation observers

class ActFakeQuant(nn.Module):
    """Per-tensor activation fake quantization with its own observer."""

    def __init__(self, qtype: str = "uint8", symmetric: bool = False, ema: float = 0.01):
        super().__init__()
        self.qtype, self.symmetric, self.ema = qtype, symmetric, ema
        self.qmin, self.qmax = qrange(qtype, False, symmetric)  # ORT never reduces activation ranges
        self.calibrating = False
        self.freeze_after = -1  # training forwards before the range is frozen; -1 = never
        for name, value in (("min_val", math.inf), ("max_val", -math.inf), ("scale", 1.0), ("zero_point", 0.0)):
            self.register_buffer(name, torch.tensor(value))
        self.register_buffer("steps", torch.tensor(0))

    def observed(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def _update_qparams(self):
        self.scale, self.zero_point = scale_zp(self.min_val, self.max_val, self.qmin, self.qmax, self.symmetric)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return _export_act(x, self)
        if self.calibrating:
            with torch.no_grad():
                self.min_val = torch.minimum(self.min_val, x.min())
                self.max_val = torch.maximum(self.max_val, x.max())
            return x
        if self.training and (self.freeze_after < 0 or int(self.steps) < self.freeze_after):
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if self.observed():
                    lo = self.min_val + self.ema * (lo - self.min_val)
                    hi = self.max_val + self.ema * (hi - self.max_val)
                self.min_val, self.max_val = lo, hi
                self.steps += 1
                self._update_qparams()
        return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self):
        return f"{self.qtype}[{self.qmin},{self.qmax}] scale={float(self.scale):.4g} zp={int(self.zero_point)}"


class SharedFakeQuant(nn.Module):
    """Re-quantizes with another observer's parameters: after max-pool/flatten the values are still on that
    grid (an identity in torch), but ORT needs a Q/DQ pair right before the Conv/Gemm to fuse it."""

    def __init__(self, source: ActFakeQuant):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: its buffers belong to the source

    def forward(self, x):
        src = self.source
        if torch.onnx.is_in_onnx_export():
            return _export_act(x, src)
        if src.calibrating:
            return x
        return fake_quant(x, src.scale, src.zero_point, src.qmin, src.qmax)


def _export_act(x, fq: ActFakeQuant):
    # torch's symbolic exports (0, 255) / (-128, 127) only; a symmetric int8 range [-127, 127] saturates
    # one step lower in ONNX, outside the calibrated range.
    qmin, qmax = (0, 255) if fq.qtype == "uint8" else (-128, 127)
    return torch.fake_quantize_per_tensor_affine(x, float(fq.scale), int(fq.zero_point), qmin, qmax)


# ---------------------------------------------------------------- weights

class _QuantWeights:
    """Mixin for Conv2d/Linear: weights fake-quantized from their own current min/max (as ORT computes them
    from the final weights), bias as int32 at input_scale * weight_scale."""

    def _setup(self, scheme, input_fq):
        self.per_channel = bool(scheme.per_channel)
        # the grid PTQ gives this weight (8 bits for depthwise weights where the target allows it)
        depthwise = isinstance(self, nn.Conv2d) and is_depthwise_weight(self.weight.shape, self.groups)
        self.wqmin, self.wqmax = qrange(scheme.weight_type, weight_reduce_range(scheme, depthwise),
                                        scheme.weight_symmetric)
        self.weight_symmetric = bool(scheme.weight_symmetric)
        object.__setattr__(self, "input_fq", input_fq)

    def _input_observer(self) -> ActFakeQuant:
        return self.input_fq.source if isinstance(self.input_fq, SharedFakeQuant) else self.input_fq

    def weight_qparams(self):
        w = self.weight.detach()
        flat = w.reshape(w.shape[0], -1) if self.per_channel else w.reshape(1, -1)
        return scale_zp(flat.amin(1), flat.amax(1), self.wqmin, self.wqmax, self.weight_symmetric)

    def quantized_params(self):
        scale, zp = self.weight_qparams()
        axis = 0 if self.per_channel else None
        if axis is None:
            scale, zp = scale[0], zp[0]
        w = fake_quant(self.weight, scale, zp, self.wqmin, self.wqmax, axis)
        b = self.bias
        if b is not None:
            bscale = (self._input_observer().scale * scale).double()  # float32 product, as ORT multiplies float32 scales
            bq = (torch.round(b.detach().double() / bscale).clamp(INT32_MIN, INT32_MAX) * bscale).float()
            b = b + (bq - b).detach()
        return w, b, scale, zp

    def _qat_weights(self):
        if torch.onnx.is_in_onnx_export() and hasattr(self, "export_weight"):
            # A Q/DQ pair on the (already on-grid) weight; qdq_export folds the Q into an int8 initializer.
            w, scale, zp = self.export_weight, self.export_scale, self.export_zp
            if self.per_channel:
                w = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)
            else:
                w = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), -128, 127)
            return w, getattr(self, "export_bias", None)
        if self._input_observer().calibrating:
            return self.weight, self.bias
        w, b, _, _ = self.quantized_params()
        return w, b


_EXPORT_BUFFERS = ("export_weight", "export_bias", "export_scale", "export_zp")


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Freeze every quantized layer's weight, bias and scales as buffers for torch.onnx.export: buffers, not
    constants, so neither the tracer nor constant folding turns the weight's Q/DQ into a float weight."""
    layers = [m for m in model.modules() if isinstance(m, _QuantWeights)]
    with torch.no_grad():
        for m in layers:
            w, b, scale, zp = m.quantized_params()
            for name, t in zip(_EXPORT_BUFFERS, (w, b, scale, zp.to(torch.int32))):
                if t is not None:
                    m.register_buffer(name, t.detach().clone())
    try:
        yield model
    finally:
        for m in layers:
            for name in _EXPORT_BUFFERS:
                m._buffers.pop(name, None)


class QConv2d(_QuantWeights, nn.Conv2d):
    def forward(self, x):
        w, b = self._qat_weights()
        return self._conv_forward(x, w, b)


class QLinear(_QuantWeights, nn.Linear):
    def forward(self, x):
        w, b = self._qat_weights()
        return F.linear(x, w, b)


# ---------------------------------------------------------------- graph preparation

_PASSTHROUGH_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity)
_PASSTHROUGH_FUNCS = {torch.flatten, F.max_pool2d, F.dropout, torch.reshape}
_PASSTHROUGH_METHODS = {"view", "reshape", "flatten", "contiguous"}


def _is_relu(node, modules) -> bool:
    return ((node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU))
            or (node.op == "call_function" and node.target in (F.relu, torch.relu))
            or (node.op == "call_method" and node.target == "relu"))


def _is_passthrough(node, modules) -> bool:
    return ((node.op == "call_module" and isinstance(modules.get(node.target), _PASSTHROUGH_MODULES))
            or (node.op == "call_function" and node.target in _PASSTHROUGH_FUNCS)
            or (node.op == "call_method" and node.target in _PASSTHROUGH_METHODS))


def _is_avgpool(node, modules) -> bool:
    return ((node.op == "call_module" and isinstance(modules.get(node.target), (nn.AdaptiveAvgPool2d, nn.AvgPool2d)))
            or (node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.avg_pool2d)))


def _fold_bn(gm: fx.GraphModule) -> int:
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    modules, folded = dict(gm.named_modules()), 0
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        prev = node.args[0]
        conv = modules.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1:
            continue
        _set_module(gm, prev.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _set_module(gm, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _as_qat(module: nn.Module, scheme, input_fq) -> nn.Module:
    q = copy.deepcopy(module)
    q.__class__ = QConv2d if isinstance(module, nn.Conv2d) else QLinear
    q._setup(scheme, input_fq)
    return q


def prepare_qat(model: nn.Module, scheme, ema: float = 0.01) -> fx.GraphModule:
    """A fake-quantized copy of `model` (eager, FP32): BN folded, Conv2d/Linear wrapped, observers inserted."""
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: not supported by this recipe
        raise ModelError(f"qat-kd needs a model torch.fx can trace ({cause_line(e)[:160]}); "
                         "use PTQ for this model") from e
    folded = _fold_bn(gm)
    for m in gm.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # a quantized tensor is shared by several consumers
    graph, counter = gm.graph, iter(range(1 << 30))
    fq_of: dict[fx.Node, nn.Module] = {}

    def insert_fq(node: fx.Node, module: nn.Module) -> fx.Node:
        name = f"fq_{next(counter)}"
        gm.add_submodule(name, module)
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        fq_of[new] = module
        return new

    def observer() -> ActFakeQuant:
        return ActFakeQuant(scheme.activation_type, scheme.activation_symmetric, ema)

    def quantized_input(node: fx.Node) -> fx.Node:
        if node in fq_of:
            return node
        origin = node
        while origin not in fq_of and _is_passthrough(origin, modules) and isinstance(origin.args[0], fx.Node):
            origin = origin.args[0]
        if origin is node:
            return insert_fq(node, observer())
        if origin not in fq_of:  # quantize where the values are made, then pass the grid through
            if _is_avgpool(origin, modules) and isinstance(origin.args[0], fx.Node):
                quantized_input(origin.args[0])  # ORT runs DQ -> (Global)AveragePool -> Q as one INT8 op
            origin = insert_fq(origin, observer())
        src = fq_of[origin]
        return insert_fq(node, SharedFakeQuant(src.source if isinstance(src, SharedFakeQuant) else src))

    modules = dict(gm.named_modules())
    wrapped = 0
    for node in list(graph.nodes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, _QuantWeights):
            raise ModelError(f"layer {node.target} is called more than once; qat-kd needs one layer per call "
                             "(each call has its own input range)")
        if type(mod) not in (nn.Conv2d, nn.Linear):
            continue
        inp = quantized_input(node.args[0])
        fq_in = fq_of[inp]
        _set_module(gm, node.target, _as_qat(mod, scheme, fq_in))
        modules = dict(gm.named_modules())
        wrapped += 1
        users = list(node.users)
        out = users[0] if len(users) == 1 and _is_relu(users[0], modules) else node
        if any(u.op != "output" for u in out.users):  # final logits stay float (QGemm has a float output)
            insert_fq(out, observer())
    graph.lint()
    gm.recompile()
    gm.qat_info = {"bn_folded": folded, "wrapped": wrapped,
                   "observers": sum(isinstance(m, ActFakeQuant) for m in gm.modules())}
    return gm


def observers(model: nn.Module) -> list[ActFakeQuant]:
    return [m for m in model.modules() if isinstance(m, ActFakeQuant)]


# ---------------------------------------------------------------- the recipe

@torch.no_grad()
def calibrate(qmodel: nn.Module, data, batches: int, batch_size: int) -> int:
    """Min/max of every observed tensor on the float model (fake quantization off), like ORT's MinMax."""
    obs = observers(qmodel)
    for o in obs:
        o.calibrating = True
    qmodel.eval()
    seen = 0
    try:
        for xb in data.batches(batch_size, limit=batches * batch_size):   # dict feeds: every input of the model
            inputs = _as_tensors(xb)
            qmodel(*inputs)
            seen += len(inputs[0])
    finally:
        for o in obs:
            o.calibrating = False
    for o in obs:
        if not o.observed():
            raise ModelError("an observer saw no data during calibration; is part of the model unused?")
        o._update_qparams()
    return seen


def qat_finetune(model: nn.Module, teacher: nn.Module | None, train_data, eval_data, cfg: QatConfig | None = None,
                 *, label_output: str | None = None, kd_loss=()) -> tuple[fx.GraphModule, dict]:
    """Fine-tune a fake-quantized copy of `model` (trained, FP32, eager) with KD from `teacher` (each output's loss
    by its task, edgec.kdloss; labels, when `train_data` has them, on `label_output`).
    Returns (qat_model, record); the record's torch_fake_quant_accuracy is what ORT should measure too."""
    from edgec.exporters.target import scheme_for
    from edgec.train import TrainConfig, evaluate, read_rows, train
    cfg = cfg or QatConfig()
    cfg.validate()
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, alpha=cfg.alpha, temperature=cfg.temperature,
                       augment=cfg.augment, seed=cfg.seed, label_output=label_output, kd_loss=kd_loss)
    tcfg.validate()
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    scheme = scheme_for(cfg.target)
    if len(train_data):
        with torch.no_grad():  # fail early, with the model's own error, on data that does not fit it
            model.eval()(*read_rows(train_data, np.arange(1)))
    qmodel = prepare_qat(model, scheme, cfg.ema)
    calib_samples = calibrate(qmodel, train_data, cfg.calib_batches, cfg.batch_size)
    steps_per_epoch = -(-len(train_data) // cfg.batch_size)
    freeze = int(round(cfg.freeze_observers_after * steps_per_epoch))
    for o in observers(qmodel):
        o.freeze_after = freeze
    fp32_acc = evaluate(model, eval_data, label_output=label_output)
    calibrated_acc = evaluate(qmodel, eval_data, label_output=label_output)
    history = train(qmodel, train_data, tcfg, eval_data=eval_data, teacher=teacher, label="qat-kd")
    qmodel.eval()
    record = {"recipe": "qat-kd", "scheme": scheme.to_dict(), "config": asdict(cfg), **qmodel.qat_info,
              "calibration_samples": calib_samples, "observer_freeze_step": freeze,
              "fp32_accuracy": fp32_acc, "calibrated_fake_quant_accuracy": calibrated_acc,
              "torch_fake_quant_accuracy": evaluate(qmodel, eval_data, label_output=label_output),
              "epochs": history["epochs"], "best_epoch": history["best_epoch"],
              "train_seconds": history["seconds"], "seconds": round(time.perf_counter() - started, 2),
              "teacher": teacher is not None}
    return qmodel, record


def export_qat_onnx(qat_model: nn.Module, example, path, *, opset: int = 17, eval_data=None, inputs=None,
                    label_output: str | None = None) -> dict:
    """The QDQ ONNX model (int8 weights, int32 biases, uint8 activations); see edgec.exporters.qdq_export.
    `example`: a tensor (one input), a tuple, or a dict feed {input name: array}; `inputs`: the model's InputSpecs (the
    exported input names and dynamic axes). With eval_data, also measures it in ONNX Runtime against the
    fake-quantized torch model (same samples)."""
    from edgec.exporters.qdq_export import export_qdq
    with export_mode(qat_model):
        info = export_qdq(qat_model, example, path, opset=opset, inputs=inputs)
    if eval_data is not None:
        info["check"] = torch_vs_ort(qat_model, path, eval_data, label_output=label_output)
    return info


def _as_tensors(feed) -> tuple:
    from edgec.train import rows
    return rows(feed, slice(None))


@torch.no_grad()
def torch_vs_ort(qat_model: nn.Module, onnx_path, data, batch_size: int = 256, label_output: str | None = None) -> dict:
    """The fake-quantized torch model and the ONNX file in ORT on the same samples: their agreement on every
    output (the first one's figures at the top level), and the accuracy of both on the labelled output."""
    from edgec.exporters.compare import ort_session, output_agreement, run_onnx
    from edgec.kdloss import flatten
    qat_model.eval()
    parts = [flatten(qat_model(*_as_tensors(xb))) for xb in data.batches(batch_size)]
    keys = list(parts[0])
    refs = [torch.cat([p[k] for p in parts]).numpy() for k in keys]
    session = ort_session(onnx_path)
    gots = run_onnx(session, data, batch_size)
    names = [o.name for o in session.get_outputs()]
    agreement = {n: output_agreement(r, g) for n, r, g in zip(names, refs, gots)}
    out = {"samples": len(data), **agreement[names[0]]}
    if len(names) > 1:
        out["outputs"] = agreement
    if data.class_ids:   # accuracy needs class ids (float targets have none)
        from edgec.kdloss import resolve_key
        i = keys.index(resolve_key(label_output, keys)) if label_output else 0
        out["torch_accuracy"] = 100.0 * float((refs[i].argmax(1) == data.y).mean())
        out["ort_accuracy"] = 100.0 * float((gots[i].argmax(1) == data.y).mean())
        out["accuracy_gap"] = round(abs(out["torch_accuracy"] - out["ort_accuracy"]), 4)
    return out


def main(argv=None) -> None:
    """`python -m edgec.qat MODEL [--epochs N] [--out DIR] [--ptq]`: qat-kd on builtin:digits (85% of train to
    train, 15% to pick the epoch), teacher = MODEL; `export.check` holds torch and ORT accuracy on the test split;
    --ptq adds the product's PTQ INT8 and the FP32 model on the same test split. Prints one JSON record."""
    import argparse
    import json
    from pathlib import Path

    from edgec.data import load_data, split
    from edgec.modelio import load_model
    ap = argparse.ArgumentParser(prog="python -m edgec.qat")
    ap.add_argument("model")
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=QatConfig.lr)
    ap.add_argument("--out", default="qat-out")
    ap.add_argument("--ptq", action="store_true")
    args = ap.parse_args(argv)
    # the best epoch is chosen on a validation split, so the test split stays unseen until the final check
    train_ds, val_ds = split(load_data(f"{args.data}:train"), 0.15, seed=0)
    test_ds = load_data(f"{args.data}:test")
    loaded = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(test_ds.x[:1])
    qmodel, record = qat_finetune(loaded.module, load_model(args.model).module, train_ds, val_ds,
                                  QatConfig(epochs=args.epochs, lr=args.lr))
    record["export"] = export_qat_onnx(qmodel, example, out / "qat.onnx", eval_data=test_ds)
    if args.ptq:
        from edgec.exporters.compare import accuracy
        from edgec.exporters.onnx_export import export_onnx
        from edgec.exporters.quantize import quantize_int8
        fp32 = export_onnx(loaded.module, example, out / "fp32.onnx")
        ptq = quantize_int8(out / "fp32.onnx", out / "ptq.onnx", list(train_ds.batches(64))[:4])
        record["ptq"] = {"ort_accuracy": 100 * accuracy(out / "ptq.onnx", test_ds, test_ds.y),
                         "file_bytes": ptq.int8_bytes, "calibration_samples": ptq.samples}
        record["fp32"] = {"ort_accuracy": 100 * accuracy(out / "fp32.onnx", test_ds, test_ds.y),
                          "file_bytes": fp32.file_bytes}
    print(json.dumps(record, indent=1, default=str))


__all__ = ["QatConfig", "qat_finetune", "export_qat_onnx", "torch_vs_ort", "export_mode", "prepare_qat",
           "calibrate", "fake_quant", "scale_zp", "qrange", "ActFakeQuant", "SharedFakeQuant", "QConv2d", "QLinear",
           "observers"]


if __name__ == "__main__":
    main()
