"""`network t = ... weights "file.pt"`: a plain state_dict or a checkpoint xdsl wrote, checked before training.

An xdsl checkpoint (`<run>/checkpoints/<block>/final.pt`) holds every network of its spec, cut into
parts, under `modules` (`parts.<net>.<part>.<key>`). The network named like the one being declared is
picked (`weights "final.pt#net1"` picks another); a checkpoint holding one network needs no name.
Parts share their parameters with the network and keep its attribute paths, so the network's own
state_dict is the union of its parts' keys with the prefix dropped.

The file is read with `weights_only=True` (tensors and plain data only). On the meta device (`xdsl
check`) it is read onto meta tensors, so keys and shapes are compared without loading any data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xdsl.errors import XdslError

__all__ = ["split_selector", "network_state", "state_mismatch", "load_network_weights"]


def split_selector(text: str) -> tuple[str, str | None]:
    """`"run/final.pt#net1"` -> ("run/final.pt", "net1"); no `#`: no selector."""
    path, sep, name = text.rpartition("#")
    return (path, name) if sep and path and name and "/" not in name else (text, None)


def _read(path: Path, device: str) -> Any:
    from xdsl.checkpoint import load_checkpoint

    return load_checkpoint(path, "meta" if device == "meta" else "cpu")


def _xdsl_networks(modules: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """network -> its state_dict, from an xdsl checkpoint's `modules`."""
    nets: dict[str, dict[str, Any]] = {}
    for key, value in modules.items():
        head, net, _part, rest = (key.split(".", 3) + ["", "", ""])[:4]
        if head == "parts" and rest:
            nets.setdefault(net, {})[rest] = value
    return nets


def network_state(path: Path, name: str, selector: str | None, device: str = "cpu") -> dict[str, Any]:
    """The state_dict for network `name` from a plain state_dict file or an xdsl checkpoint."""
    state = _read(path, device)
    if isinstance(state, Mapping) and isinstance(state.get("modules"), Mapping):
        nets = _xdsl_networks(state["modules"])
        want = selector or name
        if want in nets:
            return nets[want]
        if selector is None and len(nets) == 1:
            return next(iter(nets.values()))
        held = ", ".join(sorted(nets)) or "none"
        raise XdslError(f"the xdsl checkpoint {path} holds no network '{want}' (it holds: {held})",
                        hint=f'pick one with weights "{path}#{sorted(nets)[0]}"' if nets else None)
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise XdslError(f"{path} holds neither a state_dict nor an xdsl checkpoint",
                        hint="save one with torch.save(model.state_dict(), path), or use a run's "
                             "checkpoints/<block>/final.pt")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _some(keys: list[str], sep: str = ", ") -> str:
    return sep.join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def state_mismatch(model_state: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """How `state` fails to fit a model (missing / unexpected keys, shapes), in one line; None if it fits."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(model_state[k].shape)} in the model"
              for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) missing ({_some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({_some(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape(s) differ ({_some(shapes, '; ')})")
    return "; ".join(problems) or None


def load_network_weights(model: nn.Module, text: str, file: Path, name: str, ref: str, device: str) -> None:
    """Check (on meta) or load (elsewhere) the weights a `network` statement names."""
    _, selector = split_selector(text)
    state = network_state(file, name, selector, device)
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise XdslError(f"weights in {file} do not fit {name} ({ref}): {problem}",
                        hint="the file must come from the same model with the same arguments "
                             "(num_classes, width, ...)")
    if device != "meta":
        model.load_state_dict(state)
