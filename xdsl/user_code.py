"""User code named in a spec as `"package.module:callable"`: models, datasets, loss primitives.

The import rule is the same for all of them: a module in the spec's directory (a `name.py` file or a
`name/` package beside it) is imported; anything else only with `--allow-imports`, because importing
runs its code. No spec text is ever evaluated.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xdsl.errors import XdslError
from xdsl.registry import did_you_mean

__all__ = ["USER_REF", "check_user_ref", "local_module_file", "user_callable"]

USER_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""`package.module:callable` (the attribute may be dotted: `module:Class.create`)."""

# top-level module name -> spec directory it was imported from (so a second spec's file can replace it)
_LOCAL_IMPORTS: dict[str, Path] = {}

_EXAMPLES = {"model": "'mynets:make_net'", "dataset": "'mydata:load'", "loss": "'mylosses:focal'"}


def _check_syntax(ref: str, what: str) -> None:
    if not USER_REF.match(ref):
        example = _EXAMPLES.get(what, "'mymodule:function'")
        raise XdslError(f"bad {what} reference '{ref}'",
                        hint=f"a user {what} is written 'package.module:callable', e.g. {example}")


def local_module_file(module_name: str, spec_dir: Path | None) -> Path | None:
    """The file of `module_name` when it lives in the spec's directory, else None."""
    if spec_dir is None:
        return None
    parts = module_name.split(".")
    for candidate in (
        Path(spec_dir).joinpath(*parts[:-1], parts[-1] + ".py"),
        Path(spec_dir).joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def _import_refused(ref: str, what: str) -> XdslError:
    module_name = ref.split(":")[0]
    top = module_name.split(".")[0]
    return XdslError(
        f"{what} '{ref}' needs Python module '{module_name}', which is not beside the spec file",
        hint=f"put {top}.py (or the package folder {top}/) next to the spec, "
        "or pass --allow-imports to import installed modules (this runs their code)",
    )


def check_user_ref(ref: str, *, spec_dir: Path | None = None, allow_imports: bool | None = None,
                   what: str = "model") -> None:
    """The errors `user_callable` would raise before importing: syntax, and the import rule when
    `allow_imports` is given (True/False). Nothing is imported."""
    _check_syntax(ref, what)
    if allow_imports is False and local_module_file(ref.split(":")[0], spec_dir) is None:
        raise _import_refused(ref, what)


def _top_level_origin(module: Any) -> Path | None:
    file = getattr(module, "__file__", None)
    if file:
        path = Path(file).resolve()
        return path.parent if path.name == "__init__.py" else path
    paths = list(getattr(module, "__path__", []))
    return Path(paths[0]).resolve() if paths else None


def _import_module(module_name: str, spec_dir: Path | None, local: bool) -> Any:
    """Import `module_name`, from `spec_dir` first when it lives there (a second spec's file of the same
    name replaces the first; a name that shadows an installed module is refused)."""
    top = module_name.split(".")[0]
    if local and spec_dir is not None:
        spec_dir = Path(spec_dir).resolve()
        loaded = sys.modules.get(top)
        if loaded is not None:
            origin = _top_level_origin(loaded)
            if origin is None or origin.parent != spec_dir:
                if top not in _LOCAL_IMPORTS:
                    raise XdslError(
                        f"module '{top}' beside the spec has the name of an imported module ({origin})",
                        hint=f"rename {top} to a name no installed package uses",
                    )
                for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                    del sys.modules[name]
        _LOCAL_IMPORTS[top] = spec_dir
    added = spec_dir is not None and str(spec_dir) not in sys.path
    if added:
        sys.path.insert(0, str(spec_dir))
    try:
        importlib.invalidate_caches()
        return importlib.import_module(module_name)
    except XdslError:
        raise
    except Exception as e:  # a user file that fails to import is a user error, reported in one line
        raise XdslError(f"cannot import '{module_name}': {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(str(spec_dir))


def user_callable(ref: str, spec_dir: Path | None, allow_imports: bool, *, what: str = "model",
                  returns: str = "an nn.Module") -> Callable[..., Any]:
    """Import the callable `ref` names under the import rule; every failure is one XdslError."""
    _check_syntax(ref, what)
    module_name, attr = ref.split(":")
    local = local_module_file(module_name, spec_dir) is not None
    if not local and not allow_imports:
        raise _import_refused(ref, what)
    obj: Any = _import_module(module_name, spec_dir, local)
    for name in attr.split("."):
        if not hasattr(obj, name):
            public = [n for n in dir(obj) if not n.startswith("_")]
            guess = did_you_mean(name, public)
            raise XdslError(
                f"'{module_name}' has no attribute '{attr}'",
                hint=f"did you mean '{module_name}:{guess}'?" if guess else None,
            )
        obj = getattr(obj, name)
    if not callable(obj):
        raise XdslError(f"'{ref}' is not callable", hint=f"name a function or class returning {returns}")
    return obj
