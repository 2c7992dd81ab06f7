"""Reading a `.space` file: the one place its bytes become text, so every command reports a bad
file the same way (`nasdsl check` and `nasdsl search` once disagreed: one line against a traceback)."""
from __future__ import annotations

from pathlib import Path

from nasdsl.errors import NasdslError


def read_source(path: str | Path) -> str:
    """The file's text. A file that is not UTF-8 is an error at the line and column of its first bad
    byte (with that line shown), one that holds NUL bytes or cannot be read an error naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NasdslError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8")
        line = good.count("\n") + 1
        column = len(good) - (good.rfind("\n") + 1) + 1
        shown = data.decode("utf-8", errors="replace")
        raise NasdslError(f"not a text file: byte 0x{data[exc.start]:02x} is not UTF-8", file=str(path),
                          line=line, column=column, source=shown) from None
    if "\0" in text:
        raise NasdslError("not a text file (it contains NUL bytes)", file=str(path))
    return text
