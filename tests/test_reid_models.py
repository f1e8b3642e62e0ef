"""Builtin MobileNet v1 and InceptionV1: parameter counts against the DML paper's Table 1, cuts, features."""

from __future__ import annotations

import pytest
import torch

from xdsl.models import MODELS


def _params(ref: str, **kwargs) -> int:
    return sum(p.numel() for p in MODELS.get(ref)(**kwargs).parameters())


def test_mobilenet_v1_has_the_papers_parameter_count():
    # DML paper, Table 1 (CIFAR-100): MobileNet 3.3M; the MobileNet paper: 4.2M with 1000 classes
    assert round(_params("builtin.mobilenet_v1", num_classes=100) / 1e6, 1) == 3.3
    assert round(_params("builtin.mobilenet_v1", num_classes=1000) / 1e6, 1) == 4.2


def test_inception_v1_is_torchvisions_googlenet_without_auxiliary_heads():
    import torchvision

    ours = MODELS.get("builtin.inception_v1")(num_classes=751)
    reference = torchvision.models.googlenet(num_classes=751, aux_logits=False, init_weights=True)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]
    # 6.6M with 1000 classes (torchvision's documented count); 5.7M with 100. The DML paper's Table 1
    # lists 7.8M for its InceptionV1, which no auxiliary-head-free GoogLeNet reaches.
    assert round(_params("builtin.inception_v1", num_classes=1000) / 1e6, 1) == 6.6
    ours.train()
    assert ours(torch.randn(2, 3, 64, 64)).shape == (2, 751)  # a tensor in training too: no aux outputs


def test_mobilenet_v1_stages_halve_the_resolution_and_pool_gives_the_1024_d_feature():
    net = MODELS.get("builtin.mobilenet_v1")(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 32)
    sizes = []
    h = x
    for stage in (net.stem, net.layer1, net.layer2, net.layer3, net.layer4):
        h = stage(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(64, 32, 16), (128, 16, 8), (256, 8, 4), (512, 4, 2), (1024, 2, 1)]
    assert net.pool(h).shape == (2, 1024)
    assert torch.allclose(net.fc(net.pool(h)), net(x))


def test_mobilenet_and_inception_cut_and_cross_in_a_spec(tmp_path):
    import xdsl

    spec = tmp_path / "mi.xspec"
    spec.write_text(
        'data synthetic(shape=[3, 64, 32], num_classes=5, train_size=8, test_size=4, batch_size=4)\n'
        "network a = builtin.mobilenet_v1(num_classes=5)\nnetwork b = builtin.inception_v1(num_classes=5)\n"
        'cut a at "layer3" into up, down\ncut b at "inception4a" into up, down\n'
        "train { minimize ce(s, y) wrt s for s in [a, b]; epochs 1 }\n")
    exp = xdsl.load(spec)
    x = torch.randn(2, 3, 64, 32)
    exp.set_train_mode(False)
    assert exp.forward("a.up >> b.down", x).shape == (2, 5)  # both give 512 x 4 x 2 at the cut
    assert torch.allclose(exp.forward("a", x), exp.networks["a"](x), atol=1e-5)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"width": 0.0}])
def test_mobilenet_v1_refuses_bad_arguments(bad):
    from xdsl.errors import XdslError

    with pytest.raises(XdslError):
        MODELS.get("builtin.mobilenet_v1")(**bad)
