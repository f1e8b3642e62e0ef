"""`xdsl run --set key=value`: change a checked program's settings without editing the spec.

    --set data.batch_size=32     a `data` keyword
    --set epochs=3               every train block's epochs (also max_steps, grad_clip, eval_every)
    --set xml.epochs=3           one train block's setting
    --set lr=1e-3                every train block's learning rate
"""

from __future__ import annotations

import ast as pyast
import dataclasses
from typing import Any

from xdsl.errors import XdslError
from xdsl.lang import ir
from xdsl.lang.check import SETTINGS

__all__ = ["apply_overrides"]


def _value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    try:
        return pyast.literal_eval(text)  # numbers, lists and quoted strings only: never evaluates code
    except (ValueError, SyntaxError):
        return text


def _set_stage(stage: ir.Stage, key: str, value: Any) -> ir.Stage:
    if key == "epochs":
        if not (isinstance(value, int) and value >= 1):
            raise XdslError(f"--set epochs must be an integer >= 1, got {value!r}")
        return dataclasses.replace(stage, epochs=value)
    if key == "lr":
        if not (isinstance(value, int | float) and value > 0):
            raise XdslError(f"--set lr must be a number > 0, got {value!r}")
        opt = dataclasses.replace(stage.optimizer, kwargs={**stage.optimizer.kwargs, "lr": float(value)})
        return dataclasses.replace(stage, optimizer=opt)
    if key in SETTINGS and key not in ("optimizer", "schedule", "order"):
        return dataclasses.replace(stage, settings={**stage.settings, key: value})
    if key == "order":
        return dataclasses.replace(stage, order=str(value))
    raise XdslError(f"--set: unknown train setting '{key}'", hint=f"settings: epochs, lr, {', '.join(SETTINGS)}")


def apply_overrides(program: ir.Program, overrides: dict[str, str]) -> ir.Program:
    """A copy of `program` with the overrides applied; unknown keys are errors, not ignored."""
    stages = list(program.stages)
    data = program.data
    names = {s.name for s in stages}
    for key, text in overrides.items():
        value = _value(text)
        head, _, rest = key.partition(".")
        if head == "data" and rest:
            if data is None:
                raise XdslError("--set data.*: the spec has no data statement")
            from xdsl.data import dataset_params

            if rest not in dataset_params(data.name):
                raise XdslError(f"--set: dataset '{data.name}' has no parameter '{rest}'",
                                hint=f"parameters: {', '.join(dataset_params(data.name))}")
            data = dataclasses.replace(data, kwargs={**data.kwargs, rest: value})
        elif head in names and rest:
            stages = [_set_stage(s, rest, value) if s.name == head else s for s in stages]
        elif not rest:
            stages = [_set_stage(s, head, value) for s in stages]
        else:
            raise XdslError(f"--set: unknown key '{key}'", hint=f"data.<key>, <setting>, or <block>.<setting> "
                                                              f"with blocks {', '.join(sorted(names))}")
    return dataclasses.replace(program, stages=stages, data=data)
