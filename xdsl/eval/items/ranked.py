"""`ranked(paths..., k=5)`: the mean of each path's k largest softmax probabilities, largest first.

The DML paper's Figure 3(c) compares the posterior of independently trained and mutually trained
networks this way: DML's top-ranked class gets less mass and the next ones more (a less certain, more
robust posterior). `split="train"` measures it on the training set, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xdsl.eval.item import PerPathItem
from xdsl.eval.table import Tab, fmt, row_label


class Ranked(PerPathItem):
    name = "ranked"
    keywords = {"k": 5, "split": "test"}
    title_keywords = True

    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        k = kwargs.get("k", 5)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            return "k", f"ranked(): k is a whole number >= 1, got {k!r}", "e.g. ranked(net1, net2, k=5)"
        return super().check_keywords(kwargs)

    @property
    def ranked_k(self) -> int:
        return int(self.spec.kwargs.get("k", 5))

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        rows = result.get("rows", [])
        k = max((len(r.get("ranked") or []) for r in rows), default=0)
        where = "training set" if result.get("split") == "train" else "test set"
        t = Tab("Ranked posterior: " + result.get("title", ""), ["Path", *(f"#{i + 1}" for i in range(k))],
                numeric=set(range(1, k + 1)),
                caption=f"mean of the i-th largest softmax probability over the {where}")
        for r in rows:
            values = r.get("ranked")
            t.rows.append([row_label(r), *([fmt(v, 4) for v in values] if values and r.get("status") == "ok"
                                           else [r.get("status", "n/a")] * k)])
        return [t]
