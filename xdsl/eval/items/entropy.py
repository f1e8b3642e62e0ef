"""`entropy(paths...)`: mean prediction entropy (nats) of each path, as in the DML paper's analysis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xdsl.eval.item import PerPathItem
from xdsl.eval.table import Tab, fmt, fmt_acc, row_label


class Entropy(PerPathItem):
    name = "entropy"

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        t = Tab("Entropy: " + result.get("title", ""), ["Path", "Mean entropy (nats)", "Accuracy"], numeric={1, 2})
        for r in result.get("rows", []):
            ok = r.get("status") == "ok"
            t.rows.append([row_label(r), fmt(r.get("entropy")) if ok else r.get("status", "n/a"),
                           fmt_acc(r.get("accuracy"), r.get("status"))])
        return [t]
