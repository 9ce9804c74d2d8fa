"""Scale-out of `edgec distill` on PyTorch's own engine: `torch.distributed.run` starts N worker processes
(`python -m edgec.distributed JOB.json`); each joins the process group (gloo on CPU, nccl on CUDA) and runs
the same edgec.distill.run_job as a single process would. Rank 0 writes the model and the result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgec.core.errors import EdgecError, OptionError, cause_line


@dataclass
class Launch:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def validate(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise OptionError("--nproc-per-node and --nnodes must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise OptionError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.master_addr:
            raise OptionError("--nnodes > 1 needs --master-addr (the host of node rank 0) and the same "
                              "--master-port on every node")

    def torchrun_args(self) -> list[str]:
        args = [f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}"]
        if self.nnodes == 1 and not self.master_addr and not self.master_port:
            return args + ["--standalone"]  # a free local port: parallel runs on one host do not collide
        return args + [f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr or '127.0.0.1'}",
                       f"--master-port={self.master_port or 29500}"]


def run_distill(spec, student: str | None, student_arch: str | None, train: dict, launch_cfg: Launch, *,
                output: str, force: bool = False) -> dict | None:
    """`edgec distill`: every option checked, then one process or torch.distributed.run workers."""
    from edgec.core.fsutil import check_writable
    from edgec.distill import DistillJob, run_job
    from edgec.source import DEFAULT_DATA
    job = DistillJob(teacher=spec.model, output=output, arch=spec.arch, trust_pickle=spec.trust_pickle,
                     input_shape=list(spec.input_shape) if isinstance(spec.input_shape, tuple) else spec.input_shape,
                     student=student,
                     student_arch=student_arch, data=spec.data or DEFAULT_DATA, eval_data=spec.eval_data,
                     image_size=spec.image_size, mean=list(spec.mean) if spec.mean else None,
                     std=list(spec.std) if spec.std else None, force=force,
                     train={**train, "hints": [list(h) for h in train.get("hints", ())]})  # travels as JSON
    job.config().validate()  # bad options fail here, before processes start
    if not (student or student_arch):
        raise OptionError("pass --student FILE (e.g. the output of `edgec prune`) or --student-arch SPEC")
    check_writable(output, force, inputs=(spec.model, student, spec.data, spec.eval_data))
    launch_cfg.validate()
    return launch(job, launch_cfg) if launch_cfg.distributed else run_job(job)


def launch(job, launch_cfg: Launch) -> dict | None:
    """Run `job` (an edgec.distill.DistillJob) in torch.distributed.run workers; returns rank 0's result
    (None on nodes other than rank 0's, which do not write)."""
    launch_cfg.validate()
    with tempfile.TemporaryDirectory(prefix="edgec-ddp-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({"job": job.to_json(), "result": str(result_file)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch_cfg.torchrun_args(),
               "-m", "edgec.distributed", str(job_file)]
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if result and "error" in result:
            err = EdgecError(result["error"])
            err.exit_code = result["exit_code"]
            raise err
        if proc.returncode != 0:
            raise EdgecError(f"the distributed run failed (torch.distributed.run exit {proc.returncode}); "
                             "the workers' messages are above")
        return result


def _worker(job_path: str) -> int:
    """One DDP process: join the group, run the job, report (rank 0)."""
    import torch
    import torch.distributed as dist

    from edgec.distill import DistillJob, run_job
    spec = json.loads(Path(job_path).read_text())
    job = DistillJob(**spec["job"])
    cuda = torch.cuda.is_available() and job.train.get("device", "auto") != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        result = run_job(job)
        if rank == 0:
            Path(spec["result"]).write_text(json.dumps(result))
        # leave together: a rank that tears gloo down while another still runs collectives or writes can abort
        # ("terminate called without an active exception", seen once in the suite)
        dist.barrier()
        return 0
    except EdgecError as e:
        if rank == 0:
            Path(spec["result"]).write_text(json.dumps({"error": cause_line(e), "exit_code": e.exit_code}))
        print(f"edgec: error (rank {rank}): {cause_line(e)}", file=sys.stderr)
        return e.exit_code
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
