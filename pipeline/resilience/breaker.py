"""A circuit breaker: stop calling a service that keeps failing, try again after a cool-down.

States:
- closed: calls go through; `failure_threshold` consecutive failures open it;
- open: calls are refused without touching the service until `cooldown_seconds` have passed;
- half-open: after the cool-down, one trial call goes through (others are still refused); its
  success closes the breaker, its failure opens it again for another cool-down.

The runner keeps one per sink and one per enricher. The clock is injected (`time.monotonic` by
default) so tests control it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(self, name: str, *, failure_threshold: int = 5, cooldown_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial_started: float | None = None
        self.short_circuited = 0

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_seconds:
            return "half_open"
        return "open"

    def remaining_cooldown(self) -> float:
        """Seconds until a trial call is allowed (0 when closed or half-open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_seconds - self.clock())

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one trial call at a time does."""
        state = self.state
        if state == "closed":
            return True
        now = self.clock()
        # One trial at a time; a trial that never reported back (its task was cancelled) expires after a cool-down.
        if state == "half_open" and (self._trial_started is None or now - self._trial_started >= self.cooldown_seconds):
            self._trial_started = now
            return True
        self.short_circuited += 1
        return False

    def record_success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._trial_started = None

    def record_failure(self) -> None:
        self._trial_started = None
        if self.opened_at is not None:  # a failed trial: open again for a whole cool-down
            self.opened_at = self.clock()
            return
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
