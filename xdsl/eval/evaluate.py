"""Evaluate the `evaluate` items of a spec: plan every item, one shared pass, then each item's result.

Every item is answered from one pass over the test loader where it can be (the `Engine` computes
each distinct path prefix once per batch); flatness needs its own passes and latency is timed on
one batch. The result is plain JSON data (`{"num_samples", "num_batches", "device", "items": [...]}`),
one entry per item in spec order; `xdsl.eval.tables` renders it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from xdsl.eval.engine import Engine, Pass, SnapshotState
from xdsl.eval.item import Context, EvaluateItem, Result
from xdsl.eval.items import EVALUATIONS
from xdsl.eval.paths import Unavailable
from xdsl.lang import ir
from xdsl.rundir import RunDir

if TYPE_CHECKING:
    from xdsl.experiment import Experiment

__all__ = ["evaluate_items", "evaluate_program", "default_items", "checkpoint_snapshots", "find_items",
           "SnapshotState"]


def _module_modes(exp: Experiment) -> list[tuple[nn.Module, bool]]:
    mods: list[nn.Module] = list(exp.compiled.root.modules())
    for net in exp.networks.values():
        mods += list(net.modules())
    return [(m, m.training) for m in mods]


def _plan(spec: ir.EvalItem, index: int, ctx: Context, job: Pass) -> EvaluateItem | Result:
    """The item, planned into the shared pass; or its result already when it cannot run."""
    if spec.kind not in EVALUATIONS:
        return {"kind": spec.kind, "title": spec.kind, "error": f"unknown evaluation '{spec.kind}'", "rows": []}
    item = EVALUATIONS.get(spec.kind)(spec, index, ctx)
    try:
        item.plan(job)
    except Unavailable as e:
        return item.result(error=str(e), rows=[])
    return item


def evaluate_items(exp: Experiment, loader: Iterable, items: Sequence[ir.EvalItem], *,
                   device: str | torch.device | None = None, max_batches: int | None = None,
                   snapshot_state: SnapshotState | None = None, seed: int = 0, data: Any = None) -> dict[str, Any]:
    """Evaluate `items` on `loader` in eval mode without gradients; JSON-serialisable results.

    `device` is where batches go (default: the experiment's device); `max_batches` caps every pass;
    `snapshot_state(net, epoch)` supplies the weights of snapshot networks (`net1@10`); `seed` makes
    the flatness noise reproducible; `data` (the DataBundle) gives `retrieval` its query/gallery split
    and `flatness(split="train")` the training set. Weights and train/eval modes are as before when this
    returns.
    """
    dev = torch.device(device) if device is not None else torch.device(exp.device)
    ctx = Context(exp, Engine(exp, snapshot_state, dev, max_batches), loader, dev, seed, data)
    modes = _module_modes(exp)
    job = Pass()
    try:
        exp.set_train_mode(False)
        exp.compiled.root.eval()
        with torch.no_grad():
            planned = [_plan(spec, i, ctx, job) for i, spec in enumerate(items)]
            if job.paths or job.capture:
                ctx.engine.run_pass(loader, job)
            results = [p.compute(job) if isinstance(p, EvaluateItem) else p for p in planned]
    finally:
        for m, training in modes:
            m.train(training)
    return {"num_samples": job.num_samples, "num_batches": job.num_batches, "device": str(dev),
            "items": _jsonable(results)}


def default_items(data: Any, pos: Any = None) -> list[ir.EvalItem]:
    """What a spec without an `evaluate` statement gets: test accuracy, or retrieval for re-id data."""
    kind = "retrieval" if getattr(data, "retrieval", None) is not None else "accuracy"
    return [ir.EvalItem(kind, (), dict(EVALUATIONS.get(kind).keywords), pos)]


def evaluate_program(exp: Experiment, loader: Iterable, **kwargs: Any) -> dict[str, Any]:
    """All `evaluate` items of the experiment's spec (see `evaluate_items` for the keywords)."""
    return evaluate_items(exp, loader, exp.program.evaluate, **kwargs)


def find_items(results: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The result entries of one kind (`find_items(res, "xross")[0]["rows"]`)."""
    return [item for item in results.get("items", []) if item.get("kind") == kind]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def checkpoint_snapshots(run_dir: str | Path, stage: str | None = None) -> SnapshotState:
    """`snapshot_state` reading the trainer's per-epoch snapshots (`RunDir.snapshot`).

    Each file holds {"modules": {"parts": state_dict of compiled.root.parts, "adapters": ...}}; the
    returned callable gives one network's part weights (keys relative to `root.parts[net]`).
    With `stage=None` the epoch must exist in exactly one train block's directory.
    """
    run = RunDir(Path(run_dir))
    loaded: dict[Path, Mapping[str, Tensor]] = {}

    def find(epoch: int) -> Path:
        if stage is not None:
            f = run.snapshot(stage, epoch)
            if not f.exists():
                raise FileNotFoundError(f"{f} does not exist")
            return f
        found = run.snapshots_of(epoch)
        if not found:
            raise FileNotFoundError(f"no checkpoint of epoch {epoch} under {run.checkpoints}")
        if len(found) > 1:
            stages = ", ".join(f.parent.name for f in found)
            raise ValueError(f"epoch {epoch} is saved by several train blocks ({stages}); pass stage=")
        return found[0]

    def snapshot_state(net: str, epoch: int) -> Mapping[str, Tensor]:
        f = find(epoch)
        if f not in loaded:
            loaded[f] = torch.load(f, map_location="cpu", weights_only=True)["modules"]["parts"]
        prefix = f"{net}."
        state = {k[len(prefix):]: v for k, v in loaded[f].items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"{f} has no weights of network '{net}'")
        return state

    return snapshot_state
