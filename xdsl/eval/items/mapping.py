"""`mapping(a, b, measure=bmm_std)`: channel matching scores at every cut of two networks: original,
random and Gale-Shapley orders and its rounds (the XML paper's XML_m)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.paths import split_net
from xdsl.eval.table import Tab
from xdsl.lang import ir
from xdsl.mapping import MEASURES, channel_mapping, format_report
from xdsl.registry import did_you_mean

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass


class ChannelMapping(EvaluateItem):
    name = "mapping"
    takes = "networks"
    keywords = {"measure": "bmm_std", "batches": 1}
    min_networks = 2
    per_sample = False   # features of the first batches: one process

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> str:
        return "any"  # features only: re-id query images serve as well

    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        measure = str(kwargs["measure"])
        if measure in MEASURES:
            return None
        guess = did_you_mean(measure, MEASURES)
        return "measure", f"unknown measure '{measure}'", \
            f"did you mean '{guess}'?" if guess else f"measures: {', '.join(MEASURES)}"

    def plan(self, job: Pass) -> None:
        """Capture both networks' features at every cut they share, for the first `batches` batches."""
        job.capture_batches = max(job.capture_batches, int(self.spec.kwargs.get("batches", 1)))
        self.pairs: list[tuple[str, str, int, ir.Path, ir.Path]] = []
        for a, b in itertools.combinations(self.networks(), 2):
            (na, ea), (nb, eb) = split_net(a), split_net(b)
            for k in range(1, min(len(self.program.parts[na]), len(self.program.parts[nb]))):
                pa, pb = self.program.natural_path(na, k, ea), self.program.natural_path(nb, k, eb)
                for p in (pa, pb):
                    if self.engine.check(p) is None:
                        job.capture.setdefault(str(p), p)
                self.pairs.append((a, b, k, pa, pb))

    def compute(self, job: Pass) -> Result:
        measure = str(self.spec.kwargs.get("measure", "bmm_std"))
        return self.result(networks=self.networks(), measure=measure,
                           rows=[self._row(job, *pair, measure) for pair in self.pairs])

    def _row(self, job: Pass, a: str, b: str, k: int, pa: ir.Path, pb: ir.Path, measure: str) -> Result:
        row: Result = {"networks": [a, b], "cut": k, "after": self.program.parts[split_net(a)[0]][k - 1],
                       "measure": measure}
        problem = (self.engine.check(pa) or self.engine.check(pb) or self.engine.failed.get(str(pa))
                   or self.engine.failed.get(str(pb)))
        if problem is None and not (job.features.get(str(pa)) and job.features.get(str(pb))):
            problem = "no batches"
        if problem is None:
            try:
                rep = channel_mapping(torch.cat(job.features[str(pa)]), torch.cat(job.features[str(pb)]), measure)
                row.update(original=rep.original, random=rep.random, gale=rep.gale,
                           rounds=[int(r) for r in rep.rounds], perm=[int(i) for i in rep.perm],
                           text=format_report(rep), status="ok")
            except Exception as e:  # noqa: BLE001 - any mapping failure is reported, not raised
                problem = getattr(e, "message", None) or str(e)
        if problem is not None:
            row.update(status=problem)
        return row

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        t = Tab("Channel mapping: " + result.get("title", ""),
                ["Networks", "Cut after", "Measure", "Original", "Random", "Gale", "Rounds"], numeric={3, 4, 5})
        for r in result.get("rows", []):
            if r.get("status") != "ok":
                t.rows.append([" / ".join(r["networks"]), str(r.get("after")), r.get("measure", ""),
                               r.get("status", "n/a"), "", "", ""])
                continue
            rounds = r.get("rounds", [])
            text = "/".join(str(x) for x in rounds[:10]) + (f"/... ({len(rounds)})" if len(rounds) > 10 else "")
            t.rows.append([" / ".join(r["networks"]), str(r.get("after")), r["measure"], f"{r['original']:.4g}",
                           f"{r['random']:.4g}", f"{r['gale']:.4g}", text])
        return [t]
