"""Macros: `dml(...)`, `xml(...)`, `kd(...)`, ... replaced by the core statements they stand for.

A macro is a function from its call to spec text; the text is parsed like any spec, so
`xdsl expand` output is itself a valid spec. Adding a method is one function plus `@macro`.

    independent(a, b, ...)                      CE only, one block (every table's baseline)
    dml(a, b, ..., teacher=, weighting=)        Deep Mutual Learning, cohorts of N; DML_e
    xml(a, b, ...)                              Xross Mutual Learning (networks cut into up, down)
    kd(teacher, student, T=4, alpha=0.9)        Hinton KD with a frozen teacher
    byot(net, T=3, alpha=0.3, beta=1e-6)        Be Your Own Teacher (network cut into stages)
    born_again(g0, g1, ..., variant="kd")       Born-Again generations (kd | ban | cwtm | dkpp)

Every macro also takes the train settings (epochs, optimizer, order, schedule, ...), `name`, and
`after=B`: start from block B's final weights (born_again: B trained generation 0).

    xml(net1, net2, epochs=200, optimizer=adam(lr=1e-4))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from xdsl.errors import Pos, SpecError
from xdsl.lang import ast
from xdsl.lang.format import format_expr
from xdsl.lang.settings import TRAIN_KEYS
from xdsl.registry import Registry, did_you_mean

__all__ = ["MACROS", "macro", "expand_macros"]

MACROS: Registry[Callable[[ast.MacroCall, dict[str, str]], str]] = Registry("macro")

# the train-block settings every training macro passes through unchanged (the one table of them)
_TRAIN_KEYS = TRAIN_KEYS


def macro(*params: str, needs_spec: bool = False):
    """Register a macro taking networks positionally and the given keyword parameters.

    With `needs_spec` the macro is also given the statements before it (e.g. `byot` reads the cut).
    """

    def register(fn):
        fn.params = params + _TRAIN_KEYS + ("name", "after")
        fn.needs_spec = needs_spec
        MACROS.register(fn.__name__.rstrip("_"), fn)
        return fn

    return register


def _after(kw: dict[str, str]) -> str:
    """` after B` for a block continuing from block B's final weights (`after=B` on any macro), else ''."""
    return f" after {kw['after']}" if "after" in kw else ""


def _train_settings(kw: dict[str, str]) -> str:
    return "\n".join(f"    {k} {kw[k]}" for k in _TRAIN_KEYS if k in kw)


def _networks(call: ast.MacroCall, at_least: int) -> list[str]:
    nets = []
    for a in call.args:
        if not isinstance(a, ast.Name):
            raise SpecError(f"{call.name}(): positional arguments are network names", a.pos)
        nets.append(a.id)
    if len(nets) < at_least:
        raise SpecError(f"{call.name}() needs at least {at_least} network(s), got {len(nets)}", call.pos)
    return nets


@macro()
def independent(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Each network trained alone with cross-entropy: the baseline of every seed table."""
    nets = _networks(call, 1)
    name = kw.get("name", "independent")
    return f"""train {name}{_after(kw)} {{
    minimize ce(s, y) wrt s for s in [{', '.join(nets)}]
{_train_settings(kw)}
}}"""


_DML_WEIGHTS = {
    "paper": ("ce(s, y) + {mimic}", "the DML paper's Eq. 10: CE + 1/(K-1) sum of KLs"),
    "half": ("0.5 * ce(s, y) + 0.5 * {mimic}", "the XML code's form: 0.5 CE + 0.5 mean KL"),
}
_DML_TEACHERS = {
    "peers": "mean(kl(t, s) for t in T)",                # each peer a teacher (Eq. 10)
    "ensemble": "kl(ensemble(T), s)",                    # DML_e, the peers' averaged softmax (Eq. 11)
    "ensemble_logits": "kl(ensemble(T, by=logits), s)",  # DML_e, the peers' averaged logits
}


@macro("teacher", "weighting")
def dml(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Deep Mutual Learning: weighting="paper" (default) is the DML paper's objective CE + 1/(K-1) sum_t KL(p_t || p_s).

    weighting="half" is 0.5 CE + 0.5 mean KL, the form of the XML code (its DML baseline); under SGD it
    halves the effective learning rate against `independent`, so it is used only where the XML
    experiments use it. `xdsl expand` prints the loss line either way.

    teacher="ensemble" gives DML_e as the paper's Eq. 11 writes it: the peers' averaged softmax is the single
    teacher. mean_t KL(p_t || p_s) - KL(mean_t p_t || p_s) = H(mean_t p_t) - mean_t H(p_t) does not depend on s,
    so this DML_e has exactly DML's gradient and trains identically (tested); only the loss value differs.
    teacher="ensemble_logits" averages the peers' logits instead: a sharper target, the one under which the
    paper's observation (DML_e worse than DML, its target more peaked on the true class) can appear.
    """
    nets = _networks(call, 2)
    name = kw.get("name", "dml")
    teacher = kw.get("teacher", '"peers"').strip('"')
    weighting = kw.get("weighting", '"paper"').strip('"')
    if teacher not in _DML_TEACHERS:
        raise SpecError(f"dml(): teacher is {', '.join(map(repr, _DML_TEACHERS))}, got {teacher!r}", call.pos)
    if weighting not in _DML_WEIGHTS:
        raise SpecError(f"dml(): weighting is {' or '.join(map(repr, _DML_WEIGHTS))}, got {weighting!r}", call.pos,
                        "; ".join(f'"{k}": {doc}' for k, (_, doc) in _DML_WEIGHTS.items()))
    body = _DML_WEIGHTS[weighting][0].format(mimic=_DML_TEACHERS[teacher])
    return f"""loss {name}(s, T) = {body}
train {name}{_after(kw)} {{
    minimize {name}(s, peers(s)) wrt s for s in [{', '.join(nets)}]
{_train_settings(kw)}
}}"""


@macro(needs_spec=True)
def xml(call: ast.MacroCall, kw: dict[str, str], spec: ast.Spec) -> str:
    """Xross Mutual Learning (the XML paper): (DML terms + up-mimic + down-mimic) / (2 K), K = len(peers).

    The networks must be cut alike (same part names). With parts `up, down` this is the XML paper's
    formula; with P parts every path mixing s's and a peer's parts (2^P - 2 of them) gets a CE
    and a KL-to-the-peer term, normalised by (2^P - 2) K (the XML paper's "Multiple Xross").
    """
    nets = _networks(call, 2)
    name = kw.get("name", "xml")
    parts = {net: _cut_parts(spec, net, call) for net in nets}
    first = parts[nets[0]]
    if first is None or any(p != first for p in parts.values()):
        uncut = [n for n, p in parts.items() if p is None]
        raise SpecError("xml() needs its networks cut alike (same part names) above it; "
                        + (f"'{uncut[0]}' is not cut" if uncut else
                           "; ".join(f"{n}: {', '.join(p)}" for n, p in parts.items())), call.pos,
                        f'e.g. cut {", ".join(nets)} at "layer2" into up, down')
    if first == ("up", "down"):
        body = """    ( ce(s, y)
    + mean(kl(t, s) for t in T)
    + sum(kl(t, s.up >> t.down) for t in T)
    + sum(kl(t, t.up >> s.down) for t in T)
    + sum(ce(s.up >> t.down, y) for t in T)
    + sum(ce(t.up >> s.down, y) for t in T)
    ) / (2 * len(T))"""
    else:
        mixed = [" >> ".join(f"{'s' if mask >> i & 1 else 't'}.{part}" for i, part in enumerate(first))
                 for mask in range(1, 2 ** len(first) - 1)]
        kls = " + ".join(f"kl(t, {m})" for m in mixed)
        ces = " + ".join(f"ce({m}, y)" for m in mixed)
        body = f"""    ( ce(s, y)
    + mean(kl(t, s) for t in T)
    + sum({kls} for t in T)
    + sum({ces} for t in T)
    ) / ({len(mixed)} * len(T))"""
    return f"""loss {name}(s, T) =
{body}
train {name}{_after(kw)} {{
    minimize {name}(s, peers(s)) wrt s for s in [{', '.join(nets)}]
{_train_settings(kw)}
}}"""


@macro("T", "alpha")
def kd(call: ast.MacroCall, kw: dict[str, str]) -> str:
    """Hinton KD (the KD paper): kd(teacher, student): alpha T^2 KL(teacher || student) + (1 - alpha) CE.

    The teacher is frozen (no objective minimises it): loaded with `weights "..."`, or trained by an
    earlier block named by `after=` (whose final weights of every module this block starts from).
    """
    numbers = call.args[2:]  # kd(teacher, student, T, alpha) as the README writes it
    if len(numbers) > 2 or any(not isinstance(a, ast.Number | ast.Neg) for a in numbers):
        raise SpecError("kd() takes teacher, student, then optionally T and alpha", call.pos)
    for key, value in zip(("T", "alpha"), numbers):
        if key in kw:
            raise SpecError(f"kd(): {key} given twice", call.pos)
        kw[key] = format_expr(value)
    nets = _networks(dataclasses.replace(call, args=call.args[:2]), 2)
    teacher, student = nets
    name = kw.get("name", "kd")
    return f"""train {name}{_after(kw)} {{
    minimize kd({teacher}, {student}, y, T={kw.get('T', '4.0')}, alpha={kw.get('alpha', '0.9')}) wrt {student}
{_train_settings(kw)}
}}"""


def _cut_parts(spec: ast.Spec, net: str, before: ast.MacroCall) -> tuple[str, ...] | None:
    """The part names of `net` as cut by a `cut` statement above the macro call (None if it is not cut)."""
    for st in spec.statements:
        if st is before:
            break
        if isinstance(st, ast.Cut) and net in st.networks:
            return tuple(st.parts)
    return None


_BYOT_HEADS = ("bottleneck", "sepconv")


@macro("T", "alpha", "beta", "reduction", "head", needs_spec=True)
def byot(call: ast.MacroCall, kw: dict[str, str], spec: ast.Spec) -> str:
    """Be Your Own Teacher (the BYOT paper): self-distillation of one network cut into stages.

    The network must be cut into parts p1 .. pn (n >= 3): a head is attached after each of p1 .. p(n-2),
    p(n-1) ends with the deepest features and pn is the classifier (e.g. builtin nets cut at "layer1",
    "layer2", "pool"; torchvision ResNets at "layer1", "layer2", "layer3", "avgpool"). Head i is two
    adapters owned by the network, `<net>_neck<i> = bottleneck()` (features, shaped like the deepest
    features) and `<net>_fc<i> = classifier()`, so `net.p<i> >> <net>_neck<i>` is head i's feature path
    and `net.p<i> >> <net>_neck<i> >> <net>_fc<i>` its logits. Loss (the paper's; T=3, alpha=0.3 are the
    authors' released code):

        ce(net, y) + sum_i [ (1 - alpha) ce(head_i, y) + alpha KL_T(net || head_i) + beta l2(feat_i, deepest) ]

    head="sepconv" builds each head's feature half from SepConv blocks (`<net>_neck<i> = sepconv()`), as the
    authors' released code does, instead of the paper's bottleneck.
    The deepest classifier (the network's own output) and its features are detached targets. KL_T is
    written `kl(...) / (T * T)`: `kl` carries Hinton's T^2 factor, BYOT's soft loss does not. The hint is
    `l2` (squared distance summed over features, batch mean); beta=0 drops it (the released code has none).
    """
    nets = _networks(call, 1)
    if len(nets) != 1:
        raise SpecError("byot() takes exactly one network (self-distillation)", call.pos)
    (net,) = nets
    parts = _cut_parts(spec, net, call)
    if parts is None or len(parts) < 3:
        got = "is not cut" if parts is None else f"has only {len(parts)} parts"
        raise SpecError(f"byot(): network '{net}' {got}; it needs at least 3 parts (stages with heads, "
                        f"the deepest features, the classifier)", call.pos,
                        f'cut it first, e.g. cut {net} at "layer1", "layer2", "pool" into s1, s2, s3, fc')
    name = kw.get("name", "byot")
    T, alpha, beta = kw.get("T", "3.0"), kw.get("alpha", "0.3"), kw.get("beta", "1e-06")
    hints = _number(beta, "beta", call) != 0
    deepest = f"{net}.{parts[-2]}"
    head = kw.get("head", '"bottleneck"').strip('"')
    if head not in _BYOT_HEADS:
        raise SpecError(f"byot(): head is {' or '.join(map(repr, _BYOT_HEADS))}, got {head!r}", call.pos)
    if head == "sepconv" and "reduction" in kw:
        raise SpecError("byot(): reduction is an option of the bottleneck head, not of sepconv", call.pos)
    neck_args = f"reduction={kw['reduction']}" if "reduction" in kw else ""
    lines, terms = [], [f"ce({net}, y)"]
    for i, part in enumerate(parts[:-2], start=1):
        neck, fc = f"{net}_neck{i}", f"{net}_fc{i}"
        lines += [f"adapter {neck} = {head}({neck_args}) owner {net}",
                  f"adapter {fc} = classifier() owner {net}"]
        feat = f"{net}.{part} >> {neck}"
        logits = f"{feat} >> {fc}"
        terms += [f"(1 - {alpha}) * ce({logits}, y)", f"{alpha} * kl({net}, {logits}, T={T}) / ({T} * {T})"]
        if hints:
            terms.append(f"{beta} * l2({feat}, {deepest}, grad=false)")
    body = "\n    + ".join(terms)
    return "\n".join(lines) + f"""
loss {name}() =
    {body}
train {name}{_after(kw)} {{
    minimize {name}() wrt {net}
{_train_settings(kw)}
}}"""


_BAN_VARIANTS = {
    "kd": "ce(s, y) + kl(t, s, T={T})",       # BAN+L: labels + the teacher's prediction
    "ban": "kl(t, s, T={T})",                  # BAN: the teacher's prediction only
    "cwtm": "cwtm(t, s, y)",                   # labels, each sample weighted by the teacher's max
    "dkpp": "dkpp(t, s, y)",                   # teacher's max at the label, its other outputs permuted
}


@macro("variant", "T", "generations", needs_spec=True)
def born_again(call: ast.MacroCall, kw: dict[str, str], spec: ast.Spec) -> str:
    """Born-Again Networks: born_again(g0, g1, ..., gN): g(k) is taught by g(k-1), one block each.

    Blocks `<name>0` (g0 with ce, unless `after=B` says an earlier block B trained g0) and `<name>k after
    <name>(k-1)` (g(k) minimises `<name>_loss(g(k), g(k-1))`, the teacher g(k-1) frozen at its final
    weights). `name` defaults to "gen". Variants: "kd" (default, BAN+L: ce + kl), "ban" (BAN: kl only), "cwtm"
    (Confidence-Weighted by Teacher Max), "dkpp" (Dark Knowledge with Permuted Predictions); T (default 1)
    is the temperature of kl. The BAN ensemble is `evaluate ensemble(g1, ..., gN)`.
    `born_again(net, generations=N)` declares N new networks `net_g1..net_gN` like `net` and chains them.
    """
    generated = ""
    if "generations" in kw:  # born_again(net, generations=N): N new copies of net's architecture
        if len(call.args) != 1:
            raise SpecError("born_again(net, generations=N) takes one network", call.pos)
        (net,) = _networks(call, 1)
        n = int(_number(kw["generations"], "generations", call))
        if n < 1:
            raise SpecError("born_again(): generations must be >= 1", call.pos)
        decl = next((s for s in spec.statements if isinstance(s, ast.Network) and net in s.names), None)
        if decl is None:
            raise SpecError(f"born_again(): '{net}' is not a network declared before this line", call.pos)
        nets = [net] + [f"{net}_g{k}" for k in range(1, n + 1)]
        ref = decl.ref if ":" not in decl.ref else f'"{decl.ref}"'
        args = ", ".join(f"{k.name}={format_expr(k.value)}" for k in decl.kwargs)
        generated = f"network {', '.join(nets[1:])} = {ref}({args})\n"
    else:
        nets = _networks(call, 2)
    name = kw.get("name", "gen")
    variant = kw.get("variant", '"kd"').strip('"')
    if variant not in _BAN_VARIANTS:
        raise SpecError(f"born_again(): unknown variant '{variant}'", call.pos,
                        f"variants: {', '.join(_BAN_VARIANTS)}")
    settings = _train_settings(kw)
    loss = f"{name}_loss"
    out = [f"loss {loss}(s, t) = {_BAN_VARIANTS[variant].format(T=kw.get('T', '1.0'))}"]
    previous = kw.get("after")
    if previous is None:
        previous = f"{name}0"
        out.append(f"""train {previous} {{
    minimize ce({nets[0]}, y) wrt {nets[0]}
{settings}
}}""")
    for k in range(1, len(nets)):
        block = f"{name}{k}"
        out.append(f"""train {block} after {previous} {{
    minimize {loss}({nets[k]}, {nets[k - 1]}) wrt {nets[k]}
{settings}
}}""")
        previous = block
    return generated + "\n".join(out)


def _number(text: str, what: str, call: ast.MacroCall) -> float:
    try:
        return float(text)
    except ValueError:
        raise SpecError(f"{call.name}(): {what} must be a number, got {text}", call.pos) from None


def _relocate(node, pos: Pos):
    """Give every node of generated statements the macro call's position (errors point at the call)."""
    if isinstance(node, tuple):
        return tuple(_relocate(n, pos) for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, Pos):
        changes = {f.name: _relocate(getattr(node, f.name), pos) for f in dataclasses.fields(node)
                   if f.name != "pos"}
        if any(f.name == "pos" for f in dataclasses.fields(node)):
            changes["pos"] = pos
        return dataclasses.replace(node, **changes)
    return node


def _did_you_mean(name: str) -> str | None:
    close = did_you_mean(name, MACROS.names())
    return f"did you mean '{close}'?" if close else None


def expand_macros(spec: ast.Spec) -> ast.Spec:
    """Replace every macro call by the statements it generates (macros may not generate macros)."""
    from xdsl.lang.parser import parse

    out: list[ast.Statement] = []
    for s in spec.statements:
        if not isinstance(s, ast.MacroCall):
            out.append(s)
            continue
        if s.name not in MACROS:
            raise SpecError(f"unknown statement or macro '{s.name}'", s.pos,
                            _did_you_mean(s.name) or f"macros: {', '.join(MACROS.names())}")
        fn = MACROS.get(s.name)
        kw: dict[str, str] = {}
        for k in s.kwargs:
            if k.name not in fn.params:
                raise SpecError(f"macro {s.name}() has no parameter '{k.name}'", k.pos,
                                f"its parameters are: {', '.join(fn.params)}")
            kw[k.name] = k.value.id if k.name in ("name", "after") and isinstance(k.value, ast.Name) \
                else format_expr(k.value)
        for key in ("name", "after"):  # block names may be given as strings too
            if key in kw:
                kw[key] = kw[key].strip('"')
        text = fn(s, kw, spec) if fn.needs_spec else fn(s, kw)
        generated = parse(text, f"<macro {s.name} at {s.pos}>")
        for g in generated.statements:
            if isinstance(g, ast.MacroCall):
                raise SpecError(f"macro {s.name}() generated another macro call", s.pos)
            out.append(_relocate(g, s.pos))
    return ast.Spec(tuple(out), spec.file)
