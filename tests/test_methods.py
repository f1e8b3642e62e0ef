"""The seeds' methods as specs: every generated objective equals the method's formula written in PyTorch.

KD (seed 001), DML cohorts / DML_e / update order (seed 002), BYOT (seed 003), Born-Again with CWTM
and DKPP (seed 004), FitNets hints and attention transfer; multi-stage specs (`after`) continue from
the previous block's final weights; every macro expands to core text that re-parses and checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xdsl
from xdsl import losses
from xdsl.adapters import make_adapter
from xdsl.errors import SpecError
from xdsl.experiment import compile_program
from xdsl.lang.check import check
from xdsl.lang.format import format_spec
from xdsl.lang.macros import expand_macros
from xdsl.lang.parser import parse, parse_file
from xdsl.train.runner import RunOptions, run

SPECS = Path(__file__).resolve().parent.parent / "specs"
METHOD_SPECS = [
    "kd_digits", "kd_wrn_resnet32_cifar100",
    "byot_digits", "byot_resnet18_cifar100",
    "born_again_digits", "born_again_wrn_cifar100",
    "dml_variants_digits", "dml_variants_resnet32_wrn_cifar100",
    "dml_flatness_entropy_digits", "dml_flatness_entropy_resnet32_cifar100",
    "fitnets_at_digits", "fitnets_at_resnet56_resnet20_cifar100",
]

DATA = "data synthetic(num_classes=10, shape=[1, 8, 8], train_size=64, test_size=32, batch_size=16)\n"


def _write(tmp_path: Path, text: str, name: str = "spec.xspec") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _kl(t: torch.Tensor, s: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), summed over classes, batch mean; t is a fixed target."""
    p = torch.softmax(t.detach() / T, -1)
    return (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T


def _chain(parts: dict, names: list[str], x: torch.Tensor) -> torch.Tensor:
    for n in names:
        x = parts[n](x)
    return x


# ------------------------------------------------------------------------------------------ KD


KD = DATA + """network teacher = builtin.cnn(num_classes=10, in_channels=1, width=16)
network student = builtin.cnn(num_classes=10, in_channels=1, width=4)
train pretrain {
    minimize ce(teacher, y) wrt teacher
    optimizer adam(lr=1e-2)
}
kd(teacher, student, after=pretrain, T=3.0, alpha=0.7, optimizer=adam(lr=1e-3))
"""


def test_kd_after_pretrain_is_hinton_with_a_frozen_teacher(tmp_path):
    exp = xdsl.load(_write(tmp_path, KD))
    exp.use_stage("kd")
    assert exp.stage.after == "pretrain" and exp.stage.trained == ("student",)
    assert not any(p.requires_grad for p in exp.networks["teacher"].parameters())
    x, y = _batch()
    t, s = exp.networks["teacher"](x), exp.networks["student"](x)
    expected = 0.7 * _kl(t, s, 3.0) + 0.3 * F.cross_entropy(s, y)
    # alpha * T^2 * KL written out once more, without the helper
    p_t, logp_s = torch.softmax(t / 3.0, -1), torch.log_softmax(s / 3.0, -1)
    by_hand = 0.7 * 9.0 * (p_t * (p_t.log() - logp_s)).sum(-1).mean() + 0.3 * F.cross_entropy(s, y)
    got = exp.objectives(x, y)
    assert list(got) == ["student"]
    torch.testing.assert_close(got["student"], expected)
    torch.testing.assert_close(got["student"], by_hand)


def test_kd_teacher_loaded_with_weights_is_the_saved_network(tmp_path):
    torch.manual_seed(1)
    trained = xdsl.load(_write(tmp_path, KD, "first.xspec"))
    torch.save(trained.networks["teacher"].state_dict(), tmp_path / "teacher.pt")
    text = KD.replace("builtin.cnn(num_classes=10, in_channels=1, width=16)",
                      'builtin.cnn(num_classes=10, in_channels=1, width=16) weights "teacher.pt"')
    text = text.split("train pretrain")[0] + "kd(teacher, student, T=3.0, alpha=0.7)\n"
    torch.manual_seed(2)  # a different initialisation: the file must decide the teacher's weights
    exp = xdsl.load(_write(tmp_path, text, "loaded.xspec"))
    x, _ = _batch()
    exp.set_train_mode(False)
    trained.networks["teacher"].eval()
    torch.testing.assert_close(exp.networks["teacher"](x), trained.networks["teacher"](x))
    assert exp.stage.trained == ("student",)


# ------------------------------------------------------------------------------------------ DML


COHORT = DATA + "network a, b, c = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"


def test_dml_cohort_of_three_mimics_each_peer_and_dml_e_the_peers_ensemble(tmp_path):
    """The DML paper's Eq. 10 (CE + 1/(K-1) sum KL) by default, the XML code's 0.5/0.5 form with
    weighting="half"; DML_e (Eq. 11) with the peers' averaged softmax or their averaged logits."""
    text = COHORT + ('dml(a, b, c)\ndml(a, b, c, teacher="ensemble", name=dml_e)\n'
                     'dml(a, b, c, teacher="ensemble_logits", name=dml_el)\n'
                     'dml(a, b, c, weighting="half", name=half)\n')
    exp = xdsl.load(_write(tmp_path, text))
    x, y = _batch()
    nets = ("a", "b", "c")
    for stage in ("dml", "dml_e", "dml_el", "half"):
        exp.use_stage(stage)
        got = exp.objectives(x, y)
        logits = {n: exp.networks[n](x) for n in nets}
        for s in nets:
            peers = [t for t in nets if t != s]
            ce = F.cross_entropy(logits[s], y)
            log_q = torch.log_softmax(logits[s], -1)
            if stage in ("dml", "half"):
                mimic = sum(_kl(logits[t], logits[s]) for t in peers) / (len(nets) - 1)
            elif stage == "dml_e":
                p = torch.stack([torch.softmax(logits[t], -1) for t in peers]).mean(0)
                mimic = (p * (p.log() - log_q)).sum(-1).mean()
            else:
                p = torch.softmax(torch.stack([logits[t] for t in peers]).mean(0), -1)
                mimic = (p * (p.log() - log_q)).sum(-1).mean()
            expected = 0.5 * ce + 0.5 * mimic if stage == "half" else ce + mimic
            torch.testing.assert_close(got[s], expected, msg=f"{stage}/{s}")


def test_dml_e_with_averaged_logits_has_a_gradient_other_than_dml(tmp_path):
    """Only the logit-averaged ensemble can make DML_e train differently from DML (the paper's Fig. 4)."""
    exp = xdsl.load(_write(tmp_path, COHORT + 'dml(a, b, c)\ndml(a, b, c, teacher="ensemble_logits", name=e)\n'))
    x, y = _batch()
    grads = {}
    for stage in ("dml", "e"):
        exp.use_stage(stage)
        grads[stage] = torch.autograd.grad(exp.objectives(x, y)["a"], exp.owned_params("a"))
    assert any(not torch.allclose(g, h) for g, h in zip(grads["dml"], grads["e"]))


def test_dml_weights_show_in_the_expanded_spec():
    text = COHORT + 'dml(a, b)\ndml(a, b, weighting="half", name=h)\n'
    out = " ".join(format_spec(expand_macros(parse(text))).split())
    assert "loss dml(s, T) = ce(s, y) + mean(kl(t, s) for t in T)" in out
    assert "loss h(s, T) = 0.5 * ce(s, y) + 0.5 * mean(kl(t, s) for t in T)" in out
    with pytest.raises(SpecError, match="weighting"):
        expand_macros(parse(COHORT + 'dml(a, b, weighting="third")\n'))


@pytest.mark.parametrize("order", ["alternating", "simultaneous", "round_robin"])
def test_dml_order_passes_through_the_macro(tmp_path, order):
    exp = xdsl.load(_write(tmp_path, COHORT + f"dml(a, b, order={order}, epochs=3)\n"))
    assert exp.stage.order == order and exp.stage.epochs == 3
    assert (exp._joint is not None) == (order == "simultaneous")


# ------------------------------------------------------------------------------------------ BYOT


BYOT = DATA + """network net = builtin.cnn(num_classes=10, in_channels=1, width=8)
cut net at "layer1", "layer2", "pool" into s1, s2, s3, fc
byot(net, T=3.0, alpha=0.3, beta=0.01, optimizer=adam(lr=1e-3))
evaluate accuracy(net.s1 >> net_neck1 >> net_fc1, net.s2 >> net_neck2 >> net_fc2, net),
         ensemble(net.s1 >> net_neck1 >> net_fc1, net.s2 >> net_neck2 >> net_fc2, net)
"""


def test_byot_objective_is_ce_on_every_classifier_plus_kl_and_feature_hints(tmp_path):
    exp = xdsl.load(_write(tmp_path, BYOT))
    assert {a: (d.kind, d.owner) for a, d in exp.program.adapters.items()} == {
        "net_neck1": ("bottleneck", "net"), "net_fc1": ("classifier", "net"),
        "net_neck2": ("bottleneck", "net"), "net_fc2": ("classifier", "net")}
    x, y = _batch()
    parts, ad = exp.parts["net"], exp.adapters
    f1, f2 = _chain(parts, ["s1"], x), _chain(parts, ["s1", "s2"], x)
    deepest = parts["s3"](f2)
    logits = parts["fc"](deepest)
    feats = [ad["net_neck1"](f1), ad["net_neck2"](f2)]
    heads = [ad["net_fc1"](feats[0]), ad["net_fc2"](feats[1])]
    assert feats[0].shape == deepest.shape == (16, 32)  # the bottleneck matches the deepest features
    expected = F.cross_entropy(logits, y)
    for feat, head in zip(feats, heads):
        p_t, logp = torch.softmax(logits.detach() / 3.0, -1), torch.log_softmax(head / 3.0, -1)
        kl_no_t2 = (p_t * (p_t.log() - logp)).sum(-1).mean()  # BYOT's soft loss has no T^2 factor
        expected = expected + 0.7 * F.cross_entropy(head, y) + 0.3 * kl_no_t2
        expected = expected + 0.01 * (feat - deepest.detach()).pow(2).sum(1).mean()
    torch.testing.assert_close(exp.objectives(x, y)["net"], expected)


def test_byot_targets_are_detached_and_the_hint_trains_the_heads_bottleneck(tmp_path):
    """Only the heads' terms reach the heads; the deepest classifier gets only its own CE."""
    exp = xdsl.load(_write(tmp_path, BYOT))
    x, y = _batch()
    fc = exp.networks["net"].fc  # the same Parameters as the part `fc`
    loss = exp.objectives(x, y)["net"]
    grads = torch.autograd.grad(loss, [fc.weight, *exp.adapters["net_neck1"].parameters()])
    logits = exp.forward("net", x)
    (own,) = torch.autograd.grad(F.cross_entropy(logits, y), [fc.weight])
    torch.testing.assert_close(grads[0], own)  # kl and l2 send nothing into the teacher side
    assert all(g.abs().sum() > 0 for g in grads[1:])


def test_byot_heads_and_their_ensemble_are_evaluated(tmp_path):
    from xdsl.data import build_data
    from xdsl.eval.evaluate import evaluate_program, find_items

    exp = xdsl.load(_write(tmp_path, BYOT))
    bundle = build_data(exp.program.data.name, exp.program.data.kwargs)
    res = evaluate_program(exp, bundle.test_loader())
    (acc,) = find_items(res, "accuracy")
    assert [r["label"] for r in acc["rows"]] == ["net.s1 >> net_neck1 >> net_fc1",
                                                 "net.s1 >> net.s2 >> net_neck2 >> net_fc2", "net"]
    assert all(r["status"] == "ok" and 0.0 <= r["accuracy"] <= 1.0 for r in acc["rows"])
    (ens,) = find_items(res, "ensemble")
    assert ens["status"] == "ok" and len(ens["members"]) == 3


def test_byot_needs_a_network_cut_into_three_parts():
    text = "network net = builtin.cnn()\ncut net at \"layer2\" into up, down\nbyot(net)\n"
    with pytest.raises(SpecError) as info:
        check(parse(text))
    assert "at least 3 parts" in info.value.message and "cut net at" in info.value.hint
    with pytest.raises(SpecError, match="is not cut"):
        check(parse("network net = builtin.cnn()\nbyot(net)\n"))


def test_byot_without_hints_has_no_l2_terms():
    program = check(parse(BYOT.replace("beta=0.01", "beta=0")))
    assert "l2(" not in str(program.stages[0].objectives["net"])
    assert "kl(" in str(program.stages[0].objectives["net"])


def test_bottleneck_and_classifier_adapters_fit_what_follows():
    neck = make_adapter("bottleneck", {}, (2, 16, 8, 8), (2, 64, 2, 2), None)
    assert neck(torch.randn(2, 16, 8, 8)).shape == (2, 64, 2, 2)
    flat = make_adapter("bottleneck", {"reduction": 2}, (2, 16, 8, 8), (2, 32), None)
    assert flat(torch.randn(2, 16, 8, 8)).shape == (2, 32)
    assert make_adapter("classifier", {}, (2, 64, 2, 2), None, 7)(torch.randn(2, 64, 2, 2)).shape == (2, 7)
    assert make_adapter("classifier", {}, (2, 32), None, 7)(torch.randn(2, 32)).shape == (2, 7)


# ------------------------------------------------------------------------------------------ Born-Again


BAN = DATA + "network g0, g1, g2 = builtin.cnn(num_classes=10, in_channels=1, width=4)\n"


def _ban(tmp_path, variant: str, **extra: str):
    args = "".join(f", {k}={v}" for k, v in extra.items())
    exp = xdsl.load(_write(tmp_path, BAN + f'born_again(g0, g1, g2, variant="{variant}"{args})\n'))
    assert [s.name for s in exp.program.stages] == ["gen0", "gen1", "gen2"]
    assert [s.after for s in exp.program.stages] == [None, "gen0", "gen1"]
    assert [s.trained for s in exp.program.stages] == [("g0",), ("g1",), ("g2",)]
    exp.use_stage("gen1")
    assert not any(p.requires_grad for p in exp.networks["g0"].parameters())
    return exp


def test_born_again_kd_and_ban_variants(tmp_path):
    x, y = _batch()
    for variant, with_labels in (("kd", True), ("ban", False)):
        exp = _ban(tmp_path, variant, T=2.0)
        t, s = exp.networks["g0"](x), exp.networks["g1"](x)
        expected = _kl(t, s, 2.0) + (F.cross_entropy(s, y) if with_labels else 0.0)
        torch.testing.assert_close(exp.objectives(x, y)["g1"], expected, msg=variant)
        exp.use_stage("gen0")
        torch.testing.assert_close(exp.objectives(x, y)["g0"], F.cross_entropy(exp.networks["g0"](x), y))


def test_born_again_cwtm_weights_each_sample_by_the_teachers_confidence(tmp_path):
    exp = _ban(tmp_path, "cwtm")
    x, y = _batch()
    t, s = exp.networks["g0"](x), exp.networks["g1"](x)
    conf = torch.softmax(t, -1).max(-1).values
    expected = sum(conf[i] / conf.sum() * F.cross_entropy(s[i:i + 1], y[i:i + 1]) for i in range(len(y)))
    torch.testing.assert_close(exp.objectives(x, y)["g1"], expected)


def _permuted(q: torch.Tensor, keys: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """DKPP's target written row by row (the Born-Again paper's Eq. 11): the teacher's maximum goes to the
    true label (to the argmax when y is None); the other values, in index order of the teacher's output
    with the maximum and the label's entry swapped, go to the other positions in the order of their keys."""
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        row = q[r].clone()
        top = int(row.argmax())
        keep = top if y is None else int(y[r])
        row[top], row[keep] = q[r, keep], q[r, top]
        others = [k for k in range(q.shape[1]) if k != keep]
        by_key = sorted(others, key=lambda k: float(keys[r, k]))
        out[r, keep] = row[keep]
        for src, dst in zip(others, by_key):
            out[r, dst] = row[src]
    return out


def test_born_again_dkpp_puts_the_teachers_max_on_the_true_label_and_permutes_the_rest(tmp_path):
    exp = _ban(tmp_path, "dkpp")
    x, y = _batch()
    t, s = exp.networks["g0"](x), exp.networks["g1"](x)
    q = torch.softmax(t, -1)
    assert (q.argmax(-1) != y).any()  # the batch has samples the teacher gets wrong
    torch.manual_seed(123)
    got = exp.objectives(x, y)["g1"]
    torch.manual_seed(123)
    keys = torch.rand_like(q)  # the only random draw of the objective: one key per class and sample
    target = _permuted(q, keys, y)
    expected = -(target * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(got, expected)
    # properties: a permutation of each row whose maximum sits at the label, a different one per call
    assert torch.equal(target.sort(-1).values, q.sort(-1).values)
    assert torch.equal(target.argmax(-1), y)
    unpermuted = -(q * torch.log_softmax(s, -1)).sum(-1).mean()
    assert not torch.isclose(got, unpermuted)
    draws = {exp.objectives(x, y)["g1"].item() for _ in range(5)}
    assert len(draws) > 1


def test_dkpp_at_label_false_keeps_the_teachers_argmax():
    g = torch.Generator().manual_seed(4)
    t, s = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    q = torch.softmax(t, -1)
    torch.manual_seed(5)
    got = losses.dkpp(t, s, y, at_label=False)
    torch.manual_seed(5)
    target = _permuted(q, torch.rand_like(q))
    torch.testing.assert_close(got, -(target * torch.log_softmax(s, -1)).sum(-1).mean())


def test_born_again_dkpp_equals_soft_ce_when_the_dark_knowledge_is_uniform(tmp_path):
    """With all non-argmax teacher probabilities equal, every permutation gives the same target:
    the teacher's maximum at the label, the equal rest elsewhere."""
    exp = _ban(tmp_path, "dkpp")
    fc = exp.networks["g0"].fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([0.0, 3.0] + [0.0] * 8))  # fixed teacher logits for every input
    x, y = _batch()
    low, high = torch.softmax(fc.bias, -1)[[0, 1]]
    q = torch.full((16, 10), float(low)).scatter(1, y[:, None], float(high))
    s = exp.networks["g1"](x)
    expected = -(q * torch.log_softmax(s, -1)).sum(-1).mean()
    for _ in range(3):
        torch.testing.assert_close(exp.objectives(x, y)["g1"], expected)


def test_born_again_after_an_earlier_teacher_and_errors(tmp_path):
    text = BAN + "train teacher { minimize ce(g0, y) wrt g0 }\n" \
                 'born_again(g0, g1, variant="cwtm", after=teacher, name=cw)\n'
    program = check(parse(text))
    assert [(s.name, s.after, s.trained) for s in program.stages] == [
        ("teacher", None, ("g0",)), ("cw1", "teacher", ("g1",))]
    with pytest.raises(SpecError) as info:
        check(parse(BAN + 'born_again(g0, g1, variant="cwmt")\n'))
    assert "unknown variant" in info.value.message and "cwtm" in info.value.hint


def test_born_again_generations_start_from_the_previous_blocks_final_weights(tmp_path):
    """`after`: gen1 loads gen0's final weights, so its frozen teacher g0 is gen0's trained g0."""
    spec = _write(tmp_path, BAN + "born_again(g0, g1, g2, optimizer=adam(lr=1e-2))\nevaluate accuracy\n")
    out = tmp_path / "run"
    torch.manual_seed(0)
    run(spec, RunOptions(out=out, quiet=True, epochs=1, device="cpu"))

    def final(block: str) -> dict[str, torch.Tensor]:
        return torch.load(out / "checkpoints" / block / "final.pt", weights_only=True)["modules"]

    gen0, gen1, gen2 = final("gen0"), final("gen1"), final("gen2")

    def of(state: dict, net: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k.startswith(f"parts.{net}.")}

    assert of(gen0, "g0") and of(gen1, "g0").keys() == of(gen0, "g0").keys()
    for key, value in of(gen0, "g0").items():
        assert torch.equal(gen1[key], value), key  # the teacher of gen1 is gen0's final g0, untouched
        assert torch.equal(gen2[key], value), key
    for key, value in of(gen1, "g1").items():
        assert torch.equal(gen2[key], value), key  # gen2's teacher is gen1's final g1
    changed = [k for k, v in of(gen1, "g1").items() if v.is_floating_point() and not torch.equal(v, gen0[k])]
    assert changed  # gen1 trained g1 (from the weights g1 had in gen0's checkpoint)


# ------------------------------------------------------------------------------------------ FitNets / AT


FEATURES = DATA + """network teacher = builtin.cnn(num_classes=10, in_channels=1, width=16)
network student = builtin.cnn(num_classes=10, in_channels=1, width=4)
cut teacher, student at "layer1", "layer2" into g1, g2, head
adapter reg = regressor(kernel=3, bn=true) owner student
train fitnets { minimize ce(student, y) + 100 * hint(student.g2 >> reg, teacher.g2) wrt student }
train attention {
    minimize ce(student, y) + 500 * (at(student.g1, teacher.g1) + at(student.g2, teacher.g2)) wrt student
}
"""


def _attention_map(f: torch.Tensor) -> torch.Tensor:
    a = f.pow(2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def test_fitnets_hint_through_a_regressor_and_attention_transfer_between_networks(tmp_path):
    exp = xdsl.load(_write(tmp_path, FEATURES))
    x, y = _batch()
    reg = exp.adapters["reg"]
    assert (reg[0].in_channels, reg[0].out_channels) == (8, 32)  # student stage 2 -> teacher stage 2
    assert exp.program.adapters["reg"].owner == "student"
    t, s = exp.parts["teacher"], exp.parts["student"]
    t1, s1 = t["g1"](x), s["g1"](x)
    t2, s2 = t["g2"](t1), s["g2"](s1)
    logits = s["head"](s2)
    hint = ((reg(s2) - t2) ** 2).mean()
    torch.testing.assert_close(exp.objectives(x, y)["student"], F.cross_entropy(logits, y) + 100 * hint)
    exp.use_stage("attention")
    at = sum(((_attention_map(a) - _attention_map(b)) ** 2).mean() for a, b in ((s1, t1), (s2, t2)))
    torch.testing.assert_close(exp.objectives(x, y)["student"], F.cross_entropy(logits, y) + 500 * at)
    assert not any(p.requires_grad for p in exp.networks["teacher"].parameters())


# ------------------------------------------------------------------------------------------ specs, macros


@pytest.mark.parametrize("name", METHOD_SPECS)
def test_method_spec_expands_to_core_text_that_reparses_and_checks(name):
    spec = parse_file(SPECS / f"{name}.xspec")
    expanded = expand_macros(spec)
    text = format_spec(expanded)
    again = parse(text)
    assert again == expanded
    assert not any(type(s).__name__ == "MacroCall" for s in again.statements)
    def stages(program):
        return [(s.name, s.after, s.objectives, s.epochs, s.order, s.optimizer.name, s.optimizer.kwargs)
                for s in program.stages]

    assert stages(check(again)) == stages(check(spec))


@pytest.mark.parametrize("name", METHOD_SPECS)
def test_method_spec_compiles_on_the_meta_device(name):
    compiled = compile_program(SPECS / f"{name}.xspec", device="meta")
    assert compiled.program.stages and compiled.num_classes in (10, 100)


@pytest.mark.parametrize("call", [
    "kd(t, s, after=pre, T=2, alpha=0.5, epochs=3)",
    'kd(t, s, after="pre")',
    'dml(s, t, u, teacher="ensemble", order=simultaneous)',
    "independent(s, t, u)",
    "byot(n, T=3, alpha=0.3, beta=1e-6, reduction=2, epochs=2)",
    'born_again(s, t, u, variant="ban", T=4)',
    'born_again(s, t, variant="dkpp", after=pre, name=dk)',
    'dml(s, t, after=pre, weighting="half", teacher="ensemble_logits")',
    "independent(s, t, after=pre)",
    "xml(s, t, after=pre)",
])
def test_every_macro_expansion_is_a_spec_that_checks(call):
    text = DATA + """network s, t, u = builtin.cnn(num_classes=10, in_channels=1, width=4)
network n = builtin.cnn(num_classes=10, in_channels=1, width=4)
cut n at "layer1", "layer2", "pool" into a, b, c, d
cut s, t at "layer2" into up, down
train pre { minimize ce(t, y) wrt t }
""" + call + "\n"
    expanded = expand_macros(parse(text))
    reparsed = parse(format_spec(expanded))
    assert reparsed == expanded
    program = check(reparsed)
    assert program.stages[-1].objectives and program.stages[0].name == "pre"
    if "after=" in call:
        assert program.stages[-1].after == "pre"


def test_dml_e_has_the_gradient_of_dml_so_the_two_train_identically(tmp_path):
    """KL(mean_t p_t || p_s) and mean_t KL(p_t || p_s) differ by a term constant in s (the peers' entropies):
    the paper's DML_e (its Eq. 11, the peers' averaged probabilities as the teacher) updates exactly like DML."""
    exp = xdsl.load(_write(tmp_path, COHORT + 'dml(a, b, c)\ndml(a, b, c, teacher="ensemble", name=dml_e)\n'))
    x, y = _batch()
    out = {}
    for stage in ("dml", "dml_e"):
        exp.use_stage(stage)
        loss = exp.objectives(x, y)["a"]
        out[stage] = (loss.detach(), torch.autograd.grad(loss, exp.owned_params("a")))
    assert not torch.isclose(out["dml"][0], out["dml_e"][0])
    for g, h in zip(out["dml"][1], out["dml_e"][1]):
        torch.testing.assert_close(g, h)


# ------------------------------------------------------------------------------------------ relation losses
# The primitives behind methods of torchdistill's / mdistiller's lists, against their reference code's form.


def _feat_pair(seed: int, s_shape=(6, 4, 4, 4), t_shape=(6, 8, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*s_shape, generator=g, requires_grad=True), torch.randn(*t_shape, generator=g,
                                                                                 requires_grad=True)


def _sp_reference(f_s, f_t):
    b = f_s.shape[0]
    g_s = F.normalize(torch.mm(f_s.view(b, -1), f_s.view(b, -1).t()))
    g_t = F.normalize(torch.mm(f_t.view(b, -1), f_t.view(b, -1).t()))
    return ((g_t - g_s) * (g_t - g_s)).view(-1, 1).sum(0)[0] / (b * b)


def _pkt_reference(s, t, eps=1e-7):
    s = s / (torch.sqrt((s**2).sum(1, keepdim=True)) + eps)
    t = t / (torch.sqrt((t**2).sum(1, keepdim=True)) + eps)
    ms, mt = (s @ s.t() + 1.0) / 2.0, (t @ t.t() + 1.0) / 2.0
    ms, mt = ms / ms.sum(1, keepdim=True), mt / mt.sum(1, keepdim=True)
    return torch.mean(mt * torch.log((mt + eps) / (ms + eps)))


def _pdist_reference(e, eps=1e-12):
    sq = e.pow(2).sum(1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def _rkd_reference(s, t):
    t_d = _pdist_reference(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = _pdist_reference(s)
    d = d / d[d > 0].mean()
    td = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), p=2, dim=2)
    sd = F.normalize(s.unsqueeze(0) - s.unsqueeze(1), p=2, dim=2)
    t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return 25 * F.smooth_l1_loss(d, t_d) + 50 * F.smooth_l1_loss(s_angle, t_angle)


def _nst_reference(f_s, f_t):
    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return poly(f_t, f_t).mean() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()


def _dist_reference(z_s, z_t, beta, gamma, tau):
    def pearson_gap(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()

    y_s, y_t = (z_s / tau).softmax(1), (z_t / tau).softmax(1)
    return tau**2 * (beta * pearson_gap(y_s, y_t) + gamma * pearson_gap(y_s.t(), y_t.t()))


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "nst"])
def test_relation_feature_losses_match_their_reference_form_and_detach_the_teacher(name):
    s, t = _feat_pair(0)
    if name in ("pkt", "rkd"):  # applied to pooled (B, D) features
        s, t = (torch.randn(6, 16, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in (1, 2))
    ref = {"sp": _sp_reference, "pkt": _pkt_reference, "rkd": _rkd_reference, "nst": _nst_reference}[name]
    value = getattr(losses, name)(s, t)
    torch.testing.assert_close(value, ref(s, t.detach()))
    value.backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dist_matches_its_reference_form():
    g = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    expected = _dist_reference(z_s, z_t, 2.0, 0.5, 4.0)
    torch.testing.assert_close(losses.dist(z_t, z_s, beta=2.0, gamma=0.5, T=4.0), expected)
    assert float(losses.dist(z_s, z_s)) == pytest.approx(0.0, abs=1e-6)


def test_relation_losses_are_one_line_of_a_spec(tmp_path):
    text = FEATURES.split("train fitnets")[0] + (
        "train relations { minimize ce(student, y) + 3000 * sp(student.g2, teacher.g2) + 50 * nst(student.g2, "
        "teacher.g2) + rkd(student.g1, teacher.g1) + 30000 * pkt(student.g1, teacher.g1) "
        "+ dist(teacher, student, beta=2, gamma=2) wrt student }\n")
    exp = xdsl.load(_write(tmp_path, text))
    x, y = _batch()
    t, s = exp.parts["teacher"], exp.parts["student"]
    t1, s1 = t["g1"](x), s["g1"](x)
    t2, s2 = t["g2"](t1), s["g2"](s1)
    zt, zs = t["head"](t2), s["head"](s2)
    expected = (F.cross_entropy(zs, y) + 3000 * losses.sp(s2, t2) + 50 * losses.nst(s2, t2) + losses.rkd(s1, t1)
                + 30000 * losses.pkt(s1, t1) + losses.dist(zt, zs, beta=2.0, gamma=2.0))
    torch.testing.assert_close(exp.objectives(x, y)["student"], expected)
