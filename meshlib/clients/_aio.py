"""Bounding an await in time without losing a cancellation.

`asyncio.wait_for` on Python 3.10 and 3.11 returns the result, and drops the cancellation, when
the awaited work finishes in the same loop iteration as the caller is cancelled: the caller's
task then carries on as if never cancelled. `asyncio.timeout` fixes that but needs 3.11. So the
bounded work runs in a task of its own, awaited directly, and a timer cancels only that task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def within(work: Coroutine[Any, Any, T], seconds: float | None) -> T:
    """`await work`, at most `seconds` (None: no bound); `asyncio.TimeoutError` past it. A
    cancellation of the caller cancels `work` and is raised, never lost."""
    if seconds is None:
        return await work
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
    expired: list[bool] = []
    timer = loop.call_later(max(seconds, 0.0), _expire, task, expired)
    try:
        return await task
    except asyncio.CancelledError:
        if expired and not cancelling():
            raise asyncio.TimeoutError from None
        raise
    finally:
        timer.cancel()


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    if not task.done():
        expired.append(True)
        task.cancel()


def cancelling() -> bool:
    """Whether the running task itself is being cancelled (known on Python 3.11+; on 3.10,
    a cancellation that comes as the bound expires is reported as the timeout)."""
    task = asyncio.current_task()
    pending = getattr(task, "cancelling", None)
    return bool(pending()) if pending is not None else False
