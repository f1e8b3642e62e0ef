"""Channel mapping: stable matching, the four measures, and permutations that keep a network's function."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, Bottleneck

from xdsl.errors import XdslError
from xdsl.mapping import (
    MEASURES,
    ChannelPermutation,
    MappingReport,
    channel_mapping,
    format_report,
    gale_shapley,
    gale_shapley_trace,
    identity_perm,
    invert_perm,
    matching_score,
    permute_conv_in,
    permute_conv_out,
    permute_cut_channels,
    random_perm,
    similarity,
)

# ---------------------------------------------------------------------------------------------- helpers


def blocking_pairs(s: np.ndarray, t: np.ndarray, perm: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j) where row i strictly prefers column j to its partner and column j strictly prefers i."""
    c = s.shape[0]
    partner_of_col = np.empty(c, dtype=int)
    partner_of_col[perm] = np.arange(c)
    out = []
    for i in range(c):
        for j in range(c):
            if j == perm[i]:
                continue
            if s[i, j] > s[i, perm[i]] and t[i, j] > t[partner_of_col[j], j]:
                out.append((i, j))
    return out


def greedy(s: np.ndarray) -> np.ndarray:
    """Best remaining pair first: the unique stable matching for one tie-free shared score matrix."""
    c = s.shape[0]
    perm = np.full(c, -1)
    used_r, used_c = set(), set()
    for flat in np.argsort(-s, axis=None):
        i, j = divmod(int(flat), c)
        if i not in used_r and j not in used_c:
            perm[i] = j
            used_r.add(i)
            used_c.add(j)
    return perm


def is_perm(p: np.ndarray, c: int) -> bool:
    return p.shape == (c,) and sorted(p.tolist()) == list(range(c))


square = st.integers(1, 12).flatmap(
    lambda c: arrays(np.float64, (c, c), elements=st.floats(-1, 1, allow_nan=False, width=32))
)


# ---------------------------------------------------------------------------------------------- Gale-Shapley


@settings(max_examples=150, deadline=None)
@given(square)
def test_gale_shapley_is_stable_permutation(s):
    perm, rounds = gale_shapley(s)
    c = s.shape[0]
    assert is_perm(perm, c)
    assert blocking_pairs(s, s, perm) == []
    assert rounds[0] == c and all(r >= 1 for r in rounds)
    assert (np.diff(rounds) <= 0).all()


@settings(max_examples=100, deadline=None)
@given(square, st.data())
def test_gale_shapley_two_sided_preferences_stable(s, data):
    c = s.shape[0]
    t = data.draw(arrays(np.float64, (c, c), elements=st.floats(-1, 1, allow_nan=False, width=32)))
    trace = gale_shapley_trace(s, t)
    assert is_perm(trace.perm, c)
    assert blocking_pairs(s, t, trace.perm) == []
    # free count drops by exactly the number of newly held columns; sum(accepted) >= C
    nxt = trace.free[1:] + [0]
    newly_held = [a - b for a, b in zip(trace.free, nxt, strict=True)]
    assert sum(newly_held) == c
    assert all(acc >= nh >= 0 for acc, nh in zip(trace.accepted, newly_held, strict=True))
    assert sum(trace.accepted) >= c


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_shared_scores_give_the_greedy_unique_matching(c, seed):
    s = np.random.default_rng(seed).permutation(c * c).reshape(c, c).astype(float)  # no ties
    perm, _ = gale_shapley(s)
    np.testing.assert_array_equal(perm, greedy(s))


def test_hand_worked_3x3():
    s = np.array([[3.0, 2.0, 1.0], [9.0, 1.0, 0.0], [4.0, 8.0, 5.0]])
    # round 1: rows 0,1 -> col 0 (keeps row 1), row 2 -> col 1; round 2: row 0 -> col 1 (rejected);
    # round 3: row 0 -> col 2.
    trace = gale_shapley_trace(s)
    assert trace.perm.tolist() == [2, 0, 1]
    assert trace.free == [3, 1, 1]
    assert trace.accepted == [2, 0, 1]
    perm, rounds = gale_shapley(torch.tensor(s))  # tensors work too
    assert perm.tolist() == [2, 0, 1] and rounds == [3, 1, 1]


def test_proposer_optimal_differs_from_acceptor_optimal():
    # m0: w0 > w1, m1: w1 > w0;  w0: m1 > m0, w1: m0 > m1. Both matchings are stable.
    men = np.array([[2.0, 1.0], [1.0, 2.0]])  # men[i, j]: how much man i likes woman j
    women = np.array([[1.0, 2.0], [2.0, 1.0]])  # women[i, j]: how much woman j likes man i
    men_opt, _ = gale_shapley(men, women)
    assert men_opt.tolist() == [0, 1]
    women_opt_t, _ = gale_shapley(women.T, men.T)  # women propose
    women_opt = invert_perm(women_opt_t)
    assert women_opt.tolist() == [1, 0]
    for p in (men_opt, women_opt):
        assert blocking_pairs(men, women, p) == []


def test_classic_3x3_proposer_optimal():
    # Proposers' and acceptors' lists (best first); the men-optimal and women-optimal matchings differ.
    men_pref = [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    women_pref = [[1, 2, 0], [2, 0, 1], [0, 1, 2]]
    men = np.zeros((3, 3))
    women = np.zeros((3, 3))
    for i, pref in enumerate(men_pref):
        for k, j in enumerate(pref):
            men[i, j] = 3 - k
    for j, pref in enumerate(women_pref):
        for k, i in enumerate(pref):
            women[i, j] = 3 - k
    perm, rounds = gale_shapley(men, women)
    assert perm.tolist() == [0, 1, 2] and rounds == [3]  # everyone gets their first choice
    women_opt = invert_perm(gale_shapley(women.T, men.T)[0])
    assert women_opt.tolist() == [2, 0, 1]
    assert blocking_pairs(men, women, women_opt) == []


def test_gale_shapley_rejects_bad_input():
    with pytest.raises(XdslError, match="square"):
        gale_shapley(np.zeros((2, 3)))
    with pytest.raises(XdslError, match="NaN"):
        gale_shapley(np.array([[np.nan]]))
    with pytest.raises(XdslError):
        gale_shapley(np.zeros((0, 0)))


# ---------------------------------------------------------------------------------------------- measures


def _np_reference(a: np.ndarray, b: np.ndarray, measure: str) -> np.ndarray:
    ca, cb = a.shape[1], b.shape[1]
    A = [a[:, i].ravel() for i in range(ca)]
    B = [b[:, j].ravel() for j in range(cb)]
    out = np.zeros((ca, cb))
    for i in range(ca):
        for j in range(cb):
            x, y = A[i], B[j]
            m = x.size
            if measure == "bmm_std":
                out[i, j] = np.dot(x - x.mean(), y - y.mean()) / m
            elif measure == "cos_std":
                xs, ys = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
                out[i, j] = np.dot(xs, ys) / (np.linalg.norm(xs) * np.linalg.norm(ys))
            elif measure == "l2":
                out[i, j] = -np.sum((x - y) ** 2) / m
            else:
                xs, ys = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
                out[i, j] = -np.sum((xs - ys) ** 2) / m
    return out


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("shape", [(4, 5, 3, 2), (7, 6)])
def test_measure_matches_numpy(measure, shape):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g) * 2 + 1
    b = torch.randn(*shape, generator=g)
    s = similarity(a, b, measure)
    assert s.shape == (shape[1], shape[1])
    np.testing.assert_allclose(
        s.numpy(), _np_reference(a.double().numpy(), b.double().numpy(), measure), rtol=1e-9, atol=1e-9
    )


def test_measure_einsum_forms():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4, 2, 2)), rng.normal(size=(3, 4, 2, 2))
    ac = a - a.mean(axis=(0, 2, 3), keepdims=True)
    bc = b - b.mean(axis=(0, 2, 3), keepdims=True)
    cov = np.einsum("nihw,njhw->ij", ac, bc) / 12
    np.testing.assert_allclose(
        similarity(torch.tensor(a), torch.tensor(b), "bmm_std").numpy(), cov, atol=1e-12
    )
    corr = cov / np.outer(ac.std(axis=(0, 2, 3)), bc.std(axis=(0, 2, 3)))
    np.testing.assert_allclose(
        similarity(torch.tensor(a), torch.tensor(b), "cos_std").numpy(), corr, atol=1e-12
    )
    # standardised l2 is 2*corr - 2
    np.testing.assert_allclose(
        similarity(torch.tensor(a), torch.tensor(b), "l2_std").numpy(), 2 * corr - 2, atol=1e-12
    )


def test_measure_errors_and_constant_channel():
    with pytest.raises(XdslError, match="unknown"):
        similarity(torch.zeros(2, 3), torch.zeros(2, 3), "dot")
    with pytest.raises(XdslError, match="same batch"):
        similarity(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))
    with pytest.raises(XdslError):
        similarity(torch.zeros(3), torch.zeros(3))
    a = torch.randn(5, 3)
    a[:, 1] = 7.0  # constant channel: scores 0, never NaN
    for m in MEASURES:
        assert torch.isfinite(similarity(a, a, m)).all()


# -------------------------------------------------------------------------------------------- scores / report


def test_scores_and_report():
    s = np.arange(9.0).reshape(3, 3)
    assert matching_score(s, identity_perm(3)) == pytest.approx((0 + 4 + 8) / 3)
    assert matching_score(s, [2, 1, 0]) == pytest.approx((2 + 4 + 6) / 3)
    assert is_perm(random_perm(10, 3), 10)
    np.testing.assert_array_equal(random_perm(10, 3), random_perm(10, 3))
    with pytest.raises(XdslError, match="permutation"):
        matching_score(s, [0, 0, 1])
    p = random_perm(7, 1)
    np.testing.assert_array_equal(p[invert_perm(p)], np.arange(7))

    a = torch.randn(16, 4, 2, 2)
    rep = channel_mapping(a, a[:, [3, 1, 0, 2]], "cos_std")
    assert isinstance(rep, MappingReport)
    text = format_report(rep)
    assert "original:" in text and "random:" in text and "gale:" in text and "rounds: 4" in text
    long = MappingReport("l2", 0.0, 0.0, 1.0, list(range(30, 0, -1)), identity_perm(30), [1] * 30)
    assert "30/29/28" in format_report(long) and "(30 rounds)" in format_report(long)
    with pytest.raises(XdslError, match="same channel count"):
        channel_mapping(torch.randn(4, 3), torch.randn(4, 2))


# ---------------------------------------------------------------------------------------------- applying


def conv_stack(c_in: int = 3, c: int = 8, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(seed)
    up = nn.Sequential(
        nn.Conv2d(c_in, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    down = nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, groups=c),
        nn.BatchNorm2d(c),
        nn.PReLU(c),  # depthwise: passes through
        nn.Conv2d(c, 5, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    for m in list(up) + list(down):
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running stats and affine
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return up.eval(), down.eval()


def test_channel_permutation_adapter():
    x = torch.randn(2, 5, 3, 3)
    p = random_perm(5, 0)
    adapt = ChannelPermutation(p)
    y = adapt(x)
    for i in range(5):
        torch.testing.assert_close(y[:, i], x[:, p[i]])
    torch.testing.assert_close(adapt.inverse()(y), x)
    assert "perm" in dict(adapt.named_buffers())
    up, down = conv_stack()
    x = torch.randn(2, 3, 8, 8)
    p = random_perm(8, 2)
    torch.testing.assert_close(
        down(ChannelPermutation(p).inverse()(ChannelPermutation(p)(up(x)))), down(up(x))
    )
    with pytest.raises(XdslError):
        adapt(torch.randn(2, 4))


def test_permute_cut_channels_sequential_keeps_function():
    up, down = conv_stack()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref_cut, ref_out = up(x), down(up(x))
    p = random_perm(8, 5)
    permute_cut_channels(up, down, p)
    with torch.no_grad():
        cut, out = up(x), down(up(x))
    torch.testing.assert_close(cut, ref_cut[:, p])
    torch.testing.assert_close(out, ref_out)


def test_permute_linear_after_flatten_with_spatial():
    torch.manual_seed(0)
    up = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
    down = [nn.Flatten(), nn.Linear(4 * 3 * 3, 2)]
    x = torch.randn(2, 2, 3, 3)
    ref = down[1](down[0](up(x)))
    permute_cut_channels(up, down, [2, 0, 3, 1])
    torch.testing.assert_close(down[1](down[0](up(x))), ref)


@pytest.mark.parametrize("cut", [1, 2])
def test_permute_cut_channels_resnet_stage(cut):
    torch.manual_seed(0)
    net = resnet18(num_classes=10).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    up = [net.conv1, net.bn1, net.relu, net.maxpool, *layers[:cut]]
    down = [*layers[cut:], net.avgpool, nn.Flatten(), net.fc]
    x = torch.randn(2, 3, 32, 32)
    run_up, run_down = nn.Sequential(*up), nn.Sequential(*down)
    with torch.no_grad():
        ref_cut, ref_out = run_up(x), run_down(run_up(x))
        c = ref_cut.shape[1]
        p = random_perm(c, 7)
        permute_cut_channels(up, down, p)
        torch.testing.assert_close(run_up(x), ref_cut[:, p])
        torch.testing.assert_close(run_down(run_up(x)), ref_out, rtol=1e-4, atol=1e-5)


def test_permute_cut_channels_bottleneck():
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))
    up = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Bottleneck(8, 4, downsample=ds),
        Bottleneck(16, 4),
    )
    down = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 8, downsample=nn.Sequential(nn.Conv2d(16, 32, 1))))
    up.eval(), down.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref_cut, ref_out = up(x), down(up(x))
        p = random_perm(16, 3)
        permute_cut_channels(up, down, p)
        torch.testing.assert_close(up(x), ref_cut[:, p])
        torch.testing.assert_close(down(up(x)), ref_out)


def test_permute_cut_channels_unsupported_is_clear_and_atomic():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x) * 2

    up = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    before = up[0].weight.detach().clone()
    with pytest.raises(XdslError) as err:
        permute_cut_channels(up, [Weird()], [1, 0, 2, 3])
    assert "adapter" in (err.value.hint or "")
    torch.testing.assert_close(up[0].weight, before)  # nothing applied
    with pytest.raises(XdslError, match="input"):
        permute_cut_channels([nn.ReLU()], [nn.Conv2d(3, 2, 1)], [1, 0, 2])
    with pytest.raises(XdslError, match="grouped"):
        permute_conv_in(nn.Conv2d(4, 4, 1, groups=2), [1, 0, 2, 3])
    with pytest.raises(XdslError, match="4 output channels|4 entries"):
        permute_cut_channels(up, [nn.Conv2d(4, 2, 1)], [1, 0, 2])
    with pytest.raises(XdslError):
        permute_conv_out(nn.ReLU(), None, [0])


def test_mapping_recovers_permuted_copy():
    net1_up, net1_down = conv_stack(c=16, seed=3)
    for m in net1_up:
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()  # zero-mean pre-activations: no dead ReLU channel
    net2_up, net2_down = copy.deepcopy(net1_up), copy.deepcopy(net1_down)
    hidden = random_perm(16, 11)
    permute_cut_channels(net2_up, net2_down, hidden)  # net2 = net1 with shuffled cut channels
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = net1_up(x), net2_up(x)
    assert (a.std(dim=(0, 2, 3)) > 0).all()  # no dead channels, so no ties
    rep = channel_mapping(a, b, "bmm_std")
    np.testing.assert_array_equal(rep.perm, invert_perm(hidden))
    assert rep.gale > rep.original and rep.gale > rep.random
    torch.testing.assert_close(ChannelPermutation(rep.perm)(b), a)
    permute_cut_channels(net2_up, net2_down, rep.perm)  # undo the shuffle in the weights
    with torch.no_grad():
        torch.testing.assert_close(net2_up(x), a)
        torch.testing.assert_close(net2_down(net2_up(x)), net1_down(a))


def test_basic_block_without_downsample_in_down_keeps_stream_permuted():
    torch.manual_seed(0)
    up = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    down = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), nn.Conv2d(8, 2, 1))
    up.eval(), down.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = down(up(x))
        permute_cut_channels(up, down, random_perm(8, 4))
        torch.testing.assert_close(down(up(x)), ref)
