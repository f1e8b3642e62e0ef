"""Where a sweep's runs execute. Each run is one `xdsl run` command (`torchrun -m xdsl run` when a run
uses several GPUs); a launcher only decides where that command runs and waits for it.

    local      N processes at a time on this machine (`--jobs N`); when several GPUs are visible,
               each process sees its own (CUDA_VISIBLE_DEVICES), `--nproc` of them for multi-GPU runs
    submitit   one job per run through the submitit package: SLURM when the cluster has it
               (partition, time limit, GPUs as options), or submitit's local executor
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xdsl.errors import XdslError

__all__ = ["Job", "SlurmOptions", "run_command", "launch_local", "launch_submitit", "visible_gpus"]


@dataclass
class Job:
    """One run of the sweep: its directory, its `xdsl run` arguments and where its output goes."""

    name: str               # configuration/seedK
    out: Path               # the run directory
    run_args: list[str]     # arguments after `xdsl run`
    nproc: int = 1          # processes (GPUs) of this run: > 1 runs under torchrun

    @property
    def log(self) -> Path:
        return self.out / "sweep-job.log"


@dataclass
class SlurmOptions:
    """What a submitit job asks the scheduler for (ignored by the local executor except the time limit)."""

    partition: str | None = None
    time_min: int = 60
    gpus: int = 0
    cpus: int | None = None
    cluster: str | None = None   # None: SLURM when available, else local; "local" / "debug" force one
    extra: dict[str, object] = field(default_factory=dict)


def run_command(job: Job) -> list[str]:
    """The command line of one run: `python -m xdsl run ...`, or torchrun's module for several processes."""
    if job.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}",
                "-m", "xdsl", "run", *job.run_args]
    return [sys.executable, "-m", "xdsl", "run", *job.run_args]


def visible_gpus() -> list[str]:
    """GPU ids a local sweep can hand out: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build
        return []


def _run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def launch_local(jobs: list[Job], parallel: int, on_done: Callable[[Job, int], None]) -> dict[str, int]:
    """Run `jobs` as local processes, `parallel` at a time; returns each job's exit code by name.

    With G > 1 visible GPUs, a slot of `job.nproc` GPUs is taken for each running job and given back when
    it ends, so at most G // nproc jobs run at once; with one GPU or none the processes share it.
    """
    gpus = visible_gpus()
    per_job = max(j.nproc for j in jobs) if jobs else 1
    slots: list[list[str]] = []
    if len(gpus) > 1:  # one GPU (or none): every process sees it, nothing to hand out
        slots = [gpus[i:i + per_job] for i in range(0, len(gpus) - per_job + 1, per_job)]
    if slots:
        parallel = min(parallel, len(slots))
    lock = threading.Lock()
    codes: dict[str, int] = {}

    def work(job: Job) -> None:
        env = dict(os.environ)
        slot = None
        if slots:
            with lock:
                slot = slots.pop()
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        try:
            code = _run_logged(run_command(job), job.log, env)
        finally:
            if slot is not None:
                with lock:
                    slots.append(slot)
        with lock:
            codes[job.name] = code
            on_done(job, code)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for f in [pool.submit(work, j) for j in jobs]:
            f.result()
    return codes


def launch_submitit(jobs: list[Job], folder: Path, slurm: SlurmOptions,
                    on_done: Callable[[Job, int], None]) -> dict[str, int]:
    """Submit one submitit job per run and wait for all of them; returns each job's exit code by name."""
    try:
        import submitit
    except ImportError:
        raise XdslError("--launcher submitit needs the submitit package",
                        hint="pip install 'xdsl-distill[sweep]' (or pip install submitit)") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=slurm.cluster)
    params: dict[str, object] = {"timeout_min": slurm.time_min, "tasks_per_node": 1, "nodes": 1}
    if slurm.gpus:
        params["gpus_per_node"] = slurm.gpus
    if slurm.cpus:
        params["cpus_per_task"] = slurm.cpus
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    params.update(slurm.extra)
    executor.update_parameters(**params)
    submitted = []
    for job in jobs:
        executor.update_parameters(name=f"xdsl-{job.name}")
        command = submitit.helpers.CommandFunction(["bash", "-c", _logged_shell(run_command(job), job.log)])
        submitted.append((job, executor.submit(command)))
    codes: dict[str, int] = {}
    for job, handle in submitted:
        try:
            handle.result()
            code = 0
        except Exception:  # submitit's FailedJobError or a lost job; the run's log says why
            code = 1
        codes[job.name] = code
        on_done(job, code)
    return codes


def _logged_shell(cmd: list[str], log: Path) -> str:
    """A shell line running `cmd` with its output appended to `log` (the job's own stdout is submitit's)."""
    import shlex

    line = " ".join(shlex.quote(c) for c in cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    return f"echo {shlex.quote('$ ' + line)} >> {shlex.quote(str(log))}; {line} >> {shlex.quote(str(log))} 2>&1"
