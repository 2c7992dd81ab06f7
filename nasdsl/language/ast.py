"""Typed syntax tree of a .space file. Every node remembers where it came from for error messages."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Pos:
    line: int
    column: int


# ---- expressions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    value: Union[int, float]
    pos: Pos


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class FunCall:
    func: str
    args: tuple["Argument", ...]
    pos: Pos


@dataclass(frozen=True)
class Tuple:
    items: tuple["Expr", ...]
    pos: Pos


Expr = Union[Number, Name, BinOp, Neg, FunCall, Tuple]


@dataclass(frozen=True)
class Argument:
    name: str | None  # None for a positional argument
    value: Expr
    pos: Pos


# ---- blocks and layers -------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """An op, a composite block or a `def` invoked by name: `mbconv(24, k=3, e=6)`."""
    name: str
    args: tuple[Argument, ...]
    pos: Pos


@dataclass(frozen=True)
class Comprehension:
    var: str
    iterable: Expr
    pos: Pos


@dataclass(frozen=True)
class Alternative:
    """A chain of ops (`conv(64) > bn > relu`), optionally repeated by `for` clauses."""
    chain: tuple[Call, ...]
    comprehensions: tuple[Comprehension, ...]
    pos: Pos
    placement: "Expr | None" = None   # `@ [...]`: the layer channels this block writes


@dataclass(frozen=True)
class Blocks:
    alternatives: tuple[Alternative, ...]
    pos: Pos


@dataclass(frozen=True)
class Header:
    name: str
    args: tuple[Argument, ...]
    pos: Pos


@dataclass(frozen=True)
class Param:
    name: str
    value: Expr
    overridable: bool  # `param` yes, `let` no
    pos: Pos
    params: tuple[str, ...] | None = None  # `let f(x) = ...` defines a value function


@dataclass(frozen=True)
class Define:
    name: str
    params: tuple[str, ...]
    body: Blocks
    pos: Pos


@dataclass(frozen=True)
class Residual:
    """`residual [chain] [@ index]`: an explicit shortcut; no chain means identity."""
    chain: tuple[Call, ...]
    placement: "Expr | None"
    pos: Pos


@dataclass(frozen=True)
class Layer:
    name: str | None
    options: tuple[Argument, ...]
    body: Blocks
    pos: Pos
    residual: Residual | None = None
    then: tuple[Call, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    options: tuple[Argument, ...]
    layers: tuple[Layer, ...]
    pos: Pos


Statement = Union[Param, Define, Layer, Stage]


@dataclass(frozen=True)
class Program:
    header: Header
    statements: tuple[Statement, ...]
    file: str = "<string>"
    source: str = field(default="", repr=False)
