"""The batched input pipeline: the whole dataset as uint8 on the training device, augmented per batch.

The per-sample path (a DataLoader calling `dataset[i]` once per image) costs a Python round trip per
sample; on a GPU that starves the model. The batched path keeps every image of a dataset as one uint8
tensor on the training device, gathers a batch by index and augments it with a few tensor operations
(see `batch_augment.py`). Both paths visit samples in the same order (`epoch_order` mirrors DataLoader) and
augment each sample from the same counter-based draws, so they produce the same batches: choosing one
never changes what a run computes (bit for bit for pad-and-crop recipes).

Which path runs: the data statement's `pipeline` ('auto', 'batched', 'per_sample'). 'auto' takes the
batched path when the dataset offers uint8 images (see `batchable`) and they fit `memory_budget`: a
share of the free memory of the training device ('25%', the default) or an absolute size ('2GiB',
'500MB'; '0' never fits).

Interface for datasets: a train/test Dataset is batchable when it has `images` (a uint8 tensor
(N, C, H, W), one fixed size), `labels` (int64 (N,)), `seed` (int), `epoch` and `recipe()` (the
`batch_augment.Recipe` its `__getitem__` applies, with the draws of `batch_augment.draw`; None when it runs
torchvision transforms per sample, and then its `why_per_sample` says so). `images.UInt8Images`
is that class; any dataset that yields fixed-size uint8 images can be one (decode files once with
`cache.cached_images`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from xdsl.data.batch_augment import Recipe, Workspace, augment_batch, draw

__all__ = ["DEFAULT_BUDGET", "PIPELINES", "BatchedLoader", "Choice", "batchable", "choose", "epoch_order",
           "free_memory", "parse_budget"]

PIPELINES = ("auto", "batched", "per_sample")
DEFAULT_BUDGET = "25%"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_budget(text: str) -> tuple[float | None, int | None]:
    """'25%' -> (0.25, None), '2GiB' -> (None, 2147483648); ValueError when it is neither."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(text)
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit == "%":
        if number > 100:
            raise ValueError(text)
        return number / 100, None
    return None, int(number * _UNITS[unit])


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's own count, else the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def batchable(dataset: Any) -> bool:
    """Whether `dataset` offers the batched path's interface (see the module docstring)."""
    images = getattr(dataset, "images", None)
    return (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and callable(getattr(dataset, "recipe", None)) and isinstance(getattr(dataset, "labels", None), Tensor)
            and dataset.recipe() is not None)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} GiB"


@dataclass(frozen=True)
class Choice:
    """Which path a run takes, and the header line that says so and why."""

    batched: bool
    line: str


def choose(pipeline: str, budget: str, datasets: tuple[Any, ...], device: torch.device) -> Choice:
    """Pick the path for `datasets` (train, test) on `device` under `pipeline` and `budget`."""
    if pipeline == "per_sample":
        return Choice(False, "per-sample pipeline (pipeline=\"per_sample\")")
    if not all(batchable(d) for d in datasets):
        reasons = [getattr(d, "why_per_sample", None) for d in datasets]
        why = next((r for r in reasons if r), "the dataset has no uint8 image tensor")
        return Choice(False, f"per-sample pipeline ({why})")
    need = sum(d.images.numel() + d.labels.numel() * d.labels.element_size() for d in datasets)
    where = f"on {device}"
    if pipeline == "batched":
        return Choice(True, f"batched pipeline {where}: {_size(need)} of uint8 images (pipeline=\"batched\")")
    fraction, absolute = parse_budget(budget)
    if fraction is not None:
        free = free_memory(device)
        allowed = int(fraction * free)
        of = f"{budget.strip()} of {_size(free)} free {where}"
    else:
        allowed, of = int(absolute or 0), f"memory_budget {budget.strip()}"
    if need <= allowed:
        return Choice(True, f"batched pipeline {where}: {_size(need)} of uint8 images fit {_size(allowed)} "
                            f"({of})")
    return Choice(False, f"per-sample pipeline: {_size(need)} of uint8 images exceed {_size(allowed)} ({of})")


def epoch_order(n: int, epoch_seed: int, sampler: Sampler | None = None) -> Tensor:
    """The sample order a shuffling DataLoader with a generator seeded `epoch_seed` visits.

    DataLoader draws its workers' base seed from that generator before the RandomSampler's randperm;
    this does the same, so both paths see the same batches. A given sampler (e.g. DistributedSampler,
    already `set_epoch`-ed) decides the order itself, as it does for the DataLoader.
    """
    if sampler is not None:
        return torch.as_tensor(list(iter(sampler)), dtype=torch.long)
    generator = torch.Generator()
    generator.manual_seed(int(epoch_seed))
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator)


class BatchedLoader:
    """One epoch of (x, y) batches gathered by index from device-resident uint8 images and augmented.

    Iterate it like a DataLoader; `len()` is the number of batches (the last one may be partial).
    `with_index`: (x, y, i) batches, `i` the samples' positions in the dataset (on the images' device).
    `work`: memory to reuse (see `Workspace`); pass the same one every epoch, from one thread at a time.
    """

    def __init__(self, dataset: Any, images: Tensor, labels: Tensor, recipe: Recipe, *, order: Tensor,
                 batch_size: int, epoch_seed: int, with_index: bool = False, work: Workspace | None = None):
        self.dataset = dataset
        self.images, self.labels, self.recipe = images, labels, recipe
        self.order = order
        self.batch_size = int(batch_size)
        self.epoch_seed = int(epoch_seed)
        self.with_index = with_index
        self.work = work

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        in_size = tuple(self.images.shape[-2:])
        device = self.images.device
        work = self.work or Workspace()  # scratch buffers; every batch yielded is a tensor nobody else holds
        for start in range(0, len(self.order), self.batch_size):
            host = self.order[start:start + self.batch_size]
            index = host.to(device, non_blocking=True)
            draws = draw(self.recipe, self.dataset.seed, self.epoch_seed, host.numpy(), in_size)
            # gathered by index_select (a row copy; `images[index]` is 20x slower on CPU)
            batch = augment_batch(self.images, draws, self.recipe, work, index), self.labels.index_select(0, index)
            yield (*batch, index) if self.with_index else batch
