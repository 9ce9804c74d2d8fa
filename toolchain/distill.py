"""Knowledge distillation as a stage: a teacher (any loadable model, TorchScript included) trains a student
(a pruned edgec model file, a checkpoint, or a fresh architecture) with edgec.train's one loop.

`distill()` is the function the pipeline calls; `DistillJob` + `run_job()` are what `edgec distill` runs, in one
process or in each DDP process (edgec.distributed launches those; only rank 0 writes).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgec.core.errors import ModelError, OptionError
from edgec.train import TrainConfig, evaluate, train


def _output_shapes(model: nn.Module, example: tuple) -> dict:
    """{output key: shape without the batch axis} (edgec.kdloss.flatten keys)."""
    from edgec.kdloss import flatten
    from edgec.metrics import set_eval
    set_eval(model)
    with torch.no_grad():
        out = model(*example)
    return {k: tuple(v.shape[1:]) for k, v in flatten(out).items()}


def distill(teacher: nn.Module, student: nn.Module, train_data, eval_data, cfg: TrainConfig, *,
            label: str = "distill", stop_after: int | None = None) -> dict:
    """Train `student` in place on `teacher`'s outputs (alpha=0: plain fine-tuning), each output with the loss of
    its task (edgec.kdloss), weighed per output (--kd-loss OUTPUT=KIND:WEIGHT), and on the labels of every
    labelled output (`y` on --label-output, each `y:OUTPUT` set on its output). Returns the stage record: teacher
    and student accuracy before/after (None where the labels are not class ids), the losses chosen, the labels
    used, the training history, time."""
    import numpy as np
    from edgec.train import read_rows
    example = read_rows(train_data, np.arange(min(2, len(train_data))))
    try:
        t_out = _output_shapes(teacher, example)
    except Exception as e:  # noqa: BLE001 - e.g. a torch.export program traced at a fixed batch size
        from edgec.core.errors import cause_line
        raise ModelError(f"the teacher fails on a batch of {len(example[0])} samples ({cause_line(e)[:160]}); "
                         "a torch.export program needs a dynamic batch dimension") from None
    s_out = _output_shapes(student, example)
    if t_out != s_out:
        if len(t_out) == 1 == len(s_out) and len(next(iter(t_out.values()))) == 1:
            t_n, s_n = next(iter(t_out.values()))[0], next(iter(s_out.values()))[0]
            raise OptionError(f"teacher gives {t_n} outputs, the student {s_n}; build the student with the same "
                              "classes (e.g. --student-arch torchvision:mobilenet_v3_small?num_classes=" f"{t_n})")
        raise OptionError(f"the teacher's outputs {t_out} and the student's {s_out} differ; the student must return "
                          "the same outputs with the same shapes")
    from edgec.train import _dist
    rank, _ = _dist()
    teacher_acc = evaluate(teacher, eval_data, label_output=cfg.label_output) if rank == 0 else None
    student_acc0 = evaluate(student, eval_data, label_output=cfg.label_output) if rank == 0 else None
    record = train(student, train_data, cfg, eval_data=eval_data, teacher=teacher if cfg.alpha > 0 or cfg.hints
                   or not train_data.labelled else None, label=label, stop_after=stop_after)
    record.update(teacher_accuracy=teacher_acc, student_accuracy_before=student_acc0,
                  recipe="fine-tune" if cfg.alpha == 0 and not cfg.hints else "distill")
    return record


@dataclass
class DistillJob:
    """Everything `edgec distill` was asked, resolved to plain values (it travels to DDP workers as JSON)."""
    teacher: str
    output: str
    arch: str | None = None
    input_shape: list | None = None
    trust_pickle: bool = False
    student: str | None = None
    student_arch: str | None = None
    data: str = "builtin:digits"
    eval_data: str | None = None
    image_size: int | None = None
    mean: list | None = None
    std: list | None = None
    force: bool = False
    train: dict = field(default_factory=dict)   # TrainConfig fields
    stop_after: int | None = None               # tests: simulate an interruption after N epochs

    @property
    def checkpoint(self) -> str:
        return str(self.output) + ".ckpt"

    def config(self) -> TrainConfig:
        kw = dict(self.train)
        kw["hints"] = tuple(tuple(h) for h in kw.get("hints", ()))
        kw["kd_loss"] = tuple(tuple(h) for h in kw.get("kd_loss", ()))
        return TrainConfig(**kw, checkpoint=self.checkpoint)

    def to_json(self) -> dict:
        return asdict(self)


def load_student(job: DistillJob, input_shape):
    """(module, arch spec, history so far) of the student."""
    from edgec.modelio import build_arch, load_model
    if job.student:
        loaded = load_model(job.student, job.student_arch, trust_pickle=job.trust_pickle, input_shape=input_shape)
        if not loaded.eager:
            raise ModelError(f"--student {job.student} is {loaded.kind}; a student is trained, so it must be an "
                             "eager model (an edgec model file from `edgec prune`, or a checkpoint + --student-arch)")
        arch = loaded.arch
        if arch is None:
            raise ModelError(f"--student {job.student} has no architecture spec; pass --student-arch")
        return loaded.module, arch, loaded.meta.get("history", [])
    if job.student_arch:
        torch.manual_seed(job.train.get("seed", 0))  # a fresh student starts from the same weights on every rank/run
        return build_arch(job.student_arch), job.student_arch, [{"stage": "init", "arch": job.student_arch}]
    raise OptionError("pass --student FILE (e.g. the output of `edgec prune`) or --student-arch SPEC")


def run_job(job: DistillJob) -> dict | None:
    """Load, distill, write (rank 0). Returns the result on rank 0, None elsewhere."""
    from edgec.metrics import count_flops, count_params
    from edgec.modelio import save_model
    from edgec.source import SourceSpec, load_source
    from edgec.train import _dist
    started = time.perf_counter()
    cfg = job.config()
    cfg.validate()
    rank, world = _dist()
    inputs = load_source(SourceSpec(job.teacher, arch=job.arch, trust_pickle=job.trust_pickle,
                                    input_shape=tuple(job.input_shape) if job.input_shape else None, data=job.data,
                                    eval_data=job.eval_data, image_size=job.image_size,
                                    mean=tuple(job.mean) if job.mean else None,
                                    std=tuple(job.std) if job.std else None))
    student, arch, history = load_student(job, inputs.input_shape)
    record = distill(inputs.model.module, student, inputs.calib.for_output(cfg.label_output),
                     inputs.eval.for_output(cfg.label_output) if inputs.eval is not None else None, cfg,
                     stop_after=job.stop_after)
    if rank != 0:
        return None
    example = inputs.example()   # one real sample of every input: FLOPs of multi-input models too
    record.update(params=count_params(student), flops=count_flops(student, example),
                  teacher_params=count_params(inputs.model.module),
                  teacher_flops=count_flops(inputs.model.module, example),
                  teacher_path=str(job.teacher), data=inputs.calib.source,
                  eval_data=inputs.eval.source if inputs.eval is not None else None,
                  total_seconds=round(time.perf_counter() - started, 2))
    if record["interrupted"]:
        return {"output": None, "checkpoint": job.checkpoint, **record}
    save_model(job.output, student, arch, inputs.input_shape, force=job.force,
               history=[*history, {"stage": "distill", **record}], preprocess=inputs.calib.preprocess or None)
    Path(job.checkpoint).unlink(missing_ok=True)  # the run is complete: the model file supersedes it
    return {"output": str(job.output), **record}
