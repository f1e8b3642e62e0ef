"""Atomic, verifiable checkpoints: a crash at any moment leaves the previous checkpoint intact.

Written as temp file + fsync + rename (atomic on POSIX); read with `weights_only=True` so a
checkpoint from elsewhere cannot run code. A truncated or corrupted file is reported and the
previous one (`last.prev.pt`) is used instead.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdsl.errors import XdslError

__all__ = ["save_atomic", "load_checkpoint", "load_latest", "rng_state", "set_rng_state"]


def save_atomic(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write `state` to `path` so that readers see either the old file or the complete new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_suffix(".prev.pt"))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, quota, permissions: the previous checkpoint is untouched
            raise _write_error(path, e) from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def _write_error(path: Path, e: OSError) -> XdslError:
    return XdslError(f"cannot write checkpoint '{path}': {e.strerror or e}",
                     hint="free disk space or choose another --out; the previous checkpoint is intact, "
                     "continue with --resume")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`); unreadable files are an XdslError naming the file."""
    if Path(path).is_dir():
        inside = [p.name for p in (Path(path) / "final.pt", Path(path) / "last.pt") if p.is_file()]
        raise XdslError(f"checkpoint '{path}' is a directory, not a checkpoint file",
                        hint=f"use {Path(path) / inside[0]}" if inside else
                        "give a file such as <run>/checkpoints/<block>/final.pt")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise XdslError(f"checkpoint '{path}' does not exist") from None
    except Exception as e:  # truncated zip, bad pickle, disallowed global
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if blocked:  # weights_only=True met a reference to code, e.g. os.system in a __reduce__
            raise XdslError(f"checkpoint '{path}' refers to the Python object {blocked.group(1)}; refused: "
                            "checkpoints load with weights_only=True and hold only tensors and plain data",
                            hint="only load checkpoints written by xdsl run (or a plain state_dict)") from None
        detail = "not a PyTorch file" if isinstance(e, pickle.UnpicklingError) else \
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise XdslError(f"checkpoint '{path}' is truncated, corrupted or not an xdsl checkpoint ({detail})") from None


def load_latest(path: Path, map_location: str | torch.device = "cpu",
                warn=print) -> dict[str, Any] | None:
    """The newest readable checkpoint of `path` / its `.prev.pt` twin, or None if neither exists."""
    candidates = [p for p in (path, path.with_suffix(".prev.pt")) if p.exists()]
    for i, candidate in enumerate(candidates):
        try:
            return load_checkpoint(candidate, map_location)
        except XdslError as e:
            if i + 1 < len(candidates):
                warn(f"warning: {e.message}; using the previous checkpoint {candidates[i + 1]}")
            else:
                raise
    return None


def rng_state() -> dict[str, Any]:
    """Every random generator a run uses, so a resumed run draws the same numbers."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
