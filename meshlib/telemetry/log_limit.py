"""At most one warning a minute from a logger that quotes what callers send.

OpenTelemetry's W3C baggage propagator logs a warning for every malformed list-member of a
`baggage` header it extracts (up to 180 a header, each quoting the caller's text): any caller
could have a served request write hundreds of lines to the app's log. meshlib extracts that
header from every request it serves, so it limits that logger: one record a minute passes,
telling how many were held back since; the rest are dropped, and the bad members with them,
as the propagator drops them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["limit_caller_warnings"]

BAGGAGE_LOGGER = "opentelemetry.baggage.propagation"
INTERVAL = 60.0  # seconds between two records that pass


class OnePerInterval:
    """A logging filter (any object with `filter()` is one) passing one record per `interval`
    seconds, the next one passed saying how many it held back."""

    def __init__(
        self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time from which a record passes again
        self._held = 0

    def reset(self) -> None:
        """Let the next record pass, as if none had come yet."""
        with self._lock:
            self._next = 0.0
            self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._held += 1
                return False
            self._next = now + self.interval
            held, self._held = self._held, 0
        if held:
            record.msg = f"{record.msg} ({held} more held back since the last one logged)"
        return True


_installed: OnePerInterval | None = None
_install_lock = threading.Lock()


def limit_caller_warnings() -> None:
    """Limit the baggage propagator's warnings (once per process)."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = OnePerInterval()
            logging.getLogger(BAGGAGE_LOGGER).addFilter(_installed)
