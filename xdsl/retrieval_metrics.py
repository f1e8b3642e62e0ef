"""Re-identification retrieval scores: CMC Rank-k accuracy and mean average precision (mAP).

The Market-1501 protocol (Zheng et al., ICCV 2015; the DML paper's second benchmark): every query is
matched against the whole gallery, ranked by feature distance, and

- gallery images of the query's identity taken by the query's camera are excluded for that query
  (finding the same person in the same camera view is not re-identification);
- junk gallery images (identity -1, badly detected boxes) are excluded for every query;
- distractors (identity 0, false detections) stay in the gallery as non-matches;
- a query whose identity has no remaining gallery image is skipped (it has no defined rank or AP).

CMC Rank-k is the fraction of queries whose first true match ranks k or better; a query's AP is the
mean, over its true matches, of the precision at each match's rank; mAP averages AP over queries.
Ties in distance keep gallery order (a stable sort), so results never depend on the sorting backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["METRICS", "JUNK_ID", "RetrievalScores", "distance_matrix", "retrieval_scores"]

METRICS = ("cosine", "euclidean")
JUNK_ID = -1
"""Gallery identity of junk images: excluded for every query (Market-1501's `-1_...` files)."""


@dataclass(frozen=True)
class RetrievalScores:
    """CMC at the requested ranks and mAP (fractions in [0, 1]) over `queries` scored queries."""

    cmc: dict[int, float]
    mAP: float
    queries: int
    skipped: int

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {f"rank{k}": v for k, v in self.cmc.items()}
        out.update(mAP=self.mAP, queries=self.queries, skipped=self.skipped)
        return out


def distance_matrix(query: Tensor, gallery: Tensor, metric: str = "cosine") -> Tensor:
    """(Q, D) x (G, D) -> (Q, G) distances: `1 - cosine similarity`, or Euclidean distance."""
    if metric not in METRICS:
        raise ValueError(f"unknown retrieval metric '{metric}' (known: {', '.join(METRICS)})")
    q, g = query.double(), gallery.double()
    if metric == "cosine":
        return 1.0 - F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    return torch.cdist(q, g)


def retrieval_scores(
    query: Tensor,
    gallery: Tensor,
    query_ids: Tensor,
    query_cams: Tensor,
    gallery_ids: Tensor,
    gallery_cams: Tensor,
    *,
    metric: str = "cosine",
    ranks: Sequence[int] = (1, 5, 10),
    chunk: int = 512,
) -> RetrievalScores:
    """Score query features (Q, D) against gallery features (G, D) under the protocol above.

    Queries are processed `chunk` at a time so the full Market-1501 test (3,368 x 15,913) never holds
    more than a chunk's distance and order matrices.
    """
    if query.shape[0] != len(query_ids) or gallery.shape[0] != len(gallery_ids):
        raise ValueError("one identity and camera per query and gallery feature")
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        raise ValueError("retrieval features contain NaN or inf")
    ranks = sorted({int(k) for k in ranks})
    if not ranks or ranks[0] < 1:
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    q_ids, q_cams = query_ids.long().cpu(), query_cams.long().cpu()
    g_ids, g_cams = gallery_ids.long().cpu(), gallery_cams.long().cpu()
    query, gallery = query.cpu(), gallery.cpu()
    hits = torch.zeros(len(ranks), dtype=torch.float64)
    ap_sum, scored = 0.0, 0
    for start in range(0, len(q_ids), chunk):
        stop = min(start + chunk, len(q_ids))
        dist = distance_matrix(query[start:stop], gallery, metric)                    # (q, G)
        same_id = q_ids[start:stop, None] == g_ids[None, :]                            # (q, G)
        excluded = (same_id & (q_cams[start:stop, None] == g_cams[None, :])) | (g_ids[None, :] == JUNK_ID)
        dist = dist.masked_fill(excluded, float("inf"))                                # excluded rank last
        order = torch.sort(dist, dim=1, stable=True).indices
        match = torch.gather(same_id & ~excluded, 1, order).double()                   # (q, G) in rank order
        relevant = match.sum(1)
        valid = relevant > 0
        match, relevant = match[valid], relevant[valid]
        scored += int(valid.sum())
        if not len(match):
            continue
        first = match.argmax(1) + 1                                                    # rank of first match
        hits += torch.stack([(first <= k).sum() for k in ranks]).double()
        positions = torch.arange(1, match.shape[1] + 1, dtype=torch.float64)
        precision = match.cumsum(1) / positions                                        # precision at each rank
        ap_sum += float(((precision * match).sum(1) / relevant).sum())
    cmc = {k: float(h) / scored if scored else 0.0 for k, h in zip(ranks, hits)}
    return RetrievalScores(cmc=cmc, mAP=ap_sum / scored if scored else 0.0, queries=scored,
                           skipped=len(q_ids) - scored)
