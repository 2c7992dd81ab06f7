"""AST -> graph IR: evaluates parameters, expands defs, stages and comprehensions, lowers every
call to primitive ops with shape inference, and validates the result. Errors carry file:line:col."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from nasdsl.errors import NasdslError, did_you_mean
from nasdsl.graph.ir import Block, Layer, Network, Shape, Shortcut
from nasdsl.graph.ops import ACTIVATIONS, SE_GATES, ShapeError
from nasdsl.language import ast
from nasdsl.language.builtins import BOOL_WORDS, BUILTINS, Arg, Lowering, Parts, Symbol, make_divisible
from nasdsl.language.parser import MAX_NUMBER, parse, parse_expr

HEADER_FIELDS = {"input": 3, "resolution": 224, "classes": 1000}
MAX_DEF_DEPTH = 32          # defs calling defs
MAX_EVAL_DEPTH = 200        # nested expressions, counting the bodies of `let` functions they call
MAX_FUNCTION_CALLS = 100_000  # calls of `let` functions in one compilation
MAX_SIZE = 1_000_000        # channels, kernels, strides, padding, resolution, classes
MAX_RANGE = 100_000         # values of one range()
MAX_OPS = 20_000            # op calls after expanding defs, stages and `for`s, in one network


def _range(*args):
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise ValueError(f"too many values (the limit is {MAX_RANGE:,})")
    return tuple(r)


def _round(number, ndigits=None):
    if ndigits is None:
        return round(number)
    if isinstance(ndigits, float) or abs(ndigits) > 30:
        raise ValueError(f"ndigits must be an integer between -30 and 30, got {ndigits!r}")
    return round(number, ndigits)


FUNCTIONS = {
    "make_divisible": make_divisible,
    "round": _round, "int": int, "float": float, "min": min, "max": max,
    "floor": math.floor, "ceil": math.ceil, "range": _range,
}


def compile_file(path: str | Path, overrides: dict[str, str] | None = None) -> Network:
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise NasdslError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    except UnicodeDecodeError:
        raise NasdslError("not a text file (it is not UTF-8)", file=str(path)) from None
    if "\0" in source:
        raise NasdslError("not a text file (it contains NUL bytes)", file=str(path))
    return compile_source(source, str(path), overrides)


def compile_source(source: str, file: str = "<string>", overrides: dict[str, str] | None = None) -> Network:
    try:
        return Compiler(parse(source, file), overrides or {}).run()
    except RecursionError:  # the limits above should prevent it; never show a traceback
        raise NasdslError("too deeply nested (recursive defs or functions?)", file=file) from None


@dataclass
class _Scope:
    values: dict
    parent: "_Scope | None" = None

    def lookup(self, name):
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            scope = scope.parent
        raise KeyError(name)

    def names(self):
        scope, out = self, set()
        while scope is not None:
            out |= set(scope.values)
            scope = scope.parent
        return out

    def child(self, values: dict) -> "_Scope":
        return _Scope(values, self)


@dataclass
class _Context:
    """Where a call is being lowered: the layer's gating switch and a pending stage stride."""
    gate: bool = True
    stride: int | None = None
    depth: int = 0
    seen_defs: tuple = field(default_factory=tuple)
    stage: str | None = None


class Compiler:
    def __init__(self, program: ast.Program, overrides: dict[str, str]):
        self.program = program
        self.overrides = dict(overrides)
        self.defs: dict[str, ast.Define] = {}
        self.layers: list[Layer] = []
        self.layer_names: set[str] = set()
        self.block_names: dict[str, str] = {}   # block name -> its layer: names are gate keys and graph nodes
        self.shape: Shape | None = None
        self.eval_depth = 0         # nesting of eval(), bounded by MAX_EVAL_DEPTH
        self.function_calls = 0     # `let` function calls, bounded by MAX_FUNCTION_CALLS
        self.ops_expanded = 0       # op calls after expansion, bounded by MAX_OPS

    # ---- errors ------------------------------------------------------------------------------
    def error(self, message: str, pos: ast.Pos | None) -> NasdslError:
        return NasdslError(message, file=self.program.file, line=pos.line if pos else None,
                           column=pos.column if pos else None, source=self.program.source)

    # ---- driver ------------------------------------------------------------------------------
    def run(self) -> Network:
        header = self.program.header
        scope = _Scope(dict(FUNCTIONS))
        params: dict = {}
        overridable: set[str] = set()
        header_values = dict(HEADER_FIELDS)
        given = set()
        for arg in header.args:
            if arg.name is None:
                raise self.error("header arguments are named: input=, resolution=, classes=", arg.pos)
            if arg.name not in HEADER_FIELDS:
                hint = did_you_mean(arg.name, HEADER_FIELDS) or " (expected input, resolution or classes)"
                raise self.error(f"unknown header argument '{arg.name}'{hint}", arg.pos)
            if arg.name in given:
                raise self.error(f"header argument '{arg.name}' given twice", arg.pos)
            given.add(arg.name)
            header_values[arg.name] = self.positive_int(self.eval(arg.value, scope), arg.name, arg.value)
        for name, value in header_values.items():
            params[name] = self.apply_override(name, value)
            overridable.add(name)
        scope.values.update(params)

        for stmt in self.program.statements:
            if isinstance(stmt, ast.Param):
                if stmt.name in scope.values and stmt.name not in FUNCTIONS:
                    what = "a header field" if stmt.name in HEADER_FIELDS else "already defined"
                    raise self.error(f"'{stmt.name}' is {what}", stmt.pos)
                if stmt.params is not None:
                    self.check_formals(stmt.name, stmt.params, stmt.pos)
                    scope.values[stmt.name] = _UserFunction(stmt, self, scope)
                    continue
                value = self.eval(stmt.value, scope)
                if stmt.overridable:
                    value = self.apply_override(stmt.name, value)
                    overridable.add(stmt.name)
                scope.values[stmt.name] = params[stmt.name] = value
            elif isinstance(stmt, ast.Define):
                if stmt.name in BUILTINS:
                    raise self.error(f"'{stmt.name}' is a builtin op; give the def another name", stmt.pos)
                if stmt.name in self.defs:
                    raise self.error(f"'{stmt.name}' is already defined", stmt.pos)
                self.check_formals(stmt.name, stmt.params, stmt.pos)
                self.defs[stmt.name] = stmt

        for name, text in self.overrides.items():
            setting = _setting(name, text)
            if (name in params and name not in overridable) or isinstance(scope.values.get(name), _UserFunction):
                raise NasdslError(f"'{name}' is a `let`, computed in {self.program.file}; only a `param` or "
                                  f"input, resolution, classes can be set", file=setting)
            raise NasdslError(f"unknown parameter '{name}' in {self.program.file}"
                              f"{did_you_mean(name, overridable)}", file=setting)

        self.shape = Shape(params["input"], (params["resolution"], params["resolution"]))
        input_shape = self.shape
        for stmt in self.program.statements:
            if isinstance(stmt, ast.Layer):
                self.layer(stmt, scope, self.auto_name(stmt.name, f"layer{len(self.layers)}"), None)
            elif isinstance(stmt, ast.Stage):
                self.stage(stmt, scope)
        if not self.layers:
            raise self.error("the space has no layers", header.pos)
        out = self.layers[-1].out_shape
        if not out.is_flat or out.channels != params["classes"]:
            last = [s for s in self.program.statements if isinstance(s, (ast.Layer, ast.Stage))][-1]
            hint = "" if out.is_flat else "; end it with gap > linear(classes)"
            raise self.error(f"the network must end with {params['classes']} class scores (classes="
                             f"{params['classes']}), but its output is {_describe(out)}{hint}", last.pos)
        return Network(header.name, input_shape, params["classes"], tuple(self.layers), params,
                       source=self.program.file)

    def apply_override(self, name: str, default):
        if name not in self.overrides:
            return default
        text = self.overrides.pop(name)
        setting = _setting(name, text)
        try:
            value = self.eval(parse_expr(text, setting), _Scope(dict(FUNCTIONS)))
        except NasdslError as exc:
            raise NasdslError(f"not a valid value: {exc.message}", file=setting) from None
        if isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise NasdslError(f"expected a number like the default {default!r}, got {_show(value)}", file=setting)
        if name in HEADER_FIELDS:
            if not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) \
                    or not 1 <= value <= MAX_SIZE:
                raise NasdslError(f"expected an integer from 1 to {MAX_SIZE:,}", file=setting)
            value = int(value)
        return value

    def check_formals(self, name: str, formals: tuple[str, ...], pos: ast.Pos) -> None:
        seen = set()
        for f in formals:
            if f in seen:
                raise self.error(f"'{name}' names its argument '{f}' twice", pos)
            seen.add(f)

    def auto_name(self, name: str | None, fallback: str) -> str:
        return name if name is not None else fallback

    # ---- expressions -------------------------------------------------------------------------
    def eval(self, expr: ast.Expr, scope: _Scope):
        if self.eval_depth >= MAX_EVAL_DEPTH:
            raise self.error(f"too deeply nested (more than {MAX_EVAL_DEPTH} levels, counting the functions "
                             f"it calls; a recursive `let` function?)", getattr(expr, "pos", None))
        self.eval_depth += 1
        try:
            return self._eval(expr, scope)
        finally:
            self.eval_depth -= 1

    def _eval(self, expr: ast.Expr, scope: _Scope):
        if isinstance(expr, ast.Number):
            return expr.value
        if isinstance(expr, ast.Name):
            try:
                value = scope.lookup(expr.id)
            except KeyError:
                return Symbol(expr.id)
            if callable(value):
                raise self.error(f"'{expr.id}' is a function; call it as {expr.id}(...)", expr.pos)
            return value
        if isinstance(expr, ast.Tuple):
            return tuple(self.eval(e, scope) for e in expr.items)
        if isinstance(expr, ast.Neg):
            return -self.number(self.eval(expr.operand, scope), expr.operand, scope)
        if isinstance(expr, ast.BinOp):
            left = self.number(self.eval(expr.left, scope), expr.left, scope)
            right = self.number(self.eval(expr.right, scope), expr.right, scope)
            if expr.op == "**" and abs(left) > 1 and right > 128:
                raise self.error(_TOO_LARGE, expr.pos)
            try:
                return self.checked(_BINOPS[expr.op](left, right), expr.pos)
            except ZeroDivisionError:
                raise self.error("division by zero", expr.pos) from None
            except OverflowError:
                raise self.error(_TOO_LARGE, expr.pos) from None
        if isinstance(expr, ast.FunCall):
            try:
                func = scope.lookup(expr.func)
            except KeyError:
                func = None
            if func is not None and not callable(func):
                raise self.error(f"'{expr.func}' is {_show(func)}, not a function", expr.pos)
            if not callable(func):
                known = {n for n in scope.names() if callable(scope.lookup(n))}
                hint = did_you_mean(expr.func, known)
                if not hint and expr.func in self.defs | BUILTINS:
                    hint = f" ('{expr.func}' is an op; ops build layers, functions compute values)"
                raise self.error(f"unknown function '{expr.func}'{hint}", expr.pos)
            args = [self.eval(a.value, scope) for a in expr.args if a.name is None]
            kwargs = {a.name: self.eval(a.value, scope) for a in expr.args if a.name is not None}
            for a, v in zip([a for a in expr.args if a.name is None], args):
                if not isinstance(v, (int, float, tuple)):
                    self.number(v, a.value, scope)
            if isinstance(func, _UserFunction):
                return func.call(args, kwargs, expr)
            try:
                return self.checked(func(*args, **kwargs), expr.pos)
            except ZeroDivisionError:
                raise self.error(f"{expr.func}(): division by zero", expr.pos) from None
            except OverflowError:
                raise self.error(f"{expr.func}(): {_TOO_LARGE}", expr.pos) from None
            except (TypeError, ValueError, ArithmeticError) as exc:
                message = str(exc).replace(f"{getattr(func, '__name__', '')}()", f"{expr.func}()")
                message = message if message.startswith(f"{expr.func}()") else f"{expr.func}(): {message}"
                raise self.error(message, expr.pos) from None
        raise self.error("invalid expression", getattr(expr, "pos", None))  # pragma: no cover

    def checked(self, value, pos):
        """Arithmetic stays real and finite, below MAX_NUMBER: no inf, nan, complex or huge integers."""
        if isinstance(value, complex):
            raise self.error("not a real number (a fractional power of a negative number?)", pos)
        if isinstance(value, (int, float)) and not abs(value) <= MAX_NUMBER:
            raise self.error(_TOO_LARGE, pos)
        return value

    def number(self, value, expr, scope, what: str = ""):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, Symbol) and not self.is_word(value):
                raise self.error(f"undefined parameter '{value}'{did_you_mean(value, self.visible(scope))}",
                                 expr.pos)
            raise self.error(f"{what + ' expects' if what else 'expected'} a number, got {_show(value)}",
                             expr.pos)
        return value

    def is_word(self, value: str) -> bool:
        """A bare word the language knows (an op, on/off, an activation, a shortcut kind): not a typo."""
        return (value in BUILTINS or value in self.defs or value.lower() in BOOL_WORDS or value in ACTIVATIONS
                or value in SE_GATES or value in ("auto", "identity", "pad", "proj", "in", "mid"))

    def visible(self, scope: _Scope):
        return {n for n in scope.names() if n not in FUNCTIONS}

    def positive_int(self, value, what: str, expr) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, Symbol) and not self.is_word(value):
                raise self.error(f"undefined parameter '{value}'", expr.pos)
            raise self.error(f"{what} must be an integer, got {_show(value)}", expr.pos)
        if not 1 <= value <= MAX_SIZE:
            raise self.error(f"{what} must be from 1 to {MAX_SIZE:,}, got {value}", expr.pos)
        return value

    # ---- arguments ---------------------------------------------------------------------------
    def bind(self, name: str, sig: tuple[Arg, ...], args: tuple[ast.Argument, ...], scope: _Scope,
             pos: ast.Pos) -> dict:
        """Match call arguments to a signature, check their types, fill in defaults."""
        bound: dict = {}
        where: dict = {}
        positional = [a for a in args if a.name is None]
        if any(a.name is None for a in args[len(positional):]):
            first = next(a for a in args[len(positional):] if a.name is None)
            raise self.error("positional argument after a keyword argument", first.pos)
        if len(positional) > len(sig):
            if not sig:
                raise self.error(f"{name} takes no arguments", positional[0].pos)
            raise self.error(f"{name} takes at most {len(sig)} positional argument"
                             f"{'s' if len(sig) != 1 else ''}, got {len(positional)}", positional[len(sig)].pos)
        for spec, a in zip(sig, positional):
            bound[spec.name], where[spec.name] = a.value, a
        names = {s.name for s in sig}
        for a in args[len(positional):]:
            if a.name not in names:
                hint = did_you_mean(a.name, names) or (
                    f" ({name} takes {', '.join(s.name for s in sig)})" if sig else f" ({name} takes no arguments)")
                raise self.error(f"unknown argument '{a.name}' for {name}{hint}", a.pos)
            if a.name in bound:
                raise self.error(f"argument '{a.name}' given twice", a.pos)
            bound[a.name], where[a.name] = a.value, a
        out = {}
        for spec in sig:
            if spec.name not in bound:
                if spec.required:
                    raise self.error(f"{name} needs argument '{spec.name}'", pos)
                out[spec.name] = spec.default
                continue
            expr = bound[spec.name]
            out[spec.name] = self.check_type(name, spec, self.eval(expr, scope), expr, scope)
        return out

    def check_type(self, op: str, spec: Arg, value, expr, scope):
        what = f"{op}: {spec.name}"
        if spec.type == "index":
            if not isinstance(value, tuple) or not value or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                raise self.error(f"{what} expects a list of channel indices like [0, 2, 5], got {_show(value)}",
                                 expr.pos)
            return value
        if spec.type in ("kernels", "counts"):
            return self.int_list(op, spec, value, expr, scope)
        if spec.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, Symbol) and value.lower() in BOOL_WORDS:
                return BOOL_WORDS[value.lower()]
            raise self.error(f"{what} expects on or off, got {_show(value)}", expr.pos)
        if spec.type == "enum":
            if isinstance(value, Symbol) and value in spec.choices:
                return str(value)
            hint = did_you_mean(str(value), spec.choices) if isinstance(value, str) else ""
            raise self.error(f"{what} expects one of {', '.join(spec.choices)}, got {_show(value)}{hint}", expr.pos)
        self.number(value, expr, scope, what)
        if spec.type in ("float", "float0", "prob"):
            if spec.type == "prob" and not 0 <= value < 1:
                raise self.error(f"{what} must be in [0, 1), got {value}", expr.pos)
            if spec.type == "float" and value <= 0:
                raise self.error(f"{what} must be positive, got {value}", expr.pos)
            if spec.type == "float0" and value < 0:
                raise self.error(f"{what} must be 0 or more, got {value}", expr.pos)
            return float(value)
        if isinstance(value, float):
            if not value.is_integer():
                hint = "; round it with make_divisible(x, 8) or int(x)" if spec.type == "channels" else ""
                raise self.error(f"{what} must be an integer, got {value:g}{hint}", expr.pos)
            value = int(value)
        minimum = 0 if spec.type == "int0" else 1
        if value < minimum:
            unit = " channel" if spec.type == "channels" else ""
            raise self.error(f"{what} must be at least {minimum}{unit}, got {value}", expr.pos)
        if value > MAX_SIZE:
            raise self.error(f"{what} must be at most {MAX_SIZE:,}, got {value}", expr.pos)
        return value

    def int_list(self, op: str, spec: Arg, value, expr, scope):
        """`kernels`: a kernel or a list of them (mixed kernels); `counts`: a list of channel counts.
        Each number is checked as a kernel or a channel count is."""
        if spec.type == "kernels" and not isinstance(value, tuple):
            return self.check_type(op, replace(spec, type="kernel"), value, expr, scope)
        if not isinstance(value, tuple) or not value:
            what = f"{op}: {spec.name}"
            example = "3 or [3, 5, 7]" if spec.type == "kernels" else "[48, 48]"
            raise self.error(f"{what} expects {'a kernel or ' if spec.type == 'kernels' else ''}a list like "
                             f"{example}, got {_show(value)}", expr.pos)
        one = replace(spec, type="kernel" if spec.type == "kernels" else "channels")
        return tuple(self.check_type(op, one, v, expr, scope) for v in value)

    # ---- layers ------------------------------------------------------------------------------
    LAYER_OPTIONS = (Arg("gate", "bool", True), Arg("residual", "enum", "auto", choices=("auto", "on", "off")))
    STAGE_OPTIONS = (Arg("repeat", "stride", 1), Arg("stride", "stride", 1))

    def stage(self, stmt: ast.Stage, scope: _Scope) -> None:
        opts = self.bind(f"stage {stmt.name}", self.STAGE_OPTIONS, stmt.options, scope, stmt.pos)
        multi = len(stmt.layers) > 1
        for rep in range(opts["repeat"]):
            for i, layer in enumerate(stmt.layers):
                suffix = "." + (layer.name or str(i)) if multi or layer.name else ""
                stride = opts["stride"] if rep == 0 and i == 0 and opts["stride"] != 1 else None
                self.layer(layer, scope, f"{stmt.name}.{rep}{suffix}", stride, stmt.name)

    def layer(self, stmt: ast.Layer, scope: _Scope, name: str, stride: int | None,
              stage: str | None = None) -> None:
        if name in self.layer_names:
            raise self.error(f"layer '{name}' is already defined", stmt.pos)
        if name == "input":
            raise self.error("'input' names the network's input; give the layer another name", stmt.pos)
        if name in self.block_names:
            raise self.error(f"layer name '{name}' is taken by a block of layer '{self.block_names[name]}'", stmt.pos)
        self.layer_names.add(name)
        opts = self.bind(f"layer {name}", self.LAYER_OPTIONS, stmt.options, scope, stmt.pos)
        ctx = _Context(gate=opts["gate"], stride=stride, stage=stage)
        chains = self.expand(stmt.body, scope, ctx)
        in_shape = self.shape
        built = []
        for i, (chain, placement, pos) in enumerate(chains):
            block_name = name if len(chains) == 1 else f"{name}.b{i}"
            block, parts = self.block(block_name, chain, None, ctx, in_shape, pos)
            if placement is not None:
                block = replace(block, index=self.index(placement, block.out_shape.channels))
            built.append(((block, parts), pos))
        (first, parts0), _ = built[0]
        for ((b, parts), pos) in built[1:]:
            if b.out_shape != first.out_shape and b.index is None and first.index is None:
                raise self.error(f"parallel blocks are summed, so their outputs must match: {first.label} "
                                 f"gives {_describe(first.out_shape)}, {b.label} gives {_describe(b.out_shape)}",
                                 pos)
            if (parts.shortcut, [o.attrs for o in parts.post]) != (parts0.shortcut, [o.attrs for o in parts0.post]):
                raise self.error(f"parallel blocks share the layer's shortcut and post-activation, so "
                                 f"{first.label} and {b.label} must agree on them", pos)
        blocks = [b for (b, _), _ in built]
        for b in blocks:
            if b.name != name and (b.name in self.layer_names or b.name in self.block_names):
                raise self.error(f"layer '{name}' names a block '{b.name}', but that name is taken by layer "
                                 f"'{self.block_names.get(b.name, b.name)}'", stmt.pos)
        self.block_names.update((b.name, name) for b in blocks)
        out_shape = first.out_shape
        shortcut, post = parts0.shortcut, tuple(parts0.post)
        auto_residual = all(b.kind in BUILTINS and BUILTINS[b.kind].auto_residual and b.args.get("stride") == 1
                         for b in blocks)
        if shortcut is None and (opts["residual"] == "on" or
                                 (opts["residual"] == "auto" and auto_residual and in_shape == out_shape)):
            if in_shape != out_shape:
                option = next((a for a in stmt.options if a.name == "residual"), None)
                raise self.error(f"residual add of unequal shapes: the layer's input is {_describe(in_shape)}, "
                                 f"its output {_describe(out_shape)}", option.pos if option else stmt.pos)
            shortcut = Shortcut()
        elif opts["residual"] == "off":
            shortcut = None
        if stmt.residual is not None or stmt.then or any(b.index is not None for b in blocks):
            shortcut, post, out_shape = self.explicit_parts(stmt, blocks, in_shape, shortcut, post, scope)
        self.layers.append(Layer(name, tuple(blocks), in_shape, out_shape, shortcut, post))
        self.shape = out_shape

    def index(self, placement, channels: int) -> tuple[int, ...]:
        """`@ [...]`: distinct non-negative channel positions, one per channel placed."""
        expr, scope = placement
        value = self.eval(expr, scope)
        if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.error(f"`@` takes a list of channel positions, got {_show(value)}", expr.pos)
        if len(value) != channels:
            raise self.error(f"`@` places {channels} channels, but lists {len(value)} positions", expr.pos)
        if len(set(value)) != len(value) or min(value, default=0) < 0:
            raise self.error("`@` positions must be distinct and non-negative", expr.pos)
        if max(value, default=0) >= MAX_SIZE:
            raise self.error(f"`@` position {max(value):,} is beyond the limit of {MAX_SIZE:,} channels", expr.pos)
        return value

    def explicit_parts(self, stmt: ast.Layer, blocks, in_shape: Shape, shortcut, post, scope):
        """A layer written out in full (as derived networks are): placed blocks, `residual`, `then`."""
        placed = [b.index for b in blocks if b.index is not None]
        sc_ops, sc_index = (), None
        if stmt.residual is not None:
            if shortcut is not None and shortcut.ops:
                raise self.error("this layer's blocks already bring a shortcut; drop `residual`", stmt.residual.pos)
            lo = Lowering(f"{stmt.name}.shortcut", in_shape, False)
            sc_ops = tuple(self.lower_chain(lo, stmt.residual.chain, scope))
            sc_shape = sc_ops[-1].out_shape if sc_ops else in_shape
            if stmt.residual.placement is not None:
                sc_index = self.index((stmt.residual.placement, scope), sc_shape.channels)
                placed.append(sc_index)
        sc_shape = (sc_ops[-1].out_shape if sc_ops else in_shape) if stmt.residual is not None else None
        unplaced = [b.out_shape.channels for b in blocks if b.index is None]
        if sc_shape is not None and sc_index is None:
            unplaced.append(sc_shape.channels)
        width = max([max(ix) + 1 for ix in placed if ix] + unplaced)
        size = blocks[0].out_shape.size if blocks else in_shape.size
        out_shape = Shape(width, size)
        for b in blocks:
            if b.out_shape.size != size or (b.index is None and b.out_shape.channels != width):
                raise self.error(f"block {b.label} gives {_describe(b.out_shape)}, but the layer is "
                                 f"{_describe(out_shape)}: place its channels with `@ [...]`", stmt.pos)
        if stmt.residual is not None:
            if sc_shape.size != size or (sc_index is None and sc_shape.channels != width):
                raise self.error(f"residual add of unequal shapes: the shortcut gives {_describe(sc_shape)}, "
                                 f"the layer {_describe(out_shape)}", stmt.residual.pos)
            shortcut = Shortcut(sc_ops, sc_index)
        if stmt.then:
            lo = Lowering(f"{stmt.name}.then", out_shape, False)
            post = tuple(self.lower_chain(lo, stmt.then, scope))
            if post[-1].out_shape != out_shape:
                raise self.error("`then` ops must keep the layer's shape (activations, dropout)", stmt.then[0].pos)
        return shortcut, post, out_shape

    def lower_chain(self, lo: Lowering, calls, scope) -> list:
        ops = []
        for call in calls:
            builtin = BUILTINS.get(call.name)
            if builtin is None or builtin.composite:
                raise self.error(f"only primitive ops can form a shortcut or follow `then`, not '{call.name}'",
                                 call.pos)
            a = self.bind(call.name, builtin.args, call.args, scope, call.pos)
            try:
                ops.extend(builtin.lower(lo, a).ops)
            except (ShapeError, ValueError, ArithmeticError) as exc:
                raise self.error(f"{call.name}: {exc}", call.pos) from None
        return ops

    def expand(self, body: ast.Blocks, scope: _Scope, ctx: _Context) -> list:
        """Flatten alternatives, comprehensions and defs into (calls, scope, pos) chains of builtins."""
        out = []
        for alt in body.alternatives:
            for bound in self.comprehend(alt.comprehensions, scope):
                chains = self.expand_chain(alt.chain, bound, ctx, alt.pos)
                if alt.placement is not None:
                    chains = [(calls, (alt.placement, bound), p) for calls, _, p in chains]
                self.ops_expanded += sum(max(1, len(calls)) for calls, _, _ in chains)
                if self.ops_expanded > MAX_OPS:
                    raise self.error(f"the network is too large: more than {MAX_OPS:,} ops after expanding "
                                     f"defs, stages and `for`s", alt.pos)
                out.extend(chains)
        if not out:
            raise self.error("this layer has no blocks (an empty `for` range?)", body.pos)
        return out

    def comprehend(self, comps, scope):
        if not comps:
            yield scope
            return
        head, rest = comps[0], comps[1:]
        values = self.eval(head.iterable, scope)
        if not isinstance(values, tuple):
            raise self.error(f"`for {head.var} in` needs a list like [3, 5, 7] or range(n), "
                             f"got {_show(values)}", head.iterable.pos)
        for v in values:
            yield from self.comprehend(rest, scope.child({head.var: v}))

    def expand_chain(self, chain, scope, ctx, pos) -> list:
        """A chain may call defs; a def that yields one chain is inlined, several only stand alone."""
        results = [([], None)]  # list of (calls with their scopes, first pos)
        for call in chain:
            if call.name in self.defs:
                d = self.defs[call.name]
                if ctx.depth >= MAX_DEF_DEPTH:
                    raise self.error(f"defs nested too deeply (is '{call.name}' recursive?)", call.pos)
                values = self.bind_def(d, call, scope)
                sub = self.expand(d.body, values, _Context(ctx.gate, ctx.stride, ctx.depth + 1, stage=ctx.stage))
                if len(sub) > 1 and len(chain) > 1:
                    raise self.error(f"'{call.name}' has {len(sub)} parallel blocks, so it cannot be "
                                     f"chained with other ops; put it in a layer of its own", call.pos)
                if len(chain) == 1:
                    return sub
                results = [(calls + subcalls, p or sp) for calls, p in results for subcalls, _, sp in sub]
            elif call.name in BUILTINS:
                results = [(calls + [(call, scope)], p or call.pos) for calls, p in results]
            else:
                known = set(BUILTINS) | set(self.defs)
                hint = did_you_mean(call.name, known)
                if not hint and call.name in scope.names():
                    hint = f" ('{call.name}' is a value, not an op)"
                raise self.error(f"unknown op '{call.name}'{hint}", call.pos)
        return [(calls, None, p or pos) for calls, p in results]

    def bind_def(self, d: ast.Define, call: ast.Call, scope: _Scope) -> _Scope:
        values = {}
        positional = [a for a in call.args if a.name is None]
        if len(positional) > len(d.params):
            raise self.error(f"{d.name} takes {len(d.params)} argument{'s' if len(d.params) != 1 else ''}, "
                             f"got {len(positional)}", call.pos)
        for pname, a in zip(d.params, positional):
            values[pname] = self.eval(a.value, scope)
        for a in call.args[len(positional):]:
            if a.name is None:
                raise self.error("positional argument after a keyword argument", a.pos)
            if a.name not in d.params:
                hint = did_you_mean(a.name, d.params) or (f" ({d.name} takes {', '.join(d.params)})" if d.params
                                                          else f" ({d.name} takes no arguments)")
                raise self.error(f"unknown argument '{a.name}' for {d.name}{hint}", a.pos)
            values[a.name] = self.eval(a.value, scope)
        missing = [p for p in d.params if p not in values]
        if missing:
            raise self.error(f"{d.name} needs argument '{missing[0]}'", call.pos)
        # defs see the file's parameters and their own arguments, not the caller's loop variables
        root = scope
        while root.parent is not None:
            root = root.parent
        return root.child(values)

    def block(self, name: str, chain, _scope, ctx: _Context, in_shape: Shape, pos) -> Block:
        lo = Lowering(name, in_shape, ctx.gate)
        ops, shortcut, post = [], None, []
        composite = None
        pending_stride = ctx.stride
        labels = []
        args_out = {}
        for call, scope in chain:
            builtin = BUILTINS[call.name]
            if composite is not None or (builtin.composite and len(chain) > 1):
                raise self.error(f"{(composite or builtin).name} is a whole block and cannot be chained "
                                 f"with other ops; put it in a layer of its own", call.pos)
            a = self.bind(call.name, builtin.args, call.args, scope, call.pos)
            from_stage = pending_stride is not None and builtin.has_stride
            if from_stage:
                a["stride"], pending_stride = pending_stride, None
            lo.gate = ctx.gate and a.get("gate", True)
            try:
                parts = builtin.lower(lo, a)
            except (ShapeError, ValueError, ArithmeticError) as exc:
                note = f" (stride={a['stride']} comes from stage '{ctx.stage}')" if from_stage else ""
                message = str(exc) if str(exc).startswith(call.name) else f"{call.name}: {exc}"
                raise self.error(message + note, call.pos) from None
            for op in (*parts.ops, *(parts.shortcut.ops if parts.shortcut else ()), *parts.post):
                if op.out_shape.channels > MAX_SIZE:
                    raise self.error(f"{call.name}: {op.out_shape.channels:,} channels is more than the limit "
                                     f"of {MAX_SIZE:,}", call.pos)
            ops.extend(parts.ops)
            shortcut, post = parts.shortcut, parts.post
            if builtin.composite:
                composite = builtin
            labels.append(_label(call.name, a, builtin))
            args_out = a
        if pending_stride is not None:
            raise self.error(f"stage '{ctx.stage}' has stride={pending_stride}, but this block has no op "
                             f"that takes a stride (conv, dwconv, a pooling or a composite block)", pos)
        out_shape = ops[-1].out_shape
        kind = composite.name if composite else ("chain" if len(chain) > 1 else chain[0][0].name)
        block = Block(name, kind, " > ".join(labels), tuple(ops), in_shape, out_shape,
                      args=args_out if composite else {})
        return block, Parts(shortcut=shortcut, post=post)


class _UserFunction:
    """`let f(x) = expr`: evaluated in the file's scope plus its arguments."""

    def __init__(self, stmt: ast.Param, compiler: "Compiler", scope: _Scope):
        self.stmt, self.compiler, self.scope = stmt, compiler, scope
        self.depth = 0

    def __call__(self, *a, **k):  # marks it callable for lookups
        raise TypeError

    def call(self, args: list, kwargs: dict, expr: ast.FunCall):
        names = self.stmt.params
        if len(args) > len(names) or set(kwargs) - set(names):
            takes = f"arguments ({', '.join(names)})" if names else "no arguments"
            raise self.compiler.error(f"{self.stmt.name}() takes {takes}", expr.pos)
        values = dict(zip(names, args), **kwargs)
        missing = [n for n in names if n not in values]
        if missing:
            raise self.compiler.error(f"{self.stmt.name}() needs argument '{missing[0]}'", expr.pos)
        if self.depth >= MAX_DEF_DEPTH:
            raise self.compiler.error(f"'{self.stmt.name}' calls itself too deeply", expr.pos)
        self.compiler.function_calls += 1
        if self.compiler.function_calls > MAX_FUNCTION_CALLS:
            raise self.compiler.error(f"too many function calls (more than {MAX_FUNCTION_CALLS:,}; "
                                      f"exponential recursion?)", expr.pos)
        self.depth += 1
        try:
            return self.compiler.eval(self.stmt.value, self.scope.child(values))
        finally:
            self.depth -= 1


_BINOPS = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
    "//": lambda a, b: a // b, "%": lambda a, b: a % b, "**": lambda a, b: a ** b,
}


_TOO_LARGE = f"number too large (the limit is 1e{len(str(MAX_NUMBER)) - 1})"


def _setting(name: str, text: str) -> str:
    """`--set NAME=VALUE` as the user typed it, escaped if it holds a newline or another control character."""
    pair = f"{name}={text}"
    return f"--set {pair if pair.isprintable() else repr(pair)}"


def _describe(shape: Shape) -> str:
    if shape.is_flat:
        return f"a vector of {shape.channels}"
    return f"{shape.channels} channel{'s' if shape.channels != 1 else ''} at {shape.height}x{shape.width}"


def _show(value) -> str:
    if isinstance(value, Symbol):
        return f"'{value}'"
    if isinstance(value, tuple):
        return "a list"
    return repr(value)


def _label(name: str, a: dict, builtin) -> str:
    """A compact description: `mbconv k5 e3`, `conv 64 k3 s2`."""
    short = {"out": "", "k": "k", "e": "e", "stride": "s", "groups": "g", "p": "p", "se": "se"}
    bits = [name]
    for spec in builtin.args:
        v = a.get(spec.name)
        if spec.name in short and v is not None and (v != spec.default or spec.name in ("k", "e", "out")):
            if spec.name == "stride" and v == 1:
                continue
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, tuple):   # mixed kernels, as timm's block strings write them: k3.5.7
                v = ".".join(map(str, v))
            bits.append(f"{short[spec.name]}{v}")
    return " ".join(bits)
