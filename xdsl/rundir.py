"""The layout of a run directory, owned here (the trainer writes it, `xdsl eval` and evaluation read it):

    runs/<spec>-<time>/
        spec.xspec              the expanded spec that ran
        environment.json        versions (python, torch, torchvision, xdsl), device, precision, determinism,
                                the spec directory's git commit, the command line
        metrics.jsonl, .csv     one row per (block, epoch, network); val_acc with a validation split
        results.json            evaluation of every block (best and last epoch); "best_on": validation | test
        checkpoints/<block>/    last.pt (resumable, atomic), final.pt (weights only), best.pt (every
                                network at its best epoch: "modules" as in final.pt, "best": {net: {epoch,
                                acc, val_acc}}, "states": {epoch: weights}; chosen on validation when the
                                data has a split),
                                epoch<k>.pt (snapshots, when `evaluate` names `net@k`), mapping.json
        tensorboard/            TensorBoard events, when tensorboard is installed
        *.png                   learning curves, Xross heatmaps of every block, accuracy vs #params
        graph.svg               what each train block computes (graph.dot + graph.mmd without Graphviz)
        report.html             one self-contained page: results, per-term losses, plots, graph, spec
        seed<k>/                one such directory per seed under `--seeds N`
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @staticmethod
    def default(spec: Path) -> RunDir:
        return RunDir(Path("runs") / f"{spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}")

    def seed(self, seed: int) -> RunDir:
        return RunDir(self.root / f"seed{seed}")

    @property
    def spec(self) -> Path:
        return self.root / "spec.xspec"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def graph(self) -> Path:
        return self.root / "graph.svg"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def block(self, stage: str) -> Path:
        """The checkpoint directory of one train block."""
        return self.checkpoints / stage

    def last(self, stage: str) -> Path:
        return self.block(stage) / "last.pt"

    def final(self, stage: str) -> Path:
        return self.block(stage) / "final.pt"

    def best(self, stage: str) -> Path:
        return self.block(stage) / "best.pt"

    def snapshot(self, stage: str, epoch: int) -> Path:
        return self.block(stage) / f"epoch{epoch}.pt"

    def snapshots_of(self, epoch: int) -> list[Path]:
        """Every block's snapshot of `epoch`."""
        return sorted(self.checkpoints.glob(f"*/epoch{epoch}.pt"))

    def mapping(self, stage: str) -> Path:
        return self.block(stage) / "mapping.json"

    def plot(self, name: str, stage: str | None = None) -> Path:
        return self.root / (f"{name}_{stage}.png" if stage else f"{name}.png")
