"""Input-pipeline benchmark: the per-sample DataLoader against the batched uint8 pipeline, side by side.

    python -m benchmarks.data                       # images/s table + tiny-model epoch, CPU
    python -m benchmarks.data --device cuda         # the same on a GPU (images live on the device)
    python -m benchmarks.data --rounds 3 --images 2048 --epoch-images 5000   # quicker

Part 1 times one pass over synthetic uint8 images (CIFAR-like 32x32 with reflect padding, Tiny
ImageNet-like 64x64 with zero padding; pad 4, random crop, flip, normalise) through each path, for
batch 128 and 512 and 1 and 2 threads. Part 2 trains a tiny MLP (3072-16-16-10, so that data
dominates) for one epoch on a fabricated CIFAR-10 directory through `xdsl run`, once per path, and reads the epoch's
training time from the run's metrics. Each path runs in its own process (two long-lived workers fed by
this one), so neither runs in a heap the other shaped. Both parts interleave the paths: every round times each
variant once, the first variant rotating between rounds, so load on a shared machine hits both
alike; each ratio is taken within a round and the median over rounds is reported. Part 1 also
reports images per CPU-second of the process (`time.process_time`), which an oversubscribed machine
disturbs far less than wall time (not for loader workers, whose CPU time is another process's). The two paths
produce identical batches (tests/test_pipeline.py), so they do the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from xdsl.data.batch_augment import Recipe, Workspace
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


def _recipe(size: int, crop: str) -> Recipe:
    if crop == "resized":
        return Recipe(CIFAR10_MEAN, CIFAR10_STD, crop="resized", flip=True, size=(size, size))
    mode = "reflect" if size == 32 else "constant"
    return Recipe(CIFAR10_MEAN, CIFAR10_STD, crop="pad", flip=True, pad=4, pad_mode=mode)


_STATE: dict[tuple, Any] = {}  # in a path's process: each configuration's dataset (and workspace), made once


def _one_pass(path: str, size: int, crop: str, batch: int, threads: int, images: int, device: str, workers: int,
              epoch: int) -> tuple[float, float]:
    """One pass over the images through `path` (in that path's own process): (images per wall second,
    images per CPU second of the process). The first pass of a configuration warms it up, untimed."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    key = (size, crop, images, device)
    if key not in _STATE:
        recipe = _recipe(size, crop)
        ds = _dataset(images, size, recipe)
        # the workspace is kept from pass to pass, as a run keeps it from epoch to epoch
        _STATE[key] = (ds, recipe, (ds.images.to(dev), ds.labels.to(dev)), Workspace())
        _one_pass(path, size, crop, batch, threads, images, device, workers, -1)
    ds, recipe, on_device, work = _STATE[key]
    if path == "per_sample":
        ds.set_epoch(epoch)
        loader: Iterable = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                      generator=torch.Generator().manual_seed(epoch), pin_memory=dev.type == "cuda")
    else:
        loader = BatchedLoader(ds, *on_device, recipe, order=epoch_order(len(ds), epoch), batch_size=batch,
                               epoch_seed=epoch, work=work)
    t0, c0 = time.perf_counter(), time.process_time()
    n = _drain(loader, dev)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def _serve(conn: Any) -> None:
    multiprocessing.set_start_method(None, force=True)  # loader workers start as they would for a user (a
    # spawned process would otherwise spawn them too, paying a fresh interpreter per worker per pass)
    while (job := conn.recv()) is not None:
        function, args = job
        conn.send(function(*args))


class _PathProcess:
    """One pipeline's own process, so that neither path runs in a heap shaped by the other (the host
    allocator's state after one path's frees changes what the next path's allocations cost)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=False)  # it may start loader workers
        self.process.start()

    def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in this process (a module-level function, sent by name)."""
        self.conn.send((function, args))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


@contextlib.contextmanager
def _path_processes() -> Iterator[dict[str, _PathProcess]]:
    """A process per path, closed on the way out."""
    processes = {"per_sample": _PathProcess(), "batched": _PathProcess()}
    try:
        yield processes
    finally:
        for process in processes.values():
            process.close()


def images_per_second(size: int, crop: str, batch: int, threads: int, *, images: int, rounds: int,
                      device: torch.device, workers: int = 0, processes: dict[str, _PathProcess] | None = None) -> Row:
    """One configuration: a pass over `images` images through each path, `rounds` times interleaved,
    each path in its own process (`processes`, started here if not given)."""
    epoch = [0]
    with contextlib.nullcontext(processes) if processes else _path_processes() as paths:

        def variant(path: str) -> Callable[[], tuple[float, float]]:
            def go() -> tuple[float, float]:
                epoch[0] += 1
                return paths[path].run(_one_pass, path, size, crop, batch, threads, images, str(device),
                                       workers if path == "per_sample" else 0, epoch[0])
            return go

        samples = _interleaved({path: variant(path) for path in ("per_sample", "batched")}, rounds)
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


def _train_epoch(spec: Path, out: Path, device: str) -> float:
    """One `xdsl run` of `spec` (in its path's own process): the first epoch's training seconds."""
    from xdsl.train.runner import RunOptions, run

    run(spec, RunOptions(out=out, quiet=True, device=device, threads=1))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(rows[0]["seconds"])


def epoch_times(*, images: int, rounds: int, batch: int, device: str, workers: int = 0) -> EpochRow:
    """Train the tiny MLP one epoch per path through `xdsl run`, each path in its own process; the
    metrics' epoch seconds."""
    with _path_processes() as processes, tempfile.TemporaryDirectory() as tmp:
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
                return processes[pipeline].run(_train_epoch, specs[pipeline], work / f"run{runs[0]}", device)
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
    with _path_processes() as processes:
        for size, crop, batch, threads, workers in configs:
            rows.append(images_per_second(size, crop, batch, threads, workers=workers, images=args.images,
                                          rounds=args.rounds, device=device, processes=processes))
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
