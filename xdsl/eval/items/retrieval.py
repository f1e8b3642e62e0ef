"""`retrieval(paths..., feature="pool", metric=cosine, ensemble=concat, ranks=[1, 5, 10])`: person
re-identification by nearest-neighbour matching of each path's feature, CMC Rank-k and mAP (the DML
paper's Market-1501 evaluation).

Query and gallery images are embedded with each path up to its feature (`xdsl.compile.features`, through
the engine), flattened, and scored by `xdsl.retrieval_metrics` (same-identity same-camera and junk gallery
images excluded per query). With two or more paths the ensemble is scored too: `concat` (the paper's
Figure 2(b): the members' features side by side; each L2-normalised first under the cosine metric, so no
member dominates by scale) or `mean` (the members' features averaged; one dimension needed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdsl.errors import XdslError
from xdsl.eval.item import EvaluateItem, Result
from xdsl.eval.paths import path_label
from xdsl.eval.table import Tab, fmt_acc, row_label
from xdsl.lang import ir
from xdsl.registry import did_you_mean
from xdsl.retrieval_metrics import METRICS, retrieval_scores

if TYPE_CHECKING:
    from xdsl.eval.engine import Pass

__all__ = ["ENSEMBLES", "Retrieval", "embed", "evaluate_retrieval"]

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
        split = getattr(self.ctx.data, "retrieval", None)
        if split is None:
            return self.result(error="the data has no query/gallery split", rows=[])
        shared = self.ctx.shared  # embeddings shared by the retrieval items of one evaluation
        paths = self.paths()
        kw = self.spec.kwargs
        labels = [path_label(self.program, p) for p in paths]
        out = evaluate_retrieval(self.engine.feature_paths(), split, paths, labels,
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


def embed(modules: Sequence[nn.Module], loader: Iterable, device: torch.device) -> Tensor:
    """Features (N, D) of every batch of `loader` through `modules`, flattened, float32, on the CPU."""
    out = []
    for batch in loader:
        h = batch[0].to(device, non_blocking=True)
        for m in modules:
            h = m(h)
        out.append(h.flatten(1).float().cpu())
    return torch.cat(out)


def _combine(features: list[tuple[Tensor, Tensor]], how: str, metric: str) -> tuple[Tensor, Tensor]:
    def norm(t: Tensor) -> Tensor:
        return F.normalize(t, dim=1) if metric == "cosine" else t

    if how == "concat":
        return tuple(torch.cat([norm(f[i]) for f in features], dim=1) for i in (0, 1))  # type: ignore[return-value]
    dims = {f[0].shape[1] for f in features}
    if len(dims) != 1:
        raise XdslError(f"ensemble=mean needs features of one dimension, got {sorted(dims)}",
                        hint="use ensemble=concat")
    return tuple(torch.stack([norm(f[i]) for f in features]).mean(0) for i in (0, 1))  # type: ignore[return-value]


def evaluate_retrieval(features: Any, split: Any, paths: Sequence[ir.Path], labels: Sequence[str], *,
                       feature: str = "", metric: str = "cosine", ensemble: str = "concat",
                       ranks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
                       device: torch.device | str = "cpu",
                       cache: dict[tuple[str, str], tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
    """Scores of every path and of their ensemble on a RetrievalSplit; plain JSON data, one row per path.

    `features` runs paths up to a feature (`xdsl.compile.features.FeaturePaths`: `.modules(path, feature)`
    and `.feature_name(path, feature)`).

    `cache` keeps (query, gallery) features by (path, feature) across items of one evaluation: a cohort's
    networks appear in several items and are embedded once.
    """
    if metric not in METRICS:
        raise XdslError(f"unknown retrieval metric '{metric}'", hint=f"metrics: {', '.join(METRICS)}")
    device = torch.device(device)
    query_loader, gallery_loader = split.loaders(batch_size)
    ids = (split.query_ids, split.query_cams, split.gallery_ids, split.gallery_cams)
    rows, kept = [], []
    for path, label in zip(paths, labels):
        row: dict[str, Any] = {"path": str(path), "label": label}
        try:
            row["feature"] = features.feature_name(path, feature)
            key = (str(path), row["feature"])
            if cache is None or key not in cache:
                modules = features.modules(path, feature)
                embedded = embed(modules, query_loader, device), embed(modules, gallery_loader, device)
                if cache is not None:
                    cache[key] = embedded
            q, g = cache[key] if cache is not None else embedded
        except (XdslError, RuntimeError) as e:
            rows.append({**row, "status": f"n/a ({getattr(e, 'message', None) or str(e).splitlines()[0]})"})
            continue
        kept.append((q, g))
        rows.append(_scored(row, q, g, ids, metric, ranks))
    out: dict[str, Any] = {"kind": "retrieval", "metric": metric, "ensemble": ensemble, "ranks": sorted(ranks),
                           "queries": len(split.query_ids), "gallery": len(split.gallery_ids), "rows": rows}
    if ensemble != "none" and len(paths) > 1:
        row = {"path": f"ensemble({', '.join(str(p) for p in paths)})", "label": f"ensemble({', '.join(labels)})"}
        if len(kept) == len(paths):
            try:
                rows.append(_scored(row, *_combine(kept, ensemble, metric), ids, metric, ranks))
            except XdslError as e:
                rows.append({**row, "status": f"n/a ({e.message})"})
        else:
            rows.append({**row, "status": "n/a (a member could not be evaluated)"})
    return out


def _scored(row: dict[str, Any], q: Tensor, g: Tensor, ids: tuple[Tensor, ...], metric: str,
            ranks: Sequence[int]) -> dict[str, Any]:
    scores = retrieval_scores(q, g, *ids, metric=metric, ranks=ranks)
    status = "ok" if scores.queries else "n/a (no query has a match in the gallery)"
    return {**row, **scores.as_dict(), "dim": int(q.shape[1]), "status": status}
