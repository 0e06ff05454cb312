"""One line on a terminal, rewritten in place: what `run`'s and `report`'s progress displays share.

Drawn (carriage return, padded over the previous text) only when `live`, at most every `interval`
seconds unless forced; a subclass says what the line holds (`line`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class LiveLine:
    def __init__(self, *, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        """`enabled`: None draws only when `stream` (default standard error) is a terminal."""
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if enabled is None else enabled
        self.interval = interval
        self._clock = clock
        self._started = clock()
        self._last = float("-inf")
        self._width = 0

    def line(self) -> str:
        raise NotImplementedError

    def draw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = self._clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        """Wipe the line (before a log line is written); the next update draws it again."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
            self._last = float("-inf")

    def end(self) -> None:
        """Draw the last state and leave it on its own line."""
        if self.live:
            self.draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
