"""Call every user loss primitive once, on a batch of 2 random tensors of the shapes its call receives.

A `primitive` declaration says what the function does (its parameters' kinds, which tensors learn), but
only the function knows: one that returns a per-sample vector, an int, or that detaches the prediction
it declares as learning would crash at the first backward or, worse, train silently wrong. The probe
runs at compile time (`xdsl check`, `xdsl.load`, `xdsl run`) on the CPU, outside the trainer's random
stream, and turns each such disagreement into an error located at the call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdsl.compile.assemble import Compiled
from xdsl.compile.graph import path_node
from xdsl.errors import SpecError, SpecErrors
from xdsl.lang import ir
from xdsl.losses import LOSSES, LossSpec

__all__ = ["probe_user_primitives"]

_SCHEDULE = (ir.Clock, ir.Func, ir.Arith)


def probe_user_primitives(compiled: Compiled) -> None:
    """Raise the located errors of every distinct call of a user primitive in the program's objectives."""
    errors: list[SpecError] = []
    seen: set[tuple] = set()  # one report per call site and shapes, not one per network of a cohort
    for stage in compiled.program.stages:
        for term in stage.objectives.values():
            for prim in ir.term_leaves(term):
                spec = prim.spec
                key = (prim.name, prim.pos, tuple(_shape(compiled, a) for a in prim.args))
                if spec is None or prim.name in LOSSES or key in seen:
                    continue
                seen.add(key)
                problem = _probe(compiled, prim, spec)
                if problem is not None:
                    errors.append(problem)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SpecErrors(errors)


def _shape(compiled: Compiled, arg: Any) -> Any:
    if isinstance(arg, ir.Ensemble):
        arg = arg.members[0]
    return compiled.graph.nodes[path_node(arg)]["shape"] if isinstance(arg, ir.Path) else str(arg)


def _ref(spec: LossSpec) -> str:
    return f"{getattr(spec.fn, '__module__', '?')}:{getattr(spec.fn, '__qualname__', spec.name)}"


def _inputs(compiled: Compiled, prim: ir.Prim, spec: LossSpec, gen: torch.Generator) -> list[Any]:
    """The call's arguments as the function would receive them, tensors as fresh leaves of batch 2."""
    values: list[Any] = []
    for arg in prim.args:
        if isinstance(arg, ir.Path | ir.Ensemble):
            values.append(torch.randn(_shape(compiled, arg), generator=gen).requires_grad_(True))
        elif isinstance(arg, ir.Labels):
            values.append(torch.randint(0, max(compiled.num_classes, 1), (2,), generator=gen))
        elif isinstance(arg, _SCHEDULE):  # the objective hands a schedule over as a 0-dim float tensor
            values.append(torch.tensor(1.0))
        else:
            values.append(arg)
    return values


def _described(spec: LossSpec, values: list[Any]) -> str:
    return ", ".join(f"{p.name}: {p.kind} {tuple(v.shape)}" for p, v in zip(spec.params, values, strict=True)
                     if isinstance(v, Tensor))


def _probe(compiled: Compiled, prim: ir.Prim, spec: LossSpec) -> SpecError | None:
    gen = torch.Generator().manual_seed(0)
    values = _inputs(compiled, prim, spec, gen)
    where = f"primitive '{spec.name}' ('{_ref(spec)}') called as {prim} on a batch of 2 ({_described(spec, values)})"
    args, kwargs = spec.split_args(tuple(values))
    before = {p.name: v.detach().clone() for p, v in zip(spec.params, values, strict=True) if isinstance(v, Tensor)}
    try:
        with torch.random.fork_rng(devices=[]):
            out = spec.fn(*args, **kwargs)
    except Exception as e:  # the user's function failing is the user's error, reported at the call
        return SpecError(f"{where} raised {type(e).__name__}: {e}", prim.pos,
                         "call the function on such tensors in Python to debug it (xdsl --debug shows the traceback)")
    changed = [n for p, v in zip(spec.params, values, strict=True) if (n := p.name) in before
               and not torch.equal(before[n], v.detach())]
    if changed:  # an identical sub-result is computed once: every other term using it would see the change
        return SpecError(f"{where} changed its argument '{changed[0]}' in place; other loss terms share that tensor",
                         prim.pos, "compute on a copy (out-of-place operations: x = x / T, not x /= T)")
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() != 1:
        got = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor)
               else f"a value of type {type(out).__name__}")
        return SpecError(f"{where} returned {got}; a loss primitive returns a floating-point scalar tensor",
                         prim.pos, "reduce over the batch (e.g. `return loss.mean()`) and compute in floating point")
    if not bool(torch.isfinite(out.detach()).all()):  # e.g. a temperature of 0: NaN from the first step on
        return SpecError(f"{where} returned {out.item()}", prim.pos,
                         "check the call's number arguments (a division by a 0 keyword?) and the function")
    return _gradient_problem(prim, spec, values, out, where)


def _gradient_problem(prim: ir.Prim, spec: LossSpec, values: list[Any], out: Tensor, where: str) -> SpecError | None:
    """Gradient must reach exactly the tensors the declaration says learn (with this call's bool arguments)."""
    by_name = {p.name: v for p, v in zip(spec.params, values, strict=True)}
    tensors = [(name, v) for name, v in by_name.items() if isinstance(v, Tensor) and v.requires_grad]
    grads = (torch.autograd.grad(out.sum(), [v for _, v in tensors], allow_unused=True) if out.requires_grad
             else [None] * len(tensors))
    for (name, _), grad in zip(tensors, grads, strict=True):
        flows = grad is not None and bool(grad.ne(0).any())
        declared = spec.carries_gradient(name, by_name)
        if declared and not flows:
            return SpecError(f"{where} sends no gradient into '{name}', which the declaration says learns", prim.pos,
                             f"do not detach '{name}' in the function (or leave it out of `learns`)")
        if flows and not declared:
            return SpecError(f"{where} sends gradient into '{name}', which the declaration says is a detached target",
                             prim.pos, f"detach it in the function ({name}.detach()), or declare "
                             f"`learns ..., {name} if grad` with a bool parameter grad")
    return None
