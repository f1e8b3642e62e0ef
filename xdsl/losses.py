"""Loss primitives of the spec language and their registry.

Every primitive is a plain module-level function of tensors returning a scalar (batch mean), so the
compiler can emit it as an fx ``call_function`` node and torch.compile can trace it without graph
breaks: no ``.item()``, no Python branches on tensor values. Branches on Python constants
(``grad``, ``T``) are allowed when the value is a Python number: a number parameter may also be a
0-dim tensor (a schedule such as ``T=1 + 3 * (1 - epoch / epochs)``). The registry ``LOSSES`` tells
the spec checker each primitive's arity, keyword names, argument kinds and defaults.

Conventions: logits are ``(B, K)``, features ``(B, C, H, W)`` or ``(B, D)``, labels ``(B,)`` long (or
``(B, K)`` class probabilities under mixup/cutmix, for the primitives in ``SOFT_LABELS``).
Every tensor argument has a role, declared with the primitive (``grads``): the prediction (``p``,
``student``, ``student_feat``) learns and always carries gradient; the target (``target``,
``teacher``, ``teacher_feat``) is detached unless the primitive has a ``grad`` keyword and it is
true; labels carry none. The spec checker reads these roles to find loss terms that cannot train the
network they are minimised for (`xdsl.lang.flow`), so they must say exactly what the function does
(tested against autograd for every primitive).
"""

from __future__ import annotations

import difflib
import enum
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from xdsl.errors import XdslError
from xdsl.registry import Registry

__all__ = [
    "REQUIRED",
    "KINDS",
    "SOFT_LABELS",
    "CONSTANT_ONLY",
    "LossParam",
    "LossSpec",
    "LOSSES",
    "ALWAYS",
    "loss_signature",
    "primitive_spec",
    "softmax_entropy",
    "ce",
    "kl",
    "kd",
    "ce_soft",
    "entropy",
    "cwtm",
    "dkpp",
    "dkd",
    "l2",
    "mse",
    "l1",
    "cosine",
    "hint",
    "at",
    "sp",
    "pkt",
    "rkd",
    "nst",
    "dist",
    "crd",
]


class _Required(enum.Enum):
    """Sentinel type: an enum member so it survives pickling/copying as a singleton."""

    REQUIRED = "REQUIRED"

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required.REQUIRED
"""Default of a parameter that must be given."""

KINDS = frozenset({"logits", "features", "labels", "indices", "number", "bool"})
"""Argument kinds: a net path gives ``logits`` or ``features``, ``y`` gives ``labels``, ``i`` the batch's
``indices`` (each sample's position in the training set)."""

ALWAYS = True
"""``grads`` value of a prediction argument: gradient always flows into it."""


class LossParam(NamedTuple):
    """One parameter: unpacks as ``(name, kind, default)``; default is ``REQUIRED`` if required."""

    name: str
    kind: str
    default: Any


@dataclass(frozen=True)
class LossSpec:
    """What the spec checker needs to know about one primitive (and the function to call)."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[LossParam, ...]
    doc: str
    # (param, predicate, message) value constraints on number params, checked by the spec checker
    # because the functions themselves must stay branch-free.
    constraints: tuple[tuple[str, Callable[[float], bool], str], ...] = ()
    # tensor param -> ALWAYS (a prediction) or the name of the bool param that lets gradient into it
    # (a target, detached unless that keyword is true); tensor params not listed never carry gradient
    grads: tuple[tuple[str, bool | str], ...] = ()
    # parameters the function takes only by keyword (a user primitive's `*, gamma=2.0`)
    keyword_only: frozenset[str] = frozenset()
    # a stateful primitive: ``fn`` is called once per distinct term at compile time, with the per-sample
    # shape of each tensor argument and the constant keywords, and returns the nn.Module that computes the
    # term from the tensor arguments each step (its own parameters and buffers; see xdsl.compile.stateful)
    stateful: bool = False

    def split_args(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A call's arguments, in the signature's order, as the function takes them: (positional, keyword)."""
        if not self.keyword_only:
            return args, {}
        positional = tuple(a for p, a in zip(self.params, args, strict=True) if p.name not in self.keyword_only)
        return positional, {p.name: a for p, a in zip(self.params, args, strict=True) if p.name in self.keyword_only}

    @property
    def usage(self) -> str:
        """The call as written in a ``.xspec`` file, e.g. ``kl(target, p, T=1.0, grad=False)``."""
        parts = [p.name if p.default is REQUIRED else f"{p.name}={p.default!r}" for p in self.params]
        return f"{self.name}({', '.join(parts)})"

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.default is REQUIRED)

    def param(self, name: str) -> LossParam | None:
        return next((p for p in self.params if p.name == name), None)

    def carries_gradient(self, param: str, args: dict[str, Any]) -> bool:
        """Whether gradient flows into ``param`` given the call's arguments by name (defaults filled)."""
        rule = dict(self.grads).get(param)
        if rule is None:
            return False
        return rule is ALWAYS or bool(args.get(rule))

    def check_value(self, param: str, value: float) -> str | None:
        """Problem with a constant number argument, or None if it is acceptable."""
        for name, ok, message in self.constraints:
            if name == param and not ok(value):
                return f"{self.name}(): {param} {message}, got {value!r}"
        return None


LOSSES: Registry[LossSpec] = Registry("loss")

SOFT_LABELS = frozenset({"ce", "kd", "cwtm", "crd"})  # crd: negatives of other than the dominant class
"""Primitives whose labels may be class probabilities (B, K) as well as indices (B,): mixup/cutmix make `y`
soft. They reach `F.cross_entropy`, which takes either; a primitive not listed needs class indices, and the
checker rejects it next to mixup/cutmix (`xdsl.lang.augment`)."""

CONSTANT_ONLY: frozenset[tuple[str, str]] = frozenset({("ce", "label_smoothing")})
"""(primitive, number parameter) pairs that cannot be a schedule (`epoch`...): the others may be handed a 0-dim
tensor, so a primitive may branch on a number only when it is a Python number (see ``kl``)."""

_POSITIVE = (lambda v: v > 0, "must be > 0")
_UNIT = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_NONNEG = (lambda v: v >= 0, "must be >= 0")


def _primitive(
    constraints: dict[str, tuple[Callable[[float], bool], str]] | None = None,
    grads: dict[str, bool | str] | None = None,
    stateful: bool = False,
    **kinds: str,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` in LOSSES; kinds are given per parameter, defaults come from the signature.

    ``grads`` declares which tensor arguments carry gradient (see ``LossSpec.grads``); it may be
    left out only when there is one tensor argument (then the prediction). ``stateful``: ``fn`` builds
    the term's module (see ``LossSpec.stateful``).
    """

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        sig = inspect.signature(fn)
        if list(sig.parameters) != list(kinds):
            raise AssertionError(f"{fn.__name__}: kinds {list(kinds)} != parameters {list(sig.parameters)}")
        params = []
        for name, p in sig.parameters.items():
            if kinds[name] not in KINDS:
                raise AssertionError(f"{fn.__name__}: unknown kind {kinds[name]!r}")
            default = REQUIRED if p.default is inspect.Parameter.empty else p.default
            params.append(LossParam(name, kinds[name], default))
        cons = tuple((k, ok, msg) for k, (ok, msg) in (constraints or {}).items())
        tensors = [n for n, k in kinds.items() if k in ("logits", "features")]
        if grads is None and len(tensors) != 1:
            raise AssertionError(f"{fn.__name__}: say which of {tensors} carry gradient (grads=...)")
        flows = grads if grads is not None else {tensors[0]: ALWAYS}
        for name, rule in flows.items():
            if kinds.get(name) not in ("logits", "features") or not (rule is ALWAYS or kinds.get(rule) == "bool"):
                raise AssertionError(f"{fn.__name__}: bad gradient rule {name}={rule!r}")
        LOSSES.register(fn.__name__, LossSpec(fn.__name__, fn, tuple(params), inspect.getdoc(fn) or "", cons,
                                              tuple(flows.items()), stateful=stateful))
        return fn

    return register


def loss_signature(name: str) -> LossSpec:
    """The registry entry for ``name``; an unknown name is a user error with a did-you-mean hint."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=3)
        hint = (
            f"did you mean {' or '.join(close)}?" if close else f"known losses: {', '.join(sorted(LOSSES))}"
        )
        raise XdslError(f"unknown loss {name!r}", hint=hint)
    return LOSSES[name]


def primitive_spec(prim: Any) -> LossSpec | None:
    """The LossSpec a checked term (`ir.Prim`) calls: its own (a user primitive's) or the registry's."""
    own = getattr(prim, "spec", None)
    return own if own is not None else LOSSES.get(prim.name)


def _target(x: Tensor, grad: bool) -> Tensor:
    """Teacher/target side: gradients flow into it only when asked for."""
    return x if grad else x.detach()


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy ``-sum_k softmax(z)_k log softmax(z)_k`` in nats, shape ``(B,)``.

    Helper for the evaluator (mean prediction entropy, the DML paper's analysis), not a spec primitive.
    """
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


# ---------------------------------------------------------------------------------------- logits


@_primitive(p="logits", y="labels", label_smoothing="number", constraints={"label_smoothing": _UNIT})
def ce(p: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with the labels: ``F.cross_entropy(p, y, label_smoothing=...)``, batch mean.

    Use: ``ce(s, y)`` or ``ce(s, y, label_smoothing=0.1)``.
    """
    return F.cross_entropy(p, y, label_smoothing=label_smoothing)


@_primitive(target="logits", p="logits", T="number", grad="bool", constraints={"T": _POSITIVE},
            grads={"p": ALWAYS, "target": "grad"})
def kl(target: Tensor, p: Tensor, T: float = 1.0, grad: bool = False) -> Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(p/T))``, summed over classes, mean over the batch.

    The T^2 keeps gradient magnitudes comparable across temperatures (Hinton). The target is
    detached unless ``grad=true`` (DML: each net mimics the other's current prediction).
    Use: ``kl(t, s, T=4)`` - ``s`` learns to match ``t``.
    """
    t = _target(target, grad)
    if isinstance(T, int | float) and T == 1:  # same value (x / 1, x * 1 are exact), three fewer ops
        return F.kl_div(F.log_softmax(p, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return F.kl_div(
        F.log_softmax(p / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True
    ) * (T * T)


@_primitive(
    grads={"student": ALWAYS},
    teacher="logits",
    student="logits",
    y="labels",
    T="number",
    alpha="number",
    constraints={"T": _POSITIVE, "alpha": _UNIT},
)
def kd(teacher: Tensor, student: Tensor, y: Tensor, T: float = 4.0, alpha: float = 0.9) -> Tensor:
    """Hinton KD (the KD paper): ``alpha * kl(teacher, student, T) + (1 - alpha) * ce(student, y)``.

    ``kl`` includes the T^2 factor; the teacher is detached.
    Use: ``kd(teacher.fc, student.fc, y, T=4, alpha=0.9)``.
    """
    return alpha * kl(teacher, student, T) + (1.0 - alpha) * ce(student, y)


@_primitive(target="logits", p="logits", T="number", constraints={"T": _POSITIVE}, grads={"p": ALWAYS})
def ce_soft(target: Tensor, p: Tensor, T: float = 1.0) -> Tensor:
    """Soft-target cross-entropy ``-T^2 * sum_k softmax(target/T)_k log softmax(p/T)_k``, batch mean.

    Born-Again's teacher loss (the Born-Again paper). Equals ``kl(target, p, T)`` plus the (constant)
    target entropy times T^2, so it has the same gradient as ``kl``; the target is detached.
    Use: ``ce_soft(gen1.fc, gen2.fc)``.
    """
    q = F.log_softmax(target.detach() / T, dim=1).exp()
    return -(q * F.log_softmax(p / T, dim=1)).sum(dim=1).mean() * (T * T)


@_primitive(p="logits")
def entropy(p: Tensor) -> Tensor:
    """Mean prediction entropy ``-sum_k softmax(p)_k log softmax(p)_k`` in nats (the DML paper's analysis).

    Also a regulariser: a positive weight penalises confident predictions, a negative weight
    (entropy minimisation) rewards them. Use: ``entropy(s)`` or ``- 0.1 * entropy(s)``.
    """
    return softmax_entropy(p).mean()


@_primitive(teacher="logits", p="logits", y="labels", grads={"p": ALWAYS})
def cwtm(teacher: Tensor, p: Tensor, y: Tensor) -> Tensor:
    """Born-Again Confidence-Weighted by Teacher Max (the Born-Again paper).

    ``w_s = max_k softmax(teacher)_s,k / sum_s' max_k softmax(teacher)_s',k`` (detached) and
    loss ``= sum_s w_s * CE(p_s, y_s)``: the label loss, each sample weighted by the teacher's
    confidence, the weights summing to 1 over the batch. Use: ``cwtm(teacher.fc, s, y)``.
    """
    conf = F.log_softmax(teacher.detach(), dim=1).exp().amax(dim=1)
    w = conf / conf.sum()
    return (w * F.cross_entropy(p, y, reduction="none")).sum()


def _permute_non_argmax(q: Tensor) -> Tensor:
    """Per row, keep the argmax entry and move the other entries by a uniform random permutation."""
    return _permute_except(q, q.argmax(dim=1, keepdim=True))


def _permute_except(q: Tensor, keep: Tensor) -> Tensor:
    """Per row, keep the entry at column ``keep`` (B, 1) and move the others by a uniform random permutation.

    Branch-free: order the positions twice with the kept one forced first (key -1), once by index
    and once by uniform random keys; the value at the j-th position of the first order is written
    to the j-th position of the second, a uniform random bijection fixing the kept column. Uses the
    global torch RNG (``torch.rand_like``): random per call, reproducible under ``torch.manual_seed``.
    """
    first = torch.full_like(keep, -1, dtype=q.dtype)
    by_index = torch.ones_like(q).cumsum(dim=1).scatter(1, keep, first).argsort(dim=1)
    by_random = torch.rand_like(q).scatter(1, keep, first).argsort(dim=1)
    return torch.zeros_like(q).scatter(1, by_random, q.gather(1, by_index))


def _max_to_label(q: Tensor, y: Tensor) -> Tensor:
    """``q`` with, per row, its maximum and the entry at the label swapped (the max lands on the label)."""
    top, label = q.argmax(dim=1, keepdim=True), y.unsqueeze(1)
    at_top, at_label = q.gather(1, top), q.gather(1, label)
    return q.scatter(1, top, at_label).scatter(1, label, at_top)


@_primitive(teacher="logits", p="logits", y="labels", at_label="bool", grads={"p": ALWAYS})
def dkpp(teacher: Tensor, p: Tensor, y: Tensor, at_label: bool = True) -> Tensor:
    """Born-Again Dark Knowledge with Permuted Predictions.

    The Born-Again paper's Eq. 11: the target keeps the teacher's maximum ``max_u p_u`` at the true
    label and puts the teacher's other n-1 outputs, randomly permuted, on the other n-1 classes.
    ``q = softmax(teacher)`` (detached); per sample the maximum is moved to the label (swapped with
    the entry there; nothing moves when the teacher is right), then every entry except the label's
    is permuted uniformly among the non-label positions; loss ``= -sum_k q_k log softmax(p)_k``, batch
    mean. ``at_label=false`` keeps the maximum where the teacher put it (its argmax; differs only on
    samples the teacher gets wrong). Labels enter only through that position: BAN trains DKPP from
    the teacher outputs. The permutation is drawn from the global torch RNG on every call (no
    per-loss seed: a seeded ``torch.Generator`` is not traceable); it is reproducible under the run's
    ``torch.manual_seed``. Use: ``dkpp(teacher.fc, s, y)``.
    """
    q = F.log_softmax(teacher.detach(), dim=1).exp()
    keep = y.unsqueeze(1) if at_label else q.argmax(dim=1, keepdim=True)
    if at_label:
        q = _max_to_label(q, y)
    return -(_permute_except(q, keep) * F.log_softmax(p, dim=1)).sum(dim=1).mean()


def _binary_log_probs(z: Tensor, y: Tensor, gt: Tensor) -> Tensor:
    """``log [P_g, sum_{k != g} P_k]`` of ``P = softmax(z)``, shape ``(B, 2)``, computed in log space."""
    logp = F.log_softmax(z, dim=1)
    rest = torch.logsumexp(logp.masked_fill(gt.bool(), -math.inf), dim=1)
    return torch.stack([logp.gather(1, y.unsqueeze(1)).squeeze(1), rest], dim=1)


@_primitive(
    grads={"p": ALWAYS},
    teacher="logits",
    p="logits",
    y="labels",
    alpha="number",
    beta="number",
    T="number",
    constraints={"T": _POSITIVE, "alpha": _NONNEG, "beta": _NONNEG},
)
def dkd(
    teacher: Tensor, p: Tensor, y: Tensor, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022, mdistiller ``dkd_loss``): ``alpha * TCKD + beta * NCKD``.

    With ``g`` the label ``y``, ``P = softmax(z/T)`` for teacher (``P^t``) and student (``P^s``):
    ``b = [P_g, 1 - P_g]`` (target vs. all non-target classes);
    ``TCKD = T^2 * mean_batch KL(b^t || b^s)``;
    ``Q = softmax(z/T - 1000 * onehot(g))`` (non-target classes renormalised);
    ``NCKD = T^2 * mean_batch KL(Q^t || Q^s)``. The teacher is detached. mdistiller takes
    ``log(b^s)`` of the probabilities; here it is computed in log space (same value, no log(0)).
    mdistiller's warm-up ramp ``min(epoch / 20, 1)`` is not part of the loss: write it as a
    weight schedule in the spec. Use: ``dkd(teacher.fc, s, y, alpha=1, beta=8, T=4)``.
    """
    t = teacher.detach()
    gt = torch.zeros_like(p).scatter(1, y.unsqueeze(1), 1.0)
    tckd = F.kl_div(
        _binary_log_probs(p / T, y, gt),
        _binary_log_probs(t / T, y, gt),
        reduction="batchmean",
        log_target=True,
    )
    logq_s = F.log_softmax(p / T - 1000.0 * gt, dim=1)
    logq_t = F.log_softmax(t / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(logq_s, logq_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * (T * T)


# -------------------------------------------------------------------------------------- features


_FEATURE_GRADS = {"p": ALWAYS, "target": "grad"}


@_primitive(p="features", target="features", grad="bool", grads=_FEATURE_GRADS)
def l2(p: Tensor, target: Tensor, grad: bool = False) -> Tensor:
    """Squared L2 distance per sample, batch mean: ``mean_s ||flatten(p_s) - flatten(target_s)||^2``.

    BYOT feature hint (the BYOT paper) and XML adapter warm-up (the XML paper). ``target`` is detached unless
    ``grad=true``. Use: ``l2(s.layer1.hint, s.layer4)`` - the hint learns the deepest feature.
    """
    return (p - _target(target, grad)).pow(2).flatten(1).sum(dim=1).mean()


@_primitive(p="features", target="features", grad="bool", grads=_FEATURE_GRADS)
def mse(p: Tensor, target: Tensor, grad: bool = False) -> Tensor:
    """``F.mse_loss(p, target)``: elementwise mean of squared differences; target detached unless ``grad=true``.

    Use: ``mse(a.layer2 >> adapter, b.layer2)``.
    """
    return F.mse_loss(p, _target(target, grad))


@_primitive(p="features", target="features", grad="bool", grads=_FEATURE_GRADS)
def l1(p: Tensor, target: Tensor, grad: bool = False) -> Tensor:
    """``F.l1_loss(p, target)``: elementwise mean of absolute differences; target detached unless ``grad=true``.

    Use: ``l1(a.layer2 >> adapter, b.layer2)``.
    """
    return F.l1_loss(p, _target(target, grad))


@_primitive(p="features", target="features", grad="bool", grads=_FEATURE_GRADS)
def cosine(p: Tensor, target: Tensor, grad: bool = False) -> Tensor:
    """``1 - cos(flatten(p_s), flatten(target_s))``, batch mean; target detached unless ``grad=true``.

    Use: ``cosine(s.layer3, t.layer3)``.
    """
    return (1.0 - F.cosine_similarity(p.flatten(1), _target(target, grad).flatten(1), dim=1)).mean()


@_primitive(student_feat="features", teacher_feat="features", grads={"student_feat": ALWAYS})
def hint(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint: ``F.mse_loss(student_feat, teacher_feat.detach())`` (elementwise mean).

    The paper's ``0.5 * ||u - r||^2`` summed per sample differs only by a constant factor
    (``numel / (2 B)``), absorbed by the spec's loss weight. Shapes must match: put an adapter
    (regressor) on the student side. Use: ``hint(s.layer2.adapter, t.layer2)``.
    """
    return F.mse_loss(student_feat, teacher_feat.detach())


@torch.fx.wrap
def _common_spatial(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool both maps to the smaller spatial size; an fx leaf because it branches on shapes."""
    if s.dim() != 4 or t.dim() != 4:
        raise XdslError(
            f"at() needs (B, C, H, W) feature maps, got shapes {tuple(s.shape)} and {tuple(t.shape)}",
            hint="attention transfer works on conv feature maps, not on flat features or logits",
        )
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return s, t


def _attention(f: Tensor, p: float) -> Tensor:
    """Zagoruyko & Komodakis attention map: L2-normalised ``mean_c |f_c|^p`` per sample."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


@_primitive(student_feat="features", teacher_feat="features", p="number", constraints={"p": _POSITIVE},
            grads={"student_feat": ALWAYS})
def at(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): ``mean((a(s) - a(t))^2)``.

    ``a(f) = normalize(mean_c |f_c|^p flattened)`` (L2 per sample; ``|.|`` so odd/fractional p
    work), teacher detached, mean over batch and spatial positions (as the reference code).
    Channel counts may differ; if spatial sizes differ the larger map is average-pooled to the
    smaller. Use: ``at(s.layer3, t.layer3, p=2)``.
    """
    s, t = _common_spatial(student_feat, teacher_feat.detach())
    return (_attention(s, p) - _attention(t, p)).pow(2).mean()


# ------------------------------------------------------------------------ relations between samples
# Methods of torchdistill's and mdistiller's lists that are one loss term away (weights as in mdistiller:
# ``3000 * sp(...)``, ``30000 * pkt(...)``, ``rkd(...)``, ``50 * nst(...)``, ``dist(...)``).


@_primitive(student_feat="features", teacher_feat="features", grads={"student_feat": ALWAYS})
def sp(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): match the batch's row-normalised Gram matrices.

    ``G = normalize_rows(F F^T)`` of the flattened features; loss ``= ||G_t - G_s||_F^2 / B^2``.
    Teacher detached; channel counts and sizes may differ. Use: ``sp(s.layer3, t.layer3)`` (weight 3000).
    """
    s, t = student_feat.flatten(1), teacher_feat.detach().flatten(1)
    g_s, g_t = F.normalize(s @ s.t(), dim=1), F.normalize(t @ t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (s.shape[0] * s.shape[0])


def _cosine_affinity(f: Tensor, eps: float) -> Tensor:
    """PKT's conditional probabilities: cosine similarities scaled to [0, 1], rows summing to 1."""
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    sim = (f @ f.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


@_primitive(student_feat="features", teacher_feat="features", grads={"student_feat": ALWAYS})
def pkt(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): KL between cosine-affinity distributions.

    ``mean_ij q_t,ij log((q_t,ij + eps) / (q_s,ij + eps))`` with eps = 1e-7 (mdistiller's form: the
    mean, not the sum, over the B x B entries). Teacher detached. Use: ``pkt(s.pool, t.pool)`` (weight 30000).
    """
    eps = 1e-7
    q_s = _cosine_affinity(student_feat.flatten(1), eps)
    q_t = _cosine_affinity(teacher_feat.detach().flatten(1), eps)
    return (q_t * torch.log((q_t + eps) / (q_s + eps))).mean()


def _normalized_distances(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances divided by their mean over the off-diagonal pairs (RKD)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * e @ e.t()).clamp(min=1e-12).sqrt()
    n = e.shape[0]
    off = 1.0 - torch.eye(n, dtype=e.dtype, device=e.device)
    d = d * off
    return d / (d.sum() / (n * (n - 1)))


def _angles(e: Tensor) -> Tensor:
    """Cosines of the angles at every sample j between the directions to samples i and k (RKD)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@_primitive(student_feat="features", teacher_feat="features", distance="number", angle="number",
            constraints={"distance": _NONNEG, "angle": _NONNEG}, grads={"student_feat": ALWAYS})
def rkd(student_feat: Tensor, teacher_feat: Tensor, distance: float = 25.0, angle: float = 50.0) -> Tensor:
    """Relational KD (Park et al. 2019): distance-wise and angle-wise relations of the batch.

    ``distance * smooth_l1(psi_D(s), psi_D(t)) + angle * smooth_l1(psi_A(s), psi_A(t))``, psi_D the pairwise
    distances over their mean, psi_A the cosines of all triplet angles (mdistiller's weights 25 and 50).
    Teacher detached; feature sizes may differ. Use: ``rkd(s.pool, t.pool)``.
    """
    s, t = student_feat.flatten(1), teacher_feat.detach().flatten(1)
    loss_d = F.smooth_l1_loss(_normalized_distances(s), _normalized_distances(t))
    loss_a = F.smooth_l1_loss(_angles(s), _angles(t))
    return distance * loss_d + angle * loss_a


def _poly_mmd_kernel(a: Tensor, b: Tensor) -> Tensor:
    """Mean over pairs of channels of (a_i . b_j)^2 (NST's degree-2 polynomial kernel)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@_primitive(student_feat="features", teacher_feat="features", grads={"student_feat": ALWAYS})
def nst(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Neuron selectivity transfer (Huang & Wang 2017): MMD of channel activation maps, polynomial kernel.

    Each channel's map is flattened and L2-normalised; loss ``= k(t, t) + k(s, s) - 2 k(s, t)`` with
    ``k`` the mean squared inner product over channel pairs. Teacher detached; if spatial sizes differ
    the larger map is average-pooled to the smaller. Use: ``nst(s.layer3, t.layer3)`` (weight 50).
    """
    s, t = _common_spatial(student_feat, teacher_feat.detach())
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2)
    return _poly_mmd_kernel(t, t) + _poly_mmd_kernel(s, s) - 2.0 * _poly_mmd_kernel(s, t)


def _pearson_gap(a: Tensor, b: Tensor) -> Tensor:
    """1 - mean over rows of the Pearson correlation of a's and b's rows (eps 1e-8 as in DIST's code)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return 1.0 - ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()


@_primitive(teacher="logits", p="logits", beta="number", gamma="number", T="number",
            constraints={"beta": _NONNEG, "gamma": _NONNEG, "T": _POSITIVE}, grads={"p": ALWAYS})
def dist(teacher: Tensor, p: Tensor, beta: float = 1.0, gamma: float = 1.0, T: float = 1.0) -> Tensor:
    """DIST (Huang et al. 2022): Pearson-correlation relations of the predictions, inter- and intra-class.

    With ``y = softmax(z / T)``: ``T^2 * (beta * (1 - corr over classes, per sample) + gamma * (1 - corr
    over the batch, per class))``. Teacher detached. Use: ``dist(t, s, beta=2, gamma=2)`` (plus ``ce(s, y)``).
    """
    y_s = F.softmax(p / T, dim=1)
    y_t = F.softmax(teacher.detach() / T, dim=1)
    return (T * T) * (beta * _pearson_gap(y_s, y_t) + gamma * _pearson_gap(y_s.t(), y_t.t()))


# ------------------------------------------------------------------------ stateful (modules with state)


_WHOLE = (lambda v: v >= 1 and v == int(v), "must be a whole number >= 1")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@_primitive(stateful=True, t="features", s="features", i="indices", y="labels", feat_dim="number",
            nce_k="number", nce_t="number", nce_m="number", grads={"s": ALWAYS},
            constraints={"feat_dim": _WHOLE, "nce_k": _WHOLE, "nce_t": _POSITIVE,
                         "nce_m": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")})
def crd(t: Any, s: Any, i: Any, y: Any = None, feat_dim: float = 128, nce_k: float = 16384, nce_t: float = 0.07,
        nce_m: float = 0.5) -> torch.nn.Module:
    """Contrastive representation distillation (Tian et al. 2020; RepDistiller's CRDLoss), a stateful term.

    Teacher and student features (flattened per sample, e.g. the pooled features ``t.body``, ``s.body`` of
    networks cut before their classifier) are embedded by two linear heads into ``feat_dim`` dimensions and
    L2-normalised; each is contrasted (NCE, temperature ``nce_t``) with the other side's memory bank row of
    the same sample against ``nce_k`` negatives; the banks (one row per training sample) follow the
    embeddings with momentum ``nce_m``. ``i``: the batch's sample indices; with ``y`` the negatives come from
    other classes (RepDistiller's default 'exact' mode). The heads are owned by the network the term is
    minimised for. Teacher detached. Use: ``crd(t.body, s.body, i, y)``, weighted beside the labels:
    ``ce(s, y) + 0.8 * crd(t.body, s.body, i, y)`` (RepDistiller's CIFAR-100 weights).
    """
    from xdsl.contrastive import CRD

    return CRD(_numel(t), _numel(s), int(feat_dim), int(nce_k), float(nce_t), float(nce_m))
