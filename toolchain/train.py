"""One training loop for every recipe: supervised training, plain fine-tuning and knowledge
distillation (teacher soft targets, Hinton et al. 2015) are the same loop with a different loss.

alpha weighs the distillation term: loss = alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE(labels).
alpha=0 is plain fine-tuning; without labels only the distillation term is used. Optional hint (feature)
losses (FitNets) add hint_weight * MSE(adapter(student layer), teacher layer).

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

from edgec.data import Dataset
from edgec.core.errors import ModelError, OptionError
from edgec.metrics import set_eval
from edgec.core.progress import note, progress_bar

CHECKPOINT_FORMAT = "edgec.train-checkpoint/1"
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
    augment: bool = True            # random translation of images, +-1/8 of the side
    seed: int = 0
    threads: int | None = None
    patience: int | None = None     # stop after this many epochs without a better eval score
    hints: tuple = ()               # ((student_layer, teacher_layer), ...) feature losses
    hint_weight: float = 1.0
    checkpoint: str | None = None   # written after every epoch (atomically); None = no checkpoint
    resume: bool = False            # continue from `checkpoint`
    device: str = "auto"            # auto | cpu | cuda

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf:  # also refuses nan
            raise OptionError("--epochs, --batch-size and --lr must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"--alpha {self.alpha} is outside 0..1")
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


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float | None:
    """Top-1 accuracy in percent, or None for unlabelled data."""
    if data is None or data.y is None:
        return None
    set_eval(model)
    device = _device_of(model)
    correct = 0
    for i, xb in enumerate(data.arrays(batch_size)):
        pred = model(torch.from_numpy(xb).to(device)).argmax(1).cpu().numpy()
        correct += int((pred == data.y[i * batch_size:i * batch_size + len(xb)]).sum())
    return 100.0 * correct / len(data)


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

    def forward(self, x):
        self._feats.clear()
        logits = self.student(x)
        return logits, [a(self._feats[n]) for n, a in zip(self.hint_layers, self.adapters)]


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
            student.eval()(example)
            set_eval(teacher)
            teacher(example)
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

def _config_for_checkpoint(cfg: TrainConfig) -> dict:
    return {k: (list(map(list, v)) if k == "hints" else v) for k, v in asdict(cfg).items()
            if k not in _RESUMABLE_CHANGES}


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


def _check_labels(student: nn.Module, example: torch.Tensor, data: Dataset) -> None:
    """Class ids outside the student's outputs: one data error before training, not an IndexError inside it."""
    was_training = student.training
    with torch.no_grad():
        out = student.eval()(example)
    student.train(was_training)
    out = out[0] if isinstance(out, (tuple, list)) else out
    y = np.asarray(data.y)
    if out.ndim == 2 and y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        data.validate(num_classes=int(out.shape[1]))


def train(student: nn.Module, train_data: Dataset, cfg: TrainConfig, *, eval_data: Dataset | None = None,
          teacher: nn.Module | None = None, label: str = "train", stop_after: int | None = None) -> dict:
    """Train `student` in place; keeps the weights of the best epoch on eval_data. Returns metrics.

    stop_after: end after this many epochs of this call, as an interruption would (tests of --resume)."""
    cfg.validate()
    if teacher is None and train_data.y is None:
        raise OptionError(f"{train_data.source} has no labels and there is no teacher: nothing to learn from")
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _pick_device(cfg)
    torch.manual_seed(cfg.seed)  # adapters start equal on every rank
    example = torch.from_numpy(np.asarray(train_data.x[0:1], np.float32))
    if train_data.y is not None and (teacher is None or cfg.alpha < 1):  # labels feed the loss: they must fit
        _check_labels(student, example, train_data)
    s_names, t_names, adapters = _build_hints(student, teacher, list(cfg.hints), example)
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
            raise ModelError(f"checkpoint {cfg.checkpoint} holds another student ({str(e).splitlines()[0]})") from None
        adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        history, best, best_state, stale = state["history"], state["best"], state["best_state"], state["stale"]
        start_epoch = state["epoch"]
        if rank == 0:
            note(f"{label}: resuming after epoch {start_epoch} of {cfg.epochs} from {cfg.checkpoint}")
    y_all = None if train_data.y is None else torch.from_numpy(train_data.y)
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
            total_loss, seen = 0.0, 0
            last_acc = history[-1]["eval_accuracy"] if history else None
            for start in range(0, len(order), cfg.batch_size):
                idx = np.sort(order[start:start + cfg.batch_size])
                xb = torch.from_numpy(np.asarray(train_data.x[idx], np.float32))
                if cfg.augment:
                    xb = augment_batch(xb, gen)
                xb = xb.to(device)
                yb = None if y_all is None else y_all[idx].to(device)
                t_logits = None
                if teacher is not None and (cfg.alpha > 0 or yb is None or t_names):
                    with torch.no_grad():
                        t_logits = teacher(xb)
                logits, s_feats = model(xb)
                loss = kd_loss(logits, t_logits if (cfg.alpha > 0 or yb is None) else None, yb,
                               cfg.alpha, cfg.temperature)
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
                acc_txt = f" acc {last_acc:.2f}%" if last_acc is not None else ""
                bar.advance(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.3f}{acc_txt}")
            total_loss, seen = _sum_over_ranks([total_loss, seen], world, device)
            _sync_buffers(student, world)
            acc = evaluate(student, eval_data) if rank == 0 else None
            acc = _broadcast(acc, world)
            history.append({"epoch": epoch + 1, "loss": total_loss / max(1, seen), "eval_accuracy": acc})
            score = acc if acc is not None else -history[-1]["loss"]
            if score > best:
                best, best_state, stale = score, copy.deepcopy(student.state_dict()), 0
            else:
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
    best_epoch = max(history, key=lambda h: h["eval_accuracy"] if h["eval_accuracy"] is not None else -h["loss"])
    record = {"config": asdict(cfg) | {"hints": [list(h) for h in cfg.hints]}, "epochs": history,
              "best_epoch": best_epoch["epoch"], "best_accuracy": best_epoch["eval_accuracy"],
              "seconds": round(time.perf_counter() - started, 2), "teacher": teacher is not None,
              "world_size": world, "resumed_from_epoch": start_epoch or None, "stopped_early": stopped_early,
              "interrupted": interrupted}
    if identical is not None:
        record["replicas_identical"] = identical
    return record
