"""BYOT's SepConv heads (the authors' released code): the adapter against hand-written convolutions,
and `byot(..., head="sepconv")` against the paper's loss written in PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl.adapters import make_adapter
from xdsl.errors import SpecError, XdslError
from xdsl.lang.check import check
from xdsl.lang.parser import parse

SPEC = """data synthetic(num_classes=10, shape=[1, 8, 8], train_size=32, test_size=16, batch_size=16)
network net = builtin.resnet(depth=8, in_channels=1, width=4, num_classes=10)
cut net at "layer1", "layer2", "pool" into s1, s2, s3, fc
byot(net, head="sepconv", T=3.0, alpha=0.3, beta=0.01, optimizer=adam(lr=1e-3))
"""


def _sep_conv_reference(block: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SepConv written with F.conv2d on the block's own weights (eval-mode BN)."""
    dw1, pw1, bn1, _, dw2, pw2, bn2, _ = block

    def bn(m, z):
        return F.batch_norm(z, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    c = x.shape[1]
    z = F.relu(bn(bn1, F.conv2d(F.conv2d(x, dw1.weight, stride=2, padding=1, groups=c), pw1.weight)))
    return F.relu(bn(bn2, F.conv2d(F.conv2d(z, dw2.weight, stride=1, padding=1, groups=c), pw2.weight)))


def test_sepconv_head_doubles_channels_and_halves_the_map_up_to_the_deepest_features():
    neck = make_adapter("sepconv", {}, (2, 64, 32, 32), (2, 512), 100).eval()
    blocks = [m for m in neck if isinstance(m, torch.nn.Sequential)]
    assert len(blocks) == 3  # 64 -> 128 -> 256 -> 512, 32 -> 16 -> 8 -> 4 (the released ResNet-18 head)
    x = torch.randn(2, 64, 32, 32)
    z = x
    for b in blocks:
        z = _sep_conv_reference(b, z)
    assert z.shape == (2, 512, 4, 4)
    torch.testing.assert_close(neck(x), z.mean((2, 3)))


def test_sepconv_refuses_widths_that_are_not_a_power_of_two_apart():
    with pytest.raises(XdslError, match="cannot map 64 to 320"):
        make_adapter("sepconv", {}, (2, 64, 32, 32), (2, 320), 100)


def test_byot_with_sepconv_heads_is_the_papers_loss(tmp_path: Path):
    path = tmp_path / "s.xspec"
    path.write_text(SPEC)
    exp = xdsl.load(path)
    assert {a: d.kind for a, d in exp.program.adapters.items()} == {
        "net_neck1": "sepconv", "net_fc1": "classifier", "net_neck2": "sepconv", "net_fc2": "classifier"}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    parts, ad = exp.parts["net"], exp.adapters
    f1 = parts["s1"](x)
    f2 = parts["s2"](f1)
    deepest = parts["s3"](f2)
    logits = parts["fc"](deepest)
    feats = [ad["net_neck1"](f1), ad["net_neck2"](f2)]
    assert [len([m for m in ad[n] if isinstance(m, torch.nn.Sequential)]) for n in ("net_neck1", "net_neck2")] \
        == [2, 1]  # 4 -> 16 channels: two blocks; 8 -> 16: one
    expected = F.cross_entropy(logits, y)
    for feat, fc in zip(feats, ("net_fc1", "net_fc2")):
        head = ad[fc](feat)
        p_t, logp = torch.softmax(logits.detach() / 3.0, -1), torch.log_softmax(head / 3.0, -1)
        expected = expected + 0.7 * F.cross_entropy(head, y) + 0.3 * (p_t * (p_t.log() - logp)).sum(-1).mean()
        expected = expected + 0.01 * (feat - deepest.detach()).pow(2).sum(1).mean()
    torch.testing.assert_close(exp.objectives(x, y)["net"], expected)


def test_byot_head_option_is_checked():
    with pytest.raises(SpecError, match="head is"):
        check(parse(SPEC.replace('head="sepconv"', 'head="conv"')))
    with pytest.raises(SpecError, match="reduction"):
        check(parse(SPEC.replace('head="sepconv"', 'head="sepconv", reduction=2')))
