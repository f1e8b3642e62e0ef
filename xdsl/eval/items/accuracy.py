"""`accuracy(paths...)`: top-1 accuracy, CE loss and #params of each path (default: every network)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xdsl.eval.item import PerPathItem
from xdsl.eval.table import Tab, fmt, fmt_acc, fmt_params, row_label


class Accuracy(PerPathItem):
    name = "accuracy"

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        rows = result.get("rows", [])
        top5 = any("top5" in r for r in rows)  # more than 10 classes (xdsl.eval.engine.TOP5_ABOVE)
        headers = ["Path", "Accuracy", *(["Top-5"] if top5 else []), "Loss", "#Params"]
        title = "Accuracy on the training set" if result.get("split") == "train" else "Accuracy"
        t = Tab(title, headers, numeric=set(range(1, len(headers))))
        for r in rows:
            t.rows.append([row_label(r), fmt_acc(r.get("accuracy"), r.get("status")),
                           *([fmt_acc(r.get("top5"), r.get("status"))] if top5 else []), fmt(r.get("loss")),
                           fmt_params(r.get("params"))])
        return [t]

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        cols: dict[str, float | None] = {}
        train = " train" if result.get("split") == "train" else ""  # beside, not instead of, test accuracy
        for r in result.get("rows", []):
            cols[(r.get("label") or r["path"]) + train] = r.get("accuracy")
        for r in result.get("rows", []):
            if "top5" in r:
                cols[f"{r.get('label') or r['path']}{train} top-5"] = r["top5"]
        return cols
