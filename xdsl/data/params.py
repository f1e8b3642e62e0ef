"""Validation of dataset parameters and data paths, so every mistake is one XdslError, not a traceback."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdsl.errors import XdslError

__all__ = ["REQUIRED", "BuildContext", "DataParamError", "check_kwargs", "require", "resolve_spec_path"]


class _Required:
    """The default of a keyword the spec must give (`root=` of a torchvision dataset, a user function's own)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


class DataParamError(XdslError):
    """A bad dataset name, parameter or data path; `dataset`/`key` let the checker point at the spec."""

    def __init__(self, message: str, *, dataset: str, key: str | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.dataset = dataset
        self.key = key


def resolve_spec_path(path: str | os.PathLike, spec_dir: Path | None, what: str = "path") -> Path:
    """A path written in a spec: absolute as given, relative to the spec's directory (else the CWD).

    A relative path may not climb out of the spec's directory with `..` (checked on the text, so a
    symlink inside the directory may still point anywhere): a spec copied from elsewhere cannot
    reach files next to it by accident or by design. Outside files need an absolute path.
    """
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    if spec_dir is None:
        return Path.cwd() / given
    normal = os.path.normpath(given)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise XdslError(
            f"{what} '{os.fspath(path)}' points outside the spec's directory",
            hint="relative paths in a spec stay inside its directory; write an absolute path "
            f"(e.g. '{Path(spec_dir).joinpath(given).resolve()}') to use a file elsewhere",
        )
    return Path(spec_dir) / normal


@dataclass(frozen=True)
class BuildContext:
    """What a dataset factory needs besides its own parameters."""

    name: str
    spec_dir: Path | None = None
    seed: int = 0
    device_is_cuda: bool = False

    def resolve(self, root: str | os.PathLike) -> Path:
        """Resolve a relative `root` against the spec's directory (else the CWD), as the docs promise;
        `..` out of the spec's directory is refused (see `resolve_spec_path`)."""
        try:
            return resolve_spec_path(root, self.spec_dir, f"dataset '{self.name}': root").resolve()
        except DataParamError:
            raise
        except XdslError as e:
            raise DataParamError(e.message, dataset=self.name, key="root", hint=e.hint) from None

    def where(self, root: str | os.PathLike) -> str:
        """A note explaining how a relative root was resolved (empty for absolute roots)."""
        if Path(root).expanduser().is_absolute():
            return ""
        base = "the spec file's directory" if self.spec_dir is not None else "the current directory"
        return f" (root={str(root)!r} is resolved against {base})"


def require(cond: bool, ctx: BuildContext, key: str, must: str, value: Any) -> None:
    """Raise a DataParamError for `key` unless `cond` holds."""
    if not cond:
        raise DataParamError(
            f"parameter '{key}' of dataset '{ctx.name}' must be {must}, got {value!r}",
            dataset=ctx.name,
            key=key,
        )


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "a boolean (true/false)"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        return "a list"
    return type(default).__name__


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """Check `value` has the type of `default` (ints pass as floats, tuples as lists)."""
    ok: bool
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, (str, os.PathLike))
        value = os.fspath(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = True
    if not ok:
        raise DataParamError(
            f"parameter '{key}' of dataset '{name}' must be {_kind(default)}, got {value!r}",
            dataset=name,
            key=key,
        )
    return value


def check_kwargs(name: str, kwargs: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Merge user kwargs over defaults, rejecting unknown keys and wrongly typed values."""
    accepted = ", ".join(params) or "(none)"
    for key in kwargs:
        if key not in params:
            close = difflib.get_close_matches(str(key), list(params), n=1)
            raise DataParamError(
                f"dataset '{name}' has no parameter '{key}' (accepted: {accepted})",
                dataset=name,
                key=str(key),
                hint=f"did you mean '{close[0]}'?" if close else None,
            )
    merged = dict(params)
    for key, value in kwargs.items():
        merged[key] = _coerce(name, key, value, params[key])
    missing = [key for key, value in merged.items() if value is REQUIRED]
    if missing:
        raise DataParamError(f"dataset '{name}' needs {', '.join(f'{k}=' for k in missing)} (it has no default)",
                             dataset=name, key=missing[0])
    return merged
