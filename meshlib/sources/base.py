"""What every policy source shares: the current Snapshot, swapping it, telling subscribers.

A source builds each new Snapshot off to the side and publishes it with one reference
assignment, so a reader sees the old policy or the new one, never a mix. When new policy is
invalid the source keeps the last good Snapshot and reports the error to its error hooks
(the metrics layer counts them) and to the `meshlib.policy` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from meshlib._fork import ForkSafeLock
from meshlib.errors import PolicyError
from meshlib.policy.snapshot import Snapshot

logger = logging.getLogger("meshlib.policy")

SnapshotListener = Callable[[Snapshot], None]
ErrorListener = Callable[[PolicyError], None]


class PolicySource(Protocol):
    """Anything that serves Snapshots."""

    @property
    def snapshot(self) -> Snapshot: ...

    def subscribe(self, listener: SnapshotListener) -> Callable[[], None]: ...

    def on_error(self, listener: ErrorListener) -> Callable[[], None]: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


class SnapshotPublisher:
    """Holds the current Snapshot and tells listeners about new ones and about errors."""

    def __init__(self, initial: Snapshot) -> None:
        self._snapshot = initial
        self._listeners: list[SnapshotListener] = []
        self._error_listeners: list[ErrorListener] = []
        self._lock = ForkSafeLock()
        self.last_error: PolicyError | None = None
        self.reload_errors = 0

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: SnapshotListener) -> Callable[[], None]:
        """Call `listener(snapshot)` after each swap, and with the current Snapshot again when
        a source's error clears without a new one; returns a function that unsubscribes."""
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._remove(self._listeners, listener)

    def on_error(self, listener: ErrorListener) -> Callable[[], None]:
        """Call `listener(error)` whenever new policy is rejected; returns an unsubscriber."""
        with self._lock:
            self._error_listeners.append(listener)
        return lambda: self._remove(self._error_listeners, listener)

    def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # the swap: one reference assignment
        self.last_error = None
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:  # a listener's bug must not stop policy updates
                logger.exception("policy listener %r failed", listener)

    def reject(self, error: PolicyError, origin: str) -> None:
        self.last_error = error
        self.reload_errors += 1
        logger.error(
            "rejected new policy from %s; still serving generation %d:\n%s",
            origin,
            self._snapshot.generation,
            error,
        )
        with self._lock:
            listeners = list(self._error_listeners)
        for listener in listeners:
            try:
                listener(error)
            except Exception:
                logger.exception("policy error listener %r failed", listener)

    def _remove(self, items: list[Any], item: object) -> None:
        with self._lock:
            if item in items:
                items.remove(item)
