"""`accuracy(paths...)`: top-1 accuracy, CE loss and #params of each path (default: every network)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.table import Tab, fmt, fmt_acc, fmt_params, row_label

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass


class Accuracy(EvaluateItem):
    name = "accuracy"

    def plan(self, job: Pass) -> None:
        for p in self.paths():
            self.need(job, p)

    def compute(self, job: Pass) -> Result:
        return self.result(rows=[self.path_row(job, p) for p in self.paths()])

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        rows = result.get("rows", [])
        top5 = any("top5" in r for r in rows)  # more than 10 classes (xdsl.eval.engine.TOP5_ABOVE)
        headers = ["Path", "Accuracy", *(["Top-5"] if top5 else []), "Loss", "#Params"]
        t = Tab("Accuracy", headers, numeric=set(range(1, len(headers))))
        for r in rows:
            t.rows.append([row_label(r), fmt_acc(r.get("accuracy"), r.get("status")),
                           *([fmt_acc(r.get("top5"), r.get("status"))] if top5 else []), fmt(r.get("loss")),
                           fmt_params(r.get("params"))])
        return [t]

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        cols: dict[str, float | None] = {}
        for r in result.get("rows", []):
            cols[r.get("label") or r["path"]] = r.get("accuracy")
        for r in result.get("rows", []):
            if "top5" in r:
                cols[f"{r.get('label') or r['path']} top-5"] = r["top5"]
        return cols
