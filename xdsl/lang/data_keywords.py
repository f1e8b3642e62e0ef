"""Data keywords whose values can be checked from the spec alone (the rest are checked when the data is built).

A value a run would refuse only after `xdsl check` said ok (`val_fraction=1.5`) is a located error at check time.
"""

from __future__ import annotations

from typing import Any

from xdsl.errors import SpecError
from xdsl.lang import ast

__all__ = ["data_keyword_errors"]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_RULES = {
    "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "val_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1) (the share held out), got {!r}"),
}


def data_keyword_errors(s: ast.Data, kwargs: dict[str, Any], allowed: dict[str, Any] | None = None
                        ) -> list[SpecError]:
    """Located errors of the data statement's statically checkable keywords, and of the keywords it must give
    (`root=` of a torchvision dataset, a user function's parameters without a default)."""
    from xdsl.data.params import REQUIRED

    missing = [k for k, v in (allowed or {}).items() if v is REQUIRED and k not in kwargs]
    errors = [SpecError(f"dataset '{s.name}' needs {', '.join(f'{k}=' for k in missing)} (no default)", s.pos)] \
        if missing else []
    for name, (ok, must) in _RULES.items():
        if name in kwargs and not ok(kwargs[name]):
            pos = next((k.value.pos for k in s.kwargs if k.name == name), s.pos)
            errors.append(SpecError(f"{name} must be {must.format(kwargs[name])}", pos))
    return errors
