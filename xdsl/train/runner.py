"""`xdsl run`: train every train block of a spec, evaluate, write a run directory.

    runs/<spec>-<time>/
        spec.xspec              the expanded spec that ran
        metrics.jsonl, .csv     one row per (block, epoch, network)
        results.json            evaluation of every block (best and last epoch)
        checkpoints/<block>/    last.pt (resumable, atomic), final.pt (weights only)
        *.png                   learning curves, Xross heatmap, accuracy vs #params

Train blocks run in order; each starts from the networks' initial weights (so Independent,
DML and XML compare from the same start) unless it says `after B`, which continues from B.
"""

from __future__ import annotations

import csv
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

from xdsl.errors import SpecError, XdslError
from xdsl.lang import ir
from xdsl.train.channel_init import map_channels
from xdsl.train.checkpoint import load_checkpoint, load_latest, rng_state, save_atomic, set_rng_state

__all__ = ["RunOptions", "run", "run_one", "evaluate_checkpoint", "NonFiniteLoss"]


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
    rank: int = 0
    world_size: int = 1


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XdslError(f"--device {name}: CUDA is not available on this machine", hint="use --device cpu")
    return torch.device(name)


def _prepare_out(spec: Path, opts: RunOptions) -> Path:
    out = opts.out or Path("runs") / f"{spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if opts.resume and not (out / "checkpoints").exists():
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Logger:
    """Metrics to JSONL + CSV (+ TensorBoard when installed); console output through rich."""

    def __init__(self, out: Path, quiet: bool, resume: bool, enabled: bool = True):
        from rich.console import Console

        self.out, self.quiet, self.enabled = out, quiet, enabled
        self.console = Console(quiet=quiet)
        self.rows: list[dict[str, Any]] = []
        path = out / "metrics.jsonl"
        if resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill; its epoch is redone
                    pass
        self.tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k not in ("epoch",):
                    self.tb.add_scalar(f"{row['stage']}/{row['network']}/{k}", v, row["epoch"])

    def truncate(self, stage: str, epoch: int) -> None:
        """Forget rows of `stage` after `epoch` (written before a crash, redone after resume)."""
        self.rows = [r for r in self.rows if not (r["stage"] == stage and r["epoch"] > epoch)]
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def write_csv(self) -> None:
        if not self.rows or not self.enabled:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def close(self) -> None:
        self.write_csv()
        if self.tb is not None:
            self.tb.close()


def _module_state(exp) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in exp.compiled.root.state_dict().items()}


def _accuracy(exp, loader, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Top-1 test accuracy of every network (the per-epoch metric; `evaluate` does the rest)."""
    exp.set_train_mode(False)
    correct = {n: torch.zeros((), device=device) for n in exp.networks}
    total = 0
    with torch.no_grad(), exp.autocast():
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for net in exp.networks:
                correct[net] += (exp.forward(net, x).argmax(-1) == y).sum()
            total += len(y)
    exp.set_train_mode(True)
    from xdsl.train import distributed

    if distributed.is_distributed():  # each process scored its own shard: add the counts up
        counts = torch.stack([correct[n].float() for n in exp.networks] + [torch.tensor(float(total), device=device)])
        torch.distributed.all_reduce(counts)
        correct = dict(zip(exp.networks, counts[:-1]))
        total = int(counts[-1])
    return {n: float(c) / max(total, 1) for n, c in correct.items()}


# evaluate items whose numbers are means over test samples: each process scores its shard, then merge
_SHARDABLE = ("accuracy", "xross", "ensemble", "entropy")


def _evaluate_sharded(exp, bundle, items: list[ir.EvalItem], device: torch.device, opts: RunOptions,
                      snapshot_state) -> dict[str, Any]:
    """The evaluate clause under torchrun: per-sample means are gathered across processes; flatness,
    mapping and latency (not sums over samples) run on rank 0 over the whole test set."""
    from xdsl.eval.evaluate import evaluate_items

    shardable = [i for i in items if i.kind in _SHARDABLE]
    rest = [i for i in items if i.kind not in _SHARDABLE]
    mine = evaluate_items(exp, _shard(bundle, opts.rank, opts.world_size), shardable, device=device,
                          snapshot_state=snapshot_state) if shardable else None
    shards: list[Any] = [None] * opts.world_size
    torch.distributed.all_gather_object(shards, mine)
    if opts.rank != 0:
        return {"items": []}
    whole = evaluate_items(exp, bundle.test_loader(), rest, device=device,
                           snapshot_state=snapshot_state) if rest else {"items": []}
    merged = iter(_merge_shards(shards)["items"] if shardable else [])
    others = iter(whole["items"])
    return {"num_samples": len(bundle.test), "device": str(device), "processes": opts.world_size,
            "items": [next(merged) if i.kind in _SHARDABLE else next(others) for i in items]}


def _merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample-weighted means of accuracy / loss / entropy over the processes' shards (exact)."""
    import copy

    weights = [s["num_samples"] for s in shards]
    total = sum(weights)
    out = copy.deepcopy(shards[0])
    out["num_samples"] = total

    def merge(target: dict[str, Any], parts: list[dict[str, Any]]) -> None:
        for key in ("accuracy", "loss", "entropy"):
            if all(p.get(key) is not None for p in parts):
                target[key] = sum(p[key] * w for p, w in zip(parts, weights)) / total

    for i, item in enumerate(out["items"]):
        parts = [s["items"][i] for s in shards]
        merge(item, parts)
        for key in ("rows", "members"):
            for j, row in enumerate(item.get(key, [])):
                merge(row, [p[key][j] for p in parts])
    return out


def _shard(bundle, rank: int, world: int):
    """This process's share of the test set for per-epoch accuracy (every sample exactly once overall)."""
    from torch.utils.data import DataLoader, Subset

    if world == 1:
        return bundle.test_loader()
    return DataLoader(Subset(bundle.test, range(rank, len(bundle.test), world)), batch_size=bundle.batch_size,
                      shuffle=False)


def _check_finite(exp, losses: dict[str, torch.Tensor], stage: ir.Stage, epoch: int, step: int,
                  ckpt: Path) -> None:
    bad = [n for n, v in losses.items() if not torch.isfinite(v)]
    if not bad:
        return
    net = bad[0]
    terms = exp.last_terms.get(net, {})
    bad_terms = [t for t, v in terms.items() if not torch.isfinite(v.detach()).all()]
    which = f"term {bad_terms[0]} = {float(terms[bad_terms[0]].detach())}" if bad_terms else \
        f"objective = {float(losses[net])}"
    raise NonFiniteLoss(
        f"non-finite loss in train block '{stage.name}', network '{net}', epoch {epoch + 1}, step {step}: {which}",
        hint=f"lower the learning rate or set grad_clip; the last good checkpoint "
             f"{ckpt if ckpt.exists() else '(none yet)'} is intact")


def _train_stage(exp, stage: ir.Stage, bundle, out: Path, logger: _Logger, opts: RunOptions, seed: int,
                 device: torch.device, initial_state: dict[str, Any], snapshots: bool,
                 sampler=None) -> dict[str, Any]:
    """Train one block (resuming if a checkpoint exists); return its per-network best/last accuracies."""
    ckpt_dir = out / "checkpoints" / stage.name
    last_path = ckpt_dir / "last.pt"
    final_path = ckpt_dir / "final.pt"
    root = exp.compiled.root

    if stage.after is not None:
        after = load_checkpoint(out / "checkpoints" / stage.after / "final.pt", device)
        root.load_state_dict(after["modules"])
    else:
        root.load_state_dict(initial_state)
    state = load_latest(last_path, device, warn=logger.console.print) if opts.resume else None
    measure = stage.settings.get("map_channels")
    mapping: list[dict[str, Any]] = []
    if measure and state is None:
        x, _ = next(iter(bundle.train_loader(epoch_seed=seed * 100_003)))
        mapping = map_channels(exp, stage, x.to(device), measure)
        for report in mapping:
            logger.console.print(f"map_channels {report['network']} -> {report['reference']}: {report['text']}")
        (ckpt_dir).mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "mapping.json").write_text(json.dumps(mapping, indent=2))
    exp.use_stage(stage.name)

    start_epoch, skip_batches, best = 0, 0, {}
    if state is not None:
        if state.get("done") and final_path.exists():
            root.load_state_dict(load_checkpoint(final_path, device)["modules"])
            set_rng_state(state["rng"])  # later blocks draw what they drew in the uninterrupted run
            logger.console.print(f"[dim]train {stage.name}: already finished, skipped[/]")
            return state["best"]
        root.load_state_dict(state["modules"])
        for net, opt in exp.optimizers.items():
            opt.load_state_dict(state["optimizers"][net])
        for net, sched in exp.schedulers.items():
            if sched is not None:
                sched.load_state_dict(state["schedulers"][net])
        set_rng_state(state["rng"])
        start_epoch, skip_batches, best = state["epoch"], state["batch"], state["best"]
        exp.step_count = state["step_count"]
        logger.truncate(stage.name, start_epoch)
        logger.console.print(f"[dim]train {stage.name}: resumed at epoch {start_epoch + 1}, batch {skip_batches}[/]")
    elif opts.resume:
        logger.truncate(stage.name, 0)  # killed before its first checkpoint: the block's rows are redone
    if exp.compile_mode is not None and opts.rank == 0:
        count = 1 if stage.order == "simultaneous" else len(stage.trained)
        logger.console.print(f"[dim]train {stage.name}: torch.compile ({exp.compile_mode}) of {count} objective(s) "
                             "at the first step[/]")

    def save(epoch: int, batch: int, done: bool = False) -> None:
        if opts.rank != 0:
            return
        save_atomic({
            "modules": root.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in exp.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in exp.schedulers.items() if s is not None},
            "rng": rng_state(), "epoch": epoch, "batch": batch, "step_count": exp.step_count,
            "best": best, "done": done, "stage": stage.name,
        }, last_path, keep_previous=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    max_steps = stage.settings.get("max_steps")
    eval_every = stage.settings.get("eval_every") or 1
    steps_done = 0
    test_loader = _shard(bundle, opts.rank, opts.world_size)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=logger.console,
                        transient=True, disable=opts.quiet)
    with progress:
        for epoch in range(start_epoch, stage.epochs):
            loader = bundle.train_loader(epoch_seed=seed * 100_003 + epoch, sampler=sampler)
            n_batches = len(loader) if max_steps is None else min(len(loader), max_steps)
            task = progress.add_task(f"{stage.name} {epoch + 1}/{stage.epochs}", total=n_batches, info="")
            exp.set_train_mode(True)
            sums = {n: torch.zeros((), device=device) for n in stage.trained}
            count = 0
            t0 = time.perf_counter()
            batch = 0
            position = skip_batches  # batches of this epoch whose step is complete
            _Stop.deferring = True
            try:
                for batch, (x, y) in enumerate(loader):
                    if batch >= n_batches:
                        break
                    if batch < skip_batches:
                        progress.advance(task)
                        continue
                    if _Stop.requested:
                        raise KeyboardInterrupt
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if exp.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    losses = exp.train_step(x, y)
                    position = batch + 1
                    for n, v in losses.items():
                        sums[n] += v
                    count += 1
                    steps_done += 1
                    if device.type == "cpu" or steps_done % opts.log_every == 0:
                        _check_finite(exp, losses, stage, epoch, batch, last_path)
                        progress.update(task, info="  ".join(f"{n} {float(v):.3f}" for n, v in losses.items()))
                    progress.advance(task)
                    if opts.stop_after_steps is not None and steps_done >= opts.stop_after_steps:
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                if _Stop.hard:  # a second signal, maybe mid-step: the last checkpoint stays as it was
                    raise
                save(epoch, position)
                logger.console.print(f"interrupted: checkpoint written to {last_path}; continue with --resume "
                                     f"--out {out}")
                raise
            finally:
                _Stop.deferring = False
            skip_batches = 0
            progress.remove_task(task)
            train_loss = {n: float(s) / max(count, 1) for n, s in sums.items()}
            for n, v in train_loss.items():
                if not math.isfinite(v):
                    _check_finite(exp, {n: torch.tensor(v)}, stage, epoch, batch, last_path)
            exp.scheduler_step()
            seconds = time.perf_counter() - t0
            acc = _accuracy(exp, test_loader, device) if (epoch + 1) % eval_every == 0 or \
                epoch + 1 == stage.epochs else {}
            for net in exp.networks:
                if net not in stage.trained and net not in acc:
                    continue
                row = {"stage": stage.name, "epoch": epoch + 1, "network": net,
                       "train_loss": train_loss.get(net), "test_acc": acc.get(net),
                       "lr": exp.optimizers[net].param_groups[0]["lr"] if net in exp.optimizers else None,
                       "seconds": round(seconds, 3), "trained": net in stage.trained}
                logger.log(row)
                if net in acc and acc[net] >= best.get(net, {}).get("acc", -1.0):
                    best[net] = {"acc": acc[net], "epoch": epoch + 1}
            logger.console.print(
                f"{stage.name} epoch {epoch + 1}/{stage.epochs}  "
                + "  ".join(f"{n}: loss {train_loss[n]:.4f}" for n in stage.trained)
                + ("  |  " + "  ".join(f"{n} acc {100 * a:.2f}%" for n, a in acc.items()) if acc else "")
                + f"  ({seconds:.1f}s)")
            save(epoch + 1, 0)
            if snapshots and opts.rank == 0:
                save_atomic({"modules": {"parts": root.parts.state_dict(), "adapters": root.adapters.state_dict()},
                             "epoch": epoch + 1}, ckpt_dir / f"epoch{epoch + 1}.pt")
    if opts.rank == 0:
        save_atomic({"modules": root.state_dict(), "stage": stage.name}, final_path)
    save(stage.epochs, 0, done=True)
    from xdsl.train.distributed import barrier

    barrier()  # later blocks (`after`) and resumes read rank 0's files
    return best


def run_one(spec: Path, opts: RunOptions, seed: int, out: Path) -> dict[str, Any]:
    """One seed: every train block, then its evaluation. Returns the results written to results.json."""
    from xdsl.data import build_data
    from xdsl.eval.evaluate import checkpoint_snapshots, evaluate_items
    from xdsl.experiment import Experiment, compile_program
    from xdsl.lang.format import format_spec

    device = _device(opts.device)
    _seed_everything(seed)
    overrides = dict(opts.overrides)
    if opts.epochs is not None:
        overrides["epochs"] = str(opts.epochs)
    compiled = compile_program(spec, device=device, allow_imports=opts.allow_imports, overrides=overrides)
    program = compiled.program
    _set_threads(opts.threads, compiled, device)
    use_compile = opts.compile if opts.compile is not None else device.type == "cuda"
    exp = Experiment(compiled, compile_mode=opts.compile_mode if use_compile else None,
                     amp=_amp_dtype(opts.amp, device), channels_last=device.type == "cuda")
    if program.data is None:
        raise SpecError("the spec has no 'data' statement, so it cannot be run", None,
                        'add e.g. `data digits(batch_size=64)`')
    try:
        bundle = build_data(program.data.name, program.data.kwargs, spec_dir=spec.resolve().parent, seed=seed,
                            device_is_cuda=device.type == "cuda")
    except XdslError as e:
        raise SpecError(e.message, program.data.pos, e.hint) from None
    sampler = None
    if "WORLD_SIZE" in os.environ:  # under torchrun (even with one process: the same batches for any N)
        from torch.utils.data.distributed import DistributedSampler

        if bundle.batch_size % opts.world_size:
            raise SpecError(f"batch_size {bundle.batch_size} is the global batch and must divide by the "
                            f"{opts.world_size} processes", program.data.pos)
        bundle.batch_size //= opts.world_size
        sampler = DistributedSampler(bundle.train, num_replicas=opts.world_size, rank=opts.rank, shuffle=True,
                                     seed=seed, drop_last=False)
    if opts.rank == 0:
        (out / "spec.xspec").write_text(format_spec(program.spec))
    logger = _Logger(out, opts.quiet, opts.resume, enabled=opts.rank == 0)
    initial_state = _module_state(exp)
    snapshots = _uses_snapshots(program)
    results: dict[str, Any] = {"spec": str(spec), "seed": seed, "device": str(device), "stages": {}}
    try:
        for stage in program.stages:
            best = _train_stage(exp, stage, bundle, out, logger, opts, seed, device, initial_state, snapshots,
                                sampler)
            exp.use_stage(stage.name)
            items = program.evaluate or [ir.EvalItem("accuracy", (), {}, stage.pos)]
            snapshot_state = checkpoint_snapshots(out, stage.name) if snapshots else None
            with exp.autocast():
                if opts.world_size > 1:
                    evaluation = _evaluate_sharded(exp, bundle, items, device, opts, snapshot_state)
                else:
                    evaluation = evaluate_items(exp, bundle.test_loader(), items, device=device,
                                                snapshot_state=snapshot_state)
            results["stages"][stage.name] = {"best": best, "evaluate": evaluation}
        if not program.stages:  # evaluate the networks as built (or as loaded with `weights`)
            items = program.evaluate or [ir.EvalItem("accuracy", (), {}, None)]
            results["stages"]["untrained"] = {"best": {}, "evaluate": evaluate_items(
                exp, bundle.test_loader(), items, device=device)}
    finally:
        logger.close()
    if opts.rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        _plots(out, logger.rows, results)
    return results


def _uses_snapshots(program: ir.Program) -> bool:
    """Whether `evaluate` mentions `net@epoch`: then every epoch's weights are kept."""
    for item in program.evaluate:
        for arg in item.args:
            if isinstance(arg, str) and "@" in arg:
                return True
            if isinstance(arg, ir.Path) and any(getattr(s, "epoch", None) is not None for s in arg.steps):
                return True
    return False


SMALL_MODEL_PARAMS = 5_000_000  # below this, one CPU thread beats several (op overheads dominate)


def _set_threads(threads: int | None, compiled, device: torch.device) -> None:
    """CPU intra-op threads: tiny convolutions run fastest single-threaded, big ones use every core."""
    if device.type != "cpu":
        return
    if threads is None:
        params = sum(p.numel() for p in compiled.root.parameters())
        threads = 1 if params < SMALL_MODEL_PARAMS else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":  # fp16 underflows without loss scaling; bf16 has fp32's range and needs none
        raise XdslError("--amp fp16 is not supported: it needs loss scaling, which xdsl does not do",
                        hint="use --amp bf16 (same speed on Ampere and newer GPUs, no scaling needed)")
    raise XdslError(f"--amp: unknown value '{amp}'", hint="auto, bf16 or none")


def _plots(out: Path, rows: list[dict[str, Any]], results: dict[str, Any]) -> None:
    try:
        from xdsl.viz.plots import plot_acc_vs_params, plot_learning_curves, plot_xross_heatmap
    except ImportError:
        return
    plot_learning_curves(rows, out / "learning_curves.png")
    for stage, r in results["stages"].items():
        for item in r["evaluate"].get("items", []):
            if item.get("kind") == "xross":
                plot_xross_heatmap(item, out / f"xross_{stage}.png")
                plot_acc_vs_params(item, out / f"acc_vs_params_{stage}.png")


def run(spec: Path, opts: RunOptions) -> dict[str, Any]:
    """Run a spec for `opts.seeds` seeds; print the results table (mean +/- std over seeds)."""
    from xdsl.eval.summary import print_run_summary
    from xdsl.train import distributed as ddp

    spec = Path(spec)
    if not spec.exists():
        raise XdslError(f"spec '{spec}' does not exist")
    opts.device = ddp.init_from_env(opts.device)
    opts.rank, opts.world_size = ddp.rank(), ddp.world_size()
    if opts.rank != 0:
        opts.quiet = True
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
            seed_out = out if opts.seeds == 1 else out / f"seed{seed}"
            seed_out.mkdir(parents=True, exist_ok=True)
            all_results.append(run_one(spec, opts, seed, seed_out))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = print_run_summary(all_results, quiet=opts.quiet)
    if opts.seeds > 1 and opts.rank == 0:
        (out / "results.json").write_text(json.dumps({"seeds": all_results, "summary": summary}, indent=2))
    if not opts.quiet:
        print(f"run directory: {out}")
    return {"out": str(out), "results": all_results, "summary": summary}


def evaluate_checkpoint(spec: Path, checkpoint: Path, *, device: str = "auto", allow_imports: bool = False) -> dict:
    """`xdsl eval`: load a checkpoint's weights into the spec's modules and run its evaluate clause."""
    from xdsl.data import build_data
    from xdsl.eval.evaluate import evaluate_items
    from xdsl.eval.tables import render_results
    from xdsl.experiment import Experiment, compile_program

    dev = _device(device)
    compiled = compile_program(spec, device=dev, allow_imports=allow_imports)
    state = load_checkpoint(checkpoint, dev)
    try:
        compiled.root.load_state_dict(state["modules"])
    except (KeyError, RuntimeError) as e:
        raise XdslError(f"checkpoint '{checkpoint}' does not fit the spec's modules: {str(e).splitlines()[0]}") \
            from None
    exp = Experiment(compiled)
    if state.get("stage") in {s.name for s in compiled.program.stages}:
        exp.use_stage(state["stage"])  # evaluate as that block left things (e.g. which adapters link parts)
    program = compiled.program
    if program.data is None:
        raise SpecError("the spec has no 'data' statement, so it cannot be evaluated", None)
    bundle = build_data(program.data.name, program.data.kwargs, spec_dir=Path(spec).resolve().parent)
    items = program.evaluate or [ir.EvalItem("accuracy", (), {}, None)]
    results = evaluate_items(exp, bundle.test_loader(), items, device=dev)
    from rich.console import Console

    for table in render_results(results):
        Console().print(table)
    return results

