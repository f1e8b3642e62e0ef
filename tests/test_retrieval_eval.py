"""Retrieval evaluation of paths: features at a named layer (crossed paths too), per path and ensemble."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.compile.features import FeaturePaths, default_feature
from xdsl.compile.graph import module_target
from xdsl.data import build_data
from xdsl.errors import XdslError
from xdsl.eval.items.retrieval import evaluate_retrieval
from xdsl.retrieval_metrics import retrieval_scores

SPEC = """
data synthetic_reid(identities=6, test_identities=5, cameras=3, images_per_camera=3, shape=[3, 16, 8],
                    batch_size=8)
network a, b = builtin.cnn(num_classes=6, in_channels=3, width=4)
cut a, b at "layer2" into up, down
train { minimize ce(s, y) wrt s for s in [a, b]; epochs 1 }
"""


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    spec = tmp_path_factory.mktemp("reid") / "reid.xspec"
    spec.write_text(SPEC)
    e = xdsl.load(spec)
    e.set_train_mode(False)
    return e


def _features(exp) -> FeaturePaths:
    return FeaturePaths(lambda s: exp.compiled.root.get_submodule(module_target(s)), exp.networks)


def test_default_feature_is_the_last_pooling_layer():
    from xdsl.models import MODELS

    assert default_feature(MODELS.get("builtin.mobilenet_v1")(num_classes=3)) == "pool.0"
    assert default_feature(MODELS.get("builtin.inception_v1")(num_classes=3)) == "avgpool"
    with pytest.raises(XdslError, match="no pooling layer"):
        default_feature(MODELS.get("builtin.mlp")())


def test_feature_of_a_crossed_path_is_the_last_networks_layer_applied_to_the_first_networks_half(exp):
    x = torch.randn(4, 3, 16, 8)
    a, b = exp.networks["a"], exp.networks["b"]
    crossed = exp.path("a.up >> b.down")
    with torch.no_grad():
        got = x
        for m in _features(exp).modules(crossed, "pool"):
            got = m(got)
        want = b.pool(b.layer3(a.layer2(a.layer1(a.stem(x)))))  # (4, 16): b's pooled feature, no fc
        assert torch.allclose(got, want, atol=1e-6)
        own = x
        for m in _features(exp).modules(exp.path("b"), ""):  # default: b's last pooling layer, pool.0
            own = m(own)
        assert torch.allclose(own.flatten(1), b.pool(b.layer3(b.layer2(b.layer1(b.stem(x))))), atol=1e-6)


def test_unknown_feature_is_an_error_naming_it(exp):
    with pytest.raises(XdslError, match="feature 'nowhere' is not in b's part"):
        _features(exp).modules(exp.path("a.up >> b.down"), "nowhere")


def test_scores_per_path_and_concatenated_ensemble_match_hand_embedded_features(exp):
    split = build_data("synthetic_reid", dict(exp.program.data.kwargs)).retrieval
    paths = [exp.path("a"), exp.path("b"), exp.path("a.up >> b.down")]
    with torch.no_grad():
        res = evaluate_retrieval(_features(exp), split, paths, ["a", "b", "a.up >> b.down"], feature="pool",
                                 metric="cosine", ensemble="concat", ranks=[1, 5])
    ids = (split.query_ids, split.query_cams, split.gallery_ids, split.gallery_cams)
    qx, gx = split.query.tensors[0], split.gallery.tensors[0]
    a, b = exp.networks["a"], exp.networks["b"]
    with torch.no_grad():
        feats = {
            "a": [a.pool(a.layer3(a.layer2(a.layer1(a.stem(t))))) for t in (qx, gx)],
            "b": [b.pool(b.layer3(b.layer2(b.layer1(b.stem(t))))) for t in (qx, gx)],
            "a.up >> b.down": [b.pool(b.layer3(a.layer2(a.layer1(a.stem(t))))) for t in (qx, gx)],
        }
    rows = {r["label"]: r for r in res["rows"]}
    for label, (q, g) in feats.items():
        want = retrieval_scores(q, g, *ids, metric="cosine", ranks=[1, 5])
        assert rows[label]["status"] == "ok" and rows[label]["dim"] == 16
        assert rows[label]["rank1"] == pytest.approx(want.cmc[1]) and rows[label]["mAP"] == pytest.approx(want.mAP)
    q = torch.cat([F.normalize(feats[k][0], dim=1) for k in feats], dim=1)
    g = torch.cat([F.normalize(feats[k][1], dim=1) for k in feats], dim=1)
    want = retrieval_scores(q, g, *ids, metric="cosine", ranks=[1, 5])
    ens = rows["ensemble(a, b, a.up >> b.down)"]
    assert ens["dim"] == 48 and ens["mAP"] == pytest.approx(want.mAP) and ens["rank5"] == pytest.approx(want.cmc[5])
    assert res["queries"] == 15 and rows["a"]["queries"] == 15  # every test identity is seen by another camera


def test_mean_ensemble_averages_features_and_euclidean_uses_raw_features(exp):
    split = build_data("synthetic_reid", dict(exp.program.data.kwargs)).retrieval
    paths = [exp.path("a"), exp.path("b")]
    with torch.no_grad():
        res = evaluate_retrieval(_features(exp), split, paths, ["a", "b"], metric="euclidean", ensemble="mean")
        a, b = exp.networks["a"], exp.networks["b"]
        q, g = ((a.pool(a.layer3(a.layer2(a.layer1(a.stem(t))))) + b.pool(b.layer3(b.layer2(b.layer1(b.stem(t)))))) / 2
                for t in (split.query.tensors[0], split.gallery.tensors[0]))
    want = retrieval_scores(q, g, split.query_ids, split.query_cams, split.gallery_ids, split.gallery_cams,
                            metric="euclidean")
    assert res["rows"][-1]["label"] == "ensemble(a, b)" and res["ensemble"] == "mean"
    ens = res["rows"][-1]
    assert ens["mAP"] == pytest.approx(want.mAP) and ens["rank10"] == pytest.approx(want.cmc[10])


def test_market1501_end_to_end_through_mobilenet(tmp_path: Path):
    from tests.test_reid_data import make_market

    root = make_market(tmp_path / "market")
    spec = tmp_path / "m.xspec"
    spec.write_text(f'data market1501(root="{root}", height=64, width=32, num_workers=0)\n'
                    "network n = builtin.mobilenet_v1(num_classes=3, width=0.25)\n"
                    "train { minimize ce(n, y) wrt n; epochs 1 }\n")
    e = xdsl.load(spec)
    e.set_train_mode(False)
    split = build_data("market1501", {"root": str(root), "height": 64, "width": 32, "num_workers": 0}).retrieval
    with torch.no_grad():
        res = evaluate_retrieval(_features(e), split, [e.path("n")], ["n"])
    (row,) = res["rows"]
    # query 0003 (camera 1) keeps its camera-2 and camera-4 images; 0005 (camera 2) keeps both of its own
    assert row["status"] == "ok" and row["queries"] == 2 and row["dim"] == 256 and row["feature"] == "pool.0"
    assert res["gallery"] == 7
