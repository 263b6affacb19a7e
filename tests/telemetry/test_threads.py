"""Context follows work into tasks, threads and pools: `current`, the OTel context, the deadline.

Each test serves a fake inbound request (W3C trace, `end-user`, a 30 s budget) and looks at
what code running elsewhere sees, and what a meshed client would send from there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import decimal
import multiprocessing.pool
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import wrapt
from opentelemetry import context as otel_context
from opentelemetry import trace

from meshlib.dataplane.deadline import inbound_deadline
from meshlib.telemetry import threads
from meshlib.telemetry.propagation import InboundContext, Propagator, current
from tests.upstream import run_script

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
PROPAGATOR = Propagator(["end-user"])
ORIGINAL_SUBMIT = concurrent.futures.ThreadPoolExecutor.__dict__["submit"]
POOL_ENTRIES = ("apply_async", "_map_async", "imap", "imap_unordered")
ORIGINAL_START = threading.Thread.__dict__["start"]
INHERITS = bool(getattr(sys.flags, "thread_inherit_context", 0))  # Python 3.14+


@dataclass(frozen=True)
class Seen:
    """What code running somewhere saw of the request being served."""

    inbound: InboundContext | None
    trace_id: str | None
    deadline: float | None
    headers: dict[str, str]


def look() -> Seen:
    sc = trace.get_current_span().get_span_context()
    return Seen(
        current.get(),
        f"{sc.trace_id:032x}" if sc.is_valid else None,
        inbound_deadline.get(),
        dict(PROPAGATOR.outbound(lambda name: False)),
    )


def assert_serving(seen: Seen, inbound: InboundContext) -> None:
    assert seen.inbound is inbound
    assert seen.trace_id == TRACE_ID
    assert seen.deadline == inbound.deadline
    assert seen.headers["traceparent"] == f"00-{TRACE_ID}-{SPAN_ID}-01"
    assert seen.headers["end-user"] == "jason"
    assert seen.headers["x-request-id"] == "req-1"
    assert "x-envoy-expected-rq-timeout-ms" in seen.headers


def assert_lost(seen: Seen) -> None:
    assert seen.inbound is None
    assert seen.trace_id is None
    assert seen.deadline is None
    assert "end-user" not in seen.headers


def make_inbound() -> InboundContext:
    headers = {
        "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01",
        "end-user": "jason",
        "x-request-id": "req-1",
        "x-envoy-expected-rq-timeout-ms": "30000",
        "x-meshlib-peer-metadata": "w=productpage-v1",  # a mesh caller: its budget is taken
    }
    return PROPAGATOR.extract(lambda name: [headers[name]] if name in headers else [])


@contextmanager
def serving() -> Iterator[InboundContext]:
    inbound = make_inbound()
    with PROPAGATOR.activated(inbound):
        yield inbound


@pytest.fixture
def installed() -> Iterator[None]:
    threads.install()
    yield
    threads.uninstall()


@pytest.fixture(autouse=True)
def stock_afterwards() -> Iterator[None]:
    """Each test starts from the stock stdlib (a middleware built elsewhere installs the
    patches), and whatever it does, the stdlib is stock again after it."""
    threads.uninstall()
    yield
    threads.uninstall()
    assert concurrent.futures.ThreadPoolExecutor.__dict__["submit"] is ORIGINAL_SUBMIT
    assert threading.Thread.__dict__["start"] is ORIGINAL_START
    assert not any(name in multiprocessing.pool.ThreadPool.__dict__ for name in POOL_ENTRIES)
    assert current.get() is None


def in_thread(target: Callable[[], Any]) -> Any:
    """Run `target` on a plain thread and return its result."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(target()))
    thread.start()
    thread.join()
    return box[0]


# -- why: the stock behaviour --------------------------------------------------------------


def test_thread_pool_executor_loses_context_without_install() -> None:
    """Stock ThreadPoolExecutor does not copy contextvars: the request is gone in the worker."""
    with serving(), concurrent.futures.ThreadPoolExecutor(1) as pool:
        seen = pool.submit(look).result()
    assert_lost(seen)


@pytest.mark.skipif(INHERITS, reason="this Python's threads inherit the starter's context")
def test_thread_loses_context_without_install() -> None:
    """A stock threading.Thread starts in an empty context."""
    with serving():
        seen = in_thread(look)
    assert_lost(seen)


# -- installed -----------------------------------------------------------------------------


@pytest.mark.usefixtures("installed")
def test_thread_pool_executor_submit_carries_context() -> None:
    """submit() runs the callable in a copy of the submitter's context."""
    with serving() as inbound, concurrent.futures.ThreadPoolExecutor(2) as pool:
        seen = pool.submit(look).result()
    assert_serving(seen, inbound)


@pytest.mark.usefixtures("installed")
def test_thread_pool_executor_map_carries_context() -> None:
    """map() goes through submit(), so every item sees the request."""
    with serving() as inbound, concurrent.futures.ThreadPoolExecutor(3) as pool:
        seen = list(pool.map(lambda _: look(), range(6)))
    for each in seen:
        assert_serving(each, inbound)


@pytest.mark.usefixtures("installed")
def test_pool_workers_do_not_keep_an_earlier_request() -> None:
    """A worker thread started for request A does not hand A's context to later work."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with serving() as inbound:
            assert_serving(pool.submit(look).result(), inbound)
        assert_lost(pool.submit(look).result())
        threads.uninstall()
        assert_lost(pool.submit(look).result())  # nor once uninstalled


@pytest.mark.usefixtures("installed")
def test_multiprocessing_thread_pool_tasks_run_in_their_submitters_context() -> None:
    """multiprocessing's ThreadPool starts its workers and handlers when it is made: made
    while a request is served, none of them keeps that request (they used to, and ran every
    later task in it); each task runs in the context of the code that submitted it, whatever
    way it was submitted (`apply_async`, `apply`, `map`, `starmap`, `imap`,
    `imap_unordered`), and a result callback in none."""
    with serving() as inbound:
        pool = multiprocessing.pool.ThreadPool(2)
        in_request = [
            pool.apply_async(look).get(10),
            pool.apply(look),
            *pool.map(lambda _: look(), range(3)),
            *pool.map(lambda _: look(), range(4), chunksize=2),
            *pool.starmap(look, [()] * 2),
            *pool.imap(lambda _: look(), range(2)),
            *pool.imap(lambda _: look(), range(4), chunksize=2),
            *pool.imap_unordered(lambda _: look(), range(2)),
            pool.apply_async(func=look).get(10),
        ]
    try:
        assert len(in_request) == 20
        for seen in in_request:
            assert_serving(seen, inbound)
        later = [pool.apply_async(look).get(10), *pool.map(lambda _: look(), range(2))]
        called_back: list[Seen] = []
        with serving():
            pool.apply_async(int, callback=lambda _: called_back.append(look())).wait(10)
        for seen in (*later, *called_back):
            assert_lost(seen)
        assert len(called_back) == 1
    finally:
        pool.terminate()


def test_a_process_pool_is_left_alone() -> None:
    """Only ThreadPool's entries are wrapped: a process Pool pickles its tasks (a wrapped
    task would not pickle), and no context follows into another process."""
    import multiprocessing.pool as pools

    threads.install()
    try:
        assert "apply_async" in pools.ThreadPool.__dict__
        assert "apply_async" not in pools.Pool.__dict__ or not isinstance(
            pools.Pool.__dict__["apply_async"], wrapt.FunctionWrapper
        )
    finally:
        threads.uninstall()
    assert "apply_async" not in pools.ThreadPool.__dict__  # stock again: Pool's, inherited


@pytest.mark.usefixtures("installed")
def test_work_in_a_thread_does_not_leak_back() -> None:
    """Each submitted call gets its own copy: what it sets stays there, as with asyncio tasks."""
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="outer")

    def change() -> str:
        marker.set("inner")
        current.set(None)
        return marker.get()

    with serving() as inbound, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(change).result() == "inner"
        assert marker.get() == "outer"
        assert current.get() is inbound


@pytest.mark.usefixtures("installed")
def test_a_pools_initializer_state_reaches_its_tasks() -> None:
    """Only the request context travels: what the pool's initializer set in its worker's
    context is still there for each task, in a request or not, as in the stdlib."""
    connection: contextvars.ContextVar[str] = contextvars.ContextVar("connection", default="-")

    def seen() -> tuple[str, Seen]:
        return connection.get(), look()

    init = lambda: connection.set("per-worker")  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(1, initializer=init) as pool:
        with serving() as inbound:
            value, request = pool.submit(seen).result()
            assert value == "per-worker"
            assert_serving(request, inbound)
        value, request = pool.submit(seen).result()
        assert value == "per-worker"
        assert_lost(request)


@pytest.mark.usefixtures("installed")
def test_decimal_context_stays_per_thread() -> None:
    """A thread's decimal precision is its own (the stdlib keeps decimal's context per
    thread): work in a pool or a thread that changes it leaves the submitter's as it was."""

    def narrow() -> str:
        decimal.getcontext().prec = 3
        return str(decimal.Decimal(1) / decimal.Decimal(7))

    before = decimal.getcontext().prec
    with serving(), concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(narrow).result() == "0.143"
        assert in_thread(narrow) == "0.143"
        assert decimal.getcontext().prec == before


@pytest.mark.usefixtures("installed")
def test_run_in_executor_default_executor_carries_context() -> None:
    """loop.run_in_executor(None, ...) uses the default ThreadPoolExecutor: covered by submit."""

    async def main() -> tuple[InboundContext, Seen]:
        with serving() as inbound:
            return inbound, await asyncio.get_running_loop().run_in_executor(None, look)

    inbound, seen = asyncio.run(main())
    assert_serving(seen, inbound)


def test_run_in_executor_loses_context_without_install() -> None:
    """Stock run_in_executor does not copy the context (unlike asyncio.to_thread)."""

    async def main() -> Seen:
        with serving():
            return await asyncio.get_running_loop().run_in_executor(None, look)

    assert_lost(asyncio.run(main()))


@pytest.mark.usefixtures("installed")
def test_run_in_executor_own_executor_carries_context() -> None:
    """run_in_executor with an app-made ThreadPoolExecutor is covered too."""

    async def main(pool: concurrent.futures.Executor) -> tuple[InboundContext, Seen]:
        with serving() as inbound:
            return inbound, await asyncio.get_running_loop().run_in_executor(pool, look)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        inbound, seen = asyncio.run(main(pool))
    assert_serving(seen, inbound)


@pytest.mark.parametrize("install", [False, True], ids=["stock", "installed"])
def test_asyncio_to_thread_carries_context(install: bool) -> None:
    """asyncio.to_thread copies the context itself; installed, nothing changes for it."""
    if install:
        threads.install()

    async def main() -> tuple[InboundContext, Seen]:
        with serving() as inbound:
            return inbound, await asyncio.to_thread(look)

    inbound, seen = asyncio.run(main())
    assert_serving(seen, inbound)


def test_asyncio_tasks_carry_context() -> None:
    """Tasks copy the context when created: create_task, gather and TaskGroup-style fan-out."""

    async def child() -> Seen:
        await asyncio.sleep(0)
        return look()

    async def main() -> tuple[InboundContext, list[Seen]]:
        with serving() as inbound:
            task = asyncio.create_task(child())
            gathered = await asyncio.gather(child(), child())
            return inbound, [await task, *gathered]

    inbound, seen = asyncio.run(main())
    for each in seen:
        assert_serving(each, inbound)


def test_starlette_threadpool_carries_context() -> None:
    """Starlette's run_in_threadpool (sync endpoints, sync dependencies) copies the context."""
    concurrency = pytest.importorskip("starlette.concurrency")

    async def main() -> tuple[InboundContext, Seen]:
        with serving() as inbound:
            return inbound, await concurrency.run_in_threadpool(look)

    inbound, seen = asyncio.run(main())
    assert_serving(seen, inbound)


@pytest.mark.usefixtures("installed")
def test_threading_thread_carries_context() -> None:
    """threading.Thread runs in a copy of the context captured at start()."""
    with serving() as inbound:
        seen = in_thread(look)
    assert_serving(seen, inbound)


@pytest.mark.usefixtures("installed")
def test_thread_subclass_and_timer_carry_context() -> None:
    """A Thread subclass overriding run(), and threading.Timer, are covered too."""
    box: list[Seen] = []

    class Worker(threading.Thread):
        def run(self) -> None:
            box.append(look())

    with serving() as inbound:
        worker = Worker()
        timer = threading.Timer(0.001, lambda: box.append(look()))
        worker.start()
        timer.start()
        worker.join()
        timer.join()
    assert len(box) == 2
    for each in box:
        assert_serving(each, inbound)
    assert "run" not in worker.__dict__  # the captured context is let go with the work


@pytest.mark.usefixtures("installed")
def test_thread_context_is_captured_at_start_not_creation() -> None:
    """A thread made outside the request but started inside it runs in the request."""
    box: list[Seen] = []
    thread = threading.Thread(target=lambda: box.append(look()))
    with serving() as inbound:
        thread.start()
    thread.join()
    assert_serving(box[0], inbound)


@pytest.mark.usefixtures("installed")
def test_thread_started_in_an_empty_context_stays_empty() -> None:
    """The documented escape hatch for long-lived workers: start them in an empty Context."""
    box: list[Seen] = []
    thread = threading.Thread(target=lambda: box.append(look()))
    with serving():
        contextvars.Context().run(thread.start)
    thread.join()
    assert_lost(box[0])


@pytest.mark.usefixtures("installed")
def test_thread_started_twice_is_still_an_error() -> None:
    """start() keeps its contract: a second call raises, and the thread is left as it was."""
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    with pytest.raises(RuntimeError):
        thread.start()
    assert "run" not in thread.__dict__


@pytest.mark.usefixtures("installed")
def test_otel_context_set_in_the_request_follows() -> None:
    """A span made current while serving (e.g. a client span) is what the worker sees."""
    span = trace.NonRecordingSpan(
        trace.SpanContext(int("ab" * 16, 16), int("cd" * 8, 16), is_remote=False)
    )
    with serving(), concurrent.futures.ThreadPoolExecutor(1) as pool:
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            seen = pool.submit(look).result()
        finally:
            otel_context.detach(token)
    assert seen.trace_id == "ab" * 16
    assert seen.headers["traceparent"] == f"00-{'ab' * 16}-{'cd' * 8}-00"


def test_install_and_uninstall_are_idempotent() -> None:
    """install() twice wraps once; uninstall() twice restores the stock methods."""
    threads.install()
    threads.install()
    submit = concurrent.futures.ThreadPoolExecutor.__dict__["submit"]
    assert isinstance(submit, wrapt.FunctionWrapper)
    assert submit.__wrapped__ is ORIGINAL_SUBMIT
    assert threading.Thread.__dict__["start"].__wrapped__ is ORIGINAL_START
    assert threads.is_installed()
    threads.uninstall()
    threads.uninstall()
    assert not threads.is_installed()
    assert concurrent.futures.ThreadPoolExecutor.__dict__["submit"] is ORIGINAL_SUBMIT
    assert threading.Thread.__dict__["start"] is ORIGINAL_START


def test_uninstall_under_another_wrapper_passes_through() -> None:
    """If another library wrapped submit over ours, uninstall leaves its wrapper in place and
    ours stops copying; install() again turns it back on without a second layer."""

    def other(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    threads.install()
    wrapt.wrap_function_wrapper(concurrent.futures.ThreadPoolExecutor, "submit", other)
    try:
        threads.uninstall()
        with serving(), concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert_lost(pool.submit(look).result())
        threads.install()
        with serving() as inbound, concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert_serving(pool.submit(look).result(), inbound)
        inner = concurrent.futures.ThreadPoolExecutor.__dict__["submit"].__wrapped__
        assert inner.__wrapped__ is ORIGINAL_SUBMIT  # still exactly one layer of ours
    finally:
        threads.uninstall()
        concurrent.futures.ThreadPoolExecutor.submit = ORIGINAL_SUBMIT  # type: ignore[method-assign]


def test_a_wrapper_put_on_pool_later_is_not_bypassed_by_threadpools() -> None:
    """Another library (an APM) wrapping `Pool.apply_async` after `install()` still sees
    ThreadPool's calls, installed and after `uninstall()`, which leaves ThreadPool inheriting
    Pool's method again rather than keeping the one it had when wrapped."""
    pools = multiprocessing.pool
    original = pools.Pool.__dict__["apply_async"]
    seen: list[str] = []

    def apm(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        seen.append(type(instance).__name__)
        return wrapped(*args, **kwargs)

    threads.install()
    wrapt.wrap_function_wrapper(pools.Pool, "apply_async", apm)
    pool = pools.ThreadPool(1)
    try:
        pool.apply(int)
        threads.uninstall()
        pool.apply(int)
        assert seen == ["ThreadPool", "ThreadPool"]
        assert "apply_async" not in pools.ThreadPool.__dict__
    finally:
        pool.terminate()
        pools.Pool.apply_async = original  # type: ignore[method-assign]


IMPORTING = """
import importlib.util, sys, threading

spec = importlib.util.find_spec("multiprocessing.pool")
line = next(
    number for number, text in enumerate(open(spec.origin).read().splitlines(), 1)
    if text.startswith("class ThreadPool")
)
paused, go = threading.Event(), threading.Event()


def trace(frame, event, arg):  # pause the import just before it defines ThreadPool
    if frame.f_code.co_filename == spec.origin and frame.f_code.co_name == "<module>":
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line:
                paused.set()
                go.wait(30)
            return local
        return local
    return None


def importer():
    sys.settrace(trace)
    import multiprocessing.pool
    sys.settrace(None)


from meshlib.telemetry import threads

importing = threading.Thread(target=importer)
importing.start()
assert paused.wait(30)
failed = []


def install():
    try:
        threads.install()
    except Exception as exc:
        failed.append(repr(exc))


installing = threading.Thread(target=install)
installing.start()
installing.join(1)  # it waits for the import (or, before the fix, failed at once)
go.set()
installing.join(30)
importing.join(30)
import multiprocessing.pool
print(failed, "apply_async" in multiprocessing.pool.ThreadPool.__dict__)
"""


def test_install_while_another_thread_imports_multiprocessing_pool() -> None:
    """`install()` while another thread is half-way through importing multiprocessing.pool
    (it is in sys.modules, without ThreadPool yet) waits for that import and wraps ThreadPool;
    it raised AttributeError from the middleware's constructor, and ThreadPool stayed
    unwrapped for the life of the process."""
    result = run_script(IMPORTING)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]
