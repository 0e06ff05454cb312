"""A one-line progress display for long CLI runs, on standard error, only when it is a terminal.

No dependency: the line is rewritten in place (carriage return) at most every `interval` seconds and
shows files done out of total, messages, alerts and the message rate.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TextIO

from pipeline.observability.live_line import LiveLine


class Progress(LiveLine):
    def __init__(self, total_files: int, *, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.2, clock=time.monotonic) -> None:
        super().__init__(stream=stream, enabled=enabled, interval=interval, clock=clock)
        self.total_files = total_files
        self.files = 0
        self.messages = 0
        self.alerts = 0
        self._filter: _ClearLine | None = None
        if self.live:  # a log line first wipes the progress line, which is redrawn on the next update
            self._filter = _ClearLine(self)
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)

    def file_started(self, path: Path) -> None:
        self.files += 1
        self.draw()

    def batch_done(self, messages: int, alerts: int) -> None:
        self.messages += messages
        self.alerts += alerts
        self.draw()

    def line(self) -> str:
        elapsed = max(self._clock() - self._started, 1e-9)
        done = min(self.files, self.total_files)
        if self.total_files:
            filled = int(20 * done / self.total_files)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{self.total_files} files"
        else:
            bar = "stdin"
        return f"{bar}  {self.messages} messages  {self.alerts} alerts  {self.messages / elapsed:.0f} msg/s"

    def close(self) -> None:
        self.end()
        if self._filter is not None:
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._filter)
            self._filter = None


class _ClearLine(logging.Filter):
    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True
