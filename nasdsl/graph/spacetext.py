"""`.space` text fragments shared by the op catalogue (each kind prints its own call) and the printer.

Kept apart from printer.py because ops.py needs them and printer.py needs ops.py.
"""
from __future__ import annotations


def num(v) -> str:
    """A value as the language writes it: on/off for booleans, floats with a decimal point, lists in brackets."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(num(x) for x in v) + "]"
    if isinstance(v, float):
        text = repr(v)
        return text if ("." in text or "e" in text) else text + ".0"
    return str(v)


def index(channels) -> str:
    """A channel list, as `range(a, b)` when it is one, so derived widths stay readable."""
    channels = list(channels)
    if channels and channels == list(range(channels[0], channels[-1] + 1)):
        return f"range({channels[0]}, {channels[-1] + 1})" if channels[0] else f"range({channels[-1] + 1})"
    return "[" + ", ".join(map(str, channels)) + "]"


def call(name: str, positional=(), **kwargs) -> str:
    """`name(a, k=v)`, or the bare name without arguments (the language accepts both)."""
    args = [num(v) if not isinstance(v, str) else v for v in positional]
    args += [f"{k}={num(v) if not isinstance(v, str) else v}" for k, v in kwargs.items()]
    return f"{name}({', '.join(args)})" if args else name


def identifier(name: str) -> str:
    """`name` as a name the language and Python both accept: other characters become `_`, and a
    leading digit gets `net_` in front (a space's, an export's or an imported model's name)."""
    ident = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return ident if ident and not ident[0].isdigit() else f"net_{ident}"
