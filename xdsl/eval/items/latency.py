"""`latency(nets..., max_params=N, max_latency_ms=T)`: dynamic computation (the XML paper): every Xross
path's latency on one batch, the Pareto front (accuracy vs #params) and the best path under a budget
(0 = no budget)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.dynamic import best_path, pareto_front
from xdsl.eval.item import Result
from xdsl.eval.items.xross import Xross
from xdsl.eval.table import Tab, fmt, fmt_acc, fmt_params

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass


class Latency(Xross):
    name = "latency"
    keywords = {"repeats": 10, "max_params": 0, "max_latency_ms": 0.0}
    min_networks = 0
    per_sample = False   # wall times: measured by one process on one batch

    def compute(self, job: Pass) -> Result:
        out = super().compute(job)
        first = next(iter(self.ctx.loader), None)
        repeats = int(self.spec.kwargs.get("repeats", 10))
        for c, row in zip(self.combos, out["rows"]):
            runnable = first is not None and c.path is not None and self.engine.problem(c.path) is None
            row["latency_ms"] = self.engine.latency(first[0].to(self.ctx.device), c.path, repeats) \
                if runnable else None
        out.update(repeats=repeats, batch_size=int(first[0].shape[0]) if first is not None else None,
                   device=str(self.ctx.device), max_params=self.spec.kwargs.get("max_params") or None,
                   max_latency_ms=self.spec.kwargs.get("max_latency_ms") or None)
        return out

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        caption = ", ".join(f"{n} = {a}" for n, a in result.get("architectures", {}).items()) or None
        t = cls.table(result, "Latency: " + result.get("title", ""), _caption(result, caption))
        t.headers += ["ms/batch", "Pareto"]
        t.numeric |= {len(t.headers) - 2, len(t.headers) - 1}
        front = {r["path"] for r in pareto_front(result.get("rows", []))}
        for cells, r in zip(t.rows, result.get("rows", [])):
            cells += [fmt(r.get("latency_ms"), 2), "*" if r["path"] in front else ""]
        return [t]

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        return {}


def _caption(result: Mapping[str, Any], caption: str | None) -> str:
    """The best path under the item's #params / latency budget."""
    budget = {"max_params": result.get("max_params") or None,
              "max_latency_ms": result.get("max_latency_ms") or None}
    best = best_path(result.get("rows", []), **budget)
    wanted = ", ".join(f"{k} <= {v}" for k, v in budget.items() if v) or "no budget"
    choice = f"{best['label'] or best['path']} ({fmt_acc(best['accuracy'])}, {fmt_params(best['params'])} params)" \
        if best else "none fits"
    text = f"* = Pareto front (accuracy vs #params); best path with {wanted}: {choice}"
    return f"{caption}; {text}" if caption else text
