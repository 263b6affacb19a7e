"""Loading and compiling policy with Python's cyclic garbage collector paused.

Building a Snapshot allocates hundreds of thousands of objects that all stay alive. Each time
enough of them accumulate, the collector rescans the young heap and, more and more often as it
grows, the whole heap — finding no garbage: a third of the time to load 10,000 resources
(`python -m bench policy`). Pausing it for the build is the standard remedy; what is collected
afterwards is collected as before.

Nested and concurrent pauses nest: nothing is restored until the last one ends. A collector
the app had switched off before a load stays off; one it switches off *during* a load on another
thread is switched back on when the load ends (the pause is process-wide, as the collector is).
Callers hand over their input already in memory (no network I/O under the pause), and a child
forked during a load starts with the collector as it was before the load.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

__all__ = ["collector_paused", "without_collector"]

_lock = threading.Lock()
_depth = 0
_was_enabled = False

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off (reference counting still frees)."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def _after_fork_in_child() -> None:
    """The child of a fork made during a load has no load to finish: undo the pause there."""
    global _lock, _depth
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _depth:
        _depth = 0
        if _was_enabled:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def without_collector(function: Callable[P, R]) -> Callable[P, R]:
    """`function`, run inside `collector_paused()`."""

    @functools.wraps(function)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        with collector_paused():
            return function(*args, **kwargs)

    return paused
