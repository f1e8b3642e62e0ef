"""Where a run computes: the device, CPU threads and autocast dtype chosen from the command line."""

from __future__ import annotations

import os

import torch
from torch import nn

from xdsl.errors import XdslError

__all__ = ["pick_device", "set_threads", "amp_dtype", "SMALL_MODEL_PARAMS"]

SMALL_MODEL_PARAMS = 5_000_000  # below this, one CPU thread beats several (op overheads dominate)


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; asking for CUDA without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XdslError(f"--device {name}: CUDA is not available on this machine", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise XdslError(f"--device {name}: not a device torch knows ({str(e).splitlines()[0]})",
                        hint="use auto, cpu, cuda or cuda:N") from None


def set_threads(threads: int | None, root: nn.Module, device: torch.device) -> None:
    """CPU intra-op threads: tiny convolutions run fastest single-threaded, big ones use every core."""
    if device.type != "cpu":
        return
    if threads is None:
        params = sum(p.numel() for p in root.parameters())
        threads = 1 if params < SMALL_MODEL_PARAMS else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """--amp: auto = bf16 on CUDA, none elsewhere; fp16 (with loss scaling) for GPUs without bf16."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":  # for GPUs without bf16; the Experiment adds one GradScaler per optimiser
        return torch.float16
    raise XdslError(f"--amp: unknown value '{amp}'", hint="auto, bf16, fp16 or none")
