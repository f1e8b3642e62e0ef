"""`map_channels` (seed 000 XML_m): networks keep their function; cross paths see aligned channels."""

from __future__ import annotations

import torch

import xdsl
from xdsl.train.channel_init import map_channels

SPEC = """data synthetic(num_classes=10, shape=[1, 8, 8], train_size=64, test_size=32, batch_size=16)
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=8)
cut net1, net2 at "layer2" into up, down
train xml_m {
    minimize ce(net1, y) + ce(net1.up >> net2.down, y) wrt net1
    minimize ce(net2, y) + ce(net2.up >> net1.down, y) wrt net2
    map_channels bmm_std
}
"""


def test_map_channels_permutes_weights_without_changing_any_network(tmp_path):
    spec = tmp_path / "m.xspec"
    spec.write_text(SPEC)
    torch.manual_seed(0)
    exp = xdsl.load(spec)
    for net in exp.networks.values():  # give BatchNorm real statistics so channels differ
        net.train()
        with torch.no_grad():
            net(torch.randn(64, 1, 8, 8))
        net.eval()
    # net2 is net1 with its channels at the cut shuffled: the mapping must find the shuffle back
    exp.networks["net2"].load_state_dict(exp.networks["net1"].state_dict())
    from xdsl.mapping import permute_cut_channels
    from xdsl.train.channel_init import _halves

    shuffle = torch.randperm(16).numpy()
    permute_cut_channels(*_halves(exp.networks["net2"], "layer2"), shuffle)
    x = torch.randn(32, 1, 8, 8)
    before = {n: exp.forward(n, x) for n in ("net1", "net2")}
    cross_before = exp.forward("net1.up >> net2.down", x)
    reports = map_channels(exp, exp.stage, x, "bmm_std")
    assert [r["network"] for r in reports] == ["net2"]
    for n in ("net1", "net2"):
        torch.testing.assert_close(exp.forward(n, x), before[n])  # same function after permuting
    # aligned: the cross path now equals the network itself; before it did not
    torch.testing.assert_close(exp.forward("net1.up >> net2.down", x), before["net1"])
    assert not torch.allclose(cross_before, before["net1"])
    assert reports[0]["gale"] > reports[0]["original"]
