"""`val_fraction=`: a validation split carved out of any dataset's training set, at the DataBundle level.

The split is stratified (every class keeps its share) and fixed by the run seed. The validation samples
are the training samples seen through the *evaluation* transform: a dataset whose training samples are
augmented provides `eval_view()` (the same samples, unaugmented); one without it has no augmentation
(tensors), so its samples are used as they are. Choosing the best epoch on validation instead of on
the test set is what makes a reported "best" honest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from xdsl.data.bundle import DataBundle
from xdsl.data.params import DataParamError

__all__ = ["SplitView", "dataset_labels", "eval_view", "stratified_split", "with_validation"]


class SplitView(Subset):
    """A Subset that forwards `set_epoch`, so per-epoch augmentation still replays exactly."""

    def set_epoch(self, epoch_seed: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch_seed)


def dataset_labels(ds: Dataset) -> Tensor:
    """The class label of every sample, read without loading images where the dataset allows it."""
    if isinstance(ds, TensorDataset):
        return torch.as_tensor(ds.tensors[1]).long()
    for attr in ("labels", "targets"):
        labels = getattr(ds, attr, None)
        if labels is not None:
            return torch.as_tensor(labels).long()
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)  # type: ignore[arg-type]


def eval_view(ds: Dataset) -> Dataset:
    """The dataset's samples under the evaluation transform (no augmentation)."""
    view = getattr(ds, "eval_view", None)
    return view() if callable(view) else ds


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices): round(fraction * n_c) samples of each class c to validation.

    Classes are shuffled independently by one generator seeded with `seed`, so the split depends only on
    the labels, the fraction and the seed. Both index lists are sorted (dataset order).
    """
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    val: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = int(round(fraction * len(members)))
        val.append(members[torch.randperm(len(members), generator=gen)[:take]])
    val_idx = torch.sort(torch.cat(val)).values if val else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return torch.nonzero(keep).flatten(), val_idx


def with_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """`bundle` with `fraction` of its training set moved to a validation split (see the module doc)."""
    if bundle.val is not None:
        raise DataParamError(
            f"dataset '{bundle.name}' has its own validation split; 'val_fraction' would carve a second one",
            dataset=bundle.name, key="val_fraction", hint="remove val_fraction=")
    train_idx, val_idx = stratified_split(dataset_labels(bundle.train), fraction, seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DataParamError(
            f"parameter 'val_fraction' of dataset '{bundle.name}' = {fraction} leaves "
            f"{len(train_idx)} training and {len(val_idx)} validation samples",
            dataset=bundle.name, key="val_fraction")
    changes: dict[str, Any] = {"train": _subset(bundle.train, train_idx),
                               "val": _subset(eval_view(bundle.train), val_idx)}
    return dataclasses.replace(bundle, **changes)


def _subset(ds: Dataset, indices: Tensor) -> Dataset:
    """The samples at `indices`: a dataset of its own kind when it can select (uint8 images, so the batched
    pipeline still applies to both splits), else a view."""
    select = getattr(ds, "select", None)
    return select(indices) if callable(select) else SplitView(ds, indices.tolist())
