"""`retrieval(...)`: re-identification by nearest-neighbour matching of a path's features (the DML paper's
Market-1501 evaluation).

    evaluate retrieval(net1, net2, net1.up >> net2.down, feature="pool", metric=cosine, ensemble=concat)

Each path is run up to the named feature: a module path or fx node name of the path's *last* network
(the last part on the path that contains it is split there with the cut machinery, so any valid cut
point works, crossed paths included). Without `feature` it is the last pooling layer of that network,
"the feature of the last pooling layer" of the paper. Query and gallery images are embedded, flattened,
and scored by `xdsl.eval.retrieval_metrics` (CMC Rank-k, mAP; same-identity same-camera and junk
gallery images excluded per query). With two or more paths the ensemble is scored too: `concat`
(the paper's Figure 2(b): the members' features side by side; each L2-normalised first under the cosine
metric, so no member dominates by scale) or `mean` (the members' features averaged, same dimension needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xdsl.compile.cut import cut_model
from xdsl.errors import XdslError
from xdsl.eval.retrieval_metrics import METRICS, retrieval_scores
from xdsl.lang import ir

__all__ = ["POOLING", "FeaturePaths", "default_feature", "embed", "evaluate_retrieval"]

POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d)


def default_feature(network: nn.Module) -> str:
    """The last pooling layer of a network (module order), e.g. `avgpool` of a ResNet, `pool.0` of MobileNet."""
    pools = [name for name, m in network.named_modules() if isinstance(m, POOLING)]
    if not pools:
        raise XdslError(f"{type(network).__name__} has no pooling layer to take the retrieval feature from",
                        hint='name one with feature="<module path or fx node name>"')
    return pools[-1]


class FeaturePaths:
    """Modules that run a path up to a named feature; truncated parts are built once and reused.

    `module_of(step)` gives the module of a path step (the compiled root's part or adapter);
    `networks` the whole networks, for the default feature.
    """

    def __init__(self, module_of: Callable[[ir.Step], nn.Module], networks: dict[str, nn.Module]):
        self.module_of = module_of
        self.networks = networks
        self._heads: dict[tuple[int, str], nn.Module | None] = {}

    def feature_name(self, path: ir.Path, feature: str) -> str:
        last = [s for s in path.steps if isinstance(s, ir.PartStep)]
        if not last:
            raise XdslError(f"path {path} has no network part to take a feature from")
        return feature or default_feature(self.networks[last[-1].net])

    def modules(self, path: ir.Path, feature: str) -> list[nn.Module]:
        """The path's modules, the last one cut right after `feature` (searched from the path's end)."""
        k, head = self.head(path, feature)
        return [self.module_of(s) for s in path.steps[:k]] + [head]

    def head(self, path: ir.Path, feature: str) -> tuple[int, nn.Module]:
        """(index of the step holding `feature`, that step's module cut right after it); an XdslError when
        the path's last network has no such layer on the path."""
        name = self.feature_name(path, feature)
        net = [s for s in path.steps if isinstance(s, ir.PartStep)][-1].net
        for k in range(len(path.steps) - 1, -1, -1):
            step = path.steps[k]
            if isinstance(step, ir.PartStep) and step.net == net:
                head = self._head(self.module_of(step), name)
                if head is not None:
                    return k, head
        raise XdslError(f"feature '{name}' is not in {net}'s part(s) on path {path}",
                        hint="name a module path or fx node name of the path's last network (a valid cut point)")

    def _head(self, part: nn.Module, name: str) -> nn.Module | None:
        """`part` up to and including `name`; the part itself when `name` ends it; None when absent."""
        key = (id(part), name)
        if key not in self._heads:
            try:
                head = cut_model(part, [name], ["head", "tail"])["head"]
            except XdslError as e:
                if e.message.startswith("unknown cut point") or "is not a step" in e.message:
                    head = None
                elif "is at the end of the network" in e.message:
                    head = part
                else:
                    raise XdslError(f"retrieval feature '{name}': {e.message}", e.hint) from None
            self._heads[key] = head
        return self._heads[key]


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


def evaluate_retrieval(features: FeaturePaths, split: Any, paths: Sequence[ir.Path], labels: Sequence[str], *,
                       feature: str = "", metric: str = "cosine", ensemble: str = "concat",
                       ranks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
                       device: torch.device | str = "cpu",
                       cache: dict[tuple[str, str], tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
    """Scores of every path and of their ensemble on a RetrievalSplit; plain JSON data, one row per path.

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
