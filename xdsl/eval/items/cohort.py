"""`cohort(nets...)`: each member's accuracy and their mean +/- std, as the DML paper reports cohorts of
2 to 5 (its Fig. 2). Without arguments the members are the networks the train block trained, so one
`evaluate cohort` line serves blocks that train cohorts of different sizes."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.table import Tab, fmt_acc

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass
    from xdsl.lang import ir


class Cohort(EvaluateItem):
    name = "cohort"
    takes = "networks"

    def members(self) -> list[str]:
        if self.spec.args:
            return [str(a) for a in self.spec.args]
        stage = self.exp.stage
        return list(stage.trained) if stage is not None else list(self.program.networks)

    def _paths(self) -> list[ir.Path]:
        return [self.program.natural_path(net) for net in self.members()]

    def plan(self, job: Pass) -> None:
        for p in self._paths():
            self.need(job, p)

    def compute(self, job: Pass) -> Result:
        rows = [self.path_row(job, p) for p in self._paths()]
        accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
        return self.result(rows=rows, **_spread(accs))

    @classmethod
    def merge(cls, shards, weights) -> Result:
        out = super().merge(shards, weights)
        out.update(_spread([r["accuracy"] for r in out.get("rows", []) if r.get("accuracy") is not None]))
        return out

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        t = Tab("Cohort: " + result.get("title", ""), ["Member", "Accuracy"], numeric={1})
        for r in result.get("rows", []):
            t.rows.append([str(r.get("label") or r["path"]), fmt_acc(r.get("accuracy"), r.get("status"))])
        mean, std = result.get("mean"), result.get("std")
        spread = "-" if mean is None else f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}%"
        t.rows.append([f"mean ± std of {result.get('members', 0)}", spread])
        return [t]

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        return {"cohort mean": result.get("mean"), "cohort std": result.get("std")}


def _spread(accs: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over the members (std 0 for one member, None for none)."""
    if not accs:
        return {"members": 0, "mean": None, "std": None}
    return {"members": len(accs), "mean": statistics.mean(accs),
            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
