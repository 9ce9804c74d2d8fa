"""One training loop for every recipe: supervised training, plain fine-tuning and knowledge
distillation (teacher soft targets, Hinton et al. 2015) are the same loop with a different loss.

alpha weighs the distillation term: loss = alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE(labels).
alpha=0 is plain fine-tuning; without labels only the distillation term is used.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgec.data import Dataset
from edgec.errors import OptionError
from edgec.progress import progress_bar


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"          # sgd | adamw
    weight_decay: float = 5e-4
    schedule: str = "cosine"        # cosine | constant
    alpha: float = 0.9              # weight of the distillation term (0 = plain fine-tuning)
    temperature: float = 4.0
    augment: bool = True            # random translation of images, +-1/8 of the side
    seed: int = 0
    threads: int | None = None

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise OptionError("--epochs, --batch-size and --lr must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"--alpha {self.alpha} is outside 0..1")
        if self.temperature <= 0:
            raise OptionError(f"--temperature {self.temperature} must be positive")
        if self.optimizer not in ("sgd", "adamw") or self.schedule not in ("cosine", "constant"):
            raise OptionError("--optimizer is sgd|adamw and --schedule cosine|constant")


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


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float | None:
    """Top-1 accuracy in percent, or None for unlabelled data."""
    if data is None or data.y is None:
        return None
    model.eval()
    correct = 0
    for i, xb in enumerate(data.batches(batch_size)):
        pred = model(torch.from_numpy(xb)).argmax(1).numpy()
        correct += int((pred == data.y[i * batch_size:i * batch_size + len(xb)]).sum())
    return 100.0 * correct / len(data)


def train(student: nn.Module, train_data: Dataset, cfg: TrainConfig, *, eval_data: Dataset | None = None,
          teacher: nn.Module | None = None, label: str = "train") -> dict:
    """Train `student` in place; keeps the weights of the best epoch on eval_data. Returns metrics."""
    cfg.validate()
    if teacher is None and train_data.y is None:
        raise OptionError(f"{train_data.source} has no labels and there is no teacher: nothing to learn from")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
           if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    steps_per_epoch = -(-len(train_data) // cfg.batch_size)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                 pct_start=0.15)
             if cfg.schedule == "cosine" else None)
    if teacher is not None:
        teacher.eval()
    history, best, best_state = [], -1.0, None
    started = time.perf_counter()
    y_all = None if train_data.y is None else torch.from_numpy(train_data.y)
    with progress_bar(f"{label}", total=cfg.epochs * steps_per_epoch) as bar:
        for epoch in range(cfg.epochs):
            student.train()
            order = torch.randperm(len(train_data), generator=gen).numpy()
            total_loss = 0.0
            for start in range(0, len(order), cfg.batch_size):
                idx = np.sort(order[start:start + cfg.batch_size])
                xb = torch.from_numpy(np.asarray(train_data.x[idx], np.float32))
                if cfg.augment:
                    xb = augment_batch(xb, gen)
                yb = None if y_all is None else y_all[idx]
                with torch.no_grad():
                    t_logits = teacher(xb) if teacher is not None and (cfg.alpha > 0 or yb is None) else None
                loss = kd_loss(student(xb), t_logits, yb, cfg.alpha, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total_loss += float(loss) * len(idx)
                bar.advance(f"epoch {epoch + 1}/{cfg.epochs} loss {float(loss):.3f}")
            acc = evaluate(student, eval_data)
            history.append({"epoch": epoch + 1, "loss": total_loss / len(order), "eval_accuracy": acc})
            score = acc if acc is not None else -history[-1]["loss"]
            if score > best:
                best, best_state = score, copy.deepcopy(student.state_dict())
    if best_state is not None and eval_data is not None:
        student.load_state_dict(best_state)
    student.eval()
    best_epoch = max(history, key=lambda h: h["eval_accuracy"] if h["eval_accuracy"] is not None else -h["loss"])
    return {"config": asdict(cfg), "epochs": history, "best_epoch": best_epoch["epoch"],
            "best_accuracy": best_epoch["eval_accuracy"], "seconds": round(time.perf_counter() - started, 2),
            "teacher": teacher is not None}
