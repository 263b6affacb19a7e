"""Bounding an await in time without losing a cancellation.

`asyncio.wait_for` on Python 3.10 and 3.11 returns the result, and drops the cancellation, when
the awaited work finishes in the same loop iteration as the caller is cancelled: the caller's
task then carries on as if never cancelled. `asyncio.timeout` fixes that but needs 3.11 (and
reads the task's cancellation count, which code that once swallowed a cancellation leaves
raised). So the bounded work runs in a task of its own, waited for with `asyncio.wait`, which
never swallows the caller's cancellation, and is cancelled when the time is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def within(work: Coroutine[Any, Any, T], seconds: float | None) -> T:
    """`await work`, at most `seconds` (None: no bound); `asyncio.TimeoutError` past it. A
    cancellation of the caller cancels `work` and is raised."""
    if seconds is None:
        return await work
    task = asyncio.get_running_loop().create_task(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(seconds, 0.0))
    except BaseException:  # the caller is cancelled: so is the work
        task.cancel()
        raise
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let it wind down (close what it opened)
    if not task.cancelled() and task.exception() is None:
        return task.result()  # it finished as it was cancelled: its result stands
    raise asyncio.TimeoutError
