"""A lock that a fork does not leave held.

Only the forking thread survives `os.fork()`: a lock another thread of the parent held at
that moment stays held in the child, with no thread left to release it. gunicorn --preload
forks its workers from a master whose policy watcher may be applying a new Snapshot just
then; without this, that worker's next reload would wait forever.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from types import TracebackType


class ForkSafeLock:
    """A `threading.Lock` made new in a forked child when another thread held it at the fork,
    after which `interrupted` is called in the child to finish that thread's work."""

    __slots__ = ("__weakref__", "_lock", "_owner", "interrupted")

    def __init__(self, interrupted: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._owner = 0
        self.interrupted = interrupted
        _locks.add(self)

    def __enter__(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._owner = 0
        self._lock.release()

    def _after_fork(self) -> None:
        if not self._lock.locked() or self._owner == threading.get_ident():
            return  # free, or held by the forking thread, which goes on to release it
        self._lock = threading.Lock()
        self._owner = 0
        if self.interrupted is not None:
            self.interrupted()


_locks: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_locks):
        lock._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
