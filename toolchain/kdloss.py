"""Distillation by task: each model output gets the loss that fits what it holds.

- `kl`: logits of one class (or probabilities summing to 1): KL at temperature T, scaled by T^2 (Hinton 2015).
- `bce`: independent probabilities in [0, 1] (sigmoid, multi-label): binary cross-entropy against the teacher's
  probabilities. A temperature softmax would flatten them into near-uniform targets (loss ~1e-4, no learning).
- `mse`: regression, scores, boxes, feature maps.
- `cosine`: embeddings (1 - cosine along the last axis).

`--kd-loss OUTPUT=KIND[:WEIGHT]` sets an output's loss and weight (`auto:WEIGHT`: the detected loss, weighed); the
rest are chosen from the teacher's outputs on real samples (`choose`), each with the reason, recorded and printed.
Outputs are addressed by position (`0`, `1`, or the exported names `output`, `output_1`) or by dict key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from edgec.core.errors import OptionError

KINDS = ("kl", "bce", "mse", "cosine")
AUTO = "auto"   # --kd-loss OUTPUT=auto:WEIGHT: the detected loss, with this weight


@dataclass
class OutputLoss:
    output: str                 # key from `flatten`: "0", "1", ... or a dict key
    kind: str                   # one of KINDS
    weight: float = 1.0
    reason: str = "set by --kd-loss"
    shape: tuple = ()           # the teacher output's shape (batch axis included)
    probabilities: bool = False  # kl on probabilities (rows sum to 1): compared in log space

    def to_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape)}


def parse(specs) -> tuple[tuple[str, str, float], ...]:
    """`OUTPUT=KIND[:WEIGHT]` strings (or already-parsed triples) -> ((output, kind, weight), ...)."""
    out = []
    for spec in specs or ():
        if not isinstance(spec, str):
            output, kind, weight = spec
        else:
            output, eq, rest = spec.partition("=")
            kind, _, w = rest.partition(":")
            if not eq or not output or not kind:
                raise OptionError(f"--kd-loss {spec!r}: expected OUTPUT=KIND[:WEIGHT], e.g. 0=bce or "
                                  "embedding=cosine:0.5")
            try:
                weight = float(w) if w else 1.0
            except ValueError:
                raise OptionError(f"--kd-loss {spec!r}: weight {w!r} is not a number") from None
        if kind not in (*KINDS, AUTO):
            raise OptionError(f"--kd-loss {spec!r}: loss {kind!r} is not one of {', '.join(KINDS)} or {AUTO} (the "
                              "detected one, e.g. boxes=auto:2 to weigh it)")
        if not weight >= 0:
            raise OptionError(f"--kd-loss {spec!r}: the weight must not be negative")
        out.append((str(output), kind, float(weight)))
    return tuple(out)


def flatten(out) -> dict[str, torch.Tensor]:
    """A model's outputs as {key: tensor}: a tensor is "0", a tuple/list is "0", "1", ..., a dict keeps its keys;
    nested containers get dotted keys."""
    if isinstance(out, torch.Tensor):
        return {"0": out}
    items = out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else None
    if items is None:
        raise OptionError(f"the model returns a {type(out).__name__}; distillation needs tensors (alone, in a "
                          "tuple/list or in a dict)")
    flat = {}
    for k, v in items:
        for sub, t in flatten(v).items():
            flat[str(k) if sub == "0" and isinstance(v, torch.Tensor) else f"{k}.{sub}"] = t
    return flat


def resolve_key(name: str, keys: list[str], what: str = "--kd-loss/--label-output") -> str:
    """An output named by position, exported name (`output`, `output_2`) or dict key -> its key in `flatten`."""
    if name in keys:
        return name
    if name == "output" and keys:
        return keys[0]
    if name.startswith("output_") and name[7:].isdigit() and int(name[7:]) < len(keys):
        return keys[int(name[7:])]
    if name.isdigit() and int(name) < len(keys):
        return keys[int(name)]
    listed = (", ".join(keys) if not all(k.isdigit() for k in keys)
              else "output" if len(keys) == 1 else ", ".join(f"output_{k}" for k in keys))
    raise OptionError(f"{what}: the model has no output {name!r}; its outputs are {listed} (or by position: "
                      f"{', '.join(str(i) for i in range(len(keys)))})")


def detect(t: torch.Tensor, several: bool) -> tuple[str, str, bool]:
    """(kind, reason, probabilities) for one teacher output seen on a real batch."""
    shape = tuple(t.shape)
    if not t.is_floating_point():
        return "none", f"{t.dtype} output: not differentiable, not distilled", False
    t = t.detach().float()
    lo, hi = float(t.min()), float(t.max())
    classes = t.shape[-1] if t.dim() >= 2 else 1
    if 0.0 <= lo and hi <= 1.0:
        if t.dim() == 2 and classes > 1 and torch.allclose(t.sum(-1), torch.ones(len(t)), atol=1e-3):
            return "kl", f"{shape}: rows in [0, 1] summing to 1: class probabilities", True
        return "bce", f"{shape}: values in [0, 1] not summing to 1 per row: independent probabilities", False
    if t.dim() == 2 and classes > 1:
        norms = t.norm(dim=-1)
        if float((norms - 1).abs().max()) < 1e-3:
            return "cosine", f"{shape}: unit-norm rows: an embedding", False
        if not several:
            return "kl", f"{shape}: unbounded scores of the only output: class logits", False
        return "mse", (f"{shape}: unbounded values in one of several outputs: regression "
                       "(say --kd-loss OUTPUT=kl if they are class logits)"), False
    return "mse", f"{shape}: unbounded values: regression / features", False


def choose(teacher_out, given=(), label_output: str | None = None) -> list[OutputLoss]:
    """One OutputLoss per teacher output: `given` ((output, kind, weight) from --kd-loss) first, the rest detected.
    Integer outputs are left out (nothing to learn from)."""
    flat = flatten(teacher_out)
    keys = list(flat)
    chosen = {resolve_key(name, keys): (kind, weight) for name, kind, weight in given}
    if label_output is not None:
        resolve_key(label_output, keys)
    losses = []
    for key, t in flat.items():
        kind, reason, probs = detect(t, len(flat) > 1)
        if key in chosen and chosen[key][0] == AUTO:
            if kind != "none":
                losses.append(OutputLoss(key, kind, chosen[key][1], f"{reason}; weight set by --kd-loss",
                                         tuple(t.shape), probs))
        elif key in chosen:
            asked, weight = chosen[key]
            if asked == "kl" and kind == "kl":
                pass  # keep the detected probabilities flag
            else:
                probs = False
            losses.append(OutputLoss(key, asked, weight, "set by --kd-loss", tuple(t.shape), probs))
        elif kind != "none":
            losses.append(OutputLoss(key, kind, 1.0, reason, tuple(t.shape), probs))
    if not losses:
        raise OptionError("the teacher has no floating-point output to distill")
    return losses


def _log_probs(x: torch.Tensor, spec: OutputLoss) -> torch.Tensor:
    return torch.log(x.clamp_min(1e-8)) if spec.probabilities else x


def term(spec: OutputLoss, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distillation term of one output."""
    if s.shape != t.shape:
        raise OptionError(f"output {spec.output}: the student gives {tuple(s.shape)}, the teacher {tuple(t.shape)}")
    s, t = s.float(), t.float()
    if spec.kind == "kl":
        T = temperature
        dim = 1 if s.dim() > 1 else 0
        return F.kl_div(F.log_softmax(_log_probs(s, spec) / T, dim=dim), F.softmax(_log_probs(t, spec) / T, dim=dim),
                        reduction="batchmean") * T * T
    if spec.kind == "bce":
        return F.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), t.clamp(0, 1))
    if spec.kind == "cosine":
        return (1 - F.cosine_similarity(s.flatten(1) if s.dim() > 2 else s, t.flatten(1) if t.dim() > 2 else t,
                                        dim=-1)).mean()
    return F.mse_loss(s, t)


def label_term(spec: OutputLoss, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The supervised term on the labelled output: class ids for kl, targets of the output's shape otherwise."""
    if spec.kind == "kl" and not y.is_floating_point():
        return (F.nll_loss(torch.log(s.clamp_min(1e-8)), y) if spec.probabilities else F.cross_entropy(s, y))
    if tuple(y.shape) != tuple(s.shape):
        raise OptionError(f"labels of shape {tuple(y.shape)} do not fit output {spec.output} {tuple(s.shape)} "
                          f"({spec.kind}); give labels shaped like that output, or --label-output another output")
    if spec.kind == "bce":
        return F.binary_cross_entropy(s.float().clamp(1e-6, 1 - 1e-6), y.float())
    return F.mse_loss(s.float(), y.float())


def total(specs: list[OutputLoss], student_out, teacher_out, labels, alpha: float, temperature: float,
          label_output: str | None) -> torch.Tensor:
    """sum over outputs of weight * distillation term; each labelled output mixes alpha * KD + (1 - alpha) * label
    loss (today's Hinton loss for one logits output). `labels`: {output key: labels} (every labelled output), or
    one tensor: the labels of `label_output` (default: the first output)."""
    s_flat = flatten(student_out)
    t_flat = flatten(teacher_out) if teacher_out is not None else None
    keys = list(s_flat)
    if labels is not None and not isinstance(labels, dict):
        labels = {resolve_key(label_output, keys) if label_output is not None else keys[0]: labels}
    labels = labels or {}
    loss = torch.zeros((), device=next(iter(s_flat.values())).device)
    for spec in specs:
        s = s_flat[spec.output]
        y = labels.get(spec.output)
        labelled = y is not None
        if t_flat is not None and (alpha > 0 or not labelled):
            loss = loss + spec.weight * (alpha if labelled else 1.0) * term(spec, s, t_flat[spec.output], temperature)
        if labelled and (alpha < 1 or t_flat is None):
            loss = loss + spec.weight * (1 - alpha if t_flat is not None else 1.0) * label_term(spec, s, y)
    return loss
