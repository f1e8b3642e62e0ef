"""What a run ran on, recorded beside its results: versions, device, precision, determinism, the spec's
git commit and the command line. A number in a paper is only reproducible with these."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["make_deterministic", "environment"]


def make_deterministic() -> None:
    """`--deterministic`: PyTorch's deterministic kernels (an op without one raises), cuDNN without
    autotuning, and the cuBLAS workspace setting that deterministic CUDA matmuls need."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _git(spec_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(spec_dir), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # an optional package that is absent or broken is recorded as absent
        return None


def environment(spec: Path, device: torch.device, *, amp: torch.dtype | None, compile_mode: str | None,
                deterministic: bool, seed: int) -> dict[str, Any]:
    """The record written to the run directory's environment.json."""
    from xdsl import __version__

    spec_dir = spec.resolve().parent
    commit = _git(spec_dir, "rev-parse", "HEAD")
    status = _git(spec_dir, "status", "--porcelain", "--", spec.name) if commit else None
    return {
        "xdsl": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": _version("torchvision"), "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_threads": torch.get_num_threads(),
        "amp": str(amp).removeprefix("torch.") if amp is not None else None,
        "compile_mode": compile_mode, "deterministic": deterministic, "seed": seed,
        "git_commit": commit, "spec_modified_since_commit": bool(status) if commit else None,
        "command": sys.argv,
    }
