"""Apps for the propagation walk: each route makes one meshed call, from one place.

Every call goes to `http://echo:9080/<place>/<nonce>` (the nonce is the inbound request's
`?n=`), so the test finds it among the echo upstream's records and compares the headers it
got with the inbound request's. No app code copies a header.

`fastapi_app(mesh)` is served in the test's process (uvicorn, hypercorn); `flask_app()` runs
in gunicorn (gthread workers) configured from MESHLIB_* variables, or in wsgiref.
No `from __future__ import annotations`: FastAPI reads the routes' annotations (a
`BackgroundTasks` imported in the factory would be taken for a query parameter).
"""

import asyncio
import concurrent.futures
import contextlib
import contextvars
import multiprocessing.pool
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import requests

import meshlib

ECHO = "http://echo:9080"
# A pool made at import time, before any middleware (and so before threads.install()).
IMPORT_POOL = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="import-time")

Job = Callable[[], Any]


def consume(jobs: queue.Queue[Job | None]) -> None:
    """A long-lived worker: runs the jobs handlers put in its queue."""
    while (job := jobs.get()) is not None:
        with contextlib.suppress(Exception):  # a failure shows as a call the echo never got
            job()


class Calls:
    """The meshed clients, sync and async, one per kind; `mesh=None` is the default Mesh."""

    def __init__(self, mesh: meshlib.Mesh | None) -> None:
        self.mesh = mesh
        self.client = meshlib.Client(mesh=mesh, timeout=10)
        self.session = meshlib.Session(mesh=mesh)
        self.aclient = meshlib.AsyncClient(mesh=mesh, timeout=10)

    def call(self, place: str, nonce: str, kind: str = "client") -> None:
        url = f"{ECHO}/{place}/{nonce}"
        if kind == "client":
            self.client.get(url).raise_for_status()
        elif kind == "session":
            self.session.get(url, timeout=10).raise_for_status()
        elif kind == "httpx":  # stock httpx, meshed by meshlib.instrument()
            with httpx.Client(timeout=10) as stock:
                stock.get(url).raise_for_status()
        elif kind == "requests":  # stock requests, meshed by meshlib.instrument()
            requests.get(url, timeout=10).raise_for_status()
        else:
            raise ValueError(kind)

    async def acall(self, place: str, nonce: str, kind: str = "async") -> None:
        url = f"{ECHO}/{place}/{nonce}"
        if kind == "async":
            (await self.aclient.get(url)).raise_for_status()
        elif kind == "fresh-async":  # a client of this event loop (async_to_sync runs another)
            async with meshlib.AsyncClient(mesh=self.mesh, timeout=10) as fresh:
                (await fresh.get(url)).raise_for_status()
        elif kind == "httpx-async":  # stock httpx, meshed by meshlib.instrument()
            async with httpx.AsyncClient(timeout=10) as stock:
                (await stock.get(url)).raise_for_status()
        else:
            raise ValueError(kind)

    def close(self) -> None:
        self.client.close()
        self.session.close()


def fastapi_app(mesh: meshlib.Mesh) -> Any:
    import anyio
    import anyio.from_thread
    import anyio.to_thread
    from fastapi import BackgroundTasks, FastAPI
    from fastapi.responses import PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    calls = Calls(mesh)
    state: dict[str, Any] = {}
    tasks: set[asyncio.Task[None]] = set()  # fire-and-forget tasks, kept from the GC

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Made at start-up, before any request: a long-lived pool, a queue worker, a
        # multiprocessing ThreadPool.
        state["pool"] = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="startup")
        state["jobs"] = jobs = queue.Queue()
        worker = threading.Thread(target=consume, args=(jobs,), name="startup-worker")
        worker.start()
        state["threadpool"] = multiprocessing.pool.ThreadPool(2)
        yield
        jobs.put(None)
        for key in ("lazy_jobs", "lazy_inherits_jobs"):
            if key in state:
                state[key].put(None)
        worker.join(10)
        state["pool"].shutdown()
        state["threadpool"].terminate()
        lazy_pool = state.get("lazy_threadpool")
        if lazy_pool is not None:
            lazy_pool.terminate()
        await calls.aclient.aclose()
        calls.close()

    app = FastAPI(lifespan=lifespan)

    def ok() -> PlainTextResponse:  # a new one each time: FastAPI sets background tasks on it
        return PlainTextResponse("ok")

    @app.get("/same_task")
    async def same_task(n: str) -> PlainTextResponse:
        await calls.acall("same_task", n)
        return ok()

    @app.get("/sync_endpoint")
    def sync_endpoint(n: str) -> PlainTextResponse:  # FastAPI runs it in its threadpool
        calls.call("sync_endpoint", n)
        return ok()

    @app.get("/background_sync")
    async def background_sync(n: str, background: BackgroundTasks) -> PlainTextResponse:
        background.add_task(calls.call, "background_sync", n, "session")  # after the response
        return ok()

    @app.get("/background_async")
    async def background_async(n: str, background: BackgroundTasks) -> PlainTextResponse:
        background.add_task(calls.acall, "background_async", n)
        return ok()

    @app.get("/run_in_threadpool")
    async def in_threadpool(n: str) -> PlainTextResponse:
        await run_in_threadpool(calls.call, "run_in_threadpool", n, "requests")
        return ok()

    @app.get("/anyio_to_thread")
    async def anyio_to_thread(n: str) -> PlainTextResponse:
        await anyio.to_thread.run_sync(calls.call, "anyio_to_thread", n, "httpx")
        return ok()

    @app.get("/anyio_task_group")
    async def anyio_task_group(n: str) -> PlainTextResponse:
        async with anyio.create_task_group() as group:
            group.start_soon(calls.acall, "anyio_task_group", n)
        return ok()

    @app.get("/gather")
    async def gather(n: str) -> PlainTextResponse:
        await asyncio.gather(calls.acall("gather", n, "httpx-async"), asyncio.sleep(0))
        return ok()

    @app.get("/create_task")
    async def create_task(n: str) -> PlainTextResponse:
        task = asyncio.create_task(calls.acall("create_task", n))
        await asyncio.sleep(0.01)  # other work first
        await task
        return ok()

    @app.get("/task_after_response")
    async def task_after_response(n: str) -> PlainTextResponse:
        async def later() -> None:
            await asyncio.sleep(0.05)
            await calls.acall("task_after_response", n)

        task = asyncio.create_task(later())  # not awaited: it calls after the response
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return ok()

    @app.get("/asyncio_to_thread")
    async def asyncio_to_thread(n: str) -> PlainTextResponse:
        await asyncio.to_thread(calls.call, "asyncio_to_thread", n)
        return ok()

    @app.get("/executor_default")
    async def executor_default(n: str) -> PlainTextResponse:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, calls.call, "executor_default", n)
        return ok()

    @app.get("/executor_startup")
    async def executor_startup(n: str) -> PlainTextResponse:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(state["pool"], calls.call, "executor_startup", n, "session")
        return ok()

    @app.get("/executor_import_time")
    async def executor_import_time(n: str) -> PlainTextResponse:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(IMPORT_POOL, calls.call, "executor_import_time", n)
        return ok()

    @app.get("/pool_from_threadpool")
    def pool_from_threadpool(n: str) -> PlainTextResponse:  # submitted from a worker thread
        state["pool"].submit(calls.call, "pool_from_threadpool", n).result()
        return ok()

    @app.get("/pool_from_thread")
    async def pool_from_thread(n: str) -> PlainTextResponse:
        def submit() -> None:  # a thread of the handler's submits to the long-lived pool
            IMPORT_POOL.submit(calls.call, "pool_from_thread", n, "requests").result()

        thread = threading.Thread(target=submit)
        thread.start()
        await asyncio.to_thread(thread.join)
        return ok()

    @app.get("/thread_joined")
    def thread_joined(n: str) -> PlainTextResponse:
        thread = threading.Thread(target=calls.call, args=("thread_joined", n))
        thread.start()
        thread.join()
        return ok()

    @app.get("/thread_after_response")
    async def thread_after_response(n: str) -> PlainTextResponse:
        threading.Thread(target=calls.call, args=("thread_after_response", n, "session")).start()
        return ok()

    @app.get("/timer")
    async def timer(n: str) -> PlainTextResponse:
        threading.Timer(0.05, calls.call, args=("timer", n)).start()
        return ok()

    @app.get("/queue_worker_startup")
    async def queue_worker_startup(n: str) -> PlainTextResponse:
        state["jobs"].put(lambda: calls.call("queue_worker_startup", n))
        return ok()

    @app.get("/queue_worker_copied")
    async def queue_worker_copied(n: str) -> PlainTextResponse:
        # The workaround for a queue: the job carries a copy of the handler's context.
        job = contextvars.copy_context().run
        state["jobs"].put(lambda: job(calls.call, "queue_worker_copied", n))
        return ok()

    def lazy_worker(key: str, start: Callable[[threading.Thread], None]) -> queue.Queue[Job | None]:
        jobs = state.get(key)
        if jobs is None:  # started by the first request that needs it
            jobs = state[key] = queue.Queue()
            start(threading.Thread(target=consume, args=(jobs,), name=key))
        return jobs

    @app.get("/queue_worker_lazy")
    async def queue_worker_lazy(n: str) -> PlainTextResponse:
        # Started in an empty context, as the docs advise: no request's context stays in it.
        jobs = lazy_worker("lazy_jobs", lambda t: contextvars.Context().run(t.start))
        jobs.put(lambda: calls.call("queue_worker_lazy", n))
        return ok()

    @app.get("/queue_worker_lazy_inherits")
    async def queue_worker_lazy_inherits(n: str) -> PlainTextResponse:
        # Started as is: it keeps the first request's context (the docs' caveat).
        jobs = lazy_worker("lazy_inherits_jobs", threading.Thread.start)
        jobs.put(lambda: calls.call("queue_worker_lazy_inherits", n))
        return ok()

    @app.get("/threadpool_startup")
    async def threadpool_startup(n: str) -> PlainTextResponse:  # multiprocessing's ThreadPool
        result = state["threadpool"].apply_async(calls.call, ("threadpool_startup", n))
        await asyncio.to_thread(result.get, 10)
        return ok()

    @app.get("/threadpool_lazy")
    async def threadpool_lazy(n: str) -> PlainTextResponse:
        pool = state.get("lazy_threadpool")
        if pool is None:  # made by the first request that needs it
            pool = state["lazy_threadpool"] = multiprocessing.pool.ThreadPool(2)
        result = pool.apply_async(calls.call, ("threadpool_lazy", n))
        await asyncio.to_thread(result.get, 10)
        return ok()

    @app.get("/threadpool_copied")
    async def threadpool_copied(n: str) -> PlainTextResponse:  # the docs' workaround
        job = contextvars.copy_context().run
        result = state["threadpool"].apply_async(job, (calls.call, "threadpool_copied", n))
        await asyncio.to_thread(result.get, 10)
        return ok()

    @app.get("/done_callback")
    async def done_callback(n: str) -> PlainTextResponse:
        future = state["pool"].submit(threading.Event().wait, 0.05)
        future.add_done_callback(lambda _: calls.call("done_callback", n))
        return ok()

    @app.get("/async_to_sync")
    def async_to_sync_in_sync(n: str) -> PlainTextResponse:
        from asgiref.sync import async_to_sync

        async_to_sync(calls.acall)("async_to_sync", n, "fresh-async")
        return ok()

    @app.get("/sync_to_async")
    async def sync_to_async_in_async(n: str) -> PlainTextResponse:
        from asgiref.sync import sync_to_async

        await sync_to_async(calls.call)("sync_to_async", n)
        return ok()

    @app.get("/anyio_from_thread")
    def anyio_from_thread(n: str) -> PlainTextResponse:  # back to the event loop
        anyio.from_thread.run(calls.acall, "anyio_from_thread", n)
        return ok()

    @app.get("/copy_context_run")
    async def copy_context_run(n: str) -> PlainTextResponse:
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(calls.call, "copy_context_run", n))
        thread.start()
        await asyncio.to_thread(thread.join)
        return ok()

    @app.get("/streaming_sync")
    def streaming_sync(n: str) -> StreamingResponse:
        def chunks() -> Iterator[bytes]:  # iterated in the threadpool, after the handler
            yield b"a"
            calls.call("streaming_sync", n)
            yield b"b"

        return StreamingResponse(chunks())

    @app.get("/streaming_async")
    async def streaming_async(n: str) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a"
            await calls.acall("streaming_async", n)
            yield b"b"

        return StreamingResponse(chunks())

    return meshlib.MeshMiddleware(app, mesh=mesh)


def flask_app(mesh: meshlib.Mesh | None = None) -> Any:
    """A Flask app making the same calls from WSGI's places; without `mesh`, the default Mesh
    from MESHLIB_* variables (gunicorn)."""
    import flask

    if mesh is None:
        meshlib.configure()
        meshlib.instrument()  # stock httpx and requests clients are meshed too
    calls = Calls(mesh)
    jobs: queue.Queue[Job | None] = queue.Queue()
    threading.Thread(target=consume, args=(jobs,), name="import-worker", daemon=True).start()
    app = flask.Flask(__name__)

    @app.get("/plain")
    def plain() -> str:
        calls.call("plain", flask.request.args["n"], "session")
        return "ok"

    @app.get("/thread_joined")
    def thread_joined() -> str:
        thread = threading.Thread(
            target=calls.call, args=("thread_joined", flask.request.args["n"])
        )
        thread.start()
        thread.join()
        return "ok"

    @app.get("/thread_after_response")
    def thread_after_response() -> str:
        threading.Thread(
            target=calls.call, args=("thread_after_response", flask.request.args["n"], "requests")
        ).start()
        return "ok"

    @app.get("/timer")
    def timer() -> str:
        threading.Timer(0.05, calls.call, args=("timer", flask.request.args["n"])).start()
        return "ok"

    @app.get("/executor_import_time")
    def executor_import_time() -> str:
        n = flask.request.args["n"]
        IMPORT_POOL.submit(calls.call, "executor_import_time", n, "httpx").result()
        return "ok"

    @app.get("/queue_worker_startup")
    def queue_worker_startup() -> str:
        n = flask.request.args["n"]
        jobs.put(lambda: calls.call("queue_worker_startup", n))
        return "ok"

    @app.get("/queue_worker_copied")
    def queue_worker_copied() -> str:
        n = flask.request.args["n"]
        job = contextvars.copy_context().run
        jobs.put(lambda: job(calls.call, "queue_worker_copied", n))
        return "ok"

    @app.get("/streaming")
    def streaming() -> flask.Response:
        n = flask.request.args["n"]

        def chunks() -> Iterator[str]:  # produced by the server after the view returned
            yield "a"
            calls.call("streaming", n)
            yield "b"

        return flask.Response(chunks())

    app.wsgi_app = meshlib.MeshWSGIMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    return app
