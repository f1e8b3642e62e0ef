"""`flatness(paths..., sigmas=[...], draws=3, split="test")`: accuracy and CE loss under N(0, sigma^2) noise
on every weight of the path, mean over draws (the DML paper's flatness analysis). `split="train"` measures
the training loss on the unaugmented training set, as the paper's Figure 3 does (on re-id data too)."""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.paths import path_label
from xdsl.eval.table import Tab, fmt, fmt_acc
from xdsl.lang import ir

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass

_NONE = {"accuracy": None, "loss": None, "accuracy_std": None}


def _seed_of(*parts: Any) -> int:
    return zlib.crc32("|".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class Flatness(EvaluateItem):
    name = "flatness"
    keywords = {"sigmas": [0.0, 0.01, 0.02, 0.05], "draws": 3, "split": "test"}
    per_sample = False   # random draws: one process evaluates the whole test set
    title_keywords = True

    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        sigmas = kwargs.get("sigmas", cls.keywords["sigmas"])
        if not isinstance(sigmas, list) or not sigmas or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in sigmas):
            return "sigmas", f"flatness(): sigmas is a non-empty list of noise scales >= 0, got {sigmas!r}", None
        draws = kwargs.get("draws", cls.keywords["draws"])
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
            return "draws", f"flatness(): draws is an integer >= 1, got {draws!r}", None
        return super().check_keywords(kwargs)

    @property
    def sigmas(self) -> list[float]:
        return [float(s) for s in self.spec.kwargs.get("sigmas", self.keywords["sigmas"])]

    @property
    def draws(self) -> int:
        return int(self.spec.kwargs.get("draws", self.keywords["draws"]))

    def plan(self, job: Pass) -> None:
        if 0.0 in self.sigmas and not self.on_train:  # the unperturbed numbers come from the shared pass
            for p in self.paths():
                self.need(job, p)

    def compute(self, job: Pass) -> Result:
        paths = self.paths()
        noisy = self._noisy([p for p in paths if self.engine.problem(p) is None])
        if self.on_train and 0.0 in self.sigmas:  # the shared pass is over the test set: measure here
            clean = self.engine.run_paths(self.loader, {str(p): p for p in paths if self.engine.problem(p) is None})
            job = clean
        rows = []
        for p in paths:
            problem = self.engine.problem(p, job)
            for s in self.sigmas:
                row: Result = {"path": str(p), "label": path_label(self.program, p), "sigma": s}
                if problem:
                    row.update(_NONE, status=problem)
                elif s == 0.0:
                    base = job.stats[str(p)].summary()
                    row.update(accuracy=base["accuracy"], loss=base["loss"], accuracy_std=0.0, status="ok")
                else:
                    row.update(noisy.get((str(p), s), {**_NONE, "status": "n/a"}))
                rows.append(row)
        return self.result(sigmas=self.sigmas, draws=self.draws, split=self.spec.kwargs.get("split", "test"),
                           paths=[str(p) for p in paths],
                           labels=[path_label(self.program, p) for p in paths], rows=rows)

    def _disjoint_groups(self, paths: list[ir.Path]) -> list[list[ir.Path]]:
        """Paths whose parameters do not overlap can be perturbed together and evaluated in one pass."""
        groups: list[tuple[set[int], list[ir.Path]]] = []
        for p in paths:
            ids = {id(q) for q in self.engine.parameters(p)}
            for used, members in groups:
                if not used & ids:
                    used |= ids
                    members.append(p)
                    break
            else:
                groups.append((ids, [p]))
        return [members for _, members in groups]

    def _noisy(self, paths: list[ir.Path]) -> dict[tuple[str, float], Result]:
        """(path, sigma) -> mean accuracy / loss over the draws, for every sigma > 0."""
        out: dict[tuple[str, float], Result] = {}
        groups = self._disjoint_groups(paths)
        for sigma in self.sigmas:
            if sigma == 0.0:
                continue
            acc: dict[str, list[float]] = {str(p): [] for p in paths}
            loss: dict[str, list[float]] = {str(p): [] for p in paths}
            problems: dict[str, str] = {}
            for draw in range(max(1, self.draws)):
                for group in groups:
                    job = self._perturbed_pass(group, sigma, draw)
                    for p in group:
                        s = job.stats[str(p)].summary()
                        if str(p) in job.problems:
                            problems[str(p)] = job.problems[str(p)]
                        elif s["accuracy"] is not None:
                            acc[str(p)].append(s["accuracy"])
                            loss[str(p)].append(s["loss"])
            for p in paths:
                a, lo = acc[str(p)], loss[str(p)]
                out[(str(p), sigma)] = {"accuracy": statistics.fmean(a), "loss": statistics.fmean(lo),
                                        "accuracy_std": statistics.pstdev(a) if len(a) > 1 else 0.0,
                                        "status": "ok"} if a else \
                    {**_NONE, "status": problems.get(str(p), "n/a (no batches)")}
        return out

    def _perturbed_pass(self, group: list[ir.Path], sigma: float, draw: int) -> Pass:
        """One pass over the test set with noise added to the group's weights; the weights are restored."""
        saved: list[tuple[nn.Parameter, Tensor]] = []
        try:
            for p in group:
                params = self.engine.parameters(p)
                gen = torch.Generator(device=params[0].device if params else "cpu")
                gen.manual_seed(_seed_of(self.ctx.seed, p, sigma, draw))
                for q in params:
                    saved.append((q, q.detach().clone()))
                    q.add_(torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype), alpha=sigma)
            return self.engine.run_paths(self.loader, {str(p): p for p in group})
        finally:
            for q, kept in saved:
                q.copy_(kept)

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        paths = list(result.get("paths", []))
        labels = list(result.get("labels") or paths)
        t = Tab("Flatness: " + result.get("title", ""), ["sigma"] + labels, numeric=set(range(0, len(paths) + 1)),
                caption=f"accuracy (CE loss) under N(0, sigma^2) weight noise, mean of {result.get('draws')} draws")
        cells = {(r["path"], r["sigma"]): r for r in result.get("rows", [])}
        for s in result.get("sigmas", []):
            row = [f"{s:g}"]
            for p in paths:
                r = cells.get((p, s), {})
                row.append(r.get("status", "n/a") if r.get("accuracy") is None
                           else f"{fmt_acc(r['accuracy'])} ({fmt(r.get('loss'), 3)})")
            t.rows.append(row)
        return [t]
