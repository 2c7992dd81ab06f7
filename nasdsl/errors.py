"""The one error type users see: a located, one-line message, never a traceback."""
from __future__ import annotations

from difflib import get_close_matches


SNIPPET_WIDTH = 100  # characters of the offending line shown around the column


class NasdslError(Exception):
    """A user-facing error. `where` is `FILE:LINE:COL`, `FILE` or a setting name."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None, source: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.source = source
        self.exit_code = exit_code

    @property
    def where(self) -> str:
        parts = [p for p in (self.file, self.line, self.column) if p is not None]
        return ":".join(str(p) for p in parts)

    def __str__(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        snippet = self.snippet()
        return f"{head}\n{snippet}" if snippet else head

    def snippet(self) -> str:
        """The offending line with a caret under the column, as compilers print it. Lines are split
        at newlines only, as the parser counts them; a long line is cut to a window around the column."""
        if self.source is None or self.line is None:
            return ""
        lines = self.source.split("\n")
        if not 1 <= self.line <= len(lines):
            return ""
        text = "".join(ch if ch.isprintable() else " " for ch in lines[self.line - 1].rstrip("\r"))
        column = max(self.column or 1, 1)
        if len(text) > SNIPPET_WIDTH:
            start = max(0, min(column - 1 - SNIPPET_WIDTH // 2, len(text) - SNIPPET_WIDTH))
            end = start + SNIPPET_WIDTH
            text = ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")
            column = column - start + (3 if start else 0)
        text = text.rstrip()
        if not text:
            return ""
        caret = " " * (column - 1) + "^"
        return f"    {text}\n    {caret}"


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    match = get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""
