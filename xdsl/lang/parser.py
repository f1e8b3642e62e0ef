"""Spec text -> AST. The grammar is xspec.lark beside this file; nothing downstream sees Lark trees."""

from __future__ import annotations

import functools
import math
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from xdsl.errors import Pos, SpecError, register_source
from xdsl.lang import ast

__all__ = ["parse", "parse_file", "parse_expr", "grammar_path"]

MAX_SPEC_BYTES = 1_000_000  # a spec is a page of text; anything larger is a mistake, not an experiment


def grammar_path() -> Path:
    """The grammar file, beside this module (the repository's grammar/xspec.lark links to it)."""
    return Path(__file__).resolve().parent / "xspec.lark"


@functools.cache
def _lark() -> Lark:
    return Lark.open("xspec.lark", rel_to=__file__, parser="lalr", propagate_positions=True,
                     maybe_placeholders=True, lexer="basic", start=["start", "expr"])


# Human names for the terminals Lark reports in "expected ..." lists.
_TERMINAL_TEXT = {"NAME": "a name", "NUMBER": "a number", "STRING": "a string",
                  "$END": "end of file"}


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_TEXT:
        return _TERMINAL_TEXT[terminal]
    try:
        pattern = _lark().get_terminal(terminal).pattern
        return f"'{pattern.value}'"
    except KeyError:
        return terminal.lower()


def _expected(expected: set[str]) -> str:
    names = sorted({_describe(t) for t in expected if not t.startswith("__")})
    if not names:
        return ""
    if len(names) > 8:
        names = names[:8] + ["..."]
    return "expected " + ", ".join(names)


class _ToAst(Transformer):
    """Lark tree -> ast dataclasses; one method per grammar alias."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _pos(self, meta) -> Pos:
        return Pos(self.file, getattr(meta, "line", 0), getattr(meta, "column", 0))

    def _tpos(self, token: Token) -> Pos:
        return Pos(self.file, token.line, token.column)

    # ---- statements ----
    def start(self, items):
        return list(items)

    @v_args(meta=True)
    def data(self, meta, items):
        name, args = items
        return ast.Data(str(name), self._kwargs_only(args, "data"), self._pos(meta))

    @v_args(meta=True)
    def network(self, meta, items):
        names, ref, args, weights = items
        kwargs = self._kwargs_only(args, f"network '{ref}'")
        return ast.Network(tuple(names), ref, kwargs, _unquote(weights) if weights else None, self._pos(meta))

    def model_ref(self, items):
        (item,) = items
        return _unquote(item) if isinstance(item, Token) and item.type == "STRING" else item

    def dotted_name(self, items):
        return ".".join(str(t) for t in items)

    @v_args(meta=True)
    def cut(self, meta, items):
        networks, points, parts = items
        return ast.Cut(tuple(networks), tuple(points), tuple(parts), self._pos(meta))

    @v_args(meta=True)
    def adapter(self, meta, items):
        name, kind, args, owners = items
        kwargs = self._kwargs_only(args, f"adapter '{name}'")
        return ast.Adapter(str(name), str(kind), kwargs, tuple(owners), self._pos(meta))

    @v_args(meta=True)
    def loss(self, meta, items):
        name, params, body = items
        return ast.LossDef(str(name), tuple(params or ()), body, self._pos(meta))

    @v_args(meta=True)
    def primitive(self, meta, items):
        name, ref, args, *learns = items
        kinds = self._kwargs_only(args, f"primitive '{name}'")
        learned = tuple(item for item in learns if item is not None)
        return ast.PrimitiveDecl(str(name), _unquote(ref), kinds, learned, self._pos(meta))

    def learn(self, items):
        param, gate = items
        return str(param), str(gate) if gate is not None else None

    @v_args(meta=True)
    def train(self, meta, items):
        name, after, *body = items
        minimizes = tuple(i for i in body if isinstance(i, ast.Minimize))
        settings = tuple(i for i in body if isinstance(i, ast.Setting))
        return ast.Train(str(name) if name else None, str(after) if after else None, minimizes, settings,
                         self._pos(meta))

    @v_args(meta=True)
    def minimize(self, meta, items):
        objective, wrt, var, iterable = items
        return ast.Minimize(objective, wrt, str(var) if var else None, iterable, self._pos(meta))

    @v_args(meta=True)
    def setting(self, meta, items):
        key, value = items
        return ast.Setting(str(key), value, self._pos(meta))

    @v_args(meta=True)
    def evaluate(self, meta, items):
        return ast.Evaluate(tuple(items), self._pos(meta))

    @v_args(meta=True)
    def macro(self, meta, items):
        name, (args, kwargs) = items
        return ast.MacroCall(str(name), args, kwargs, self._pos(meta))

    def names(self, items):
        return [str(t) for t in items]

    def strings(self, items):
        return [_unquote(t) for t in items]

    # ---- expressions ----
    def _binop(op):  # noqa: N805 - a factory evaluated in the class body
        @v_args(meta=True)
        def method(self, meta, items):
            left, right = items
            return ast.BinOp(op, left, right, self._pos(meta))
        return method

    pipe_op = _binop(">>")
    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")
    del _binop

    @v_args(meta=True)
    def neg(self, meta, items):
        return ast.Neg(items[0], self._pos(meta))

    @v_args(meta=True)
    def attribute(self, meta, items):
        value, attr = items
        return ast.Attribute(value, str(attr), self._tpos(attr) if meta.empty else self._pos(meta))

    @v_args(meta=True)
    def snapshot(self, meta, items):
        value, epoch = items
        if not str(epoch).isdigit():
            raise SpecError(f"'@' takes an epoch number, got {epoch}", self._tpos(epoch))
        return ast.Snapshot(value, int(epoch), self._pos(meta))

    @v_args(meta=True)
    def call(self, meta, items):
        name, (args, kwargs) = items
        return ast.Call(str(name), args, kwargs, self._tpos(name))

    @v_args(meta=True)
    def call_at(self, meta, items):
        ((args, kwargs),) = items
        return ast.Call("at", args, kwargs, self._pos(meta))

    def arguments(self, items):
        args, kwargs = [], []
        for item in items:
            if item is None:
                continue
            if isinstance(item, ast.Keyword):
                kwargs.append(item)
            else:
                if kwargs:
                    raise SpecError("positional argument after keyword argument", _expr_pos(item))
                args.append(item)
        return tuple(args), tuple(kwargs)

    def keyword(self, items):
        name, value = items
        return ast.Keyword(str(name), value, self._tpos(name))

    @v_args(meta=True)
    def keyword_after(self, meta, items):
        (value,) = items
        return ast.Keyword("after", value, self._pos(meta))

    @v_args(meta=True)
    def keyword_weights(self, meta, items):
        (value,) = items
        return ast.Keyword("weights", value, self._pos(meta))

    @v_args(meta=True)
    def comprehension(self, meta, items):
        body, var, iterable = items
        return ast.Comprehension(body, str(var), iterable, self._pos(meta))

    def number(self, items):
        (tok,) = items
        text = str(tok)
        value = int(text) if text.isdigit() else float(text)
        if not math.isfinite(value):  # 1e999 parses as inf: a typo, never a setting
            raise SpecError(f"number {text} is too large", self._tpos(tok))
        return ast.Number(value, self._tpos(tok))

    def string(self, items):
        (tok,) = items
        return ast.String(_unquote(tok), self._tpos(tok))

    @v_args(meta=True)
    def true(self, meta, items):
        return ast.Bool(True, self._pos(meta))

    @v_args(meta=True)
    def false(self, meta, items):
        return ast.Bool(False, self._pos(meta))

    def name(self, items):
        (tok,) = items
        return ast.Name(str(tok), self._tpos(tok))

    @v_args(meta=True)
    def list(self, meta, items):
        return ast.ListExpr(tuple(i for i in items if i is not None), self._pos(meta))

    # ---- helpers ----
    def _kwargs_only(self, args, what: str) -> tuple[ast.Keyword, ...]:
        if args is None:
            return ()
        positional, kwargs = args
        if positional:
            raise SpecError(f"{what} takes keyword arguments only (name=value)", _expr_pos(positional[0]))
        return kwargs


def _unquote(token) -> str:
    text = str(token)[1:-1]
    return text.encode("utf-8").decode("unicode_escape") if "\\" in text else text


def _expr_pos(node) -> Pos | None:
    return getattr(node, "pos", None)


def parse(text: str, file: str = "<string>") -> ast.Spec:
    """Parse spec text into an `ast.Spec`; raise `SpecError` located at the first syntax error."""
    register_source(file, text)
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"spec is {len(text):,} characters; the limit is {MAX_SPEC_BYTES:,}", Pos(file, 1, 1))
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise SpecError("spec contains a NUL byte: is this a binary file?", Pos(file, line, 1))
    try:
        tree = _lark().parse(text, start="start")
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    try:
        statements = _ToAst(file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise
    return ast.Spec(tuple(statements), file)


def parse_file(path: str | Path) -> ast.Spec:
    """Read and parse a spec file; unreadable or non-UTF-8 files are spec errors too."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # read a bounded amount: /dev/zero or a 10 GB file must not hang us
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"cannot read spec '{path}': {e.strerror or e}") from None
    if len(data) > MAX_SPEC_BYTES:
        register_source(str(path), "")  # so the error message does not read the file again to quote it
        raise SpecError(f"spec is larger than the limit of {MAX_SPEC_BYTES:,} bytes", Pos(str(path), 1, 1),
                        hint="a spec is a page of text; is this the right file?")
    if b"\x00" in data:  # say "binary" before a decoding error about some other byte can
        register_source(str(path), "")
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise SpecError("spec contains a NUL byte: is this a binary file?", Pos(str(path), line, 1))
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark (Windows editors) is not spec text
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        register_source(str(path), "")
        start = bom + e.start
        line = data[:start].count(b"\n") + 1
        col = start - data.rfind(b"\n", 0, start)
        raise SpecError(f"spec is not valid UTF-8 (byte 0x{data[start]:02x} at offset {start})",
                        Pos(str(path), line, col), hint="save the file as UTF-8") from None
    return parse(text, str(path))


_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def _open_bracket(text: str, end: int) -> tuple[int, int, str] | None:
    """(line, col, char) of the innermost bracket still open at offset `end`; strings and comments skipped."""
    stack: list[tuple[int, int, str]] = []
    line, col, i = 1, 1, 0
    in_string = False
    while i < min(end, len(text)):
        ch = text[i]
        if in_string:
            if ch == "\\":
                i, col = i + 1, col + 1
            elif ch == '"' or ch == "\n":
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            while i + 1 < len(text) and text[i + 1] != "\n":
                i += 1
        elif ch in _CLOSERS:
            stack.append((line, col, ch))
        elif ch in _CLOSERS.values() and stack and _CLOSERS[stack[-1][2]] == ch:
            stack.pop()
        line, col = (line + 1, 1) if ch == "\n" else (line, col + 1)
        i += 1
    return stack[-1] if stack else None


def _unclosed(e: UnexpectedInput, text: str, file: str, line: int, expected: str) -> SpecError | None:
    """An error after a line break that only a closing bracket would fix: report the open bracket."""
    end = len(text) if isinstance(e, UnexpectedEOF) or getattr(getattr(e, "token", None), "type", "") == "$END" \
        else getattr(e, "pos_in_stream", None)
    opened = _open_bracket(text, end) if end is not None else None
    if opened is None or f"'{_CLOSERS[opened[2]]}'" not in expected or opened[0] >= line:
        return None
    where = "the end of the file" if end == len(text) else f"line {line}"
    return SpecError(f"'{opened[2]}' is never closed", Pos(file, opened[0], opened[1]),
                     f"add the matching '{_CLOSERS[opened[2]]}'; the statement runs on to {where}")


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> SpecError:
    line, col = getattr(e, "line", 1), getattr(e, "column", 1)
    if isinstance(e, UnexpectedEOF | UnexpectedToken):
        eof = isinstance(e, UnexpectedEOF) or e.token.type == "$END"
        err_line = len(text.rstrip().splitlines() or [""]) + 1 if eof else line
        unclosed = _unclosed(e, text, file, err_line, _expected(e.expected if eof else (e.accepts or e.expected)))
        if unclosed is not None:
            return unclosed
    if isinstance(e, UnexpectedEOF) or (isinstance(e, UnexpectedToken) and e.token.type == "$END"):
        lines = text.rstrip().splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        return SpecError(f"unexpected end of file; {_expected(e.expected)}", Pos(file, line, col),
                         hint="an unclosed '(', '[' or '{'?" if _open_bracket(text, len(text)) else None)
    if isinstance(e, UnexpectedToken):
        found = e.token.type
        what = f"'{e.token}'" if found not in ("NAME", "NUMBER", "STRING") else \
            f"{_describe(found).removeprefix('a ')} '{e.token}'"
        hint = None
        if str(e.token) in _keywords() and "NAME" in (e.accepts or e.expected):
            hint = f"'{e.token}' is a reserved word; choose another name"
        return SpecError(f"unexpected {what}; {_expected(e.accepts or e.expected)}", Pos(file, line, col), hint)
    if isinstance(e, UnexpectedCharacters):
        char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        if char == '"':
            return SpecError("unterminated string", Pos(file, line, col), 'a string ends with " on the same line')
        return SpecError(f"unexpected character {char!r}; {_expected(e.allowed)}", Pos(file, line, col))
    return SpecError(str(e), Pos(file, line, col))


@functools.cache
def _keywords() -> frozenset[str]:
    terminals = _lark().terminals
    return frozenset(t.pattern.value for t in terminals if t.pattern.type == "str" and t.pattern.value.isalpha())


def parse_expr(text: str, file: str = "<expression>") -> ast.Expr:
    """Parse one expression, such as a path given on the command line or to `Experiment.forward`."""
    register_source(file, text)
    try:
        tree = _lark().parse(text, start="expr")
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    try:
        return _ToAst(file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise
