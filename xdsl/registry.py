"""One name -> object registry type, shared by every table of named things: models and model sources,
losses, adapters, datasets, channel-mapping measures, macros and evaluate items.

Every registry reports an unknown name the same way: an `XdslError` with a did-you-mean hint, so
spec typos read alike whatever kind of thing was misspelled.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar, overload

from xdsl.errors import XdslError

__all__ = ["Registry", "did_you_mean"]

T = TypeVar("T")


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelled name, or None when nothing is close."""
    pool = list(candidates)
    same = [c for c in pool if _bare(c) == _bare(name)]  # `layer_2` is `layer2` with a separator more
    if same:
        return same[0]
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if close:
        return close[0]
    lowered = {c.lower(): c for c in pool}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def _bare(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "_.-")


class Registry(Generic[T]):
    """Named objects of one kind (`kind` is the word used in error messages, e.g. "loss")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add `obj` under `name`; without `obj`, return a decorator that does it."""
        if obj is None:

            def decorator(item: T) -> T:
                self._add(name, item)
                return item

            return decorator
        self._add(name, obj)
        return obj

    def _add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The object registered under `name`; an unknown name is a user error with a suggestion."""
        try:
            return self._items[name]
        except KeyError:
            pass
        guess = did_you_mean(name, self._items)
        if guess:
            hint = f"did you mean '{guess}'?"
        else:
            names = self.names()
            more = f", ... ({len(names) - 12} more)" if len(names) > 12 else ""
            hint = f"known {self.kind}s: {', '.join(names[:12])}{more}" if names else None
        raise XdslError(f"unknown {self.kind} '{name}'", hint=hint)

    def __getitem__(self, name: str) -> T:
        """Like a dict: KeyError for an unknown name (use `get` for the user-facing error)."""
        return self._items[name]

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()!r})"
