"""`retrieval(paths..., feature="pool", metric=cosine, ensemble=concat, ranks=[1, 5, 10])`: person
re-identification by nearest-neighbour matching of each path's feature, CMC Rank-k and mAP (the DML
paper's Market-1501 evaluation). The work is in `xdsl.eval.retrieval` (features, ensembles) and
`xdsl.eval.retrieval_metrics` (the protocol's scores)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.paths import path_label
from xdsl.eval.retrieval_metrics import METRICS
from xdsl.eval.table import Tab, fmt_acc, row_label
from xdsl.registry import did_you_mean

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass

ENSEMBLES = ("concat", "mean", "none")


class Retrieval(EvaluateItem):
    name = "retrieval"
    keywords = {"feature": "", "metric": "cosine", "ensemble": "concat", "ranks": [1, 5, 10]}
    per_sample = False   # every query against the whole gallery: one process

    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        for key, options in (("metric", METRICS), ("ensemble", ENSEMBLES)):
            value = str(kwargs[key])
            if value not in options:
                guess = did_you_mean(value, options)
                return key, f"retrieval(): unknown {key} '{value}'", \
                    f"did you mean '{guess}'?" if guess else f"{key}s: {', '.join(options)}"
        ranks = kwargs["ranks"]
        if not (isinstance(ranks, list) and ranks and all(isinstance(k, int) and k >= 1 for k in ranks)):
            return "ranks", f"retrieval(): ranks is a list of integers >= 1, got {ranks!r}", None
        return None

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> str:
        return "query/gallery"

    def compute(self, job: Pass) -> Result:
        from xdsl.eval.retrieval import FeaturePaths, evaluate_retrieval

        split = getattr(self.ctx.data, "retrieval", None)
        if split is None:
            return self.result(error="the data has no query/gallery split", rows=[])
        shared = self.ctx.shared  # features and embeddings shared by the retrieval items of one evaluation
        if "features" not in shared:
            shared["features"] = FeaturePaths(self.engine.module, self.exp.networks)
        paths = self.paths()
        kw = self.spec.kwargs
        out = evaluate_retrieval(shared["features"], split, paths, [path_label(self.program, p) for p in paths],
                                 feature=str(kw["feature"]), metric=str(kw["metric"]), ensemble=str(kw["ensemble"]),
                                 ranks=list(kw["ranks"]), device=self.ctx.device,
                                 cache=shared.setdefault("embeddings", {}))
        return self.result(**{k: v for k, v in out.items() if k != "kind"})

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        ranks = list(result.get("ranks", []))
        how = {"concat": "concatenated", "mean": "averaged"}.get(str(result.get("ensemble")))
        normalised = " (each L2-normalised)" if result.get("metric") == "cosine" else ""
        caption = (f"{result.get('metric')} distance; {result.get('queries')} queries, {result.get('gallery')} "
                   "gallery images; same identity and camera excluded per query, junk excluded"
                   + (f"; ensemble: members' features {how}{normalised}" if how else ""))
        t = Tab("Retrieval: " + result.get("title", ""), ["Path", "Feature"] + [f"Rank-{k}" for k in ranks] + ["mAP"],
                numeric=set(range(2, len(ranks) + 3)), caption=caption)
        for r in result.get("rows", []):
            feature = f"{r.get('feature') or ''} ({r['dim']})".lstrip() if r.get("dim") else str(r.get("feature", ""))
            if r.get("status") != "ok":
                t.rows.append([row_label(r), feature, r.get("status", "n/a")] + [""] * len(ranks))
                continue
            t.rows.append([row_label(r), feature] + [fmt_acc(r.get(f"rank{k}")) for k in ranks]
                          + [fmt_acc(r.get("mAP"))])
        return [t]

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        """Rank-1 and mAP of every path and of the ensemble."""
        cols: dict[str, float | None] = {}
        for r in result.get("rows", []):
            cols[f"{row_label(r)} R1"] = r.get("rank1")
            cols[f"{row_label(r)} mAP"] = r.get("mAP")
        return cols
