"""The one table of train settings: what a `train` block accepts, its defaults, and how it is written.

The checker validates settings against it, training macros pass exactly these keywords through,
`--set` edits them by these names, and `xdsl run` prints and records every resolved setting with
`resolved_spec` (so `spec.xspec` in a run directory says what ran, defaults included).

Optimiser and schedule defaults are the torch.optim classes' own (tested against their signatures):
`optimizer sgd(lr=0.1)` is `torch.optim.SGD(lr=0.1)`, plain SGD without momentum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from xdsl.lang import ast, ir
from xdsl.registry import Registry

__all__ = ["ORDERS", "OPTIMIZERS", "SCHEDULES", "SETTINGS", "TRAIN_KEYS", "REQUIRED", "DEFAULT_OPTIMIZER",
           "resolved_settings", "resolved_spec", "describe_stage"]

ORDERS = ("alternating", "simultaneous", "round_robin", "random")

# optimiser -> accepted keywords and their defaults (torch.optim.SGD / Adam / AdamW); Adam's betas
# are written beta1, beta2
OPTIMIZERS: Registry[dict[str, Any]] = Registry("optimizer")
OPTIMIZERS.register("sgd", {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False})
OPTIMIZERS.register("adam", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                             "amsgrad": False})
OPTIMIZERS.register("adamw", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2,
                              "amsgrad": False})
DEFAULT_OPTIMIZER = "adam"  # of a train block without an `optimizer` line

REQUIRED = None  # a schedule keyword with no default (StepLR needs step_size, MultiStepLR milestones)
# learning-rate schedules, stepped once per epoch; `step(every=60, gamma=0.1)` is StepLR(step_size=60,
# gamma=0.1), the DML paper's x0.1 every 60 epochs; `cosine` anneals to 0 over the block's epochs
SCHEDULES: Registry[dict[str, Any]] = Registry("schedule")
SCHEDULES.register("none", {})
SCHEDULES.register("step", {"every": REQUIRED, "gamma": 0.1})
SCHEDULES.register("multistep", {"milestones": REQUIRED, "gamma": 0.1})
SCHEDULES.register("cosine", {"warmup": 0})

# every train setting: name -> (kind, default); None = off
SETTINGS: dict[str, tuple[str, Any]] = {
    "optimizer": ("optimizer", None),
    "epochs": ("int>=1", 1),
    "steps": ("int>=1", None),          # an iteration budget instead of epochs (the DML paper: 100,000)
    "order": ("order", "alternating"),
    "schedule": ("schedule", None),
    "grad_clip": ("number>0", None),
    "max_steps": ("int>=1", None),      # cap on optimisation steps per epoch (quick runs)
    "eval_every": ("int>=1", 1),        # evaluate every N epochs
    "accumulate": ("int>=1", 1),        # micro-batches per optimisation step (gradient accumulation)
    "eval_train": ("bool", False),      # also score the unaugmented training set when test accuracy is due
    "map_channels": ("measure", None),  # align channels at the cut first (the XML paper's XML_m): bmm_std, ...
}
TRAIN_KEYS = tuple(SETTINGS)  # the keywords every training macro passes through


def _value(v: Any) -> ast.Expr:
    if isinstance(v, bool):
        return ast.Bool(v)
    if isinstance(v, int | float):
        return ast.Number(v)
    if isinstance(v, list | tuple):
        return ast.ListExpr(tuple(_value(i) for i in v))
    return ast.Name(str(v))


def _call(decl: ir.OptimizerDecl) -> ast.Expr:
    if not decl.kwargs:
        return ast.Name(decl.name)
    return ast.Call(decl.name, (), tuple(ast.Keyword(k, _value(v)) for k, v in decl.kwargs.items()))


def resolved_settings(stage: ir.Stage) -> tuple[ast.Setting, ...]:
    """Every setting of a checked train block, defaults written out (settings that are off are left out)."""
    schedule = stage.schedule or ir.OptimizerDecl("none", {}, stage.pos)
    budget = [] if stage.settings.get("steps") else [ast.Setting("epochs", ast.Number(stage.epochs))]  # or steps
    out = [ast.Setting("optimizer", _call(stage.optimizer)), *budget,
           ast.Setting("order", ast.Name(stage.order)), ast.Setting("schedule", _call(schedule))]
    for key in TRAIN_KEYS:
        value = stage.settings.get(key)
        if key not in ("optimizer", "epochs", "order", "schedule") and value is not None:
            out.append(ast.Setting(key, _value(value)))
    return tuple(out)


def resolved_spec(program: ir.Program) -> ast.Spec:
    """The checked spec with every train block's settings in full: what `spec.xspec` of a run records."""
    stages = iter(program.stages)
    statements = []
    for s in program.spec.statements:
        if isinstance(s, ast.Train):
            s = dataclasses.replace(s, settings=resolved_settings(next(stages)))
        statements.append(s)
    return dataclasses.replace(program.spec, statements=tuple(statements))


def describe_stage(stage: ir.Stage) -> str:
    """One line of a train block's resolved settings, as `xdsl run` prints it."""
    from xdsl.lang.format import format_expr

    return "; ".join(f"{s.key} {format_expr(s.value)}" for s in resolved_settings(stage))
