"""DataBundle: the train/test (and validation) datasets of one experiment plus the loader policy shared by
all trainers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from xdsl.errors import XdslError

__all__ = ["DataBundle", "seed_worker"]


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
    _test_loader: DataLoader | None = field(default=None, init=False, repr=False, compare=False)
    _val_loader: DataLoader | None = field(default=None, init=False, repr=False, compare=False)

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

    def train_loader(self, epoch_seed: int, sampler: Sampler | None = None) -> DataLoader:
        """A loader for one epoch whose order and augmentation depend only on `epoch_seed`.

        Build a fresh one every epoch: resuming at epoch k with the same seed replays epoch k exactly,
        whatever `num_workers` is. A given sampler (e.g. DistributedSampler) replaces shuffling; its
        `set_epoch(epoch_seed)` is called so forgetting to do so cannot repeat one order every epoch.
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
        return DataLoader(
            self.train,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            **self._loader_kwargs(),
        )

    def test_loader(self) -> DataLoader:
        """The evaluation loader, in dataset order; cached so persistent workers survive between evals."""
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
