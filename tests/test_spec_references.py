"""The training steps of five shipped digits specs against the same steps written by hand in plain PyTorch.

Each reference uses only the networks' own `nn.Module` stages (split at the cut by hand), the spec's
formulas typed out again (cross-entropy, KL with a detached target, squared L2), one optimiser per
network over what it owns, and the spec's update order. xdsl's `train_step` on a copy of the same
weights must give the same parameters after two steps. Other tests compare xdsl with xdsl (separable
vs shared lowering, compiled vs eager); these are the independent evidence for these specs.

The specs' `adam(...)` is replaced by plain SGD (lr 0.1) on both sides: Adam's first steps are
lr * sign(gradient), blind to a term's weight, so a wrong factor would pass; SGD's step is the
gradient itself. (Adam and AdamW against torch's own: tests/test_train_settings.py.)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xdsl

SPECS = Path(__file__).resolve().parent.parent / "specs"
LR = 0.1
Tensor = torch.Tensor


# ---- the formulas, typed out ----

def ce(p: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(p, y)


def kl(target: Tensor, p: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(p)), batch mean; the target is a constant."""
    log_t = F.log_softmax(target.detach(), dim=1)
    return (log_t.exp() * (log_t - F.log_softmax(p, dim=1))).sum(1).mean()


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 distance per sample, batch mean; b is a constant (grad=false)."""
    return ((a - b.detach()) ** 2).flatten(1).sum(1).mean()


# ---- the hand-written experiment ----

def _split(net: nn.Module, cuts: list[str]) -> list[nn.Sequential]:
    """The network's top-level stages, split after each cut point (stem..layer2 | layer3..fc)."""
    parts, current = [], []
    for name, child in net.named_children():
        current.append(child)
        if name in cuts:
            parts.append(nn.Sequential(*current))
            current = []
    return parts + [nn.Sequential(*current)]


class Hand:
    """Copies of a loaded experiment's networks and adapters, trained by hand."""

    def __init__(self, exp, cuts: list[str], owners: dict[str, tuple[str, ...]]):
        self.nets, self.adapters = copy.deepcopy((exp.networks, exp.adapters))
        self.parts = {n: _split(m, cuts) for n, m in self.nets.items()}
        self.owned = {n: list(m.parameters()) + [p for a, own in owners.items() if n in own
                                                 for p in self.adapters[a].parameters()]
                      for n, m in self.nets.items()}
        self.opts = {n: torch.optim.SGD(ps, lr=LR) for n, ps in self.owned.items()}

    def path(self, x: Tensor, *steps: str) -> Tensor:
        """`a.p1 >> b.p2 >> ...`, steps given as "net.k" (k-th part) or an adapter name."""
        for step in steps:
            if "." in step:
                net, k = step.split(".")
                x = self.parts[net][int(k)](x)
            else:
                x = self.adapters[step](x)
        return x

    def step(self, order: list[str], objectives: dict[str, Callable[[], Tensor]], simultaneous: bool = False):
        """One step: alternating (each network's objective on the weights as its predecessors left them)
        or simultaneous (every objective on the same weights, then every update)."""
        if simultaneous:
            losses = {n: objectives[n]() for n in order}
            grads = {n: torch.autograd.grad(losses[n], self.owned[n], retain_graph=True, allow_unused=True)
                     for n in order}
            for n in order:
                self._apply(n, grads[n])
            return
        for n in order:
            self._apply(n, torch.autograd.grad(objectives[n](), self.owned[n], allow_unused=True))

    def _apply(self, net: str, grads) -> None:
        self.opts[net].zero_grad(set_to_none=True)
        for p, g in zip(self.owned[net], grads):
            p.grad = g
        self.opts[net].step()


def _load(name: str, block: str, tmp_path: Path):
    text = re.sub(r"adam\(lr=[0-9.e-]+\)", f"sgd(lr={LR}, momentum=0.0, weight_decay=0.0)",
                  (SPECS / f"{name}.xspec").read_text())
    assert "adam(" not in text
    spec = tmp_path / f"{name}.xspec"
    spec.write_text(text)
    torch.manual_seed(0)
    exp = xdsl.load(spec)
    exp.use_stage(block)
    return exp


def _assert_same_weights(exp, hand: Hand, where: str) -> None:
    for kind, mine, theirs in (("network", exp.networks, hand.nets), ("adapter", exp.adapters, hand.adapters)):
        for name in mine:
            for (key, p), q in zip(mine[name].named_parameters(), theirs[name].parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m, k=f"{where}: {kind} {name}.{key}": f"{k}: {m}")


def _batches(n: int = 2, size: int = 16):
    return [(torch.randn(size, 1, 8, 8), torch.randint(0, 10, (size,))) for _ in range(n)]


def _train_both(exp, hand: Hand, hand_step: Callable[[Hand, Tensor, Tensor, int], None], where: str) -> None:
    for i, (x, y) in enumerate(_batches()):
        exp.train_step(x, y)
        hand_step(hand, x, y, i)
        _assert_same_weights(exp, hand, f"{where}, step {i + 1}")


# ---- XML of two networks (the quickstart's loss, the xml macro's expansion) ----

def _xml(h: Hand, x: Tensor, y: Tensor, s: str, t: str) -> Tensor:
    """(ce(s, y) + kl(t, s) + kl(t, s.up >> t.down) + kl(t, t.up >> s.down)
        + ce(s.up >> t.down, y) + ce(t.up >> s.down, y)) / 2"""
    zs, zt = h.path(x, f"{s}.0", f"{s}.1"), h.path(x, f"{t}.0", f"{t}.1")
    st, ts = h.path(x, f"{s}.0", f"{t}.1"), h.path(x, f"{t}.0", f"{s}.1")
    return (ce(zs, y) + kl(zt, zs) + kl(zt, st) + kl(zt, ts) + ce(st, y) + ce(ts, y)) / 2


def _dml(h: Hand, x: Tensor, y: Tensor, s: str, t: str) -> Tensor:
    """0.5 * ce(s, y) + 0.5 * kl(t, s)"""
    zs, zt = h.path(x, f"{s}.0", f"{s}.1"), h.path(x, f"{t}.0", f"{t}.1")
    return 0.5 * ce(zs, y) + 0.5 * kl(zt, zs)


def _two(loss, x, y, h):
    return {"net1": lambda: loss(h, x, y, "net1", "net2"), "net2": lambda: loss(h, x, y, "net2", "net1")}


LEARNING_ORDER = {  # block: (loss, the update order on batches 1 and 2)
    "dml_net1_first": (_dml, [["net1", "net2"]] * 2),
    "dml_net2_first": (_dml, [["net2", "net1"]] * 2),
    "xml_net1_first": (_xml, [["net1", "net2"]] * 2),
    "xml_net2_first": (_xml, [["net2", "net1"]] * 2),
    "xml_round_robin": (_xml, [["net1", "net2"], ["net2", "net1"]]),  # who goes first rotates
    "xml_simultaneous": (_xml, None),
}


@pytest.mark.parametrize("block", LEARNING_ORDER)
def test_learning_order_spec_steps_equal_hand_written(block, tmp_path):
    exp = _load("xml_learning_order_digits", block, tmp_path)
    hand = Hand(exp, ["layer2"], {})
    loss, orders = LEARNING_ORDER[block]

    def hand_step(h, x, y, i):
        if orders is None:
            h.step(["net1", "net2"], _two(loss, x, y, h), simultaneous=True)
        else:
            h.step(orders[i], _two(loss, x, y, h))

    _train_both(exp, hand, hand_step, block)


def test_learning_order_random_order_is_one_of_the_two_hand_written_orders_and_both_occur(tmp_path):
    exp = _load("xml_learning_order_digits", "xml_random", tmp_path)
    hand = Hand(exp, ["layer2"], {})
    used = []
    for i, (x, y) in enumerate(_batches(6, 8)):
        exp.train_step(x, y)
        start = copy.deepcopy((hand.nets, hand.opts))
        for order in (["net1", "net2"], ["net2", "net1"]):
            hand.nets, hand.opts = copy.deepcopy(start)
            hand.parts = {n: _split(m, ["layer2"]) for n, m in hand.nets.items()}
            hand.owned = {n: [p for g in hand.opts[n].param_groups for p in g["params"]] for n in hand.nets}
            hand.step(order, _two(_xml, x, y, hand))
            try:
                _assert_same_weights(exp, hand, f"step {i + 1}")
            except AssertionError:
                continue
            used.append(order[0])
            break
        else:
            pytest.fail(f"step {i + 1}: xdsl's random-order step is neither hand-written order")
    assert set(used) == {"net1", "net2"}, used


def test_when_to_store_spec_xml_step_equals_hand_written(tmp_path):
    exp = _load("xml_when_to_store_digits", "xml", tmp_path)
    hand = Hand(exp, ["layer2"], {})
    _train_both(exp, hand, lambda h, x, y, i: h.step(["net1", "net2"], _two(_xml, x, y, h)), "xml")


# ---- adapters: warm-up, one owner, two owners, a network linked to itself ----

REGIME_OWNERS = {"a12": ("net1",), "a21": ("net2",), "b12": ("net1", "net2"), "b21": ("net1", "net2"),
                 "c11": ("net1",), "c11r": ("net1",), "c22": ("net2",), "c22r": ("net2",)}


def _xml_link(h: Hand, x: Tensor, y: Tensor, s: str, t: str, a_st: str, a_ts: str) -> Tensor:
    """(ce(s, y) + kl(t, s) + kl(t, s.up >> a_st >> t.down) + kl(t, t.up >> a_ts >> s.down)
        + ce(s.up >> a_st >> t.down, y) + ce(t.up >> a_ts >> s.down, y)) / 2"""
    zs, zt = h.path(x, f"{s}.0", f"{s}.1"), h.path(x, f"{t}.0", f"{t}.1")
    st, ts = h.path(x, f"{s}.0", a_st, f"{t}.1"), h.path(x, f"{t}.0", a_ts, f"{s}.1")
    return (ce(zs, y) + kl(zt, zs) + kl(zt, st) + kl(zt, ts) + ce(st, y) + ce(ts, y)) / 2


REGIMES = {
    "warmup": lambda h, x, y: {"net1": lambda: l2(h.path(x, "net1.0", "a12"), h.path(x, "net2.0")),
                               "net2": lambda: l2(h.path(x, "net2.0", "a21"), h.path(x, "net1.0"))},
    "xml_one": lambda h, x, y: {"net1": lambda: _xml_link(h, x, y, "net1", "net2", "a12", "a21"),
                                "net2": lambda: _xml_link(h, x, y, "net2", "net1", "a21", "a12")},
    "xml_both": lambda h, x, y: {"net1": lambda: _xml_link(h, x, y, "net1", "net2", "b12", "b21"),
                                 "net2": lambda: _xml_link(h, x, y, "net2", "net1", "b21", "b12")},
    # the baselines without adapters: independent, and DML weighted as the XML code (0.5 CE + 0.5 KL)
    "independent": lambda h, x, y: {"net1": lambda: ce(h.path(x, "net1.0", "net1.1"), y),
                                    "net2": lambda: ce(h.path(x, "net2.0", "net2.1"), y)},
    "dml": lambda h, x, y: {
        "net1": lambda: 0.5 * ce(h.path(x, "net1.0", "net1.1"), y)
        + 0.5 * kl(h.path(x, "net2.0", "net2.1"), h.path(x, "net1.0", "net1.1")),
        "net2": lambda: 0.5 * ce(h.path(x, "net2.0", "net2.1"), y)
        + 0.5 * kl(h.path(x, "net1.0", "net1.1"), h.path(x, "net2.0", "net2.1"))},
    "independent_adapters": lambda h, x, y: {
        "net1": lambda: ce(h.path(x, "net1.0", "net1.1"), y) + ce(h.path(x, "net1.0", "c11", "c11r", "net1.1"), y),
        "net2": lambda: ce(h.path(x, "net2.0", "net2.1"), y) + ce(h.path(x, "net2.0", "c22", "c22r", "net2.1"), y)},
}


@pytest.mark.parametrize("block", REGIMES)
def test_adapter_regimes_spec_steps_equal_hand_written(block, tmp_path):
    exp = _load("xml_adapters_regimes_digits", block, tmp_path)
    hand = Hand(exp, ["layer2"], REGIME_OWNERS)
    _train_both(exp, hand, lambda h, x, y, i: h.step(["net1", "net2"], REGIMES[block](h, x, y)), block)


# ---- three networks, three parts each ----

def _xml3(h: Hand, x: Tensor, y: Tensor, s: str, peers: list[str]) -> Tensor:
    """(ce(s, y) + mean(kl(t, s)) + sum over t of the six mixed paths' ce and kl (target t)) / (6 * len(T))"""
    def whole(n):
        return h.path(x, f"{n}.0", f"{n}.1", f"{n}.2")

    zs = whole(s)
    total = ce(zs, y) + sum(kl(whole(t), zs) for t in peers) / len(peers)
    for t in peers:
        zt = whole(t)
        for owners in ((s, t, t), (t, s, t), (t, t, s), (s, s, t), (s, t, s), (t, s, s)):
            z = h.path(x, *(f"{n}.{k}" for k, n in enumerate(owners)))
            total = total + ce(z, y) + kl(zt, z)
    return total / (6 * len(peers))


def test_multicut_dynamic_spec_step_equals_hand_written(tmp_path):
    exp = _load("xml_multicut_dynamic_digits", "xml3", tmp_path)
    hand = Hand(exp, ["layer1", "layer2"], {})
    nets = ["net1", "net2", "net3"]

    def hand_step(h, x, y, i):
        h.step(nets, {s: (lambda s=s: _xml3(h, x, y, s, [t for t in nets if t != s])) for s in nets})

    _train_both(exp, hand, hand_step, "xml3")


# ---- channel mapping: a permutation of net2's channels at the cut, then the XML step ----

def test_channel_mapping_spec_maps_by_a_channel_permutation_then_steps_like_hand_written(tmp_path):
    from xdsl.train.channel_init import map_channels

    exp = _load("xml_m_channel_mapping_digits", "xml_m", tmp_path)
    for net in exp.networks.values():  # BatchNorm statistics of real batches, so channels differ
        with torch.no_grad():
            net(torch.randn(64, 1, 8, 8))
    before = copy.deepcopy(exp.networks["net2"])
    x = torch.randn(32, 1, 8, 8)
    (report,) = map_channels(exp, exp.stage, x, "bmm_std")
    after = exp.networks["net2"]
    # the permutation, read off the last conv before the cut; then applied by hand to a copy
    old, new = before.layer2[3].weight.detach(), after.layer2[3].weight.detach()
    perm = [int(torch.nonzero((old == new[i]).flatten(1).all(1))[0]) for i in range(new.shape[0])]
    assert sorted(perm) == list(range(new.shape[0])) and perm != sorted(perm)
    by_hand = copy.deepcopy(before)
    with torch.no_grad():
        by_hand.layer2[3].weight.copy_(old[perm])
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(by_hand.layer2[4], key).copy_(getattr(before.layer2[4], key)[perm])
        by_hand.layer3[0].weight.copy_(before.layer3[0].weight[:, perm])
    for key, value in by_hand.state_dict().items():
        assert torch.equal(after.state_dict()[key], value), f"net2.{key} is not the permuted original"
    hand = Hand(exp, ["layer2"], {})
    _train_both(exp, hand, lambda h, x, y, i: h.step(["net1", "net2"], _two(_xml, x, y, h)), "xml_m")
