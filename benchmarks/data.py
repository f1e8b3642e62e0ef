"""Input-pipeline benchmark: the per-sample DataLoader against the batched uint8 pipeline, side by side.

    python -m benchmarks.data                       # images/s table + tiny-model epoch, CPU
    python -m benchmarks.data --device cuda         # the same on a GPU (images live on the device)
    python -m benchmarks.data --rounds 3 --images 2048 --epoch-images 5000   # quicker

Part 1 times one pass over synthetic uint8 images (CIFAR-like 32x32 with reflect padding, Tiny
ImageNet-like 64x64 with zero padding; pad 4, random crop, flip, normalise) through each path, for
batch 128 and 512 and 1 and 2 threads. Part 2 trains a tiny MLP (3072-16-16-10, so that data
dominates) for one epoch on a fabricated CIFAR-10 directory through `xdsl run`, once per path, and reads the epoch's
training time from the run's metrics. Both parts interleave the paths: every round times each
variant once, the first variant rotating between rounds, so load on a shared machine hits both
alike; each ratio is taken within a round and the median over rounds is reported. Part 1 also
reports images per CPU-second of the process (`time.process_time`), which an oversubscribed machine
disturbs far less than wall time (not for loader workers, whose CPU time is another process's). The two paths
produce identical batches (tests/test_pipeline.py), so they do the same work.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from xdsl.data.batch_augment import Recipe
from xdsl.data.images import CIFAR10_MEAN, CIFAR10_STD, UInt8Images
from xdsl.data.pipeline import BatchedLoader, epoch_order

__all__ = ["Row", "EpochRow", "images_per_second", "epoch_times", "format_report", "main"]


@dataclass
class Row:
    """Images/s of both paths for one configuration (medians over rounds) and their ratio."""

    size: int
    crop: str
    batch: int
    threads: int
    per_sample_workers: int
    per_sample: float
    batched: float
    ratio: float
    rounds: int
    per_sample_cpu: float | None  # images per CPU-second of this process (None: loader workers did the work)
    batched_cpu: float
    cpu_ratio: float | None


@dataclass
class EpochRow:
    """Seconds of one training epoch of the tiny model per path (medians) and the speed-up."""

    per_sample_workers: int
    per_sample_s: float
    batched_s: float
    speedup: float
    images: int
    rounds: int


def _dataset(n: int, size: int, recipe: Recipe) -> UInt8Images:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return UInt8Images(images, torch.randint(0, 10, (n,), generator=gen), mean=recipe.mean, std=recipe.std,
                       augment=True, recipe=recipe)


def _drain(batches: Iterable, device: torch.device) -> int:
    count = 0
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
        count += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count


def _interleaved(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Run every variant once per round, rotating which goes first; the samples per variant."""
    names = list(variants)
    samples: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(variants[name]())
    return samples


def images_per_second(size: int, crop: str, batch: int, threads: int, *, images: int, rounds: int,
                      device: torch.device, workers: int = 0) -> Row:
    """One configuration: a pass over `images` images through each path, `rounds` times interleaved."""
    torch.set_num_threads(threads)
    if crop == "resized":
        recipe = Recipe(CIFAR10_MEAN, CIFAR10_STD, crop="resized", flip=True, size=(size, size))
    else:
        recipe = Recipe(CIFAR10_MEAN, CIFAR10_STD, crop="pad", flip=True, pad=4,
                        pad_mode="reflect" if size == 32 else "constant")
    ds = _dataset(images, size, recipe)
    on_device = ds.images.to(device), ds.labels.to(device)
    epoch = [0]

    def timed(loader: Iterable) -> tuple[float, float]:
        """(images per wall second, images per CPU second of this process)."""
        t0, c0 = time.perf_counter(), time.process_time()
        n = _drain(loader, device)
        return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)

    def per_sample() -> tuple[float, float]:
        epoch[0] += 1
        ds.set_epoch(epoch[0])
        return timed(DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                generator=torch.Generator().manual_seed(epoch[0]), pin_memory=device.type == "cuda"))

    def batched() -> tuple[float, float]:
        epoch[0] += 1
        return timed(BatchedLoader(ds, *on_device, recipe, order=epoch_order(len(ds), epoch[0]), batch_size=batch,
                                   epoch_seed=epoch[0]))

    batched()  # warm-up (first-call allocations)
    samples = _interleaved({"per_sample": per_sample, "batched": batched}, rounds)
    pairs = list(zip(samples["batched"], samples["per_sample"], strict=True))
    median = statistics.median
    cpu = None if workers or device.type == "cuda" else median([b[1] / p[1] for b, p in pairs])
    return Row(size, crop, batch, threads, workers, median(p[0] for _, p in pairs), median(b[0] for b, _ in pairs),
               median([b[0] / p[0] for b, p in pairs]), rounds,
               None if cpu is None else median(p[1] for _, p in pairs), median(b[1] for b, _ in pairs), cpu)


_EPOCH_SPEC = """data cifar10(root="cifar", batch_size={batch}, num_workers={workers}, pipeline="{pipeline}")
network a = builtin.mlp(num_classes=10, in_features=3072, hidden=16)
independent(a, epochs=1, optimizer=sgd(lr=0.05, momentum=0.9))
"""


def _fabricate_cifar(root: Path, images: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = max(1, images // 5)
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", 256)]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))


def epoch_times(*, images: int, rounds: int, batch: int, device: str, workers: int = 0) -> EpochRow:
    """Train the tiny MLP one epoch per path through `xdsl run`; the metrics' epoch seconds."""
    from xdsl.train.runner import RunOptions, run

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _fabricate_cifar(work / "cifar", images)
        specs = {}
        for pipeline in ("per_sample", "batched"):
            specs[pipeline] = work / f"{pipeline}.xspec"
            specs[pipeline].write_text(_EPOCH_SPEC.format(
                batch=batch, workers=workers if pipeline == "per_sample" else 0, pipeline=pipeline))
        runs = [0]

        def epoch(pipeline: str) -> Callable[[], float]:
            def go() -> float:
                runs[0] += 1
                out = work / f"run{runs[0]}"
                run(specs[pipeline], RunOptions(out=out, quiet=True, device=device, threads=1))
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                return float(rows[0]["seconds"])
            return go

        samples = _interleaved({p: epoch(p) for p in specs}, rounds)
    ratios = [p / b for p, b in zip(samples["per_sample"], samples["batched"], strict=True)]
    return EpochRow(workers, statistics.median(samples["per_sample"]), statistics.median(samples["batched"]),
                    statistics.median(ratios), 5 * max(1, images // 5), rounds)


def format_report(rows: list[Row], epochs: list[EpochRow], device: str) -> str:
    lines = [f"input pipeline, {device}, torch {torch.__version__}, {platform.processor() or platform.machine()}",
             "", "| images | crop | batch | threads | per-sample img/s | batched img/s | batched / per-sample | "
             "per CPU-second: per-sample | batched | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        workers = f" ({r.per_sample_workers} workers)" if r.per_sample_workers else ""
        cpu = (f"{r.per_sample_cpu:,.0f} | {r.batched_cpu:,.0f} | {r.cpu_ratio:.1f}x" if r.cpu_ratio is not None
               else f"n/a | {r.batched_cpu:,.0f} | n/a")
        lines.append(f"| {r.size}x{r.size} | {r.crop} | {r.batch} | {r.threads} | {r.per_sample:,.0f}{workers} | "
                     f"{r.batched:,.0f} | **{r.ratio:.1f}x** | {cpu} |")
    if epochs:
        lines += ["", "| tiny-model epoch | per-sample s | batched s | speed-up |", "|---|---|---|---|"]
        for e in epochs:
            workers = f"{e.per_sample_workers} loader workers" if e.per_sample_workers else "no workers"
            lines.append(f"| {e.images} images, 1 thread, per-sample with {workers} | {e.per_sample_s:.2f} | "
                         f"{e.batched_s:.2f} | **{e.speedup:.1f}x** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per configuration")
    p.add_argument("--images", type=int, default=4096, help="images per timed pass")
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--batches", default="128,512")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--epoch-images", type=int, default=10_000, help="training images of the tiny-model run; 0: skip")
    p.add_argument("--epoch-rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    configs = [(size, "pad", batch, threads, 0) for size in ints(args.sizes) for batch in ints(args.batches)
               for threads in ints(args.threads)]
    # how the per-sample path uses two cores by default (two loader processes), and a resized-crop recipe
    configs += [(32, "pad", 128, 2, 2), (64, "resized", 128, 1, 0)]
    rows: list[Row] = []
    for size, crop, batch, threads, workers in configs:
        rows.append(images_per_second(size, crop, batch, threads, workers=workers, images=args.images,
                                      rounds=args.rounds, device=device))
        print(f"  measured {asdict(rows[-1])}", file=sys.stderr, flush=True)
    epochs = []
    if args.epoch_images:
        for workers in (0, 2):
            epochs.append(epoch_times(images=args.epoch_images, rounds=args.epoch_rounds, batch=128,
                                      device=args.device, workers=workers))
            print(f"  measured {asdict(epochs[-1])}", file=sys.stderr, flush=True)
    print(format_report(rows, epochs, args.device))
    result = {"device": args.device, "rows": [asdict(r) for r in rows], "epochs": [asdict(e) for e in epochs]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
