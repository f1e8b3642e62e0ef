"""DataBundle: the train/test (and validation) datasets of one experiment plus the loader policy shared by
all trainers.

Loaders come from here only: a per-sample DataLoader, or, once `use_device` chose it, the batched
pipeline (`pipeline.py`) over device-resident uint8 images. Both yield the same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from xdsl.data.augment import BatchMix, MixedLoader
from xdsl.data.batch_augment import Workspace
from xdsl.data.pipeline import DEFAULT_BUDGET, BatchedLoader, choose, epoch_order
from xdsl.errors import XdslError

if TYPE_CHECKING:
    from xdsl.data.reid import RetrievalSplit

__all__ = ["DataBundle", "IndexedDataset", "seed_worker"]


class IndexedDataset(Dataset):
    """`dataset[k]` with `k` appended: `(x, y, k)`, the sample's position, which stateful loss terms
    (CRD's memory bank) read as `i`. Only the loaders of a spec that uses `i` wrap their dataset so."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from torch's per-worker seed.

    torch derives each worker's seed from the loader's generator, so this makes any numpy/random use
    inside datasets as reproducible as the shuffle order.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class DataBundle:
    """Everything a trainer needs about the data; loaders are built here so every run shuffles alike."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    batch_size: int
    num_workers: int
    pin_memory: bool = False
    name: str = ""
    classes: list[str] | None = None
    val: Dataset | None = None  # validation split (`val_fraction=`, or the dataset's own); eval transform
    pipeline: str = "auto"               # auto | batched | per_sample (see pipeline.py)
    memory_budget: str = DEFAULT_BUDGET  # what the batched path may hold on the training device
    notes: list[str] = field(default_factory=list)  # e.g. an image cache that was rebuilt, and why
    retrieval: RetrievalSplit | None = None  # query/gallery of a re-id dataset (its `test` is the query set)
    batch_mix: BatchMix | None = None  # mixup/cutmix of `augment=[...]`: training batches get soft labels
    _test_loader: DataLoader | None = field(default=None, init=False, repr=False, compare=False)
    _val_loader: DataLoader | None = field(default=None, init=False, repr=False, compare=False)
    _on_device: dict[str, tuple[Tensor, Tensor]] | None = field(default=None, init=False, repr=False,
                                                                compare=False)
    _workspaces: dict[str, Workspace] = field(default_factory=dict, init=False, repr=False, compare=False)

    def use_device(self, device: torch.device) -> str:
        """Choose the pipeline for training on `device`; the batched one copies the uint8 images there.

        Returns the run header's line saying which path runs and why.
        """
        choice = choose(self.pipeline, self.memory_budget, (self.train, self.test), torch.device(device))
        self._on_device = None
        self._test_loader = None
        self._workspaces = {}
        if choice.batched:
            self._on_device = {
                split: (ds.images.to(device), ds.labels.to(device))
                for split, ds in (("train", self.train), ("test", self.test))
            }
        return choice.line

    @property
    def batched(self) -> bool:
        """Whether loaders come from the batched pipeline (after `use_device` chose it)."""
        return self._on_device is not None

    def _batched_loader(self, split: str, order: Tensor, epoch_seed: int, with_index: bool = False) -> BatchedLoader:
        dataset = self.train if split == "train" else self.test
        images, labels = self._on_device[split]  # type: ignore[index]
        work = self._workspaces.setdefault(split, Workspace())  # one per split, kept from epoch to epoch
        return BatchedLoader(dataset, images, labels, dataset.recipe(), order=order, batch_size=self.batch_size,
                             epoch_seed=epoch_seed, with_index=with_index, work=work)

    def _loader_kwargs(self) -> dict:
        workers = self.num_workers
        return {
            "batch_size": self.batch_size,
            "num_workers": workers,
            "pin_memory": self.pin_memory,
            "drop_last": False,
            "worker_init_fn": seed_worker if workers > 0 else None,
            "persistent_workers": workers > 0,
        }

    def train_loader(self, epoch_seed: int, sampler: Sampler | None = None, with_index: bool = False) -> DataLoader:
        """A loader for one epoch whose order and augmentation depend only on `epoch_seed`.

        `with_index`: batches are `(x, y, i)`, `i` each sample's position in `train` (the same batches).

        Build a fresh one every epoch: resuming at epoch k with the same seed replays epoch k exactly,
        whatever `num_workers` is. A given sampler (e.g. DistributedSampler) replaces shuffling; its
        `set_epoch(epoch_seed)` is called so forgetting to do so cannot repeat one order every epoch.
        With mixup/cutmix (`batch_mix`) its labels are soft, (B, num_classes).
        """
        generator = torch.Generator()
        generator.manual_seed(int(epoch_seed))
        set_epoch = getattr(self.train, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(int(epoch_seed))
        if sampler is not None:
            sampler_set_epoch = getattr(sampler, "set_epoch", None)
            if callable(sampler_set_epoch):
                sampler_set_epoch(int(epoch_seed))
        if self.batched:
            order = epoch_order(len(self.train), epoch_seed, sampler)  # type: ignore[arg-type]
            loader: Any = self._batched_loader("train", order, epoch_seed, with_index)
        else:
            loader = DataLoader(IndexedDataset(self.train) if with_index else self.train, shuffle=sampler is None,
                                sampler=sampler, generator=generator, **self._loader_kwargs())
        return loader if self.batch_mix is None else MixedLoader(loader, self.batch_mix, epoch_seed)

    def test_loader(self) -> DataLoader:
        """The evaluation loader, in dataset order; cached so persistent workers survive between evals."""
        if self._test_loader is None and self.batched:
            order = torch.arange(len(self.test))  # type: ignore[arg-type]
            self._test_loader = self._batched_loader("test", order, 0)  # type: ignore[assignment]
        if self._test_loader is None:
            self._test_loader = DataLoader(self.test, shuffle=False, **self._loader_kwargs())
        return self._test_loader

    def val_loader(self) -> DataLoader | None:
        """The validation loader in dataset order (None without a validation split); cached like the test one."""
        if self.val is None:
            return None
        if self._val_loader is None:
            self._val_loader = DataLoader(self.val, shuffle=False, **self._loader_kwargs())
        return self._val_loader

    def plain_train_loader(self) -> DataLoader:
        """The training set in order and without augmentation: the training loss as a model sees its data
        (flatness on the training loss, the DML paper's Figure 3)."""
        view = getattr(self.train, "eval_view", None)  # augmented datasets give their unaugmented view
        train = view() if callable(view) else self.train
        return DataLoader(train, shuffle=False, **self._loader_kwargs())

    def sample_batch(self, n: int = 2) -> tuple[Tensor, Tensor]:
        """The first `n` test samples as a batch: cheap, deterministic input for shape inference."""
        count = min(int(n), len(self.test))  # type: ignore[arg-type]
        if count <= 0:
            raise XdslError(
                f"dataset '{self.name or '?'}' has an empty test split; cannot take a sample batch"
            )
        items = [self.test[i] for i in range(count)]
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        return x, y
