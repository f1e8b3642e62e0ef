"""One error root for everything a user can get wrong (spec text, data paths, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pos", "XdslError", "SpecError", "SpecErrors", "SpecWarning", "XdslWarning"]


@dataclass(frozen=True)
class Pos:
    """A source position: file, 1-based line and column."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class XdslError(Exception):
    """Root of xdsl's own errors: printed as one clear message, never as a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class SpecError(XdslError):
    """An error located in a spec file: `file:line:col: error: message`, the line and a caret."""

    severity = "error"

    def __init__(self, message: str, pos: Pos | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.pos = pos

    def render(self) -> str:
        if self.pos is None:
            text = f"{self.severity}: {self.message}"
            return text + (f"\n  hint: {self.hint}" if self.hint else "")
        text = f"{self.pos}: {self.severity}: {self.message}"
        line = _source_line(self.pos)
        if line is not None:
            text += f"\n    {line}\n    {' ' * (self.pos.col - 1)}^"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class SpecWarning(SpecError):
    """A located problem that does not stop the spec (`xdsl check --strict` makes it an error)."""

    severity = "warning"

    def as_error(self) -> SpecError:
        return SpecError(self.message, self.pos, self.hint)


class XdslWarning(UserWarning):
    """Python-warning category of spec warnings (for `xdsl.load`; `warnings.simplefilter("error", ...)`)."""


class SpecErrors(XdslError):
    """Several independent spec errors, reported together."""

    def __init__(self, errors: list[SpecError]):
        super().__init__(f"{len(errors)} errors")
        self.errors = errors

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


_SOURCES: dict[str, str] = {}


def register_source(file: str, text: str) -> None:
    """Remember a spec's text so errors can show the offending line."""
    _SOURCES[file] = text


def _source_line(pos: Pos) -> str | None:
    text = _SOURCES.get(pos.file)
    if text is None:
        try:
            text = Path(pos.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
    lines = text.splitlines()
    if 1 <= pos.line <= len(lines):
        return lines[pos.line - 1].expandtabs(1)
    return None
