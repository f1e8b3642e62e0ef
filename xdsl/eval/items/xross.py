"""`xross(nets...)`: every combination of the networks' parts (K^P paths), accuracy and #params, in the
XML paper's table format; adapters the spec trained between parts join them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.paths import Combo, split_net, xross_combinations
from xdsl.eval.table import Tab, fmt_acc, fmt_params, part_headers

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass


class Xross(EvaluateItem):
    name = "xross"
    takes = "networks"
    min_networks = 2

    def plan(self, job: Pass) -> None:
        self.part_names, self.combos = xross_combinations(self.exp, self.networks())
        for c in self.combos:
            if c.path is not None:
                self.need(job, c.path)

    def row(self, job: Pass, c: Combo) -> Result:
        if c.path is None:
            row: Result = {"path": None, "accuracy": None, "loss": None, "params": None, "status": c.status}
        else:
            row = self.path_row(job, c.path)
        return {"networks": c.networks, "parts": self.part_names, **row, "adapters": c.adapters}

    def compute(self, job: Pass) -> Result:
        nets = self.networks()
        archs = {n: self.program.networks[split_net(n)[0]].ref for n in nets}
        return self.result(networks=nets, parts=self.part_names, architectures=archs,
                           rows=[self.row(job, c) for c in self.combos])

    @classmethod
    def table(cls, result: Mapping[str, Any], title: str, caption: str | None) -> Tab:
        """The XML paper's list: the network of each part, accuracy, #params."""
        parts = list(result.get("parts", []))
        headers = part_headers(parts) + ["Accuracy", "#Params"]
        t = Tab(title, headers, caption=caption, numeric=set(range(len(parts), len(headers))))
        for r in result.get("rows", []):
            t.rows.append(list(r["networks"]) + [fmt_acc(r.get("accuracy"), r.get("status")),
                                                 fmt_params(r.get("params"))])
        return t

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        parts = list(result.get("parts", []))
        caption = ", ".join(f"{n} = {a}" for n, a in result.get("architectures", {}).items()) or None
        tabs = [cls.table(result, "Xross: " + result.get("title", ""), caption)]
        if len(parts) == 2 and result.get("rows"):  # and as an up x down matrix
            nets = list(result.get("networks", []))
            grid = {tuple(r["networks"]): r for r in result["rows"]}
            m = Tab(f"Xross accuracy ({parts[0]} rows x {parts[1]} columns)", [f"{parts[0]} \\ {parts[1]}"] + nets,
                    numeric=set(range(1, len(nets) + 1)))
            for a in nets:
                m.rows.append([a] + [fmt_acc(grid[(a, b)].get("accuracy"), "n/a") if (a, b) in grid else "-"
                                     for b in nets])
            tabs.append(m)
        return tabs

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        return {">>".join(r["networks"]): r.get("accuracy") for r in result.get("rows", [])
                if len(set(r.get("networks", []))) > 1}
