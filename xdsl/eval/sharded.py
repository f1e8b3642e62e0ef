"""Evaluation under torchrun: each process scores its share of the test set and the shares are merged.

Items whose numbers are means over test samples (`EvaluateItem.per_sample`) run on every process's
shard and merge exactly (sample-weighted means); the others (flatness, mapping, latency) run on
rank 0 over the whole test set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset

from xdsl.eval.engine import SnapshotState
from xdsl.eval.evaluate import evaluate_items
from xdsl.eval.items import EVALUATIONS
from xdsl.lang import ir

if TYPE_CHECKING:
    from xdsl.data import DataBundle
    from xdsl.experiment import Experiment

__all__ = ["shard_loader", "epoch_accuracy", "evaluate_sharded", "merge_shards"]


def shard_loader(bundle: DataBundle, rank: int, world: int, split: str = "test") -> Iterable:
    """This process's share of the test, validation or (unaugmented) training set (every sample exactly once over
    all processes)."""
    if world == 1:
        return {"test": bundle.test_loader, "val": bundle.val_loader, "train": bundle.plain_train_loader}[split]()
    if split == "train":
        view = getattr(bundle.train, "eval_view", None)  # as plain_train_loader: without augmentation
        data = view() if callable(view) else bundle.train
    else:
        data = bundle.test if split == "test" else bundle.val
    return DataLoader(Subset(data, range(rank, len(data), world)), batch_size=bundle.batch_size, shuffle=False)


def epoch_accuracy(exp: Experiment, loader: Iterable, device: torch.device,
                   max_batches: int | None = None) -> dict[str, float]:
    """Top-1 test accuracy of every network (the per-epoch metric; `evaluate` does the rest); under
    torchrun each process scores its shard and the counts are added up."""
    _use_rank0_buffers(exp)
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
    if _distributed():  # each process scored its own shard: add the counts up
        counts = torch.stack([correct[n].float() for n in exp.networks] + [torch.tensor(float(total), device=device)])
        torch.distributed.all_reduce(counts)
        correct = dict(zip(exp.networks, counts[:-1]))
        total = int(counts[-1])
    return {n: float(c) / max(total, 1) for n, c in correct.items()}


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _use_rank0_buffers(exp: Experiment) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics) before it scores its shard.

    Training keeps them per process (DDP's `broadcast_buffers=False`), but rank 0's are the ones the
    checkpoints hold: a process scoring its shard with its own statistics would score a model no
    checkpoint holds, and the merged numbers would not be the saved model's.
    """
    if _distributed():
        for buffer in exp.compiled.root.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _per_sample(item: ir.EvalItem) -> bool:
    """Whether processes may score shards of the test set and merge: not for items on the training set
    (`split="train"`), which rank 0 scores whole, as it does the items that are not means over samples."""
    return item.kind in EVALUATIONS and EVALUATIONS.get(item.kind).per_sample and item.kwargs.get("split") != "train"


def evaluate_sharded(exp: Experiment, bundle: DataBundle, items: list[ir.EvalItem], device: torch.device,
                     rank: int, world: int, snapshot_state: SnapshotState | None) -> dict[str, Any]:
    """The evaluate clause over `world` processes; rank 0 gets the whole result, the others `{"items": []}`."""
    _use_rank0_buffers(exp)
    shardable = [i for i in items if _per_sample(i)]
    rest = [i for i in items if not _per_sample(i)]
    mine = evaluate_items(exp, shard_loader(bundle, rank, world), shardable, device=device,
                          snapshot_state=snapshot_state) if shardable else None
    shards: list[Any] = [None] * world
    torch.distributed.all_gather_object(shards, mine)
    if rank != 0:
        return {"items": []}
    whole = evaluate_items(exp, bundle.test_loader(), rest, device=device,
                           snapshot_state=snapshot_state, data=bundle) if rest else {"items": []}
    merged = iter(merge_shards(shards)["items"] if shardable else [])
    others = iter(whole["items"])
    return {"num_samples": len(bundle.test), "device": str(device), "processes": world,
            "items": [next(merged) if _per_sample(i) else next(others) for i in items]}


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' results of the same items -> one, each item merged by its own class."""
    weights = [s["num_samples"] for s in shards]
    items = [EVALUATIONS.get(item["kind"]).merge([s["items"][i] for s in shards], weights)
             for i, item in enumerate(shards[0]["items"])]
    return {**shards[0], "num_samples": sum(weights), "items": items}
