"""The sweep directory and its life cycle: check every configuration, skip finished runs, launch the
rest, aggregate.

    sweeps/<spec>-<time>/            (or --out DIR)
        plan.json                    spec, grid, seeds and fixed --set values of the last invocation
        <config>/seed<K>/            an ordinary `xdsl run` directory (results.json when finished)
        <config>/seed<K>/sweep-job.log   that run's output
        submitit/                    submitit's own job files (--launcher submitit)
        sweep.csv, sweep.json        one row per configuration and train block, mean +/- std over seeds

A run is finished when its results.json exists; `--resume` skips those and continues the others,
from their last checkpoint when they have one (`xdsl run --resume`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdsl.errors import XdslError
from xdsl.sweep.aggregate import aggregate, sweep_table, write_sweep_files
from xdsl.sweep.grid import Config, check_configurations, configurations
from xdsl.sweep.launch import Job, SlurmOptions, launch_local, launch_submitit

__all__ = ["SweepOptions", "sweep", "read_sweep"]


@dataclass
class SweepOptions:
    grid: dict[str, list[str]] = field(default_factory=dict)
    seeds: int = 1
    seed: int = 0
    out: Path | None = None
    resume: bool = False
    launcher: str = "local"        # local | submitit
    jobs: int = 1                  # local: processes at a time
    nproc: int = 1                 # processes (GPUs) per run; > 1 runs under torchrun
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    fixed: dict[str, str] = field(default_factory=dict)   # --set values shared by every configuration
    run_options: list[str] = field(default_factory=list)  # passed to every `xdsl run` (--device, ...)
    allow_imports: bool = False
    metric: str = "mean"
    quiet: bool = False


def _sweep_dir(spec: Path, opts: SweepOptions) -> Path:
    out = opts.out or Path("sweeps") / f"{spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not opts.resume:
        raise XdslError(f"the sweep directory '{out}' already holds files",
                        hint="pass --resume to continue that sweep, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XdslError(f"cannot create the sweep directory '{out}': {e.strerror or e}") from None
    return out


def _job(spec: Path, out: Path, config: Config, seed: int, opts: SweepOptions) -> Job:
    run_dir = out / config.name / f"seed{seed}"
    args = [str(spec.resolve()), "--out", str(run_dir.resolve()), "--seed", str(seed)]
    for key, value in {**opts.fixed, **config.overrides}.items():
        args += ["--set", f"{key}={value}"]
    if (run_dir / "checkpoints").exists():
        args.append("--resume")
    if opts.allow_imports:
        args.append("--allow-imports")
    return Job(f"{config.name}/seed{seed}", run_dir, args + list(opts.run_options), nproc=opts.nproc)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "results.json").is_file()


def sweep(spec: Path, opts: SweepOptions, echo=print) -> dict[str, Any]:
    """Run every (configuration, seed) not yet finished, then write and print the sweep's table."""
    spec = Path(spec)
    if not spec.is_file():
        raise XdslError(f"spec '{spec}' does not exist")
    if opts.launcher not in ("local", "submitit"):
        raise XdslError(f"--launcher: unknown launcher '{opts.launcher}'", hint="local or submitit")
    if opts.seeds < 1 or opts.jobs < 1:
        raise XdslError("--seeds and --jobs must be at least 1")
    configs = configurations(opts.grid)
    check_configurations(spec, configs, opts.fixed, opts.allow_imports)   # before anything runs
    out = _sweep_dir(spec, opts)
    plan = {"spec": str(spec.resolve()), "grid": opts.grid, "seeds": list(range(opts.seed, opts.seed + opts.seeds)),
            "fixed": opts.fixed, "launcher": opts.launcher}
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    all_jobs = [_job(spec, out, c, s, opts) for c in configs for s in plan["seeds"]]
    todo = [j for j in all_jobs if not _finished(j.out)]
    echo(f"sweep {out}: {len(configs)} configuration(s) x {opts.seeds} seed(s) = {len(all_jobs)} runs"
         + (f", {len(all_jobs) - len(todo)} finished (skipped)" if len(todo) < len(all_jobs) else ""))
    done = [0]

    def on_done(job: Job, code: int) -> None:
        done[0] += 1
        status = "done" if code == 0 else f"FAILED (exit {code}); log: {job.log}"
        echo(f"[{done[0]}/{len(todo)}] {job.name} {status}")

    codes: dict[str, int] = {}
    if todo and opts.launcher == "local":
        codes = launch_local(todo, opts.jobs, on_done)
    elif todo:
        if opts.nproc > 1 and not opts.slurm.gpus:  # a torchrun job of N processes asks for N GPUs
            opts.slurm.gpus = opts.nproc
        codes = launch_submitit(todo, out / "submitit", opts.slurm, on_done)
    summary = _summarize(out, configs, plan, opts, echo)
    failed = sorted(n for n, c in codes.items() if c != 0)
    if failed:
        raise XdslError(f"{len(failed)} of {len(todo)} runs failed: {', '.join(failed)}",
                        hint=f"each run's output is in its sweep-job.log; rerun with --resume --out {out}")
    return summary


def read_sweep(out: Path, configs: list[Config] | None = None, seeds: list[int] | None = None
               ) -> dict[str, tuple[dict[str, str], list[dict[str, Any]]]]:
    """Configuration name -> (its values, the results of its finished seeds), from the run directories."""
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
    if configs is None:
        configs = configurations(plan.get("grid", {}))
    seeds = seeds if seeds is not None else plan.get("seeds", [])
    runs = {}
    for c in configs:
        results = []
        for s in seeds:
            path = out / c.name / f"seed{s}" / "results.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
        runs[c.name] = (c.overrides, results)
    return runs


def _summarize(out: Path, configs: list[Config], plan: dict[str, Any], opts: SweepOptions, echo) -> dict[str, Any]:
    runs = read_sweep(out, configs, plan["seeds"])
    keys = list(opts.grid)
    columns, rows = aggregate(runs, opts.metric)
    write_sweep_files(out, {**plan, "metric": opts.metric}, keys, columns, rows)
    from xdsl.console import make_console, print_table

    n = opts.seeds
    title = "sweep: top-1 test accuracy (%)" + (f", mean ± std over {n} seeds" if n > 1 else "")
    console = make_console()
    print_table(console, sweep_table(keys, columns, rows, title))
    ranked_by = "the mean of its networks' accuracies" if opts.metric == "mean" else f"'{opts.metric}'"
    console.print(f"* = best configuration of each train block by {ranked_by}")
    echo(f"sweep directory: {out} (sweep.csv, sweep.json)")
    return {"out": str(out), "columns": columns, "rows": rows}
