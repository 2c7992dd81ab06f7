"""Text -> typed AST, through the Lark grammar in space.lark."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from nasdsl.errors import NasdslError
from nasdsl.language import ast

GRAMMAR = Path(__file__).with_name("space.lark")

MAX_NESTING = 100          # levels of brackets, operators and unary signs in one statement
MAX_NUMBER = 10 ** 18      # the largest magnitude a number may have, in the source or computed

# Groups of terminals that "expected ..." messages name as one thing.
_OPERATORS = {"+", "-", "*", "/", "//", "%", "**"}
_STATEMENTS = {"PARAM", "LET", "DEF", "LAYER", "STAGE"}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True,
                start=["start", "setting"])


@lru_cache(maxsize=1)
def _terminal_text() -> dict[str, str]:
    """What the user typed for each terminal, for "expected ..." messages, instead of Lark's names."""
    text = {"NAME": "a name", "NUMBER": "a number", "$END": "end of file"}
    for t in _lark().terminals:
        if t.name not in text and t.pattern.type == "str":
            text[t.name] = repr(t.pattern.value)
    return text


def _pos(meta) -> ast.Pos:
    return ast.Pos(getattr(meta, "line", 1), getattr(meta, "column", 1))


def _tok_pos(tok: Token) -> ast.Pos:
    return ast.Pos(tok.line, tok.column)


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds typed nodes bottom-up, as in Lark's calculator example."""

    def __init__(self, error):
        super().__init__()
        self.error = error

    def start(self, meta, children):
        return children[0], tuple(children[1:])

    def header(self, meta, c):
        return ast.Header(str(c[0]), tuple(c[1] or ()), _pos(meta))

    def setting(self, meta, c):
        return c[0]

    def param(self, meta, c):
        return ast.Param(str(c[0]), c[1], True, _tok_pos(c[0]))

    def let(self, meta, c):
        name, params, value = c
        return ast.Param(str(name), value, False, _tok_pos(name), tuple(params) if params is not None else None)

    def formals(self, meta, c):
        return list(c[0] or ())

    def define(self, meta, c):
        return ast.Define(str(c[0]), tuple(c[1] or ()), c[2], _tok_pos(c[0]))

    def names(self, meta, c):
        return [str(t) for t in c]

    def layer(self, meta, c):
        name, options, body, residual, then = c
        return ast.Layer(str(name) if name is not None else None, tuple(options or ()), body, _pos(meta),
                         residual, tuple(then or ()))

    def residual(self, meta, c):
        chain, placement = c
        return ast.Residual(tuple(chain or ()), placement, _pos(meta))

    def then(self, meta, c):
        return c[0]

    def placement(self, meta, c):
        return c[0]

    def stage(self, meta, c):
        return ast.Stage(str(c[0]), tuple(c[1] or ()), tuple(c[2:]), _pos(meta))

    def options(self, meta, c):
        return c[0]

    def blocks(self, meta, c):
        return ast.Blocks(tuple(c), _pos(meta))

    def alternative(self, meta, c):
        *comprehensions, placement = c[1:]
        return ast.Alternative(tuple(c[0]), tuple(comprehensions), _pos(meta), placement)

    def comprehension(self, meta, c):
        return ast.Comprehension(str(c[0]), c[1], _pos(meta))

    def chain(self, meta, c):
        return list(c)

    def call(self, meta, c):
        return ast.Call(str(c[0]), tuple(c[1] or ()), _tok_pos(c[0]))

    def arguments(self, meta, c):
        return [a for a in c if a is not None]

    def positional(self, meta, c):
        return ast.Argument(None, c[0], _pos(meta))

    def keyword(self, meta, c):
        return ast.Argument(str(c[0]), c[1], _tok_pos(c[0]))

    # expressions
    def number(self, meta, c):
        tok = c[0]
        text = str(tok)
        if any(ch in text for ch in ".eE"):
            value = float(text)
        else:
            digits = text.lstrip("0") or "0"
            value = int(digits) if len(digits) <= 19 else math.inf  # no 4300-digit ValueError
        if not abs(value) <= MAX_NUMBER:
            raise self.error(f"number too large: {text if len(text) <= 20 else text[:17] + '...'} "
                             f"(the limit is 1e18)", tok.line, tok.column)
        return ast.Number(value, _tok_pos(tok))

    def name(self, meta, c):
        return ast.Name(str(c[0]), _tok_pos(c[0]))

    def funcall(self, meta, c):
        return ast.FunCall(str(c[0]), tuple(c[1] or ()), _tok_pos(c[0]))

    def tuple(self, meta, c):
        items = []
        for child in c:
            if isinstance(child, list):
                items.extend(child)
            elif child is not None:
                items.append(child)
        return ast.Tuple(tuple(items), _pos(meta))

    def exprs(self, meta, c):
        return [e for e in c if e is not None]

    def _binop(self, op, meta, c):
        return ast.BinOp(op, c[0], c[1], _pos(meta))

    def add(self, meta, c):
        return self._binop("+", meta, c)

    def sub(self, meta, c):
        return self._binop("-", meta, c)

    def mul(self, meta, c):
        return self._binop("*", meta, c)

    def div(self, meta, c):
        return self._binop("/", meta, c)

    def floordiv(self, meta, c):
        return self._binop("//", meta, c)

    def mod(self, meta, c):
        return self._binop("%", meta, c)

    def pow(self, meta, c):
        return self._binop("**", meta, c)

    def neg(self, meta, c):
        return ast.Neg(c[0], _pos(meta))


def _expected(names) -> str:
    """' (expected ')' or ',')' from the terminals the parser would accept, operators and statement
    keywords named as groups; '' when there are too many to be useful."""
    text = _terminal_text()
    names = set(names)
    items = []
    if names & _STATEMENTS == _STATEMENTS:
        names -= _STATEMENTS | {"$END"}
        items.append("a new statement")
    ops = {n for n in names if text.get(n, "").strip("'") in _OPERATORS}
    if len(ops) > 2:
        names -= ops
        items.append("an operator")
    items = sorted(text.get(n, n) for n in names) + items
    if not items or len(items) > 8:
        return ""
    return " (expected " + (", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]) + ")"


def _accepts(exc: UnexpectedInput) -> set[str]:
    parser = getattr(exc, "interactive_parser", None)
    if parser is not None:
        try:
            return set(parser.accepts())
        except Exception:  # noqa: BLE001 - fall back to Lark's coarser set
            pass
    return set(getattr(exc, "expected", ()) or ())


def _end_of_input(source: str) -> tuple[int, int]:
    """Line and column just after the last character that is not whitespace or a comment."""
    lines = source.split("\n")
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i].split("#", 1)[0].rstrip(" \t\r\f")
        if text:
            return i + 1, len(text) + 1
    return 1, 1


def _check_nesting(tree, error) -> None:
    """Refuse trees deeper than MAX_NESTING before the recursive transform and evaluation see them."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if depth > MAX_NESTING:
            meta = node.meta
            raise error(f"too deeply nested (more than {MAX_NESTING} levels)",
                        getattr(meta, "line", None), getattr(meta, "column", None))
        stack.extend((child, depth + 1) for child in node.children)


def _parse(source: str, file: str, start: str):
    def error(message, line, column):
        return NasdslError(message, file=file, line=line, column=column, source=source)

    try:
        tree = _lark().parse(source, start=start)
    except UnexpectedCharacters as exc:
        char = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else "end of file"
        raise error(f"unexpected character {char!r}", exc.line, exc.column) from None
    except UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            accepts = _accepts(exc)
            if start == "start" and accepts == {"SPACE"}:  # nothing but whitespace and comments
                raise error("empty file: a space starts with `space NAME(...)`", 1, 1) from None
            line, column = _end_of_input(source)
            raise error("unexpected end of file" + _expected(accepts), line, column) from None
        text = str(tok) if len(str(tok)) <= 20 else str(tok)[:17] + "..."
        raise error(f"unexpected {text!r}" + _expected(_accepts(exc)), tok.line, tok.column) from None
    except UnexpectedEOF as exc:
        line, column = _end_of_input(source)
        raise error("unexpected end of file" + _expected(_accepts(exc)), line, column) from None
    except UnexpectedInput as exc:  # any other Lark input error
        raise error("syntax error", getattr(exc, "line", None), getattr(exc, "column", None)) from None
    _check_nesting(tree, error)
    try:
        return _ToAst(error).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, NasdslError):
            raise exc.orig_exc from None
        raise error(f"invalid syntax: {exc.orig_exc}", None, None) from None


def parse(source: str, file: str = "<string>") -> ast.Program:
    """Parse .space text; syntax errors become NasdslError with file, line and column."""
    header, statements = _parse(source, file, "start")
    return ast.Program(header, statements, file=file, source=source)


def parse_expr(text: str, file: str = "<string>") -> ast.Expr:
    """Parse one expression, the value of a `--set NAME=VALUE`."""
    return _parse(text, file, "setting")
