"""Text -> typed AST, through the Lark grammar in space.lark."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from nasdsl.errors import NasdslError
from nasdsl.language import ast

GRAMMAR = Path(__file__).with_name("space.lark")

# What the user typed, for "expected ..." messages, instead of Lark's terminal names.
_TERMINAL_TEXT = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "EQUAL": "'='", "VBAR": "'|'", "MORETHAN": "'>'", "NAME": "a name",
    "NUMBER": "a number", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'",
    "__ANON_0": "'//'", "__ANON_1": "'**'", "PERCENT": "'%'", "$END": "end of file",
}


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _pos(meta) -> ast.Pos:
    return ast.Pos(getattr(meta, "line", 1), getattr(meta, "column", 1))


def _tok_pos(tok: Token) -> ast.Pos:
    return ast.Pos(tok.line, tok.column)


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds typed nodes bottom-up, as in Lark's calculator example."""

    def start(self, meta, children):
        return children[0], tuple(children[1:])

    def header(self, meta, c):
        return ast.Header(str(c[0]), tuple(c[1] or ()), _pos(meta))

    def param(self, meta, c):
        return ast.Param(str(c[0]), c[1], True, _pos(meta))

    def let(self, meta, c):
        name, params, value = c
        return ast.Param(str(name), value, False, _pos(meta), tuple(params) if params is not None else None)

    def define(self, meta, c):
        return ast.Define(str(c[0]), tuple(c[1] or ()), c[2], _pos(meta))

    def names(self, meta, c):
        return [str(t) for t in c]

    def layer(self, meta, c):
        name, options, body = c
        return ast.Layer(str(name) if name is not None else None, tuple(options or ()), body, _pos(meta))

    def stage(self, meta, c):
        return ast.Stage(str(c[0]), tuple(c[1] or ()), tuple(c[2:]), _pos(meta))

    def options(self, meta, c):
        return c[0]

    def blocks(self, meta, c):
        return ast.Blocks(tuple(c), _pos(meta))

    def alternative(self, meta, c):
        return ast.Alternative(tuple(c[0]), tuple(c[1:]), _pos(meta))

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
        text = str(c[0])
        value = float(text) if any(ch in text for ch in ".eE") else int(text)
        return ast.Number(value, _tok_pos(c[0]))

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


def _expected(exc: UnexpectedInput) -> str:
    names = sorted({_TERMINAL_TEXT.get(t, f"'{t.lower()}'" if t.isupper() and len(t) < 10 else t)
                    for t in getattr(exc, "expected", ()) or ()})
    if not names:
        return ""
    if len(names) > 6:
        return ""
    return " (expected " + ", ".join(names) + ")"


def parse(source: str, file: str = "<string>") -> ast.Program:
    """Parse .space text; syntax errors become NasdslError with file, line and column."""
    try:
        header, statements = _ToAst().transform(_lark().parse(source))
    except UnexpectedCharacters as exc:
        char = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else "end of file"
        raise NasdslError(f"unexpected character {char!r}", file=file, line=exc.line,
                          column=exc.column, source=source) from None
    except UnexpectedEOF as exc:
        lines = source.splitlines() or [""]
        raise NasdslError("unexpected end of file" + _expected(exc), file=file, line=len(lines),
                          column=len(lines[-1]) + 1, source=source) from None
    except UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            lines = source.splitlines() or [""]
            raise NasdslError("unexpected end of file" + _expected(exc), file=file, line=len(lines),
                              column=len(lines[-1]) + 1, source=source) from None
        raise NasdslError(f"unexpected {str(tok)!r}" + _expected(exc), file=file, line=tok.line,
                          column=tok.column, source=source) from None
    except UnexpectedInput as exc:  # any other Lark input error
        raise NasdslError("syntax error", file=file, line=getattr(exc, "line", None),
                          column=getattr(exc, "column", None), source=source) from None
    except VisitError as exc:  # a malformed literal the lexer let through
        raise NasdslError(f"invalid syntax: {exc.orig_exc}", file=file, source=source) from None
    return ast.Program(header, statements, file=file, source=source)
