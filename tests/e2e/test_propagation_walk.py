"""Where the request's context follows a meshed call, as a user's app makes it.

Real servers (FastAPI on uvicorn and hypercorn, Flask on gunicorn gthread workers and on
wsgiref) serve `walk_apps`, whose routes each make one meshed call from one place: the
handler's task, the threadpool, background tasks, executors, threads, timers, queue workers,
asgiref, streaming responses. A real echo upstream records what each call carried. Every
place is walked with several requests at once, three rounds, each request with its own trace,
`x-request-id`, `baggage`, `end-user` and deadline; a call carries its request's context
("right"), none at all ("none"), or another request's ("wrong", never expected).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshlib
from meshlib.config import MeshConfig
from tests.upstream import AsgiServer, HypercornServer, Upstream, WsgiServer, loopback_service
from tests.upstream import mesh_for as mesh_of

pytest.importorskip("fastapi")
pytest.importorskip("flask")

ROOT = Path(__file__).parent.parent.parent
ECHO_HOST = "echo.default.svc.cluster.local"
SENT: dict[str, dict[str, str]] = {}  # nonce -> the inbound headers of that request

# Where the context follows (the docs' table, docs/observability.md "Threads, executors and
# tasks"): every other place must carry none, never another request's.
FASTAPI_PLACES = {
    "same_task": "right",
    "sync_endpoint": "right",
    "background_sync": "right",
    "background_async": "right",
    "run_in_threadpool": "right",
    "anyio_to_thread": "right",
    "anyio_task_group": "right",
    "gather": "right",
    "create_task": "right",
    "task_after_response": "right",
    "asyncio_to_thread": "right",
    "executor_default": "right",
    "executor_startup": "right",
    "executor_import_time": "right",
    "pool_from_threadpool": "right",
    "pool_from_thread": "right",
    "thread_joined": "right",
    "thread_after_response": "right",
    "timer": "right",
    "queue_worker_startup": "none",
    "queue_worker_copied": "right",
    "queue_worker_lazy": "none",
    "threadpool_startup": "right",  # was "none": its tasks carried no context
    "threadpool_lazy": "right",  # was "wrong": the first request's, in every later task
    "threadpool_copied": "right",
    "done_callback": "none",
    "sync_to_async": "right",
    "async_to_sync": "right",
    "anyio_from_thread": "right",
    "copy_context_run": "right",
    "streaming_sync": "right",
    "streaming_async": "right",
}
FLASK_PLACES = {
    "plain": "right",
    "thread_joined": "right",
    "thread_after_response": "right",
    "timer": "right",
    "executor_import_time": "right",
    "queue_worker_startup": "none",
    "queue_worker_copied": "right",
    "streaming": "right",
}


@pytest.fixture(scope="module")
def echo() -> Iterator[Upstream]:
    with Upstream("echo") as server:
        yield server


@pytest.fixture(scope="module")
def policy(echo: Upstream) -> str:
    return loopback_service(ECHO_HOST, echo.port)


@pytest.fixture(scope="module")
def mesh(policy: str) -> Iterator[meshlib.Mesh]:
    mesh = mesh_of(MeshConfig(service="walk", propagate_headers=("end-user",)), policy)
    meshlib.instrument(mesh)  # stock httpx and requests clients are meshed too
    yield mesh
    meshlib.uninstrument()
    mesh.close()


@pytest.fixture(scope="module", params=["uvicorn", "hypercorn"])
def fastapi(request: pytest.FixtureRequest, mesh: meshlib.Mesh) -> Iterator[int]:
    from tests.e2e.walk_apps import fastapi_app

    app = fastapi_app(mesh)
    server = (AsgiServer if request.param == "uvicorn" else HypercornServer)(app, "walk").start()
    yield server.port
    server.stop()


@pytest.fixture(scope="module")
def flask_wsgiref(mesh: meshlib.Mesh) -> Iterator[int]:
    from tests.e2e.walk_apps import flask_app

    with WsgiServer(flask_app(mesh)) as server:
        yield server.port


@pytest.fixture(scope="module")
def flask_gunicorn(
    policy: str, mesh: meshlib.Mesh, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    path = tmp_path_factory.mktemp("walk") / "mesh.yaml"
    path.write_text(policy)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {
        **os.environ,
        "MESHLIB_SERVICE": "walk-flask",
        "MESHLIB_POLICY": str(path),
        "MESHLIB_PROPAGATE_HEADERS": "end-user",
        "MESHLIB_METRICS_PORT": "off",
    }
    gunicorn = subprocess.Popen(
        [
            *(sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "4", "-w", "1"),
            *("-b", f"127.0.0.1:{port}", "tests.e2e.walk_apps:flask_app()"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # poll until the worker answers
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/nowhere")
                connection.getresponse().read()
                connection.close()
                break
            except OSError:
                assert gunicorn.poll() is None, "gunicorn exited"
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.05)
        yield port
    finally:
        gunicorn.terminate()
        gunicorn.wait(timeout=10)


def serve_one(port: int, place: str) -> str:
    """Call `place` as a mesh caller would, with a context of its own; return its nonce."""
    nonce = secrets.token_hex(8)
    headers = SENT[nonce] = {
        "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
        "x-request-id": f"rid-{nonce}",
        "baggage": f"walk={nonce}",
        "end-user": f"user-{nonce}",
        "x-envoy-expected-rq-timeout-ms": "30000",
        "x-meshlib-peer-metadata": "w=walk-caller",  # a mesh caller: its budget is taken
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("GET", f"/{place}?n={nonce}", headers=headers)
        response = connection.getresponse()
        body = response.read()  # a streaming response calls out while this reads
        assert response.status == 200, body
    finally:
        connection.close()
    return nonce


def received(echo: Upstream, place: str, nonce: str) -> dict[str, str]:
    """The headers of the call made for request `nonce`, once the echo has it (some places
    call after the response)."""
    path = f"/{place}/{nonce}"
    deadline = time.monotonic() + 10
    while True:
        with echo.behaviour.lock:
            found = [r["headers"] for r in echo.behaviour.requests if r["path"] == path]
        if found:
            assert len(found) == 1, found
            return dict(found[0])
        assert time.monotonic() < deadline, f"no call reached the echo for {path}"
        time.sleep(0.01)


def verdict(got: dict[str, str], nonce: str) -> str:
    """right: the request's own context; none: nothing of any request's; wrong: another's."""
    own = SENT[nonce]
    budget = got.get("x-envoy-expected-rq-timeout-ms")
    if (
        all(got.get(name) == own[name] for name in ("traceparent", "x-request-id", "baggage"))
        and got.get("end-user") == own["end-user"]
        and budget is not None
        and 0 < int(budget) <= 30000
    ):
        return "right"
    others = [h for other, h in SENT.items() if other != nonce]
    for name in ("traceparent", "x-request-id", "baggage", "end-user"):
        if any(got.get(name) == h[name] for h in others):
            return "wrong"
    sent_ids = {h["x-request-id"] for h in SENT.values()}
    if (
        not {"traceparent", "baggage", "end-user", "x-envoy-expected-rq-timeout-ms"} & got.keys()
        and got.get("x-request-id") not in sent_ids
    ):
        return "none"
    return f"partial: {sorted(got.items())}"


def walk(port: int, echo: Upstream, place: str) -> list[str]:
    """Three rounds of three requests at once to `place`: the verdict of each one's call."""
    verdicts: list[str] = []
    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(3) as callers:
            nonces = list(callers.map(lambda _: serve_one(port, place), range(3)))
        verdicts += [verdict(received(echo, place, nonce), nonce) for nonce in nonces]
    return verdicts


@pytest.mark.parametrize("place", list(FASTAPI_PLACES))
def test_fastapi(fastapi: int, echo: Upstream, place: str) -> None:
    """A meshed call from `place` in a FastAPI app carries its own request's context where
    the docs say it follows, and none (never another request's) elsewhere."""
    assert walk(fastapi, echo, place) == [FASTAPI_PLACES[place]] * 9


def test_thread_started_in_a_request_keeps_its_context(fastapi: int, echo: Upstream) -> None:
    """The docs' caveat, as it is: a long-lived worker started lazily, inside the first
    request that needs it, keeps that request's context for its whole life (as a thread does
    with Python 3.14's inherited contexts), so its jobs for later requests carry the first
    one's. `queue_worker_lazy` starts it with an empty context instead: none."""
    verdicts = walk(fastapi, echo, "queue_worker_lazy_inherits")
    assert sorted(verdicts) == ["right"] + ["wrong"] * 8


@pytest.mark.parametrize("place", list(FLASK_PLACES))
def test_flask_gunicorn_gthread(flask_gunicorn: int, echo: Upstream, place: str) -> None:
    """Flask under gunicorn's gthread workers (4 threads): the same, per place."""
    assert walk(flask_gunicorn, echo, place) == [FLASK_PLACES[place]] * 9


@pytest.mark.parametrize("place", list(FLASK_PLACES))
def test_flask_wsgiref(flask_wsgiref: int, echo: Upstream, place: str) -> None:
    """Flask under wsgiref (a thread per request): the same, per place."""
    assert walk(flask_wsgiref, echo, place) == [FLASK_PLACES[place]] * 9
