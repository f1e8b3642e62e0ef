"""`anytime(paths..., repeats=10)`: accuracy, #params and latency of each path, as BYOT's anytime-prediction
table reports its classifiers (each auxiliary head alone, 1/4 .. 4/4 of the network): one row per path,
timed on one test batch like `latency` (which times every Xross path of whole networks instead)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.table import Tab, fmt, fmt_acc, fmt_params, row_label

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass


class Anytime(EvaluateItem):
    name = "anytime"
    keywords = {"repeats": 10}
    per_sample = False   # wall times: measured by one process on one batch

    def plan(self, job: Pass) -> None:
        for p in self.paths():
            self.need(job, p)

    def compute(self, job: Pass) -> Result:
        rows = [self.path_row(job, p) for p in self.paths()]
        first = next(iter(self.ctx.loader), None)
        repeats = int(self.spec.kwargs.get("repeats", 10))
        for p, row in zip(self.paths(), rows):
            runnable = first is not None and row.get("status") == "ok"
            row["latency_ms"] = self.engine.latency(first[0].to(self.ctx.device), p, repeats) if runnable else None
        return self.result(rows=rows, repeats=repeats, device=str(self.ctx.device),
                           batch_size=int(first[0].shape[0]) if first is not None else None)

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        t = Tab("Anytime prediction: " + result.get("title", ""), ["Path", "Accuracy", "#Params", "ms/batch"],
                numeric={1, 2, 3}, caption=f"latency: mean of {result.get('repeats')} forwards of one batch of "
                                          f"{result.get('batch_size')} on {result.get('device')}")
        for r in result.get("rows", []):
            t.rows.append([row_label(r), fmt_acc(r.get("accuracy"), r.get("status")), fmt_params(r.get("params")),
                           fmt(r.get("latency_ms"), 2)])
        return [t]
