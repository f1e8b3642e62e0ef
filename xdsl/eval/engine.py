"""The evaluation engine: runs the paths evaluate items ask for through the code training runs.

Paths go through `compile.lower.paths_module`, the generator behind the objectives and
`Experiment.forward`: one generated module per set of paths, each distinct prefix (`net1.up`,
`net1.up >> net2.down`, ...) computed once per batch and shared by every item and path that needs
it, so a Xross table of K networks cut into P parts costs K + K^2 + ... + K^P part forwards instead
of P * K^P. Steps of epoch snapshots (`net1@10`) call copies of the network loaded with that
epoch's weights.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from xdsl.compile.features import FeaturePaths
from xdsl.compile.graph import module_target
from xdsl.compile.lower import paths_module
from xdsl.eval.paths import Unavailable
from xdsl.lang import ir
from xdsl.shapes import param_count, unique_params

if TYPE_CHECKING:
    from xdsl.experiment import Experiment

__all__ = ["Engine", "Pass", "Stats", "SnapshotState", "TOP5_ABOVE", "batches"]

SnapshotState = Callable[[str, int], Mapping[str, Tensor]]
"""`snapshot_state(net, epoch)` -> the state_dict of network `net`'s parts after epoch `epoch`."""

_SNAPSHOT_HELP = "snapshots need a run's per-epoch checkpoints: `xdsl eval RUN_DIR`"


TOP5_ABOVE = 10
"""Top-5 accuracy is reported when there are more than this many classes (as ImageNet-style papers do)."""


@dataclass
class Stats:
    """Sums kept on the device (float64) so that a GPU pass never waits for the host until the end."""

    n: int = 0
    sums: Tensor | None = None   # [correct, CE loss, entropy] (+ top-5 correct with > TOP5_ABOVE classes)
    ranked_sums: Tensor | None = None  # sums of the k largest softmax probabilities, largest first

    def add(self, logits: Tensor, y: Tensor, ranked: int = 0) -> None:
        logits = logits.float()
        logp = F.log_softmax(logits, dim=1)
        sums = [(logits.argmax(dim=1) == y).sum(), F.nll_loss(logp, y, reduction="sum"), -(logp.exp() * logp).sum()]
        if logits.shape[1] > TOP5_ABOVE:
            sums.append((logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum())
        batch = torch.stack([v.double() for v in sums])
        self.sums = batch if self.sums is None else self.sums + batch
        if ranked:
            top = logp.exp().topk(min(ranked, logits.shape[1]), dim=1).values.sum(0).double()
            self.ranked_sums = top if self.ranked_sums is None else self.ranked_sums + top
        self.n += int(y.numel())

    def summary(self) -> dict[str, Any]:
        if not self.n or self.sums is None:
            return {"accuracy": None, "loss": None, "entropy": None}
        sums = [float(v) / self.n for v in self.sums.cpu()]
        out: dict[str, Any] = {"accuracy": sums[0], "loss": sums[1], "entropy": sums[2]}
        if len(sums) > 3:
            out["top5"] = sums[3]
        if self.ranked_sums is not None:
            out["ranked"] = [float(v) / self.n for v in self.ranked_sums.cpu()]
        return out


@dataclass
class Pass:
    """What one sweep over the loader computes: stats of paths, ensembles, captured features.

    Items fill `paths`, `ensembles`, `capture` and `capture_batches` when they plan; the engine fills
    the rest.
    """

    paths: dict[str, ir.Path] = field(default_factory=dict)
    ensembles: dict[str, list[str]] = field(default_factory=dict)     # name -> member path keys
    capture: dict[str, ir.Path] = field(default_factory=dict)         # features kept for `capture_batches`
    capture_batches: int = 0
    ranked: int = 0                                                   # keep the top-k posterior mass (k)
    stats: dict[str, Stats] = field(default_factory=dict)
    ens_stats: dict[str, Stats] = field(default_factory=dict)
    features: dict[str, list[Tensor]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)            # path key -> why it has no stats
    num_samples: int = 0
    num_batches: int = 0


def batches(loader: Iterable, device: torch.device, max_batches: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) on the device, at most `max_batches` of them."""
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            return
        x, y = batch[0], batch[1]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _why(e: Exception) -> str:
    return f"n/a ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


class Engine:
    """Modules of steps (current weights or snapshots) and the shared-prefix passes over a loader."""

    def __init__(self, exp: Experiment, snapshot_state: SnapshotState | None, device: torch.device,
                 max_batches: int | None = None):
        self.exp = exp
        self.program = exp.program
        self.device = device
        self.max_batches = max_batches
        self.root: nn.Module = exp.compiled.root
        self.snapshot_state = snapshot_state
        # what generated modules call: the compiled parts and adapters, plus loaded epoch snapshots
        self.holder = nn.Module()
        self.holder.parts = self.root.parts
        self.holder.adapters = self.root.adapters
        self.holder.snapshots = nn.ModuleDict()
        self.failed: dict[str, str] = {}                  # path key -> why it cannot be run
        self._generated: dict[tuple[str, ...], fx.GraphModule] = {}
        self._features: FeaturePaths | None = None

    # ---- modules of steps ----
    @staticmethod
    def _target(step: ir.Step) -> str:
        if isinstance(step, ir.PartStep) and step.epoch is not None:
            return f"snapshots.{step.net}__{step.epoch}.{step.part}"
        return module_target(step)

    def _snapshot(self, net: str, epoch: int) -> nn.Module:
        key = f"{net}__{epoch}"
        if key not in self.holder.snapshots:
            self.holder.snapshots[key] = self._load_snapshot(net, epoch)
        return self.holder.snapshots[key]

    def _load_snapshot(self, net: str, epoch: int) -> nn.Module:
        if self.snapshot_state is None:
            raise Unavailable(f"n/a ({net}@{epoch}: {_SNAPSHOT_HELP})")
        try:
            state = self.snapshot_state(net, epoch)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise Unavailable(f"n/a ({net}@{epoch}: no snapshot: {e})") from None
        # copy the network and its parts together so the copies still share parameters
        net_copy, parts_copy = copy.deepcopy((self.exp.networks[net], self.root.parts[net]))
        target = parts_copy if set(state) & set(parts_copy.state_dict()) else net_copy
        try:
            target.load_state_dict(state)
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            raise Unavailable(f"n/a ({net}@{epoch}: snapshot does not fit the network: {msg})") from None
        parts_copy.eval()
        net_copy.eval()
        return parts_copy

    def module(self, step: ir.Step) -> nn.Module:
        if isinstance(step, ir.PartStep) and step.epoch is not None:
            return self._snapshot(step.net, step.epoch)[step.part]
        return self.root.get_submodule(module_target(step))

    def modules(self, path: ir.Path) -> list[nn.Module]:
        return [self.module(s) for s in path.steps]

    def feature_paths(self) -> FeaturePaths:
        """Paths run up to a named feature (`retrieval`), over these modules; built once per evaluation."""
        if self._features is None:
            self._features = FeaturePaths(self.module, self.exp.networks)
        return self._features

    def check(self, path: ir.Path) -> str | None:
        """None when the path can be evaluated, else why not."""
        try:
            self.modules(path)
        except Unavailable as e:
            return str(e)
        except AttributeError as e:
            return f"unknown module on {path}: {e}"
        return None

    def problem(self, path: ir.Path, job: Pass | None = None) -> str | None:
        """Why `path` has no result (cannot be built, failed to run, not logits), or None."""
        key = str(path)
        return self.check(path) or (job.problems.get(key) if job else None) or self.failed.get(key)

    def params(self, path: ir.Path) -> int:
        """Unique parameters of the modules on a path: a parameter shared by two steps counts once."""
        return param_count(self.modules(path))

    def parameters(self, path: ir.Path) -> list[nn.Parameter]:
        return unique_params(self.modules(path))

    # ---- generated code ----
    def generated(self, paths: Mapping[str, ir.Path]) -> fx.GraphModule:
        """The generated module computing `paths` (a tuple, in order), built once per set of paths."""
        key = tuple(paths)
        if key not in self._generated:
            self._generated[key] = paths_module(self.holder, list(paths.values()), self._target)
        return self._generated[key]

    def outputs(self, paths: Mapping[str, ir.Path], x: Tensor) -> dict[str, Tensor]:
        """Every runnable path's output on x. A path that raises (shapes that do not join and were not
        known in advance) is found by running the paths one by one, recorded in `failed`, and left out."""
        live = {k: p for k, p in paths.items() if k not in self.failed}
        if not live:
            return {}
        try:
            return dict(zip(live, self.generated(live)(x)))
        except (RuntimeError, Unavailable):
            for k, p in live.items():
                try:
                    self.generated({k: p})(x)
                except (RuntimeError, Unavailable) as e:
                    self.failed[k] = _why(e)
            if all(k not in self.failed for k in live):
                raise
            return self.outputs(paths, x)

    # ---- passes ----
    def run_pass(self, loader: Iterable, job: Pass) -> Pass:
        """One sweep: every path of the job on every batch, shared prefixes computed once."""
        job.stats = {k: Stats() for k in job.paths}
        job.ens_stats = {k: Stats() for k in job.ensembles}
        job.features = {k: [] for k in job.capture}
        wanted = {**job.paths, **job.capture}
        for b, (x, y) in enumerate(batches(loader, self.device, self.max_batches)):
            outputs = self.outputs(wanted, x)
            self._add_stats(job, outputs, y)
            if b < job.capture_batches:
                for key in job.capture:
                    if key in outputs:
                        job.features[key].append(outputs[key].detach().cpu())
            job.num_samples += int(y.numel())
            job.num_batches += 1
        return job

    def run_paths(self, loader: Iterable, paths: dict[str, ir.Path], ranked: int = 0) -> Pass:
        """A pass computing only `paths`' statistics (flatness runs one per noise draw)."""
        return self.run_pass(loader, Pass(paths=paths, ranked=ranked))

    def _add_stats(self, job: Pass, outputs: dict[str, Tensor], y: Tensor) -> None:
        logits: dict[str, Tensor] = {}
        for key in job.paths:
            if key in self.failed or key in job.problems:
                job.problems.setdefault(key, self.failed.get(key, ""))
                continue
            out = outputs[key]
            if out.dim() != 2:
                job.problems[key] = f"n/a (output of shape {tuple(out.shape[1:])} is not logits)"
                continue
            logits[key] = out
            job.stats[key].add(out, y, job.ranked)
        for name, members in job.ensembles.items():
            if all(m in logits for m in members):
                probs = torch.stack([F.softmax(logits[m].float(), dim=1) for m in members]).mean(0)
                job.ens_stats[name].add(probs.clamp_min(1e-12).log(), y)

    def latency(self, x: Tensor, path: ir.Path, repeats: int) -> float:
        """Median wall time (ms) of one full forward of the path on batch x, after a warm-up."""
        run = self.generated({str(path): path})
        run(x)
        _sync(x.device)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            run(x)
            _sync(x.device)
            times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
