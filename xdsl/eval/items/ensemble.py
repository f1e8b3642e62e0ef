"""`ensemble(paths...)`: accuracy of the members' averaged softmax, beside each member's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.table import Tab, fmt_acc, row_label

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass


class Ensemble(EvaluateItem):
    name = "ensemble"

    @property
    def key(self) -> str:
        return f"#{self.index}"

    def plan(self, job: Pass) -> None:
        paths = self.paths()
        for p in paths:
            self.need(job, p)
        if all(self.engine.check(p) is None for p in paths):
            job.ensembles[self.key] = [str(p) for p in paths]

    def compute(self, job: Pass) -> Result:
        members = [self.path_row(job, p) for p in self.paths()]
        out = self.result(members=members)
        bad = [m for m in members if m["status"] != "ok"]
        if bad or self.key not in job.ens_stats:
            out.update(accuracy=None, loss=None, status=bad[0]["status"] if bad else "n/a")
        else:
            s = job.ens_stats[self.key].summary()
            out.update(accuracy=s["accuracy"], loss=s["loss"], entropy=s["entropy"], status="ok")
        return out

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        t = Tab("Ensemble: " + result.get("title", ""), ["Member", "Accuracy"], numeric={1})
        members = result.get("members", [])
        for r in members:
            t.rows.append([row_label(r), fmt_acc(r.get("accuracy"), r.get("status"))])
        acc = result.get("accuracy")
        best = max((r["accuracy"] for r in members if r.get("accuracy") is not None), default=None)
        gain = f" ({100.0 * (acc - best):+.2f})" if acc is not None and best is not None else ""
        t.rows.append(["ensemble (averaged softmax)", fmt_acc(acc, result.get("status")) + gain])
        t.caption = "gain over the best member in parentheses" if gain else None
        return [t]

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        names = [m.get("label") or m["path"] for m in result.get("members", [])]
        name = "ensemble" if n_networks is None or len(names) == n_networks else f"ens({','.join(names)})"
        return {name: result.get("accuracy")}
