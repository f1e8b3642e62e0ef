"""CMC Rank-k and mAP under the Market-1501 protocol: a hand-computed example, a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import average_precision_score

from xdsl.retrieval_metrics import distance_matrix, retrieval_scores


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values)


def test_hand_computed_example_excludes_same_camera_and_junk_and_keeps_distractors():
    # 1-D features, Euclidean distance = |q - g|. Query A (id 1, camera 1) at 0.0:
    #   g0 id 1 cam 1 at 0.10  same identity, same camera -> excluded (would be a rank-1 hit)
    #   g1 id 2 cam 2 at 0.20  wrong
    #   g2 id 1 cam 2 at 0.30  match
    #   g3 id -1 cam 2 at 0.05 junk -> excluded (would be a rank-1 miss)
    #   g4 id 0 cam 3 at 0.40  distractor: stays, wrong
    #   g5 id 1 cam 3 at 0.50  match
    # ranking g1 g2 g4 g5: first match at rank 2; AP = (1/2 + 2/4) / 2 = 0.5.
    # Query B (id 2, camera 1) at 0.21: g1 is its only match and the nearest: rank 1, AP 1.
    # Query C (id 3) has no gallery image: skipped.
    gallery = _t([[0.10], [0.20], [0.30], [0.05], [0.40], [0.50]])
    g_ids, g_cams = _t([1, 2, 1, -1, 0, 1]), _t([1, 2, 2, 2, 3, 3])
    query = _t([[0.0], [0.21], [0.3]])
    q_ids, q_cams = _t([1, 2, 3]), _t([1, 1, 1])
    s = retrieval_scores(query, gallery, q_ids, q_cams, g_ids, g_cams, metric="euclidean", ranks=(1, 2, 5))
    assert s.cmc == pytest.approx({1: 0.5, 2: 1.0, 5: 1.0})
    assert s.mAP == pytest.approx(0.75)
    assert (s.queries, s.skipped) == (2, 1)


def test_cosine_distance_is_one_minus_cosine_similarity():
    q, g = _t([[1.0, 0.0]]), _t([[0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    d = distance_matrix(q, g, "cosine")
    assert d.tolist()[0] == pytest.approx([1.0, 1 - 1 / math.sqrt(2), 2.0])


def _brute_force(query, gallery, q_ids, q_cams, g_ids, g_cams, metric, ranks):
    """Per-query loops over Python lists: the protocol written as plainly as possible."""
    hits = dict.fromkeys(ranks, 0)
    aps = []
    for i in range(len(query)):
        kept = []
        for j in range(len(gallery)):
            if int(g_ids[j]) == -1:
                continue
            if int(g_ids[j]) == int(q_ids[i]) and int(g_cams[j]) == int(q_cams[i]):
                continue
            if metric == "euclidean":
                d = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(query[i], gallery[j])))
            else:
                dot = sum(float(a) * float(b) for a, b in zip(query[i], gallery[j]))
                na = math.sqrt(sum(float(a) ** 2 for a in query[i]))
                nb = math.sqrt(sum(float(b) ** 2 for b in gallery[j]))
                d = 1 - dot / (na * nb)
            kept.append((d, j, int(g_ids[j]) == int(q_ids[i])))
        kept.sort()
        flags = [m for _, _, m in kept]
        if not any(flags):
            continue
        first = flags.index(True) + 1
        for k in ranks:
            hits[k] += first <= k
        found, precisions = 0, []
        for r, m in enumerate(flags, 1):
            if m:
                found += 1
                precisions.append(found / r)
        aps.append(sum(precisions) / len(precisions))
        # an independent AP: scikit-learn's, on negated distances (no ties with random features)
        ap_sklearn = average_precision_score(flags, [-d for d, _, _ in kept])
        assert aps[-1] == pytest.approx(ap_sklearn)
    n = len(aps)
    return {k: hits[k] / n for k in ranks}, sum(aps) / n, n


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmc_and_map_match_a_brute_force_reference(metric, seed):
    gen = torch.Generator().manual_seed(seed)
    q, g = 25, 80
    q_ids = torch.randint(1, 9, (q,), generator=gen)
    q_cams = torch.randint(1, 4, (q,), generator=gen)
    g_ids = torch.randint(1, 9, (g,), generator=gen)
    g_ids[:10] = 0  # distractors
    g_ids[10:18] = -1  # junk
    g_cams = torch.randint(1, 4, (g,), generator=gen)
    query, gallery = torch.randn(q, 6, generator=gen), torch.randn(g, 6, generator=gen)
    ranks = (1, 5, 10)
    s = retrieval_scores(query, gallery, q_ids, q_cams, g_ids, g_cams, metric=metric, ranks=ranks, chunk=7)
    cmc, mAP, n = _brute_force(query.tolist(), gallery.tolist(), q_ids, q_cams, g_ids, g_cams, metric, ranks)
    assert s.queries == n and s.queries + s.skipped == q
    assert s.cmc == pytest.approx(cmc)
    assert s.mAP == pytest.approx(mAP)


def test_ties_keep_gallery_order():
    # two gallery images at the same distance: the earlier one (a miss) ranks first
    s = retrieval_scores(_t([[0.0]]), _t([[1.0], [1.0]]), _t([1]), _t([1]), _t([2, 1]), _t([2, 2]),
                         metric="euclidean", ranks=(1, 2))
    assert s.cmc == {1: 0.0, 2: 1.0}
    assert s.mAP == pytest.approx(0.5)


def test_bad_inputs_are_refused():
    one = _t([[0.0]])
    with pytest.raises(ValueError, match="unknown retrieval metric"):
        retrieval_scores(one, one, _t([1]), _t([1]), _t([1]), _t([2]), metric="manhattan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_scores(_t([[float("nan")]]), one, _t([1]), _t([1]), _t([1]), _t([2]))
