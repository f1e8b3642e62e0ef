"""Shapes stage: the output shape of each part, found without computing anything real.

Modules run under PyTorch's FakeTensorMode, with their parameters and buffers swapped for fake
tensors (torch.func.functional_call): every tensor has a shape and dtype but no data, so a ResNet-50
on a full batch costs milliseconds and no memory, whether its weights are real CPU tensors or live on
the meta device, and the real parameters and buffers are never written (FakeTensorMode alone would
still bump BatchNorm's real `num_batches_tracked`). Shapes include the batch dimension.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

from xdsl.errors import XdslError

__all__ = ["infer_shapes", "infer_shape", "param_count", "unique_params"]


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return default


def _tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    named = list(module.named_parameters(remove_duplicate=False))
    return named + list(module.named_buffers(remove_duplicate=False))


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """FakeTensorMode logs a traceback for every op that fails under it; the failure is reported as one error."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fake_run(parts: Sequence[nn.Module], sample: Tensor, names: Sequence[str] | None) -> list[torch.Size]:
    shapes: list[torch.Size] = []
    with torch.no_grad(), _quiet_fake_tensor_log(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(sample)
        for k, part in enumerate(parts):
            what = f"part '{names[k]}'" if names else f"part {k + 1} of {len(parts)}" if len(parts) > 1 else "module"
            device = _device_of(part, x.device)
            if x.device != device:
                x = x.to(device)
            # parameters and buffers are swapped for fakes, so no write (BatchNorm's counters) reaches them
            state = {name: mode.from_tensor(t) for name, t in _tensors(part)}
            try:
                out = functional_call(part, state, (x,), strict=False)
            except XdslError:
                raise
            except Exception as e:
                hint = (f"its input is a batch of the data's samples, each {tuple(x.shape[1:])}: the model's input "
                        "keywords (in_features=, in_channels=, ...) must fit it") if k == 0 else None
                raise XdslError(
                    f"{what} cannot take a tensor of shape {tuple(x.shape)}: "
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", hint=hint
                ) from e
            if not isinstance(out, Tensor):
                raise XdslError(f"{what} returns {type(out).__name__}, not one tensor")
            shapes.append(out.shape)
            x = out
    return shapes


def infer_shapes(parts: Sequence[nn.Module], sample: Tensor, names: Sequence[str] | None = None) -> list[torch.Size]:
    """Output shape (batch dimension included) of each part, the parts running one after another on `sample`.

    `sample` may be a real, meta or fake tensor; only its shape and dtype matter. A part that cannot
    take its input's shape is an XdslError naming that shape (and the part, when `names` are given).
    """
    if not parts:
        return []
    return _fake_run(list(parts), sample, names)


def infer_shape(module: nn.Module, in_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Size:
    """Output shape of one module for an input of shape `in_shape` (batch dimension included)."""
    return _fake_run([module], torch.empty(tuple(in_shape), dtype=dtype, device="meta"), None)[0]


def param_count(modules: nn.Module | Iterable[nn.Module]) -> int:
    """Number of distinct parameter elements; a Parameter shared by several modules counts once."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The distinct Parameters of several modules, in order of first appearance."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())
