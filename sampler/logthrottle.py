"""Rate-limited logging for warnings that can repeat per request or per batch."""

from __future__ import annotations

import time


class LogThrottle:
    """Lets a repeated warning through at most once per `interval` seconds, counting the rest.

    A downstream outage or a full queue would otherwise write one line per batch or per trace.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._next = 0.0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        return True

    def take_suppressed(self) -> int:
        """How many messages were held back since the last one let through, resetting the count."""
        count, self.suppressed = self.suppressed, 0
        return count
