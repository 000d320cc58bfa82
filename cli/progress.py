"""A one-line progress bar on stderr, drawn only when stderr is a terminal.

WHY stderr and TTY-only: piped or captured output (scripts, CI logs, `-o json`) must stay clean.
"""

from __future__ import annotations

from typing import TextIO

WIDTH = 30


def bar(done: int, total: int, label: str, width: int = WIDTH) -> str:
    """'migrate [#########.....................]  30/100' (pure, for tests and drawing)."""
    filled = min(width, done * width // max(total, 1))
    digits = len(str(total))
    return f"{label} [{'#' * filled}{'.' * (width - filled)}] {done:>{digits}}/{total}"


class Progress:
    """Redraws in place; a no-op when ``stream`` is not a terminal."""

    def __init__(self, stream: TextIO, total: int, label: str, enabled: bool | None = None) -> None:
        isatty = getattr(stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.stream = stream
        self.total = total
        self.label = label
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            self.stream.write("\r" + bar(self.done, self.total, self.label))
            self.stream.flush()

    def clear(self) -> None:
        """Erase the bar before normal output is printed (so lines do not interleave with it)."""
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
