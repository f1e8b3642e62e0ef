"""Channel mapping between two networks' parts at a cut (the XML_m follow-up of the XML paper).

Two independently trained networks need not order their channels alike, so swapping their halves (XML)
feeds one half channels it does not expect. Here we score how well channel i of net1 matches channel j of
net2 on the same batch, pair the channels with Gale-Shapley (stable matching: "maybe matching the best
pairs first matters more than maximising the sum"), and apply the pairing either as a fixed adapter
(`ChannelPermutation`) or by permuting net2's weights in place (`permute_cut_channels`) so that net2 computes
the same function but its channel perm[i] now sits at position i.

Conventions: `perm[i] = j` means channel j of b (net2) is matched to channel i of a (net1); `b[:, perm]`
is b re-ordered into a's channel order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from xdsl.errors import XdslError
from xdsl.registry import Registry

__all__ = [
    "MEASURES",
    "similarity",
    "gale_shapley",
    "GaleShapleyTrace",
    "gale_shapley_trace",
    "matching_score",
    "identity_perm",
    "random_perm",
    "invert_perm",
    "MappingReport",
    "channel_mapping",
    "format_report",
    "ChannelPermutation",
    "permute_conv_out",
    "permute_conv_in",
    "permute_norm",
    "permute_cut_channels",
]

_EPS = 1e-12

# ----------------------------------------------------------------------------------------------------------
# similarity


def _channel_matrix(x: Tensor, name: str) -> Tensor:
    """(N, C, *spatial) -> (C, N*prod(spatial)) in float64: one row of samples per channel."""
    if not isinstance(x, Tensor):
        raise XdslError(f"channel mapping: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise XdslError(f"channel mapping: {name} must be (N, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _centre(m: Tensor) -> Tensor:
    return m - m.mean(dim=1, keepdim=True)


def _standardise(m: Tensor) -> Tensor:
    """Zero mean, unit (population) std per channel; a constant channel becomes all zeros."""
    m = _centre(m)
    std = m.pow(2).mean(dim=1, keepdim=True).sqrt()
    return m / std.clamp_min(_EPS)


def _neg_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * (a @ b.T)
    return -sq.clamp_min(0.0) / a.shape[1]


def _bmm_std(A: Tensor, B: Tensor) -> Tensor:
    A, B = _centre(A), _centre(B)
    return A @ B.T / A.shape[1]


def _cos_std(A: Tensor, B: Tensor) -> Tensor:
    A, B = _standardise(A), _standardise(B)
    A = A / A.norm(dim=1, keepdim=True).clamp_min(_EPS)
    B = B / B.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return A @ B.T


def _l2_std(A: Tensor, B: Tensor) -> Tensor:
    return _neg_sq_dist(_standardise(A), _standardise(B))


MEASURES: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("measure")
"""Channel similarity measures: (channels x samples) matrices A, B -> score matrix S[i, j]."""
MEASURES.register("bmm_std", _bmm_std)
MEASURES.register("cos_std", _cos_std)
MEASURES.register("l2", _neg_sq_dist)
MEASURES.register("l2_std", _l2_std)


def similarity(a: Tensor, b: Tensor, measure: str = "bmm_std") -> Tensor:
    """Score matrix S[i, j]: how well channel i of `a` matches channel j of `b` (higher is better).

    `a` and `b` are the two parts' activations at the cut on the same batch, (N, C, *spatial); each channel
    becomes a vector over (N, *spatial) of length M. Measures (the XML paper, "Measure Weight 1-4"):

    - ``bmm_std``: centre each channel to zero mean ("對0做std"), S = A B^T / M (a covariance). Only
      centred, not scaled: scaling too would make it the same ranking as ``cos_std``.
    - ``cos_std``: centre and scale to unit std ("對0做std -> 1std"), then cosine A_i.B_j / (|A_i||B_j|).
    - ``l2``: S = -|A_i - B_j|^2 / M on raw activations (negated so higher is better).
    - ``l2_std``: the same after full standardisation.

    Returns a float64 tensor on the inputs' device, shape (C_a, C_b).
    """
    if measure not in MEASURES:
        raise XdslError(
            f"unknown channel-mapping measure {measure!r}", hint=f"use one of {', '.join(MEASURES)}"
        )
    A, B = _channel_matrix(a, "a"), _channel_matrix(b, "b")
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise XdslError(
            f"channel mapping needs activations of the same batch and spatial size, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}",
            hint="take both parts' outputs at the cut on the same input batch",
        )
    B = B.to(A.device)
    if A.shape[1] == 0:
        raise XdslError("channel mapping needs at least one sample, got an empty batch")
    return MEASURES[measure](A, B)


# ----------------------------------------------------------------------------------------------------------
# Gale-Shapley


def _as_matrix(score: np.ndarray | Tensor, name: str) -> np.ndarray:
    if isinstance(score, Tensor):
        score = score.detach().cpu().to(torch.float64).numpy()
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise XdslError(
            f"Gale-Shapley channel mapping needs a square C x C {name} matrix, got shape {s.shape}",
            hint="both parts need the same channel count at the cut (link other widths with a 1x1 conv)",
        )
    if s.shape[0] == 0:
        raise XdslError(
            f"Gale-Shapley channel mapping needs at least one channel, got an empty {name} matrix"
        )
    if not np.isfinite(s).all():
        raise XdslError(f"the {name} matrix contains NaN or infinite values", hint="check the activations")
    return s


@dataclass(frozen=True)
class GaleShapleyTrace:
    """The outcome of one run, with per-round counts for reporting.

    `free[k]`: proposers without a partner at the start of round k (they all propose; free[0] = C).
    `accepted[k]`: proposals newly held by an acceptor in round k (a displaced partner becomes free again,
    so sum(accepted) = C + displacements). The XML paper's "Gale round: 95/22/9/1/1" (summing to C=128) reads
    like this count.
    """

    perm: np.ndarray
    free: list[int]
    accepted: list[int]


def gale_shapley_trace(
    score: np.ndarray | Tensor, acceptor_score: np.ndarray | Tensor | None = None
) -> GaleShapleyTrace:
    """Proposer-optimal stable matching, rows proposing to columns in synchronous rounds.

    Row i ranks columns by decreasing score[i, :]; column j ranks rows by decreasing
    acceptor_score[:, j] (default: `score`, as in the seed). Ties go to the lower index. In each round
    every free row proposes to its best column not yet tried; each column keeps the best of its current
    partner and the new proposals and rejects the rest.
    """
    s = _as_matrix(score, "score")
    t = s if acceptor_score is None else _as_matrix(acceptor_score, "acceptor score")
    if t.shape != s.shape:
        raise XdslError(f"score {s.shape} and acceptor score {t.shape} must have the same shape")
    c = s.shape[0]
    pref = np.argsort(-s, axis=1, kind="stable")  # pref[i, k]: row i's k-th choice
    order = np.argsort(-t, axis=0, kind="stable")  # order[k, j]: column j's k-th choice
    rank = np.empty((c, c), dtype=np.int64)  # rank[j, i]: position of row i in column j's list
    rank[np.arange(c)[None, :], order] = np.arange(c)[:, None]
    nxt = np.zeros(c, dtype=np.int64)
    holder = np.full(c, -1, dtype=np.int64)
    free = np.arange(c)
    free_counts: list[int] = []
    accepted: list[int] = []
    while free.size:
        free_counts.append(int(free.size))
        target = pref[free, nxt[free]]
        nxt[free] += 1
        cols = np.unique(target)
        held = holder[cols]
        keep = held >= 0
        cand_p = np.concatenate([free, held[keep]])
        cand_t = np.concatenate([target, cols[keep]])
        srt = np.lexsort((rank[cand_t, cand_p], cand_t))
        cand_p, cand_t = cand_p[srt], cand_t[srt]
        first = np.ones(cand_t.size, dtype=bool)
        first[1:] = cand_t[1:] != cand_t[:-1]
        win_p, win_t = cand_p[first], cand_t[first]
        accepted.append(int((holder[win_t] != win_p).sum()))
        holder[win_t] = win_p
        free = np.sort(cand_p[~first])
    perm = np.empty(c, dtype=np.int64)
    perm[holder] = np.arange(c)
    return GaleShapleyTrace(perm=perm, free=free_counts, accepted=accepted)


def gale_shapley(
    score: np.ndarray | Tensor, acceptor_score: np.ndarray | Tensor | None = None
) -> tuple[np.ndarray, list[int]]:
    """Stable channel matching: `perm[i] = j` pairs row i with column j; also the free proposers per round.

    With one shared score matrix (the XML paper's setting) the stable matching is unique when scores have no
    ties, and equals the greedy "best remaining pair first" matching.
    """
    trace = gale_shapley_trace(score, acceptor_score)
    return trace.perm, trace.free


# ----------------------------------------------------------------------------------------------------------
# permutations and scores


def _as_perm(perm: np.ndarray | Tensor | Sequence[int], c: int | None = None) -> np.ndarray:
    """Validate a permutation of range(C) and return it as int64 numpy."""
    if isinstance(perm, Tensor):
        perm = perm.detach().cpu().numpy()
    p = np.asarray(perm)
    if p.ndim != 1 or (p.size and not np.issubdtype(p.dtype, np.integer)):
        raise XdslError(
            f"a channel permutation must be a 1-D integer sequence, got shape {p.shape} ({p.dtype})"
        )
    p = p.astype(np.int64)
    if c is not None and p.size != c:
        raise XdslError(f"channel permutation has {p.size} entries but there are {c} channels")
    if not np.array_equal(np.sort(p), np.arange(p.size)):
        raise XdslError(f"not a permutation of 0..{p.size - 1}: {p.tolist()[:16]}")
    return p


def matching_score(score: np.ndarray | Tensor, perm: np.ndarray | Tensor | Sequence[int]) -> float:
    """Mean score of the matched pairs, mean_i S[i, perm[i]]: comparable across measures of one run."""
    s = _as_matrix(score, "score")
    p = _as_perm(perm, s.shape[0])
    return float(s[np.arange(p.size), p].mean())


def identity_perm(c: int) -> np.ndarray:
    """No mapping: channel i to channel i (the XML paper's "原始Matching分數")."""
    return np.arange(c, dtype=np.int64)


def random_perm(c: int, seed: int = 0) -> np.ndarray:
    """A seeded random mapping, the XML paper's baseline ("Random Mapping")."""
    return np.random.default_rng(seed).permutation(c).astype(np.int64)


def invert_perm(perm: np.ndarray | Tensor | Sequence[int]) -> np.ndarray:
    """inv with inv[perm[i]] = i: undoes `x[:, perm]`."""
    p = _as_perm(perm)
    inv = np.empty_like(p)
    inv[p] = np.arange(p.size)
    return inv


@dataclass
class MappingReport:
    """Scores of the identity, a random and the Gale-Shapley mapping, as the seed compares them."""

    measure: str
    original: float
    random: float
    gale: float
    rounds: list[int]
    perm: np.ndarray
    accepted: list[int] = field(default_factory=list)


def channel_mapping(a: Tensor, b: Tensor, measure: str = "bmm_std", seed: int = 0) -> MappingReport:
    """Match b's channels to a's (same batch at the cut): `report.perm[i]` is b's channel for a's i."""
    s = similarity(a, b, measure).cpu().numpy()
    if s.shape[0] != s.shape[1]:
        raise XdslError(
            f"channel mapping needs the same channel count on both sides, got {s.shape[0]} and {s.shape[1]}",
            hint="link different widths with a 1x1 conv instead of a mapping",
        )
    trace = gale_shapley_trace(s)
    c = s.shape[0]
    return MappingReport(
        measure=measure,
        original=matching_score(s, identity_perm(c)),
        random=matching_score(s, random_perm(c, seed)),
        gale=matching_score(s, trace.perm),
        rounds=list(trace.free),
        perm=trace.perm,
        accepted=list(trace.accepted),
    )


def format_report(report: MappingReport) -> str:
    """One line like the XML paper's slide: scores of no / random / Gale mapping and the round counts."""

    def counts(xs: Sequence[int]) -> str:
        if len(xs) <= 12:
            return "/".join(str(x) for x in xs)
        return "/".join(str(x) for x in xs[:10]) + f"/... ({len(xs)} rounds)"

    text = (
        f"{report.measure}  original: {report.original:.4g}  random: {report.random:.4g}  "
        f"gale: {report.gale:.4g}  rounds: {counts(report.rounds)}"
    )
    if report.accepted:
        text += f"  accepted: {counts(report.accepted)}"
    return text


# ----------------------------------------------------------------------------------------------------------
# applying a mapping: adapter


class ChannelPermutation(nn.Module):
    """Fixed adapter `x[:, perm]` for a path between parts, e.g. net2.up -> net1.down.

    With `perm` from `channel_mapping(net1_cut, net2_cut)`: `ChannelPermutation(perm)` puts net2's channels
    in net1's order (net2.up -> net1.down); `.inverse()` puts net1's in net2's order (net1.up -> net2.down).
    """

    perm: Tensor

    def __init__(self, perm: np.ndarray | Tensor | Sequence[int]):
        super().__init__()
        self.register_buffer("perm", torch.as_tensor(_as_perm(perm), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.perm.numel():
            raise XdslError(
                f"channel permutation of {self.perm.numel()} channels applied to a tensor of shape "
                f"{tuple(x.shape)}"
            )
        return x.index_select(1, self.perm)

    def inverse(self) -> ChannelPermutation:
        return ChannelPermutation(invert_perm(self.perm))

    def extra_repr(self) -> str:
        return f"channels={self.perm.numel()}"


# ----------------------------------------------------------------------------------------------------------
# applying a mapping: permuting weights in place


def _permute_param(t: Tensor | None, idx: Tensor, dim: int = 0) -> None:
    if t is None:
        return
    with torch.no_grad():
        t.copy_(t.index_select(dim, idx.to(t.device)))


def _idx(perm: np.ndarray) -> Tensor:
    return torch.as_tensor(perm, dtype=torch.long)


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)


def _is_depthwise(m: nn.Module) -> bool:
    return _is_plain_conv(m) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _check_count(m: nn.Module, have: int, c: int, what: str) -> None:
    if have != c:
        raise XdslError(f"channel permutation has {c} entries but {type(m).__name__} has {have} {what}")


def permute_conv_out(
    conv: nn.Module, bn: nn.Module | None, perm: np.ndarray | Tensor | Sequence[int]
) -> None:
    """Reorder a conv's (or linear's) output channels and its norm's: new out i = old out perm[i]."""
    if isinstance(conv, nn.Linear):
        c = conv.out_features
    elif _is_plain_conv(conv):
        c = conv.out_channels
    else:
        raise XdslError(f"permute_conv_out expects a Conv or Linear layer, got {type(conv).__name__}")
    p = _as_perm(perm, c)
    if _is_plain_conv(conv) and conv.groups > 1 and not _is_depthwise(conv):
        raise XdslError(f"cannot permute the channels of a grouped conv ({conv.groups} groups)")
    _permute_param(conv.weight, _idx(p))
    _permute_param(conv.bias, _idx(p))
    if bn is not None:
        permute_norm(bn, p)


def permute_conv_in(conv: nn.Module, perm: np.ndarray | Tensor | Sequence[int], block: int = 1) -> None:
    """Make a conv (or linear) read its inputs in a new order: it now expects old input perm[i] at i.

    `block` > 1 is for a Linear after Flatten: each channel owns `block` consecutive features.
    """
    if isinstance(conv, nn.Linear):
        p = _as_perm(perm)
        if conv.in_features != p.size * block:
            _check_count(conv, conv.in_features, p.size * block, "input features")
        idx = (_idx(p)[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
        _permute_param(conv.weight, idx, dim=1)
        return
    if not _is_plain_conv(conv):
        raise XdslError(f"permute_conv_in expects a Conv or Linear layer, got {type(conv).__name__}")
    if conv.groups != 1:
        raise XdslError(f"cannot permute the input channels of a grouped conv ({conv.groups} groups)")
    p = _as_perm(perm, conv.in_channels)
    _permute_param(conv.weight, _idx(p), dim=1)


def permute_norm(norm: nn.Module, perm: np.ndarray | Tensor | Sequence[int]) -> None:
    """Reorder a per-channel norm's affine parameters and running statistics."""
    if isinstance(norm, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        p = _as_perm(perm, norm.num_features)
        for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
            _permute_param(t, _idx(p))
        return
    if isinstance(norm, nn.GroupNorm) and norm.num_groups in (1, norm.num_channels):
        p = _as_perm(perm, norm.num_channels)
        _permute_param(norm.weight, _idx(p))
        _permute_param(norm.bias, _idx(p))
        return
    raise XdslError(f"cannot permute the channels of {type(norm).__name__}")


# Modules that act on each channel separately with no per-channel parameters.
_PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
)


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return True
    return isinstance(m, nn.GroupNorm) and m.num_groups in (1, m.num_channels)


def _resnet_block_types() -> tuple[type[nn.Module], ...]:
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency, but keep mapping usable without
        return ()
    return (BasicBlock, Bottleneck)


def _block_last(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The conv and bn that write the block's residual branch into the stream."""
    if hasattr(block, "conv3"):
        return block.conv3, block.bn3
    return block.conv2, block.bn2


def _flatten(mods: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    """Sequential containers and lists become their leaves in order; any other module stays a unit."""
    if isinstance(mods, (nn.Sequential, nn.ModuleList, list, tuple)):
        out: list[nn.Module] = []
        for m in mods:
            out.extend(_flatten(m))
        return out
    if isinstance(mods, nn.Module):
        return [mods]
    raise XdslError(f"expected a module or a list of modules, got {type(mods).__name__}")


_Op = Callable[[], None]


def _unsupported(m: nn.Module, side: str) -> XdslError:
    return XdslError(
        f"cannot permute the cut channels through {type(m).__name__} in the {side} part",
        hint="supported: sequential conv/linear/norm/activation/pool stacks and torchvision ResNet blocks; "
        "for other structures use the permutation adapter (xdsl.mapping.ChannelPermutation)",
    )


def _plan_channelwise(m: nn.Module, p: np.ndarray, ops: list[_Op]) -> bool:
    """Plan a per-channel module (PReLU, a norm) for permuted channels; False if `m` is not one."""
    c = p.size
    if isinstance(m, nn.PReLU):
        if m.num_parameters > 1:
            _check_count(m, m.num_parameters, c, "channels")
            ops.append(lambda m=m: _permute_param(m.weight, _idx(p)))
        return True
    if _is_norm(m):
        _check_count(m, getattr(m, "num_features", getattr(m, "num_channels", -1)), c, "channels")
        ops.append(lambda m=m: permute_norm(m, p))
        return True
    return False


def _plan_backward(mods: list[nn.Module], p: np.ndarray, ops: list[_Op]) -> bool:
    """Plan permuting the output channels of `mods` (run in order); True if the input must be permuted too."""
    blocks = _resnet_block_types()
    c = p.size
    for m in reversed(mods):
        if isinstance(m, _PASSTHROUGH):
            continue
        if _plan_channelwise(m, p, ops):
            continue
        if _is_depthwise(m):
            _check_count(m, m.out_channels, c, "output channels")
            ops.append(lambda m=m: permute_conv_out(m, None, p))
            continue
        if (_is_plain_conv(m) and m.groups == 1) or isinstance(m, nn.Linear):
            _check_count(m, m.out_channels if _is_plain_conv(m) else m.out_features, c, "output channels")
            ops.append(lambda m=m: permute_conv_out(m, None, p))
            return False
        if blocks and isinstance(m, blocks):
            conv, bn = _block_last(m)
            _check_count(conv, conv.out_channels, c, "output channels")
            ops.append(lambda conv=conv, bn=bn: permute_conv_out(conv, bn, p))
            needs_input = True if m.downsample is None else _plan_backward(_flatten(m.downsample), p, ops)
            if not needs_input:
                return False
            _check_count(m.conv1, m.conv1.in_channels, c, "input channels")
            ops.append(lambda m=m: permute_conv_in(m.conv1, p))
            continue
        raise _unsupported(m, "up")
    return True


def _plan_forward(mods: list[nn.Module], p: np.ndarray, ops: list[_Op]) -> bool:
    """Plan making `mods` accept permuted input channels; True if their output stays permuted."""
    blocks = _resnet_block_types()
    c = p.size
    flat = False
    for m in mods:
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1:
                raise _unsupported(m, "down")
            flat = True
            continue
        if isinstance(m, nn.Linear):
            if m.in_features % c:
                raise XdslError(f"Linear with {m.in_features} inputs cannot follow {c} permuted channels")
            block = m.in_features // c if flat else 1
            ops.append(lambda m=m, block=block: permute_conv_in(m, p, block))
            return False
        if flat:
            raise _unsupported(m, "down")
        if isinstance(m, _PASSTHROUGH):
            continue
        if _plan_channelwise(m, p, ops):
            continue
        if _is_depthwise(m):
            _check_count(m, m.in_channels, c, "input channels")
            ops.append(lambda m=m: permute_conv_out(m, None, p))
            continue
        if _is_plain_conv(m) and m.groups == 1:
            _check_count(m, m.in_channels, c, "input channels")
            ops.append(lambda m=m: permute_conv_in(m, p))
            return False
        if blocks and isinstance(m, blocks):
            _check_count(m.conv1, m.conv1.in_channels, c, "input channels")
            ops.append(lambda m=m: permute_conv_in(m.conv1, p))
            out_permuted = True if m.downsample is None else _plan_forward(_flatten(m.downsample), p, ops)
            if not out_permuted:
                return False
            conv, bn = _block_last(m)
            ops.append(lambda conv=conv, bn=bn: permute_conv_out(conv, bn, p))
            continue
        raise _unsupported(m, "down")
    return True


def permute_cut_channels(
    up: nn.Module | Sequence[nn.Module],
    down: nn.Module | Sequence[nn.Module],
    perm: np.ndarray | Tensor | Sequence[int],
) -> None:
    """Permute a network's channels at the cut in place, keeping down(up(x)) unchanged.

    Afterwards up(x)[:, i] equals the old up(x)[:, perm[i]]. `up` and `down` are modules or lists of modules
    run in sequence (nn.Sequential is looked into). The permutation is carried back from the cut to the
    convs/linears that write the cut channels, and forward to those that read them, through per-channel
    layers (activations, pooling, norms, depthwise convs). For torchvision BasicBlock/Bottleneck stages the
    whole residual stream is permuted: each block's last conv+bn, the downsample conv+bn, and the first
    conv of each block reading the stream. Anything else raises an XdslError pointing to
    `ChannelPermutation`. Nothing is changed when planning fails. Permute before building optimizers:
    their per-parameter state is not reordered.
    """
    up_mods, down_mods = _flatten(up), _flatten(down)
    p = _as_perm(perm)
    ops: list[_Op] = []
    if _plan_backward(up_mods, p, ops):
        raise XdslError(
            "the cut channels come straight from the input of the up part; there are no weights to permute",
            hint="use the permutation adapter (xdsl.mapping.ChannelPermutation)",
        )
    if _plan_forward(down_mods, p, ops):
        raise XdslError(
            "the down part passes the cut channels through to its output; permuting would change the output",
            hint="use the permutation adapter (xdsl.mapping.ChannelPermutation)",
        )
    for op in ops:
        op()
