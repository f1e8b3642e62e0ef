"""Data-parallel training with PyTorch's own stack: `torchrun --nproc_per_node=N -m xdsl run spec.xspec`.

What xdsl sets, and why:
- Each trained network's objective module is wrapped in `DistributedDataParallel` whose synchronised
  parameters are exactly the ones `minimize ... wrt s` updates (the network and the adapters it owns);
  every other parameter the module touches (peers' parts, frozen teachers) is excluded with
  `_set_params_and_buffers_to_ignore_for_model`. So parts shared between objectives never trip DDP:
  a peer's part used in s's objective is not s's to synchronise, and `backward(inputs=params_s)`
  produces gradients for exactly the synchronised set.
- `find_unused_parameters=False`: owned parameters that an objective does not use are excluded
  statically (from the generated graph), so DDP needs no per-step graph search.
- `broadcast_buffers=False`: BatchNorm statistics stay per process (as in single-GPU training on
  that process's shard); checkpoints hold rank 0's, and every process evaluates with rank 0's
  (broadcast before each evaluation, `xdsl.eval.sharded`), so merged test accuracy is the saved model's.
- `order simultaneous` runs one forward for all objectives and one backward per network; DDP's
  reducer assumes one backward per forward, so there each network's gradients are averaged with
  one flat `all_reduce` per step instead (the same collective DDP issues).
- The spec's batch_size is the GLOBAL batch: each of N processes loads batch_size / N samples
  through a `DistributedSampler` reshuffled every epoch, so N processes and one process see the
  same batches and (without BatchNorm) compute the same weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["is_distributed", "rank", "world_size", "init_from_env", "wrap_objective", "all_reduce_grads",
           "launch_torchrun", "barrier", "gather_batches", "all_reduce_mean"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes in the environment; return this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def wrap_objective(module: nn.Module, owned: list[nn.Parameter], device: torch.device) -> nn.Module:
    """DDP over one network's objective module, synchronising only the parameters it owns and uses."""
    used: set[int] = set()
    for node in getattr(module, "graph", None).nodes if hasattr(module, "graph") else ():
        if node.op == "call_module":
            used.update(id(p) for p in module.get_submodule(node.target).parameters())
    keep = {id(p) for p in owned} & used
    ignore = [name for name, p in module.named_parameters() if id(p) not in keep]
    ignore += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
    with warnings.catch_warnings():
        # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, whose False still syncs
        # buffers at init; xdsl's buffers are rank-local on purpose, so it keeps the old flag.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False, find_unused_parameters=False)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over processes with one flat all_reduce (used for `order simultaneous`)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def gather_batches(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over processes along dim 0, in rank order (itself outside torchrun).

    Stateful loss terms update their memory with every process's samples this way (CRD's memory
    banks), so the memory stays the same on every process. Batches have one size on every process
    (DistributedSampler pads the epoch to a multiple of the process count).
    """
    if not is_distributed():
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over processes (`t` itself outside torchrun)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`xdsl run --nproc N ...`: re-run the same command under torchrun with N processes on this node."""
    args, rest = [], iter(argv[1:])
    for a in rest:
        if a == "--nproc":
            next(rest, None)  # drop its value
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "xdsl", *args]
    return subprocess.call(cmd)
