"""Optimisers and learning-rate schedules named in `train` blocks (the XML paper: Adam 1e-4; the DML paper: SGD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from xdsl.lang import ir

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(decl: ir.OptimizerDecl, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """`optimizer sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)` -> torch optimizer.

    Every keyword maps one-to-one onto the torch.optim class's argument (the checker's defaults are
    the class's defaults and it rejects what the class would reject). foreach kernels (one launch per
    parameter group, not per tensor) on every device; fused Adam/AdamW on CUDA.
    """
    kw = dict(decl.kwargs)
    if decl.name == "sgd":
        return torch.optim.SGD(params, lr=kw["lr"], momentum=kw["momentum"], dampening=kw["dampening"],
                               nesterov=kw["nesterov"], weight_decay=kw["weight_decay"], foreach=True)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    cls = torch.optim.Adam if decl.name == "adam" else torch.optim.AdamW
    return cls(params, lr=kw["lr"], betas=(kw["beta1"], kw["beta2"]), eps=kw["eps"],
               weight_decay=kw["weight_decay"], amsgrad=kw["amsgrad"], **fast)


def make_scheduler(decl: ir.OptimizerDecl | None, optimizer: torch.optim.Optimizer,
                   epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Schedules over `epochs` units: `step(every=60, gamma=0.1)` is the DML paper's x0.1 every 60 epochs.

    Under a `steps N` budget the unit is one optimisation step (the runner steps the schedule per step and
    passes N here), so `every`, `milestones` and `warmup` count steps.
    """
    if decl is None or decl.name == "none":
        return None
    kw = decl.kwargs
    if decl.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(kw["every"]), gamma=kw["gamma"])
    if decl.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(kw["milestones"]), gamma=kw["gamma"])
    warmup = int(kw["warmup"])

    def cosine(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
