"""Request deadlines: the route timeout as an absolute point in time.

A route `timeout` covers every attempt and back-off, so it is kept as a deadline, not a
duration. The inbound middleware sets `inbound_deadline` from the caller's remaining budget;
outbound calls made while serving that request never wait past it.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

# Absolute time.monotonic() by which the request being served must be answered, if any.
inbound_deadline: ContextVar[float | None] = ContextVar("meshlib_inbound_deadline", default=None)

# Seconds: the shortest timeout handed to a transport. A timeout of 0 is refused (urllib3) or
# not waited on at all (a non-blocking socket fails at once, as a connection error).
LEAST_WAIT = 0.001


class Deadline:
    """A point in time, or none (no timeout)."""

    __slots__ = ("at",)

    def __init__(self, at: float | None) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float | None, *, now: float | None = None) -> Deadline:
        """A deadline `seconds` from now, clamped by the inbound request's deadline."""
        start = time.monotonic() if now is None else now
        at = None if seconds is None else start + seconds
        outer = inbound_deadline.get()
        if outer is not None and (at is None or outer < at):
            at = outer
        return cls(at)

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def clamp(self, seconds: float | None) -> float | None:
        """The smaller of `seconds` and the time left."""
        left = self.remaining()
        if left is None:
            return seconds
        return left if seconds is None else min(seconds, left)


def within(seconds: float | None, left: float) -> float:
    """A transport timeout of `seconds` (None: none) that ends within `left`, the seconds left
    of a deadline; at least LEAST_WAIT."""
    if seconds is not None and seconds <= left:
        return seconds
    return left if left > LEAST_WAIT else LEAST_WAIT


def remaining() -> float | None:
    """Seconds left for the request being served (set by the inbound middleware), or None."""
    at = inbound_deadline.get()
    return None if at is None else max(0.0, at - time.monotonic())
