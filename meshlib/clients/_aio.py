"""The async clients' waits and background work, on asyncio or trio.

The mesh's own async work (a route's timeout, a fault's delay, mirrored copies sent in the
background) runs on the event loop the caller's is: asyncio (and uvloop), else trio when the
caller runs under it. asyncio is looked for first and costs nothing more; trio is imported only
when it is already loaded (no trio loaded: no trio running, as tenacity checks).

Bounding an await in time without losing a cancellation: `asyncio.wait_for` on Python 3.10
and 3.11 returns the result, and drops the cancellation, when the awaited work finishes in the
same loop iteration as the caller is cancelled: the caller's task then carries on as if never
cancelled. `asyncio.timeout` fixes that but needs 3.11 (and reads the task's cancellation
count, which code that once swallowed a cancellation leaves raised). So the bounded work runs
in a task of its own, waited for with `asyncio.wait`, which never swallows the caller's
cancellation, and is cancelled when the time is up. trio's cancel scopes have no such gap.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def trio_running() -> Any:
    """The trio module when the caller runs under trio and not asyncio, else None."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return None
    return trio


def _loop_or_trio() -> asyncio.AbstractEventLoop | Any:
    """The running asyncio loop, else the trio module under trio; neither: asyncio's error."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        trio = trio_running()
        if trio is None:
            raise
        return trio


async def sleep(seconds: float) -> None:
    runner = _loop_or_trio()
    if isinstance(runner, asyncio.AbstractEventLoop):
        await asyncio.sleep(seconds)
    else:
        await runner.sleep(seconds)


async def within(work: Coroutine[Any, Any, T], seconds: float | None) -> T:
    """`await work`, at most `seconds` (None: no bound); `asyncio.TimeoutError` past it. A
    cancellation of the caller cancels `work` and is raised."""
    if seconds is None:
        return await work
    runner = _loop_or_trio()
    if not isinstance(runner, asyncio.AbstractEventLoop):
        with runner.move_on_after(max(seconds, 0.0)) as scope:
            return await work
        if scope.cancelled_caught:
            raise asyncio.TimeoutError
        raise AssertionError("unreachable: the work either returned or was cancelled")
    task = runner.create_task(work)
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


class Background:
    """Work started and not waited for (mirrored copies), on the caller's event loop.

    `start` runs `work()` in a task of its own; `aclose` gives what still runs `grace`
    seconds, then cancels it. `never_ran` is called for work cancelled before it started
    (asyncio drops a task cancelled before its first step: its `finally` never runs).
    """

    def __init__(self) -> None:
        self._asyncio: set[asyncio.Task[None]] = set()
        self._trio: dict[object, Any] = {}  # a running trio task's key -> its cancel scope
        self._trio_done: Any = None  # a trio.Event set when the last trio task ends

    def __len__(self) -> int:
        return len(self._asyncio) + len(self._trio)

    def start(
        self, work: Callable[[], Coroutine[Any, Any, None]], never_ran: Callable[[object], None]
    ) -> None:
        runner = _loop_or_trio()
        if isinstance(runner, asyncio.AbstractEventLoop):
            task = runner.create_task(work())
            self._asyncio.add(task)
            task.add_done_callback(self._asyncio.discard)
            task.add_done_callback(never_ran)
        else:
            # trio has no task outside a nursery but the system nursery's: a copy outlives
            # the call that started it, as an asyncio task does.
            runner.lowlevel.spawn_system_task(self._run_trio, runner, work)

    async def _run_trio(self, trio: Any, work: Callable[[], Awaitable[None]]) -> None:
        key = object()
        with trio.CancelScope() as scope:
            self._trio[key] = scope
            try:
                await work()
            finally:
                del self._trio[key]
                if not self._trio and self._trio_done is not None:
                    self._trio_done.set()

    async def aclose(self, grace: float) -> None:
        if self._asyncio:
            _, pending = await asyncio.wait(list(self._asyncio), timeout=grace)
            for task in pending:
                task.cancel()
        if self._trio:
            trio = sys.modules["trio"]
            self._trio_done = done = trio.Event()
            with trio.move_on_after(grace):
                await done.wait()
            for scope in list(self._trio.values()):
                scope.cancel()
