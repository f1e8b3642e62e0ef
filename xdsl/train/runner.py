"""`xdsl run`: train every train block of a spec, evaluate, write the run directory (`xdsl.rundir`).

Train blocks run in order; each starts from the networks' initial weights (so Independent,
DML and XML compare from the same start) unless it says `after B`, which continues from B.
A block reads top to bottom in `train_block`: restore, the epoch loop (steps, end of epoch,
checkpoint), the final weights.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from xdsl import distributed as ddp
from xdsl.checkpoint import load_checkpoint, load_latest, rng_state, save_atomic, set_rng_state
from xdsl.compile.data_fit import check_data_fit
from xdsl.data import DataBundle, build_data
from xdsl.errors import SpecError, XdslError
from xdsl.eval.evaluate import checkpoint_snapshots, default_items, evaluate_items
from xdsl.eval.sharded import epoch_accuracy, evaluate_sharded, shard_loader
from xdsl.eval.summary import print_run_summary, summary_rows
from xdsl.experiment import Experiment, compile_program
from xdsl.lang import ir
from xdsl.lang.format import format_spec
from xdsl.lang.settings import describe_stage, resolved_spec
from xdsl.report import write_report
from xdsl.rundir import RunDir
from xdsl.trackers import check_available
from xdsl.train.channel_init import map_channels
from xdsl.train.device import amp_dtype, pick_device, set_threads
from xdsl.train.environment import environment, make_deterministic
from xdsl.train.logger import MetricsLogger

__all__ = ["RunOptions", "run", "run_one", "train_block", "NonFiniteLoss"]


class _Stop:
    """Ctrl-C / SIGTERM while batches train: finish the current step, checkpoint at that batch and stop,
    so a checkpoint never holds a half-done step (alternating order updates networks one after another).
    A second signal, or one outside the batch loop, stops at once; the previous checkpoint is kept."""

    deferring = False  # inside the batch loop
    requested = False  # a signal arrived there: stop before the next batch
    hard = False       # a second one: stop now

    @classmethod
    def handler(cls, signum, frame) -> None:
        if cls.deferring and not cls.requested:
            cls.requested = True
            return
        cls.hard = cls.deferring
        raise KeyboardInterrupt


class NonFiniteLoss(XdslError):
    """A loss became NaN/inf: the run stops, the last good checkpoint stays as it was."""


@dataclass
class RunOptions:
    out: Path | None = None
    resume: bool = False
    epochs: int | None = None
    seeds: int = 1
    seed: int = 0
    device: str = "auto"
    compile: bool | None = None          # None: torch.compile on CUDA, eager elsewhere
    compile_mode: str = "default"        # torch.compile mode when compiling
    amp: str = "auto"                    # auto: bf16 autocast on CUDA
    overrides: dict[str, str] = field(default_factory=dict)
    allow_imports: bool = False
    quiet: bool = False
    log_every: int = 20                  # steps between host syncs for NaN checks and progress text
    stop_after_steps: int | None = None  # testing: raise KeyboardInterrupt after this many steps
    threads: int | None = None           # CPU threads; None: 1 for small models, else all cores
    deterministic: bool = False          # deterministic kernels (bit-identical reruns), recorded in the run dir
    rank: int = 0
    world_size: int = 1
    mlflow: str | None = None            # MLflow tracking URI (e.g. a local file store)
    wandb: str | None = None             # W&B project


@dataclass
class _Block:
    """One train block being trained: what every step of `train_block` reads and updates."""

    exp: Experiment
    stage: ir.Stage
    bundle: DataBundle
    run: RunDir
    logger: MetricsLogger
    opts: RunOptions
    seed: int
    device: torch.device
    sampler: Any = None
    start_epoch: int = 0
    skip_batches: int = 0                # batches of start_epoch already trained (resume mid-epoch)
    steps_done: int = 0
    best: dict[str, dict[str, float]] = field(default_factory=dict)
    best_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # epoch -> weights (best.pt)
    epochs: int = 0                      # `epochs N`, or as many as a `steps N` budget needs
    per_epoch: int = 0                   # optimisation steps in a full epoch

    @property
    def last(self) -> Path:
        return self.run.last(self.stage.name)

    @property
    def is_main(self) -> bool:
        return self.opts.rank == 0


# ---------------------------------------------------------------------------------------------- a train block


def train_block(b: _Block, initial_state: dict[str, Any], snapshots: bool) -> dict[str, Any]:
    """Train one block (resuming if a checkpoint exists); return its per-network best accuracies."""
    if _restore(b, initial_state):
        return b.best
    b.per_epoch, b.epochs = _budget(b)
    b.exp.block_epochs = b.epochs  # `epochs` in loss schedules: a `steps` budget's epochs too
    test_loader = shard_loader(b.bundle, b.opts.rank, b.opts.world_size)
    val_loader = shard_loader(b.bundle, b.opts.rank, b.opts.world_size, "val") if b.bundle.val is not None \
        else None
    with _progress(b) as progress:
        for epoch in range(b.start_epoch, b.epochs):
            train_loss, seconds = _train_epoch(b, epoch, progress)
            _end_epoch(b, epoch, train_loss, seconds, test_loader, val_loader)
            _checkpoint(b, epoch + 1, 0)
            if snapshots and b.is_main:
                root = b.exp.compiled.root
                save_atomic({"modules": {"parts": root.parts.state_dict(), "adapters": root.adapters.state_dict()},
                             "epoch": epoch + 1}, b.run.snapshot(b.stage.name, epoch + 1))
    _print_terms(b)
    if b.is_main:
        save_atomic({"modules": b.exp.compiled.root.state_dict(), "stage": b.stage.name, "seed": b.seed},
                    b.run.final(b.stage.name))  # the seed fixes the validation split `xdsl eval` must rebuild
    _checkpoint(b, b.epochs, 0, done=True)
    ddp.barrier()  # later blocks (`after`) and resumes read rank 0's files
    return b.best


def _budget(b: _Block) -> tuple[int, int]:
    """Steps per epoch and epochs: `epochs N`, or enough epochs for `steps N` (the last one cut short)."""
    accumulate = b.stage.settings.get("accumulate") or 1  # a step is `accumulate` batches, the last one fewer
    per_epoch = math.ceil(len(b.bundle.train_loader(epoch_seed=0, sampler=b.sampler)) / accumulate)
    if b.stage.settings.get("max_steps"):
        per_epoch = min(per_epoch, b.stage.settings["max_steps"])
    if not b.stage.settings.get("steps"):
        return per_epoch, b.stage.epochs
    return per_epoch, math.ceil(b.stage.settings["steps"] / max(per_epoch, 1))


def _restore(b: _Block, initial_state: dict[str, Any]) -> bool:
    """Start weights (initial, or `after B`'s final), channel mapping, and the resumed state if any.
    True when the block had already finished (its final weights are loaded)."""
    root, stage = b.exp.compiled.root, b.stage
    start = load_checkpoint(b.run.final(stage.after), b.device)["modules"] if stage.after is not None \
        else initial_state
    root.load_state_dict(start)
    state = load_latest(b.last, b.device, warn=b.logger.console.print) if b.opts.resume else None
    if stage.settings.get("map_channels") and state is None:
        _map_channels(b)
    b.exp.use_stage(stage.name)
    b.logger.console.print(f"train {stage.name}: {describe_stage(stage)}", markup=False, highlight=False,
                           soft_wrap=True)
    if state is not None and state.get("done") and b.run.final(stage.name).exists():
        root.load_state_dict(load_checkpoint(b.run.final(stage.name), b.device)["modules"])
        set_rng_state(state["rng"])  # later blocks draw what they drew in the uninterrupted run
        b.best = state["best"]
        b.logger.console.print(f"[dim]train {stage.name}: already finished, skipped[/]")
        return True
    if state is not None:
        _resume(b, state)
    elif b.opts.resume:
        b.logger.truncate(stage.name, 0)  # killed before its first checkpoint: the block's rows are redone
    if b.exp.compile_mode is not None and b.is_main:
        count = 1 if stage.order == "simultaneous" else len(stage.trained)
        b.logger.console.print(f"[dim]train {stage.name}: torch.compile ({b.exp.compile_mode}) of {count} "
                               "objective(s) at the first step[/]")
    return False


def _map_channels(b: _Block) -> None:
    """`map_channels`: align the networks' channels at the cut on one batch before training."""
    x, _ = next(iter(b.bundle.train_loader(epoch_seed=b.seed * 100_003)))
    mapping = map_channels(b.exp, b.stage, x.to(b.device), b.stage.settings["map_channels"])
    for report in mapping:
        b.logger.console.print(f"map_channels {report['network']} -> {report['reference']}: {report['text']}")
    b.run.block(b.stage.name).mkdir(parents=True, exist_ok=True)
    b.run.mapping(b.stage.name).write_text(json.dumps(mapping, indent=2))


def _resume(b: _Block, state: dict[str, Any]) -> None:
    """Weights, optimisers, schedules, RNG and position of the last checkpoint."""
    exp = b.exp
    exp.compiled.root.load_state_dict(state["modules"])
    for net, opt in exp.optimizers.items():
        opt.load_state_dict(state["optimizers"][net])
    for net, sched in exp.schedulers.items():
        if sched is not None:
            sched.load_state_dict(state["schedulers"][net])
    for net, scaler in exp.scalers.items():
        if net in state.get("scalers", {}):
            scaler.load_state_dict(state["scalers"][net])
            exp.skipped_steps[net] = state["skipped_steps"][net]
    set_rng_state(state["rng"])
    b.start_epoch, b.skip_batches, b.best = state["epoch"], state["batch"], state["best"]
    best_file = b.run.best(b.stage.name)
    if b.is_main and best_file.exists():  # the weights of every network's best epoch so far
        kept = {int(e): st for e, st in load_checkpoint(best_file, torch.device("cpu"))["states"].items()}
        b.best_states = {e: st for e, st in kept.items() if e in {v["epoch"] for v in b.best.values()}}
    exp.step_count = state["step_count"]
    b.logger.truncate(b.stage.name, b.start_epoch)
    b.logger.console.print(f"[dim]train {b.stage.name}: resumed at epoch {b.start_epoch + 1}, "
                           f"batch {b.skip_batches}[/]")


def _progress(b: _Block) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=b.logger.console, transient=True,
                    disable=b.opts.quiet)


def _train_epoch(b: _Block, epoch: int, progress: Progress) -> tuple[dict[str, float], float]:
    """Every step of one epoch; mean train loss per network and the seconds it took.
    Ctrl-C checkpoints at the last finished step (see `_Stop`)."""
    stage = b.stage
    loader = b.bundle.train_loader(epoch_seed=b.seed * 100_003 + epoch, sampler=b.sampler,
                                   with_index=b.exp.needs_index)  # (x, y, i) for stateful terms
    accumulate = stage.settings.get("accumulate") or 1  # micro-batches per optimisation step
    max_steps = stage.settings.get("max_steps")
    n_batches = len(loader) if max_steps is None else min(len(loader), max_steps * accumulate)
    if stage.settings.get("steps"):  # the last epoch of a step budget stops at the budget
        n_batches = min(n_batches, (stage.settings["steps"] - epoch * b.per_epoch) * accumulate)
    task = progress.add_task(f"{stage.name} {epoch + 1}/{b.epochs}", total=n_batches, info="")
    b.exp.set_train_mode(True)
    b.exp.epoch = epoch  # schedules in losses (`epoch`, `step` is the experiment's step count)
    b.exp.reset_term_sums()
    sums = {n: torch.zeros((), device=b.device) for n in stage.trained}
    count, batch, position = 0, 0, b.skip_batches  # position: batches of this epoch whose step is complete
    group: list[tuple[torch.Tensor, ...]] = []
    t0 = time.perf_counter()
    _Stop.deferring = True
    try:
        for batch, item in enumerate(loader):
            if batch >= n_batches:
                break
            if batch < b.skip_batches:
                progress.advance(task)
                continue
            group.append(tuple(item))
            if len(group) < accumulate and batch + 1 < n_batches:
                continue
            losses = _step(b, group, epoch, batch, progress, task)
            position, count, group = batch + 1, count + 1, []
            for n, v in losses.items():
                sums[n] += v
            progress.advance(task, accumulate)
            if b.opts.stop_after_steps is not None and b.steps_done >= b.opts.stop_after_steps:
                raise KeyboardInterrupt  # testing: stop as Ctrl-C would
    except KeyboardInterrupt:
        if _Stop.hard:  # a second signal, maybe mid-step: the last checkpoint stays as it was
            raise
        _checkpoint(b, epoch, position)
        b.logger.console.print(f"interrupted: checkpoint written to {b.last}; continue with --resume "
                               f"--out {b.run.root}")
        raise
    finally:
        _Stop.deferring = False
    b.skip_batches = 0
    progress.remove_task(task)
    train_loss = {n: float(s) / max(count, 1) for n, s in sums.items()}
    for n, v in train_loss.items():
        if not math.isfinite(v):
            _check_finite(b, {n: torch.tensor(v)}, epoch, batch)
    return train_loss, time.perf_counter() - t0


def _step(b: _Block, group: list[tuple[torch.Tensor, ...]], epoch: int, batch: int, progress: Progress,
          task: TaskID) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (or `accumulate` micro-batches); every `log_every` steps
    (every step on CPU) a NaN check."""
    if _Stop.requested:
        raise KeyboardInterrupt
    group = [_to_device(b, *item) for item in group]
    losses = b.exp.train_step(*group[0]) if len(group) == 1 else b.exp.accumulate_step(group)
    if b.exp.schedule_per_step:  # under `steps N` schedules count optimisation steps
        b.exp.scheduler_step()
    b.steps_done += 1
    if b.device.type == "cpu" or b.steps_done % b.opts.log_every == 0:
        _check_finite(b, losses, epoch, batch)
        progress.update(task, info="  ".join(f"{n} {float(v):.3f}" for n, v in losses.items()))
    return losses


def _to_device(b: _Block, x: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x, y) or (x, y, i) on the training device."""
    x = x.to(b.device, non_blocking=True)
    if b.exp.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *(t.to(b.device, non_blocking=True) for t in rest))


def _check_finite(b: _Block, losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    bad = [n for n, v in losses.items() if not torch.isfinite(v)]
    if not bad:
        return
    net = bad[0]
    terms = b.exp.last_terms.get(net, {})
    bad_terms = [t for t, v in terms.items() if not torch.isfinite(v.detach()).all()]
    which = f"term {bad_terms[0]} = {float(terms[bad_terms[0]].detach())}" if bad_terms else \
        f"objective = {float(losses[net])}"
    raise NonFiniteLoss(
        f"non-finite loss in train block '{b.stage.name}', network '{net}', epoch {epoch + 1}, step {step}: {which}",
        hint=f"lower the learning rate or set grad_clip; the last good checkpoint "
             f"{b.last if b.last.exists() else '(none yet)'} is intact")


def _end_epoch(b: _Block, epoch: int, train_loss: dict[str, float], seconds: float, test_loader: Any,
               val_loader: Any = None) -> None:
    """Schedules step (per epoch; per step under `steps N`); test (validation, and with `eval_train` training-set)
    accuracy every `eval_every` epochs and the last, none on re-id data (its test identities are not its classes);
    metrics rows; best epoch."""
    exp, stage = b.exp, b.stage
    lrs = {n: o.param_groups[0]["lr"] for n, o in exp.optimizers.items()}  # this epoch's, logged below
    if not exp.schedule_per_step:
        exp.scheduler_step()
    eval_every = stage.settings.get("eval_every") or 1
    on_time = (epoch + 1) % eval_every == 0 or epoch + 1 == b.epochs
    due = b.bundle.retrieval is None and on_time
    acc = epoch_accuracy(exp, test_loader, b.device) if due else {}
    val_acc = epoch_accuracy(exp, val_loader, b.device) if due and val_loader is not None else {}
    # re-id training identities are classes: their accuracy is measured, though the test set's are not
    train_acc = epoch_accuracy(exp, shard_loader(b.bundle, b.opts.rank, b.opts.world_size, "train"), b.device) \
        if on_time and stage.settings.get("eval_train") else {}
    terms = exp.term_means()
    for net in exp.networks:
        if net not in stage.trained and net not in acc:
            continue
        row = {"stage": stage.name, "epoch": epoch + 1, "step": exp.step_count, "network": net,
               "train_loss": train_loss.get(net), "test_acc": acc.get(net),
               **({"val_acc": val_acc.get(net)} if val_acc else {}),
               **({"train_acc": train_acc.get(net)} if train_acc else {}),
               "lr": lrs.get(net),
               "seconds": round(seconds, 3), "trained": net in stage.trained}
        if net in exp.skipped_steps:
            row["skipped_steps"] = exp.skipped_steps[net]  # fp16: steps whose scaled gradients overflowed
        if terms.get(net):
            row["terms"] = terms[net]  # each loss term's mean over the epoch (metrics, report, trackers)
        b.logger.log(row)
    _update_best(b, epoch + 1, acc, val_acc)
    b.logger.console.print(
        f"{stage.name} epoch {epoch + 1}/{b.epochs}  "
        + "  ".join(f"{n}: loss {train_loss[n]:.4f}" for n in stage.trained)
        + ("  |  " + "  ".join(f"{n} acc {100 * a:.2f}%" for n, a in acc.items()) if acc else "")
        + ("  |  val " + "  ".join(f"{n} {100 * a:.2f}%" for n, a in val_acc.items()) if val_acc else "")
        + ("  |  train " + "  ".join(f"{n} {100 * a:.2f}%" for n, a in train_acc.items()) if train_acc else "")
        + f"  ({seconds:.1f}s)")


def _update_best(b: _Block, epoch: int, acc: dict[str, float], val_acc: dict[str, float]) -> None:
    """Each network's best epoch: by validation accuracy when there is a validation split, else by test
    accuracy ("best on test"); `acc` is always the test accuracy at that epoch. A later epoch wins a tie.
    best.pt keeps the weights of every network's best epoch (rank 0)."""
    key = "val_acc" if val_acc else "acc"
    improved = False
    for net, score in (val_acc or acc).items():
        if score >= b.best.get(net, {}).get(key, -1.0):
            b.best[net] = {"acc": acc[net], "epoch": epoch, **({"val_acc": score} if val_acc else {})}
            improved = True
    if not improved or not b.is_main:
        return
    b.best_states[epoch] = {k: v.detach().to("cpu", copy=True) for k, v in b.exp.compiled.root.state_dict().items()}
    b.best_states = {e: st for e, st in b.best_states.items() if e in {v["epoch"] for v in b.best.values()}}
    save_atomic({"modules": _best_modules(b), "stage": b.stage.name, "best": b.best, "states": b.best_states,
                 "seed": b.seed}, b.run.best(b.stage.name))


def _best_modules(b: _Block) -> dict[str, torch.Tensor]:
    """One state_dict with every network's parts (and the adapters of its first owner) from that network's
    best epoch: what `xdsl eval --checkpoint best.pt` and `weights` load. Tensors are shared with `states`,
    so torch.save stores each once."""
    epoch_of = {net: v["epoch"] for net, v in b.best.items()}
    out = dict(b.best_states[max(b.best_states)])
    for key in out:
        kind, name = key.split(".", 2)[:2]
        owners = (name,) if kind == "parts" else b.exp.program.adapters[name].owners if kind == "adapters" else \
            (b.exp.term_owners.get(name),) if kind == "terms" else ()  # a stateful term: its owner's best epoch
        net = next((o for o in owners if o in epoch_of), None)
        if net is not None and epoch_of[net] in b.best_states:
            out[key] = b.best_states[epoch_of[net]][key]
    return out


def _print_terms(b: _Block) -> None:
    """One compact line per trained network: each loss term's mean over the last epoch, so a dead
    (always 0) or exploding term is visible without a debugger."""
    last = [r for r in b.logger.rows if r["stage"] == b.stage.name and r["epoch"] == b.epochs]
    for row in last:
        terms = row.get("terms")
        if terms:
            b.logger.console.print(f"[dim]{b.stage.name} {row['network']} terms (last epoch mean): "
                                   + "  ".join(f"{t} {v:.4g}" for t, v in terms.items()) + "[/]", soft_wrap=True)


def _checkpoint(b: _Block, epoch: int, batch: int, done: bool = False) -> None:
    """last.pt: everything a resume needs, written atomically by rank 0."""
    if not b.is_main:
        return
    exp = b.exp
    save_atomic({
        "modules": exp.compiled.root.state_dict(),
        "optimizers": {n: o.state_dict() for n, o in exp.optimizers.items()},
        "schedulers": {n: s.state_dict() for n, s in exp.schedulers.items() if s is not None},
        "scalers": {n: s.state_dict() for n, s in exp.scalers.items()}, "skipped_steps": dict(exp.skipped_steps),
        "rng": rng_state(), "epoch": epoch, "batch": batch, "step_count": exp.step_count,
        "best": b.best, "done": done, "stage": b.stage.name,
    }, b.last, keep_previous=True)


# ---------------------------------------------------------------------------------------------- a run


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_out(spec: Path, opts: RunOptions) -> Path:
    out = opts.out or RunDir.default(spec).root
    if opts.resume and not RunDir(out).checkpoints.exists():
        raise XdslError(f"--resume: '{out}' has no checkpoints to resume from", hint="pass the run's --out DIR")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        raise XdslError(f"cannot write to the run directory '{out}': {e.strerror or e}",
                        hint="choose another --out, or free disk space") from None
    return out


def _experiment(spec: Path, opts: RunOptions, device: torch.device) -> Experiment:
    overrides = dict(opts.overrides)
    if opts.epochs is not None:
        overrides["epochs"] = str(opts.epochs)
    compiled = compile_program(spec, device=device, allow_imports=opts.allow_imports, overrides=overrides)
    set_threads(opts.threads, compiled.root, device)
    use_compile = opts.compile if opts.compile is not None else device.type == "cuda"
    return Experiment(compiled, compile_mode=opts.compile_mode if use_compile else None,
                      amp=amp_dtype(opts.amp, device), channels_last=device.type == "cuda")


def _data(spec: Path, program: ir.Program, opts: RunOptions, seed: int, device: torch.device) -> tuple[DataBundle, Any]:
    """The data bundle and, under torchrun, the sampler giving each process its share of the batches."""
    if program.data is None:
        raise SpecError("the spec has no 'data' statement, so it cannot be run", None,
                        'add e.g. `data digits(batch_size=64)`')
    try:
        bundle = build_data(program.data.name, program.data.kwargs, spec_dir=spec.resolve().parent, seed=seed,
                            device_is_cuda=device.type == "cuda", allow_imports=opts.allow_imports)
    except XdslError as e:
        raise SpecError(e.message, program.data.pos, e.hint) from None
    if "WORLD_SIZE" not in os.environ:
        return bundle, None
    # under torchrun (even with one process: the same batches for any N)
    from torch.utils.data.distributed import DistributedSampler

    if bundle.batch_size % opts.world_size:
        raise SpecError(f"batch_size {bundle.batch_size} is the global batch and must divide by the "
                        f"{opts.world_size} processes", program.data.pos)
    bundle.batch_size //= opts.world_size
    return bundle, DistributedSampler(bundle.train, num_replicas=opts.world_size, rank=opts.rank, shuffle=True,
                                      seed=seed, drop_last=False)


def _same_spec(saved: Path, now: str) -> None:
    """--resume continues the run that `saved` (its spec.xspec) describes: a spec or --set that now says
    something else would train the rest differently from what the record says. Refuse, naming the lines."""
    before = saved.read_text()
    if before == now:
        return
    diff = [line for line in difflib.unified_diff(before.splitlines(), now.splitlines(), "the run", "now", lineterm="",
                                                  n=0) if not line.startswith(("---", "+++", "@@"))]
    raise XdslError(f"--resume: the spec and --set values differ from the run being resumed ({saved}):\n  "
                    + "\n  ".join(diff[:12]),
                    hint="resume with the spec and --set values the run started with, or start a new run "
                         "(another --out; `after=` starts a block from a finished one's weights)")


def run_one(spec: Path, opts: RunOptions, seed: int, out: Path) -> dict[str, Any]:
    """One seed: every train block, then its evaluation. Returns the results written to results.json."""
    device = pick_device(opts.device)
    _seed_everything(seed)
    exp = _experiment(spec, opts, device)
    program, run = exp.program, RunDir(out)
    bundle, sampler = _data(spec, program, opts, seed, device)
    check_data_fit(exp.compiled, bundle)  # class outputs against the built data's classes
    ran = format_spec(resolved_spec(program))
    if opts.resume and run.spec.exists():
        _same_spec(run.spec, ran)
    if opts.rank == 0:
        run.spec.write_text(ran)  # every setting as it ran
        _explain(run, exp.compiled)
        env = environment(spec, device, amp=exp.amp, compile_mode=exp.compile_mode,
                          deterministic=opts.deterministic, seed=seed)
        run.environment.write_text(json.dumps(env, indent=2))
    logger = MetricsLogger(run, opts.quiet, opts.resume, enabled=opts.rank == 0)
    if opts.rank == 0 and (opts.mlflow or opts.wandb):
        from xdsl.trackers import make_trackers, run_settings

        logger.trackers = make_trackers(opts.mlflow, opts.wandb, f"{out.name}-seed{seed}",
                                        run_settings(program, seed, opts.overrides), out)
    data_line = bundle.use_device(device)  # batched uint8 pipeline on `device`, or per-sample loaders
    if exp.compiled.terms:  # stateful terms (crd): memory sized for the training set, before the initial state
        exp.bind_data(_train_labels(bundle.train), seed)
    for line in [data_line, *bundle.notes]:
        logger.console.print(f"[dim]data {program.data.name}: {line}[/]")
    for line in exp.compiled.notes:  # pretrained weights loaded, classifiers replaced
        logger.console.print(line, style="dim", markup=False, highlight=False)
    initial_state = {k: v.detach().clone() for k, v in exp.compiled.root.state_dict().items()}
    snapshots = _uses_snapshots(program)
    results: dict[str, Any] = {"spec": str(spec), "seed": seed, "device": str(device), "data": data_line,
                               "num_classes": bundle.num_classes, "stages": {},
                               "best_on": "validation" if bundle.val is not None else "test"}
    try:
        for stage in program.stages:
            block = _Block(exp, stage, bundle, run, logger, opts, seed, device, sampler)
            best = train_block(block, initial_state, snapshots)
            exp.use_stage(stage.name)
            results["stages"][stage.name] = {"best": best, "evaluate": _evaluate_block(block, snapshots)}
        if not program.stages:  # evaluate the networks as built (or as loaded with `weights`)
            items = program.evaluate or default_items(bundle)
            results["stages"]["untrained"] = {"best": {}, "evaluate": evaluate_items(
                exp, bundle.test_loader(), items, device=device, data=bundle)}
        if opts.rank == 0:
            run.results.write_text(json.dumps(results, indent=2))
            _plots(run, logger.rows, results)
            write_report(run.root)
            _track_results(logger.trackers, run, results)
    finally:
        logger.close()
        for tracker in logger.trackers:
            tracker.finish()
    return results


def _train_labels(ds: Any) -> torch.Tensor:
    """The label of every training sample in loader order (a Subset's through its indices)."""
    from torch.utils.data import Subset

    from xdsl.data.split import dataset_labels

    if isinstance(ds, Subset):
        return _train_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    return dataset_labels(ds)


def _track_results(trackers: list[Any], run: RunDir, results: dict[str, Any]) -> None:
    """The results table and the run directory's pictures, report and results to every tracker."""
    if not trackers:
        return
    columns, values = summary_rows([results])
    rows = {block: {c: (cells[c][0] if cells.get(c) else None) for c in columns} for block, cells in values.items()}
    files = sorted(run.root.glob("*.png")) + [p for p in (run.report, run.results, run.graph) if p.is_file()]
    for tracker in trackers:
        tracker.log_results(columns, rows)
        tracker.log_files(files)


def _explain(run: RunDir, compiled) -> None:
    """graph.svg (graph.dot and graph.mmd without Graphviz): what every train block computes."""
    from xdsl.viz.explain import block_graphs, render

    graphs = block_graphs(compiled)
    if graphs:
        try:
            render(graphs, run.graph, "svg")
        except XdslError:  # a drawing problem must not stop a training run; `xdsl graph` reports it
            render(graphs, run.graph.with_suffix(".dot"), "dot")


def _evaluate_block(b: _Block, snapshots: bool) -> dict[str, Any]:
    """The evaluate clause after a block (accuracy, or retrieval on re-id data, when the spec has none)."""
    items = b.exp.program.evaluate or default_items(b.bundle, b.stage.pos)
    snapshot_state = checkpoint_snapshots(b.run.root, b.stage.name) if snapshots else None
    with b.exp.autocast():
        if b.opts.world_size > 1:
            return evaluate_sharded(b.exp, b.bundle, items, b.device, b.opts.rank, b.opts.world_size,
                                    snapshot_state)
        return evaluate_items(b.exp, b.bundle.test_loader(), items, device=b.device, snapshot_state=snapshot_state,
                              data=b.bundle)


def _uses_snapshots(program: ir.Program) -> bool:
    """Whether `evaluate` mentions `net@epoch`: then every epoch's weights are kept."""
    for item in program.evaluate:
        for arg in item.args:
            if isinstance(arg, str) and "@" in arg:
                return True
            if isinstance(arg, ir.Path) and any(getattr(s, "epoch", None) is not None for s in arg.steps):
                return True
    return False


def _plots(run: RunDir, rows: list[dict[str, Any]], results: dict[str, Any]) -> None:
    try:
        from xdsl.viz.plots import plot_acc_vs_params, plot_learning_curves, plot_xross
    except ImportError:  # matplotlib is the optional `viz` extra
        return
    name = Path(results["spec"]).stem
    plot_learning_curves(rows, run.plot("learning_curves"), title=f"Learning curves: {name}")
    blocks = {stage: r["evaluate"] for stage, r in results["stages"].items()}
    chance = 1.0 / results["num_classes"] if results.get("num_classes") else 0.0
    plot_xross(blocks, run.plot("xross"), chance=chance, title=f"Xross accuracy (%): {name}")
    for stage, evaluation in blocks.items():
        plot_acc_vs_params(evaluation, run.plot("acc_vs_params", stage),
                           title=f"Accuracy vs parameters: {name}, {stage}")


def run(spec: Path, opts: RunOptions) -> dict[str, Any]:
    """Run a spec for `opts.seeds` seeds; print the results table (mean +/- std over seeds)."""
    spec = Path(spec)
    if not spec.exists():
        raise XdslError(f"spec '{spec}' does not exist")
    opts.device = ddp.init_from_env(opts.device)
    if opts.deterministic:
        make_deterministic()
    opts.rank, opts.world_size = ddp.rank(), ddp.world_size()
    if opts.rank != 0:
        opts.quiet = True
    check_available(opts.mlflow, opts.wandb)  # a missing tracker package fails before anything is written
    out = _prepare_out(spec, opts) if opts.rank == 0 else None
    if ddp.is_distributed():  # every process writes under rank 0's run directory
        box = [str(out) if out else None]
        torch.distributed.broadcast_object_list(box, src=0)
        out = Path(box[0])
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _Stop.deferring = _Stop.requested = _Stop.hard = False
    for sig in previous:  # SIGTERM (schedulers, kill) checkpoints like Ctrl-C, at the end of the current step
        signal.signal(sig, _Stop.handler)
    try:
        all_results = []
        for i in range(opts.seeds):
            seed = opts.seed + i
            seed_out = out if opts.seeds == 1 else RunDir(out).seed(seed).root
            seed_out.mkdir(parents=True, exist_ok=True)
            all_results.append(run_one(spec, opts, seed, seed_out))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = print_run_summary(all_results, quiet=opts.quiet, show=opts.rank == 0)
    if opts.seeds > 1 and opts.rank == 0:
        RunDir(out).results.write_text(json.dumps({"seeds": all_results, "summary": summary}, indent=2))
        write_report(out)
    if not opts.quiet:
        print(f"run directory: {out}")
    return {"out": str(out), "results": all_results, "summary": summary}
