"""Evaluate the `evaluate` items of a spec: accuracy, Xross tables, ensembles, entropy, flatness...

Every item is answered from one pass over the test loader where it can be: per batch, each
distinct path prefix (`net1.up`, `net1.up >> net2.down`, ...) is computed once and shared by all
items and paths that need it, so a Xross table of K networks cut into P parts costs
K + K^2 + ... + K^P part forwards instead of P * K^P. Flatness (weights under Gaussian noise, seed 001)
needs its own passes; latency is timed separately on one batch.

The result is plain JSON data (`{"num_samples", "num_batches", "device", "items": [...]}`), one entry per
item in spec order; `xdsl.eval.tables` renders it.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdsl.compile.graph import module_target
from xdsl.lang import ir

__all__ = [
    "evaluate_items",
    "evaluate_program",
    "checkpoint_snapshots",
    "natural_path",
    "path_label",
    "xross_combinations",
    "path_params",
    "find_items",
    "SnapshotState",
]

SnapshotState = Callable[[str, int], Mapping[str, Tensor]]
"""`snapshot_state(net, epoch)` -> the state_dict of network `net` after epoch `epoch`."""

_SNAPSHOT_HELP = "snapshots need a run's per-epoch checkpoints: `xdsl eval RUN_DIR`"


class _Unavailable(Exception):
    """A path that cannot be evaluated (missing snapshot, shapes that do not join); the message says why."""


# ---------------------------------------------------------------------------------------------- paths


def _split_net(name: str) -> tuple[str, int | None]:
    """`"net1@10"` -> ("net1", 10): evaluate items name snapshots this way."""
    if "@" in name:
        net, epoch = name.split("@", 1)
        return net, int(epoch)
    return name, None


def natural_path(program: ir.Program, net: str, upto: int | None = None, epoch: int | None = None) -> ir.Path:
    """The network's own chain of parts (its first `upto` parts; all of them by default)."""
    names = program.parts[net]
    last = len(names) if upto is None else upto
    return ir.Path(tuple(ir.PartStep(net, names[i], i, epoch) for i in range(last)))


def _bridges(graph: Any, stage: str | None = None) -> dict[tuple[str, int, str], tuple[str, ...]]:
    """Adapter chains the spec uses between net a's part i and net b's part i+1: (a, i, b) -> adapters.

    Chains the current train block `stage` trains come first: after a block, its own adapters are the
    trained link between the parts, not another block's.
    """
    import networkx as nx

    used: set[str] = set()
    if stage is not None:
        for node, data in graph.nodes(data=True):
            if data.get("kind") == "objective" and data.get("stage") == stage:
                used |= nx.ancestors(graph, node)
    ordered = sorted(graph.nodes(data=True), key=lambda item: item[0] not in used)
    found: dict[tuple[str, int, str], tuple[str, ...]] = {}
    for _, data in ordered:
        path = data.get("path")
        if not isinstance(path, ir.Path):
            continue
        steps = path.steps
        for j, step in enumerate(steps):
            if not isinstance(step, ir.PartStep):
                continue
            k = j + 1
            while k < len(steps) and isinstance(steps[k], ir.AdapterStep):
                k += 1
            if k < len(steps) and k > j + 1:
                nxt = steps[k]
                if isinstance(nxt, ir.PartStep) and nxt.index == step.index + 1:
                    chain = tuple(s.name for s in steps[j + 1:k])  # type: ignore[union-attr]
                    found.setdefault((step.net, step.index, nxt.net), chain)
    return found


def _shape(graph: Any, path: ir.Path) -> tuple[int, ...] | None:
    node = str(path)
    if node in graph and graph.nodes[node].get("shape") is not None:
        return tuple(graph.nodes[node]["shape"])[1:]
    return None


@dataclass
class _Combo:
    networks: list[str]          # as given, e.g. "net1@10"
    path: ir.Path | None
    adapters: list[str]
    status: str = "ok"


def xross_combinations(exp: Any, networks: Sequence[str]) -> tuple[list[str], list[_Combo]]:
    """Every way to pick one network per part (K^P), joined through the spec's adapters where shapes differ.

    Returns the part names and one combination per row, first part varying slowest (the seed's order).
    """
    program: ir.Program = exp.program
    graph = exp.graph
    parsed = [_split_net(n) for n in networks]
    counts = {len(program.parts[n]) for n, _ in parsed}
    if len(counts) != 1:
        raise _Unavailable("xross needs networks cut into the same number of parts, got "
                           + ", ".join(f"{n}: {len(program.parts[n])}" for n, _ in parsed))
    (n_parts,) = counts
    first = program.parts[parsed[0][0]]
    same_names = all(program.parts[n] == first for n, _ in parsed)
    part_names = list(first) if same_names else [f"part{i + 1}" for i in range(n_parts)]
    bridges = _bridges(graph, getattr(getattr(exp, "stage", None), "name", None))
    combos: list[_Combo] = []
    for pick in itertools.product(range(len(parsed)), repeat=n_parts):
        steps: list[ir.Step] = []
        adapters: list[str] = []
        status = "ok"
        for i, k in enumerate(pick):
            net, epoch = parsed[k]
            if i > 0:
                prev_net, _ = parsed[pick[i - 1]]
                if prev_net != net:
                    chain = bridges.get((prev_net, i - 1, net))
                    if chain and all(a in exp.compiled.root.adapters for a in chain):
                        steps += [ir.AdapterStep(a) for a in chain]
                        adapters += chain
                    else:
                        out = _shape(graph, natural_path(program, prev_net, i))
                        want = _shape(graph, natural_path(program, net, i))
                        if out is not None and want is not None and out != want:
                            status = (f"n/a (shapes {out} -> {want}: no adapter joins "
                                      f"{prev_net}.{program.parts[prev_net][i - 1]} to "
                                      f"{net}.{program.parts[net][i]})")
            steps.append(ir.PartStep(net, program.parts[net][i], i, epoch))
        path = ir.Path(tuple(steps)) if status == "ok" else None
        combos.append(_Combo([networks[k] for k in pick], path, adapters, status))
    return part_names, combos


# ---------------------------------------------------------------------------------------------- runner


class _Runner:
    """Modules of steps (current weights or snapshots) and the prefix-sharing forward."""

    def __init__(self, exp: Any, snapshot_state: SnapshotState | None):
        self.exp = exp
        self.root: nn.Module = exp.compiled.root
        self.snapshot_state = snapshot_state
        self.snapshots: dict[tuple[str, int], nn.Module] = {}
        self.failed: dict[str, str] = {}

    def _snapshot(self, net: str, epoch: int) -> nn.Module:
        key = (net, epoch)
        if key not in self.snapshots:
            if self.snapshot_state is None:
                raise _Unavailable(f"n/a ({net}@{epoch}: {_SNAPSHOT_HELP})")
            try:
                state = self.snapshot_state(net, epoch)
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                raise _Unavailable(f"n/a ({net}@{epoch}: no snapshot: {e})") from None
            parts = self.root.parts[net]
            # copy the network and its parts together so the copies still share parameters
            net_copy, parts_copy = copy.deepcopy((self.exp.networks[net], parts))
            own = set(parts_copy.state_dict())
            target = parts_copy if set(state) & own else net_copy
            try:
                target.load_state_dict(state)
            except RuntimeError as e:
                msg = str(e).splitlines()[0]
                raise _Unavailable(f"n/a ({net}@{epoch}: snapshot does not fit the network: {msg})") from None
            parts_copy.eval()
            net_copy.eval()
            self.snapshots[key] = parts_copy
        return self.snapshots[key]

    def module(self, step: ir.Step) -> nn.Module:
        if isinstance(step, ir.PartStep) and step.epoch is not None:
            return self._snapshot(step.net, step.epoch)[step.part]
        return self.root.get_submodule(module_target(step))

    def modules(self, path: ir.Path) -> list[nn.Module]:
        return [self.module(s) for s in path.steps]

    def check(self, path: ir.Path) -> str | None:
        """None when the path can be evaluated, else why not."""
        try:
            self.modules(path)
        except _Unavailable as e:
            return str(e)
        except AttributeError as e:
            return f"unknown module on {path}: {e}"
        return None

    def forward(self, path: ir.Path, x: Tensor, cache: dict[str, Tensor]) -> Tensor:
        """Output of `path` on x, reusing (and filling) the cache of prefix outputs of this batch."""
        n = len(path.steps)
        keys = [str(path.prefix(i)) for i in range(n + 1)]
        k = n
        while k > 0 and keys[k] not in cache:
            k -= 1
        h = cache[keys[k]] if k else x
        for i in range(k, n):
            h = self.module(path.steps[i])(h)
            cache[keys[i + 1]] = h
        return h


def path_params(modules: Iterable[nn.Module]) -> int:
    """Unique parameters of the modules on a path: a parameter shared by two steps counts once."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p.numel())
    return sum(seen.values())


def _unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class _Stats:
    """Sums kept on the device (float64) so that a GPU pass never waits for the host until the end."""

    n: int = 0
    sums: Tensor | None = None   # [correct, CE loss, entropy]

    def add(self, logits: Tensor, y: Tensor) -> None:
        logits = logits.float()
        logp = F.log_softmax(logits, dim=1)
        batch = torch.stack([(logits.argmax(dim=1) == y).sum().double(),
                             F.nll_loss(logp, y, reduction="sum").double(),
                             (-(logp.exp() * logp).sum()).double()])
        self.sums = batch if self.sums is None else self.sums + batch
        self.n += int(y.numel())

    def summary(self) -> dict[str, float | None]:
        if not self.n or self.sums is None:
            return {"accuracy": None, "loss": None, "entropy": None}
        correct, loss, entropy = (float(v) for v in self.sums.cpu())
        return {"accuracy": correct / self.n, "loss": loss / self.n, "entropy": entropy / self.n}


@dataclass
class _Pass:
    """What one sweep over the loader computes: stats of paths, ensembles, captured features."""

    paths: dict[str, ir.Path] = field(default_factory=dict)
    ensembles: dict[str, list[str]] = field(default_factory=dict)     # name -> member path keys
    capture: dict[str, ir.Path] = field(default_factory=dict)         # features kept for `capture_batches`
    capture_batches: int = 0
    stats: dict[str, _Stats] = field(default_factory=dict)
    ens_stats: dict[str, _Stats] = field(default_factory=dict)
    features: dict[str, list[Tensor]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)            # path key -> why it has no stats
    num_samples: int = 0
    num_batches: int = 0


def _batches(loader: Iterable, device: torch.device,
             max_batches: int | None) -> Iterable[tuple[Tensor, Tensor]]:
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            return
        x, y = batch[0], batch[1]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _run_pass(runner: _Runner, loader: Iterable, device: torch.device, max_batches: int | None,
              job: _Pass) -> _Pass:
    """One sweep: every path of the job on every batch, prefixes shared through a per-batch cache."""
    job.stats = {k: _Stats() for k in job.paths}
    job.ens_stats = {k: _Stats() for k in job.ensembles}
    job.features = {k: [] for k in job.capture}
    for b, (x, y) in enumerate(_batches(loader, device, max_batches)):
        cache: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        for key, path in job.paths.items():
            if key in runner.failed or key in job.problems:
                job.problems.setdefault(key, runner.failed.get(key, ""))
                continue
            try:
                out = runner.forward(path, x, cache)
            except _Unavailable as e:
                runner.failed[key] = job.problems[key] = str(e)
                continue
            except RuntimeError as e:  # e.g. shapes that do not join and were not known in advance
                msg = f"n/a ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                runner.failed[key] = job.problems[key] = msg
                continue
            if out.dim() != 2:
                job.problems[key] = f"n/a (output of shape {tuple(out.shape[1:])} is not logits)"
                continue
            outputs[key] = out
            job.stats[key].add(out, y)
        for name, members in job.ensembles.items():
            if all(m in outputs for m in members):
                probs = torch.stack([F.softmax(outputs[m].float(), dim=1) for m in members]).mean(0)
                job.ens_stats[name].add(probs.clamp_min(1e-12).log(), y)
        if b < job.capture_batches:
            for key, path in job.capture.items():
                if key in runner.failed:
                    continue
                try:
                    job.features[key].append(runner.forward(path, x, cache).detach().cpu())
                except (_Unavailable, RuntimeError) as e:
                    runner.failed[key] = f"n/a ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        job.num_samples += int(y.numel())
        job.num_batches += 1
    return job


# ---------------------------------------------------------------------------------------------- items


def _default_paths(exp: Any) -> list[ir.Path]:
    return [natural_path(exp.program, net) for net in exp.program.networks]


def _item_paths(exp: Any, item: ir.EvalItem) -> list[ir.Path]:
    paths = [a for a in item.args if isinstance(a, ir.Path)]
    return paths or _default_paths(exp)


def _item_networks(exp: Any, item: ir.EvalItem) -> list[str]:
    nets = [str(a) for a in item.args]
    return nets or list(exp.program.networks)


def _title(item: ir.EvalItem, program: ir.Program, with_kwargs: bool = False) -> str:
    args = [path_label(program, a) if isinstance(a, ir.Path) else str(a) for a in item.args]
    if with_kwargs:
        args += [f"{k}={v}" for k, v in item.kwargs.items()]
    return f"{item.kind}({', '.join(args)})" if args else item.kind


def path_label(program: ir.Program, path: ir.Path) -> str:
    """A network's own full chain reads as its name (`net1`, `net1@3`); any other path as its text."""
    steps = path.steps
    if steps and all(isinstance(s, ir.PartStep) for s in steps):
        first: ir.PartStep = steps[0]  # type: ignore[assignment]
        if path == natural_path(program, first.net, epoch=first.epoch):
            return first.net if first.epoch is None else f"{first.net}@{first.epoch}"
    return str(path)


def _path_row(runner: _Runner, job: _Pass, path: ir.Path) -> dict[str, Any]:
    key = str(path)
    row: dict[str, Any] = {"path": key, "label": path_label(runner.exp.program, path)}
    problem = runner.check(path) or job.problems.get(key) or runner.failed.get(key)
    if problem is not None:
        return {**row, "accuracy": None, "loss": None, "entropy": None, "params": None, "status": problem}
    return {**row, **job.stats[key].summary(), "params": path_params(runner.modules(path)), "status": "ok"}


@dataclass
class _Plan:
    """An item with the paths it needs in the shared pass and how to finish it afterwards."""

    item: ir.EvalItem
    finish: Callable[[_Pass], dict[str, Any]]


def _plan_items(exp: Any, runner: _Runner, items: Sequence[ir.EvalItem], job: _Pass,
                ctx: dict[str, Any]) -> list[_Plan]:
    plans: list[_Plan] = []

    def need(path: ir.Path) -> None:
        if runner.check(path) is None:
            job.paths.setdefault(str(path), path)

    program: ir.Program = exp.program
    for idx, item in enumerate(items):
        kind = item.kind
        title = _title(item, program, with_kwargs=kind == "flatness")
        if kind in ("accuracy", "entropy"):
            paths = _item_paths(exp, item)
            for p in paths:
                need(p)

            def finish(job: _Pass, paths=paths, item=item, title=title) -> dict[str, Any]:
                rows = [_path_row(runner, job, p) for p in paths]
                return {"kind": item.kind, "title": title, "rows": rows}

            plans.append(_Plan(item, finish))
        elif kind == "ensemble":
            paths = _item_paths(exp, item)
            for p in paths:
                need(p)
            name = f"#{idx}"
            if all(runner.check(p) is None for p in paths):
                job.ensembles[name] = [str(p) for p in paths]

            def finish(job: _Pass, paths=paths, item=item, name=name, title=title) -> dict[str, Any]:
                members = [_path_row(runner, job, p) for p in paths]
                out: dict[str, Any] = {"kind": "ensemble", "title": title, "members": members}
                bad = [m for m in members if m["status"] != "ok"]
                if bad or name not in job.ens_stats:
                    out.update(accuracy=None, loss=None, status=bad[0]["status"] if bad else "n/a")
                else:
                    s = job.ens_stats[name].summary()
                    out.update(accuracy=s["accuracy"], loss=s["loss"], entropy=s["entropy"], status="ok")
                return out

            plans.append(_Plan(item, finish))
        elif kind in ("xross", "latency"):
            nets = _item_networks(exp, item)
            try:
                part_names, combos = xross_combinations(exp, nets)
            except _Unavailable as e:
                plans.append(_Plan(item, lambda job, item=item, e=e, title=title: {
                    "kind": item.kind, "title": title, "error": str(e), "rows": []}))
                continue
            for c in combos:
                if c.path is not None:
                    need(c.path)
            if kind == "latency":
                ctx.setdefault("latency", []).append((idx, item, combos))

            def finish(job: _Pass, item=item, nets=nets, part_names=part_names, combos=combos,
                       idx=idx, title=title) -> dict[str, Any]:
                rows = []
                for c in combos:
                    if c.path is None:
                        row: dict[str, Any] = {"path": None, "accuracy": None, "loss": None, "params": None,
                                               "status": c.status}
                    else:
                        row = _path_row(runner, job, c.path)
                    row = {"networks": c.networks, "parts": part_names, **row, "adapters": c.adapters}
                    if item.kind == "latency":
                        row["latency_ms"] = ctx.get("timings", {}).get((idx, row["path"]))
                    rows.append(row)
                archs = {n: exp.program.networks[_split_net(n)[0]].ref for n in nets}
                out = {"kind": item.kind, "title": title, "networks": nets, "parts": part_names,
                       "architectures": archs, "rows": rows}
                if item.kind == "latency":
                    out.update(repeats=int(item.kwargs.get("repeats", 10)), batch_size=ctx.get("batch_size"),
                               device=str(ctx.get("device")), max_params=item.kwargs.get("max_params") or None,
                               max_latency_ms=item.kwargs.get("max_latency_ms") or None)
                return out

            plans.append(_Plan(item, finish))
        elif kind == "flatness":
            paths = _item_paths(exp, item)
            sigmas = [float(s) for s in item.kwargs.get("sigmas", [0.0, 0.01, 0.02, 0.05])]
            if 0.0 in sigmas:
                for p in paths:
                    need(p)
            ctx.setdefault("flatness", []).append((idx, paths, sigmas, int(item.kwargs.get("draws", 3))))

            def finish(job: _Pass, item=item, paths=paths, sigmas=sigmas, idx=idx,
                       title=title) -> dict[str, Any]:
                rows = []
                noisy = ctx.get("noisy", {})
                for p in paths:
                    problem = runner.check(p) or job.problems.get(str(p)) or runner.failed.get(str(p))
                    for s in sigmas:
                        row: dict[str, Any] = {"path": str(p), "label": path_label(program, p), "sigma": s}
                        if problem:
                            row.update(accuracy=None, loss=None, accuracy_std=None, status=problem)
                        elif s == 0.0:
                            base = job.stats[str(p)].summary()
                            row.update(accuracy=base["accuracy"], loss=base["loss"], accuracy_std=0.0,
                                       status="ok")
                        else:
                            row.update(noisy.get((idx, str(p), s), {"accuracy": None, "loss": None,
                                                                   "accuracy_std": None, "status": "n/a"}))
                        rows.append(row)
                return {"kind": "flatness", "title": title, "sigmas": sigmas,
                        "draws": int(item.kwargs.get("draws", 3)), "paths": [str(p) for p in paths],
                        "labels": [path_label(exp.program, p) for p in paths],
                        "rows": rows}

            plans.append(_Plan(item, finish))
        elif kind == "mapping":
            nets = _item_networks(exp, item)
            measure = str(item.kwargs.get("measure", "bmm_std"))
            job.capture_batches = max(job.capture_batches, int(item.kwargs.get("batches", 1)))
            pairs = []
            for a, b in itertools.combinations(nets, 2):
                (na, ea), (nb, eb) = _split_net(a), _split_net(b)
                cuts = min(len(exp.program.parts[na]), len(exp.program.parts[nb])) - 1
                for k in range(1, cuts + 1):
                    pa, pb = natural_path(exp.program, na, k, ea), natural_path(exp.program, nb, k, eb)
                    for p in (pa, pb):
                        if runner.check(p) is None:
                            job.capture.setdefault(str(p), p)
                    pairs.append((a, b, k, pa, pb))

            def finish(job: _Pass, item=item, nets=nets, measure=measure, pairs=pairs,
                       title=title) -> dict[str, Any]:
                from xdsl.mapping import channel_mapping, format_report

                rows = []
                for a, b, k, pa, pb in pairs:
                    na = _split_net(a)[0]
                    row: dict[str, Any] = {"networks": [a, b], "cut": k,
                                           "after": exp.program.parts[na][k - 1], "measure": measure}
                    problem = (runner.check(pa) or runner.check(pb) or runner.failed.get(str(pa))
                               or runner.failed.get(str(pb)))
                    if problem is None and not (job.features.get(str(pa)) and job.features.get(str(pb))):
                        problem = "no batches"
                    if problem is None:
                        try:
                            rep = channel_mapping(torch.cat(job.features[str(pa)]),
                                                  torch.cat(job.features[str(pb)]), measure)
                            row.update(original=rep.original, random=rep.random, gale=rep.gale,
                                       rounds=[int(r) for r in rep.rounds], perm=[int(i) for i in rep.perm],
                                       text=format_report(rep), status="ok")
                        except Exception as e:  # noqa: BLE001 - any mapping failure is reported, not raised
                            problem = getattr(e, "message", None) or str(e)
                    if problem is not None:
                        row.update(status=problem)
                    rows.append(row)
                return {"kind": "mapping", "title": title, "networks": nets, "measure": measure,
                        "rows": rows}

            plans.append(_Plan(item, finish))
        else:
            plans.append(_Plan(item, lambda job, item=item, title=title: {
                "kind": item.kind, "title": title, "error": f"unknown evaluation '{item.kind}'", "rows": []}))
    return plans


# ---------------------------------------------------------------------------------------------- flatness


def _seed_of(*parts: Any) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def _disjoint_groups(runner: _Runner, paths: list[ir.Path]) -> list[list[ir.Path]]:
    """Paths whose parameters do not overlap can be perturbed together and evaluated in one pass."""
    groups: list[tuple[set[int], list[ir.Path]]] = []
    for p in paths:
        ids = {id(q) for q in _unique_params(runner.modules(p))}
        for used, members in groups:
            if not used & ids:
                used |= ids
                members.append(p)
                break
        else:
            groups.append((ids, [p]))
    return [members for _, members in groups]


def _flatness(runner: _Runner, loader: Iterable, device: torch.device, max_batches: int | None,
              paths: list[ir.Path], sigmas: list[float], draws: int,
              seed: int) -> dict[tuple[str, float], dict]:
    """Accuracy and CE loss under N(0, sigma^2) noise on every parameter of the path, mean over draws."""
    ok = [p for p in paths if runner.check(p) is None and str(p) not in runner.failed]
    out: dict[tuple[str, float], dict] = {}
    groups = _disjoint_groups(runner, ok)
    for sigma in sigmas:
        if sigma == 0.0:
            continue
        acc: dict[str, list[float]] = {str(p): [] for p in ok}
        loss: dict[str, list[float]] = {str(p): [] for p in ok}
        problems: dict[str, str] = {}
        for draw in range(max(1, draws)):
            for group in groups:
                perturbed: list[tuple[nn.Parameter, Tensor]] = []
                try:
                    for p in group:
                        params = _unique_params(runner.modules(p))
                        gen = torch.Generator(device=params[0].device if params else "cpu")
                        gen.manual_seed(_seed_of(seed, p, sigma, draw))
                        for q in params:
                            perturbed.append((q, q.detach().clone()))
                            noise = torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)
                            q.add_(noise, alpha=sigma)
                    job = _run_pass(runner, loader, device, max_batches,
                                    _Pass(paths={str(p): p for p in group}))
                finally:
                    for q, saved in perturbed:
                        q.copy_(saved)
                for p in group:
                    s = job.stats[str(p)].summary()
                    if str(p) in job.problems:
                        problems[str(p)] = job.problems[str(p)]
                    elif s["accuracy"] is not None:
                        acc[str(p)].append(s["accuracy"])
                        loss[str(p)].append(s["loss"])
        for p in ok:
            a, lo = acc[str(p)], loss[str(p)]
            if a:
                out[(str(p), sigma)] = {"accuracy": statistics.fmean(a), "loss": statistics.fmean(lo),
                                        "accuracy_std": statistics.pstdev(a) if len(a) > 1 else 0.0,
                                        "status": "ok"}
            else:
                out[(str(p), sigma)] = {"accuracy": None, "loss": None, "accuracy_std": None,
                                        "status": problems.get(str(p), "n/a (no batches)")}
    return out


# ---------------------------------------------------------------------------------------------- latency


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latency(runner: _Runner, x: Tensor, path: ir.Path, repeats: int) -> float:
    """Median wall time (ms) of one full forward of the path on batch x, after a warm-up."""
    modules = runner.modules(path)

    def run() -> None:
        h = x
        for m in modules:
            h = m(h)

    run()
    _sync(x.device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        run()
        _sync(x.device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- entry points


def _module_modes(exp: Any) -> list[tuple[nn.Module, bool]]:
    mods: list[nn.Module] = list(exp.compiled.root.modules())
    for net in exp.networks.values():
        mods += list(net.modules())
    return [(m, m.training) for m in mods]


def evaluate_items(exp: Any, loader: Iterable, items: Sequence[ir.EvalItem], *,
                   device: str | torch.device | None = None, max_batches: int | None = None,
                   snapshot_state: SnapshotState | None = None, seed: int = 0) -> dict[str, Any]:
    """Evaluate `items` on `loader` in eval mode without gradients; JSON-serialisable results.

    `device` is where batches go (default: the experiment's device); `max_batches` caps every pass;
    `snapshot_state(net, epoch)` supplies the weights of snapshot networks (`net1@10`); `seed` makes
    the flatness noise reproducible. Weights and train/eval modes are as before when this returns.
    """
    dev = torch.device(device) if device is not None else torch.device(getattr(exp, "device", "cpu"))
    runner = _Runner(exp, snapshot_state)
    modes = _module_modes(exp)
    ctx: dict[str, Any] = {"device": dev}
    try:
        if hasattr(exp, "set_train_mode"):
            exp.set_train_mode(False)
        exp.compiled.root.eval()
        with torch.no_grad():
            job = _Pass()
            plans = _plan_items(exp, runner, list(items), job, ctx)
            if job.paths or job.capture:
                _run_pass(runner, loader, dev, max_batches, job)
            noisy: dict[tuple[int, str, float], dict] = {}
            for idx, paths, sigmas, draws in ctx.get("flatness", []):
                res = _flatness(runner, loader, dev, max_batches, paths, sigmas, draws, seed)
                noisy.update({(idx, k, s): v for (k, s), v in res.items()})
            ctx["noisy"] = noisy
            if ctx.get("latency"):
                first = next(iter(_batches(loader, dev, 1)), None)
                timings: dict[tuple[int, str], float] = {}
                if first is not None:
                    ctx["batch_size"] = int(first[0].shape[0])
                    for idx, item, combos in ctx["latency"]:
                        for c in combos:
                            if c.path is None or runner.check(c.path) or str(c.path) in runner.failed:
                                continue
                            timings[(idx, str(c.path))] = _latency(runner, first[0], c.path,
                                                                   int(item.kwargs.get("repeats", 10)))
                ctx["timings"] = timings
            results = [plan.finish(job) for plan in plans]
    finally:
        for m, training in modes:
            m.train(training)
    return {"num_samples": job.num_samples, "num_batches": job.num_batches, "device": str(dev),
            "items": _jsonable(results)}


def evaluate_program(exp: Any, loader: Iterable, **kwargs: Any) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------- snapshots


def checkpoint_snapshots(run_dir: str | FsPath, stage: str | None = None) -> SnapshotState:
    """`snapshot_state` reading the trainer's `<run>/checkpoints/<stage>/epoch<k>.pt` files.

    Each file holds {"modules": {"parts": state_dict of compiled.root.parts, "adapters": ...}}; the
    returned callable gives one network's part weights (keys relative to `root.parts[net]`).
    With `stage=None` the epoch must exist in exactly one stage directory.
    """
    base = FsPath(run_dir) / "checkpoints"
    loaded: dict[FsPath, Mapping[str, Tensor]] = {}

    def find(epoch: int) -> FsPath:
        if stage is not None:
            f = base / stage / f"epoch{epoch}.pt"
            if not f.exists():
                raise FileNotFoundError(f"{f} does not exist")
            return f
        found = sorted(base.glob(f"*/epoch{epoch}.pt"))
        if not found:
            raise FileNotFoundError(f"no checkpoint of epoch {epoch} under {base}")
        if len(found) > 1:
            stages = ", ".join(f.parent.name for f in found)
            raise ValueError(f"epoch {epoch} is saved by several train blocks ({stages}); pass stage=")
        return found[0]

    def snapshot_state(net: str, epoch: int) -> Mapping[str, Tensor]:
        f = find(epoch)
        if f not in loaded:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
            loaded[f] = ckpt["modules"]["parts"]
        prefix = f"{net}."
        state = {k[len(prefix):]: v for k, v in loaded[f].items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"{f} has no weights of network '{net}'")
        return state

    return snapshot_state
