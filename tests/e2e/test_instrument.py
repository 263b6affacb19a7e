"""instrument(): stock httpx and requests clients become meshed, once, and can be restored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import requests

import meshlib
from meshlib.instrument import is_instrumented
from tests.e2e.conftest import URL, MeshFactory, held_mirror, virtual_service
from tests.upstream import Upstream

TO_V2 = virtual_service(
    "- route: [{destination: {host: reviews, subset: v2}}]\n  retries: {attempts: 3, retryOn: 5xx}\n"
)


@pytest.fixture
def instrumented(make_mesh: MeshFactory) -> Iterator[meshlib.Mesh]:
    mesh = make_mesh(TO_V2)
    meshlib.instrument(mesh)
    yield mesh
    meshlib.uninstrument()


def test_stock_clients_are_meshed(instrumented: meshlib.Mesh) -> None:
    """httpx.Client, httpx.AsyncClient and requests.Session created after instrument() are routed."""
    with httpx.Client() as client:
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
    with requests.Session() as session:
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"

    async def run() -> str:
        async with httpx.AsyncClient() as client:
            return (await client.get(URL + "/")).headers["x-upstream"]

    assert asyncio.run(run()) == "v2"
    assert requests.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"


def test_clients_created_before_instrument_are_meshed(make_mesh: MeshFactory) -> None:
    """A client made before instrument() is meshed too (the transport methods are wrapped)."""
    client = httpx.Client()
    session = requests.Session()
    meshlib.instrument(make_mesh(TO_V2))
    try:
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"
    finally:
        meshlib.uninstrument()
        client.close()
        session.close()


def test_idempotent_and_never_meshed_twice(
    instrumented: meshlib.Mesh, upstreams: dict[str, Upstream]
) -> None:
    """Calling instrument() again changes nothing; a meshlib client is not meshed a second time."""
    meshlib.instrument(instrumented)
    upstreams["v2"].behaviour.fail_every = 1.0
    with meshlib.Client(mesh=instrumented) as client:
        response = client.get(URL + "/")
    assert response.status_code == 503
    assert upstreams["v2"].behaviour.received == 4  # 1 + 3 retries, not (1 + 3) squared
    attempts = [r["headers"]["x-envoy-attempt-count"] for r in upstreams["v2"].behaviour.requests]
    assert attempts == ["1", "2", "3", "4"]


def test_uninstrument_restores_stock_behaviour(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """After uninstrument() a request to the mesh host is no longer routed (DNS cannot find it)."""
    meshlib.instrument(make_mesh(TO_V2))
    meshlib.uninstrument()
    with httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.get(URL + "/")
    with httpx.Client() as client:  # plain addresses still work
        assert client.get(f"http://{upstreams['v1'].address}/").status_code == 200


def test_instrumenting_another_mesh_applies_to_existing_clients(make_mesh: MeshFactory) -> None:
    """instrument(B) after instrument(A) (with or without uninstrument() between) routes
    existing clients by B's policy, not by the Mesh their first request met."""
    to_v3 = virtual_service("- route: [{destination: {host: reviews, subset: v3}}]\n")
    client = httpx.Client()
    session = requests.Session()
    try:
        meshlib.instrument(make_mesh(TO_V2))
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"
        meshlib.uninstrument()
        meshlib.instrument(make_mesh(to_v3))
        assert client.get(URL + "/").headers["x-upstream"] == "v3"
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v3"
    finally:
        meshlib.uninstrument()
        client.close()
        session.close()


def test_an_overriding_subclass_runs_once_per_call(
    instrumented: meshlib.Mesh, upstreams: dict[str, Upstream]
) -> None:
    """A mounted HTTPAdapter / HTTPTransport subclass that overrides send / handle_request
    (here: signing each request) runs once per call, not again for every try; the retries
    carry what it added."""
    calls: list[str] = []

    class SigningAdapter(requests.adapters.HTTPAdapter):
        def send(
            self, request: requests.PreparedRequest, *args: object, **kwargs: object
        ) -> requests.Response:  # type: ignore[override]
            calls.append("requests")
            request.headers["x-sig"] = request.headers.get("x-sig", "") + "S"
            return super().send(request, *args, **kwargs)  # type: ignore[arg-type]

    class SigningTransport(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            calls.append("httpx")
            request.headers["x-sig"] = request.headers.get("x-sig", "") + "S"
            return super().handle_request(request)

    upstreams["v2"].behaviour.fail_every = 0.5  # every second try fails: the 2nd call retries
    with requests.Session() as session:
        session.mount("http://", SigningAdapter())
        assert session.get(URL + "/", timeout=5).status_code == 200
    with httpx.Client(transport=SigningTransport()) as client:
        assert client.get(URL + "/").status_code == 200
    assert calls == ["requests", "httpx"]
    sent = upstreams["v2"].behaviour.requests
    assert len(sent) == 3  # the second call: a failed try and its retry
    assert [r["headers"]["x-sig"] for r in sent] == ["S"] * 3


def test_uninstrument_under_another_librarys_wrapper(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """Another library wrapping the same methods with wrapt after instrument() (as
    OpenTelemetry's instrumentations do) keeps its wrapper through uninstrument(), and
    meshlib's is gone: requests are stock again."""
    import wrapt

    seen: list[str] = []

    def other(
        wrapped: object, instance: object, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> object:
        seen.append(type(instance).__name__)
        return wrapped(*args, **kwargs)  # type: ignore[operator]

    stock_send = requests.adapters.HTTPAdapter.__dict__["send"]
    stock_handle = httpx.HTTPTransport.__dict__["handle_request"]
    meshlib.instrument(make_mesh(TO_V2))
    wrapt.wrap_function_wrapper(requests.adapters.HTTPAdapter, "send", other)
    wrapt.wrap_function_wrapper(httpx.HTTPTransport, "handle_request", other)
    try:
        meshlib.uninstrument()
        assert not is_instrumented()
        v1 = upstreams["v1"]
        with requests.Session() as session:
            response = session.get(f"http://{v1.address}/", timeout=5)
        with httpx.Client() as client:
            client.get(f"http://{v1.address}/")
        assert seen == ["HTTPAdapter", "HTTPTransport"]  # the other library's wrapper stays
        assert response.json()["headers"].get("x-request-id") is None  # meshlib adds none
        assert all("x-request-id" not in r["headers"] for r in v1.behaviour.requests)
        # meshlib's wrapper left the chain: the other one wraps the stock method directly
        assert requests.adapters.HTTPAdapter.__dict__["send"].__wrapped__ is stock_send
        assert httpx.HTTPTransport.__dict__["handle_request"].__wrapped__ is stock_handle
    finally:
        requests.adapters.HTTPAdapter.send = stock_send  # type: ignore[method-assign]
        httpx.HTTPTransport.handle_request = stock_handle  # type: ignore[method-assign]


def test_instrumenting_again_goes_through_a_wrapper_added_meanwhile(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream]
) -> None:
    """instrument(); another library wraps the transport; uninstrument(); instrument(): a
    client made before all of it sends its tries through the other library's wrapper, as a
    client made after does (its meshing wrapper is made anew, over the method as it is now)."""
    import wrapt

    seen: list[str] = []

    def other(
        wrapped: object, instance: object, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> object:
        seen.append("other")
        return wrapped(*args, **kwargs)  # type: ignore[operator]

    stock_handle = httpx.HTTPTransport.__dict__["handle_request"]
    mesh = make_mesh(TO_V2)
    early = httpx.Client()
    try:
        meshlib.instrument(mesh)
        assert early.get(URL + "/").status_code == 200  # its meshing wrapper is made here
        wrapt.wrap_function_wrapper(httpx.HTTPTransport, "handle_request", other)
        meshlib.uninstrument()
        meshlib.instrument(mesh)
        seen.clear()
        assert early.get(URL + "/").status_code == 200
        assert seen, "the other library's wrapper was skipped"
    finally:
        meshlib.uninstrument()
        early.close()
        httpx.HTTPTransport.handle_request = stock_handle  # type: ignore[method-assign]


@pytest.mark.parametrize("order", ["close-then-uninstrument", "uninstrument-then-close"])
def test_closing_a_client_closes_its_copies_pool_after_uninstrument_too(
    make_mesh: MeshFactory, order: str
) -> None:
    """A stock client's mirrored copies go through a pool of their own; closing the client
    closes that pool, also when `uninstrument()` came first (a client is often closed after):
    no connection to the mirror stays open."""
    from tests.rawserver import OK, ThreadServer, answering, wait_until_sync
    from tests.upstream import loopback_service

    with ThreadServer(answering(OK)) as shadow:
        mesh = make_mesh(
            loopback_service("shadow.default.svc.cluster.local", shadow.port)
            + "---\n"
            + virtual_service(
                "- route: [{destination: {host: reviews}}]\n  mirror: {host: shadow}\n"
            )
        )
        client = httpx.Client()
        meshlib.instrument(mesh)
        try:
            assert client.get(URL + "/").status_code == 200
            wait_until_sync(lambda: shadow.heads, "the copy")
        finally:
            if order == "close-then-uninstrument":
                client.close()
                meshlib.uninstrument()
            else:
                meshlib.uninstrument()
                client.close()
        wait_until_sync(lambda: shadow.active == 0, "the copy's connection to close", 2.0)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_instrumenting_another_mesh_keeps_one_pool_for_copies(
    make_mesh: MeshFactory, kind: str
) -> None:
    """instrument(B) after instrument(A): a stock client's transport gets B's wrapper, which
    takes over A's pool for mirrored copies, so closing the client (here at the end of its
    `with` block, which closes its transport without calling close()) still closes every
    connection to the mirror."""
    import asyncio

    from tests.rawserver import OK, ThreadServer, answering, wait_until_sync
    from tests.upstream import loopback_service

    with ThreadServer(answering(OK)) as shadow:
        policy = (
            loopback_service("shadow.default.svc.cluster.local", shadow.port)
            + "---\n"
            + virtual_service(
                "- route: [{destination: {host: reviews}}]\n  mirror: {host: shadow}\n"
            )
        )

        def copies(count: int) -> None:
            wait_until_sync(lambda: len(shadow.heads) >= count, f"copy {count}")

        try:
            if kind == "sync":
                with httpx.Client() as client:  # closed by the end of the block
                    for copy in (1, 2):
                        meshlib.instrument(make_mesh(policy))  # a new Mesh each time
                        assert client.get(URL + "/").status_code == 200
                        copies(copy)
            else:

                async def run() -> None:
                    async with httpx.AsyncClient() as client:
                        for copy in (1, 2):
                            meshlib.instrument(make_mesh(policy))
                            assert (await client.get(URL + "/")).status_code == 200
                            await asyncio.to_thread(copies, copy)

                asyncio.run(run())
        finally:
            meshlib.uninstrument()
        wait_until_sync(lambda: shadow.active == 0, "the copies' connections to close", 2.0)


@pytest.mark.parametrize("meshes", [1, 2], ids=["one-mesh", "another-mesh-since"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_closing_a_stock_client_under_a_call_is_the_apps_doing(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], kind: str, meshes: int
) -> None:
    """A stock client closed while a meshed call is in flight: the call raises the client's
    error, as without the mesh and as with `meshlib.Client` — not sent again through the
    closed pool (retryOn reset), which would open a connection nobody closes. Also when
    `instrument(another_mesh)` came between (a call routed to v2 by the other Mesh makes the
    transport's new facade): the call in flight on its predecessor sees the close too."""
    import threading
    import time

    upstreams["v1"].behaviour.delay = 0.5
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews, subset: v1}}]\n"
            "  retries: {attempts: 3, retryOn: reset}\n"
        )
    )

    to_v2 = make_mesh(virtual_service("- route: [{destination: {host: reviews, subset: v2}}]\n"))

    def reached() -> bool:
        return upstreams["v1"].behaviour.active > 0

    outcome: list[object] = []
    meshlib.instrument(mesh)
    try:
        if kind == "sync":
            client = httpx.Client()

            def call() -> None:
                try:
                    outcome.append(client.get(URL + "/").status_code)
                except httpx.TransportError as exc:
                    outcome.append(exc)

            caller = threading.Thread(target=call)
            caller.start()
            while not reached():  # poll: the call reached the upstream
                time.sleep(0.005)
            if meshes == 2:
                meshlib.instrument(to_v2)
                assert client.get(URL + "/").headers["x-upstream"] == "v2"
            client.close()
            caller.join(10)
        else:

            async def main() -> None:
                client = httpx.AsyncClient()
                call = asyncio.create_task(client.get(URL + "/"))
                while not reached():
                    await asyncio.sleep(0.005)
                if meshes == 2:
                    meshlib.instrument(to_v2)
                    assert (await client.get(URL + "/")).headers["x-upstream"] == "v2"
                await client.aclose()
                try:
                    outcome.append((await call).status_code)
                except httpx.TransportError as exc:
                    outcome.append(exc)

            asyncio.run(main())
    finally:
        meshlib.uninstrument()
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError), outcome
    assert upstreams["v1"].behaviour.received == 1  # sent once


def test_instrumenting_again_after_another_library_took_the_wrapper_out(
    make_mesh: MeshFactory,
) -> None:
    """Another library wrapped the transport before instrument(), and its uninstrument takes
    the outermost wrapper out — meshlib's, as OpenTelemetry's `unwrap` does: clients are
    no longer meshed, `is_instrumented()` says so, and instrument() puts meshlib's back."""
    import wrapt
    from opentelemetry.instrumentation.utils import unwrap

    def other(
        wrapped: object, instance: object, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> object:
        return wrapped(*args, **kwargs)  # type: ignore[operator]

    stock_handle = httpx.HTTPTransport.__dict__["handle_request"]
    mesh = make_mesh(TO_V2)
    client = httpx.Client()
    try:
        wrapt.wrap_function_wrapper(httpx.HTTPTransport, "handle_request", other)
        meshlib.instrument(mesh)
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
        unwrap(httpx.HTTPTransport, "handle_request")  # the other library's uninstrument()
        assert not is_instrumented()
        meshlib.instrument(mesh)
        assert is_instrumented()
        assert client.get(URL + "/").headers["x-upstream"] == "v2"
        meshlib.uninstrument()
        assert httpx.HTTPTransport.__dict__["handle_request"]._self_wrapper is other
    finally:
        meshlib.uninstrument()
        client.close()
        httpx.HTTPTransport.handle_request = stock_handle  # type: ignore[method-assign]


@pytest.mark.parametrize("kind", ["httpx", "httpx-async", "requests"])
def test_a_call_uninstrument_overtakes_is_meshed_whole(
    make_mesh: MeshFactory, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """`uninstrument()` from another thread while a call is inside meshlib's wrapper, past
    reading whether `instrument()` is in effect (here: where the wrapper asks whether meshlib
    itself sent the call): the call is meshed whole by the Mesh it found — not by the default
    Mesh, as when the flag and the Mesh were read apart and the Mesh was gone between."""
    import importlib
    import threading

    instrumenting = importlib.import_module("meshlib.instrument")  # the attribute: the function
    stock = instrumenting.inside_meshlib

    def overtaken() -> bool:
        monkeypatch.setattr(instrumenting, "inside_meshlib", stock)  # once
        other = threading.Thread(target=meshlib.uninstrument)
        other.start()
        other.join(10)
        return stock()

    meshlib.instrument(make_mesh(TO_V2))
    monkeypatch.setattr(instrumenting, "inside_meshlib", overtaken)
    try:
        if kind == "httpx":
            with httpx.Client() as client:
                upstream = client.get(URL + "/").headers["x-upstream"]
        elif kind == "requests":
            with requests.Session() as session:
                upstream = session.get(URL + "/", timeout=5).headers["x-upstream"]
        else:

            async def call() -> str:
                async with httpx.AsyncClient() as client:
                    return (await client.get(URL + "/")).headers["x-upstream"]

            upstream = asyncio.run(call())
    finally:
        meshlib.uninstrument()
    assert upstream == "v2"
    assert not is_instrumented()  # the other thread's uninstrument() did its work
    assert instrumenting.inside_meshlib is stock  # the hook ran


@pytest.mark.parametrize("kind", ["httpx", "requests"])
def test_first_calls_racing_on_a_shared_transport_make_one_wrapper(
    instrumented: meshlib.Mesh, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Stock clients sharing one transport (httpx) or adapter (requests), their first calls
    made at once from eight threads: one meshing wrapper is made for it, not one per thread
    (each would have its own pool for mirrored copies, which closing the client never
    reaches but for the one kept)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from meshlib.instrument import _Clients

    threads = 8
    made: list[object] = []
    lock = threading.Lock()
    another = threading.Event()
    name = "MeshTransport" if kind == "httpx" else "MeshAdapter"

    class Counted(getattr(_Clients, name)):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            with lock:
                made.append(self)
                if len(made) > 1:
                    another.set()
            # Hold the first one back: a second thread making its own comes in meanwhile. (Made
            # once, as it should be, it waits out the whole half second.)
            another.wait(0.5)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(_Clients, name, Counted)
    barrier = threading.Barrier(threads)
    clients: list[object] = []
    if kind == "httpx":
        transport = httpx.HTTPTransport()
        clients = [httpx.Client(transport=transport) for _ in range(threads)]
    else:
        adapter = requests.adapters.HTTPAdapter()
        for _ in range(threads):
            session = requests.Session()
            session.mount("http://", adapter)
            clients.append(session)

    def call(client: object) -> str:
        barrier.wait(5)
        response = client.get(URL + "/", timeout=5)  # type: ignore[attr-defined]
        return str(response.headers["x-upstream"])

    try:
        with ThreadPoolExecutor(threads) as pool:
            upstreams = list(pool.map(call, clients))
    finally:
        for client in clients:
            client.close()  # type: ignore[attr-defined]
    assert upstreams == ["v2"] * threads
    assert len(made) == 1


@pytest.mark.parametrize("meshes", [1, 2], ids=["one-mesh", "another-mesh-since"])
def test_closing_a_stock_session_neither_waits_for_its_copies_nor_leaks_them(
    make_mesh: MeshFactory, meshes: int
) -> None:
    """A stock `requests.Session` under `instrument()` closed while its mirrored copies are
    held by the mirror (four, one per mirroring thread) and a fifth waits for a thread:
    `close()` returns at once (Envoy never holds a caller for its shadow, and
    `requests.get()` closes a session on every call), every copy still goes, and once the
    mirror answers no connection to it stays open — the queued one's included, sent after the
    close through a pool opened anew, with `Connection: close`. Also when
    `instrument(another_mesh)` came between (a sixth call, whose copy queues too)."""
    from tests.rawserver import ThreadServer, held_until, wait_until_sync
    from tests.upstream import loopback_service

    release = asyncio.Event()
    held = ThreadServer(held_until(release))
    with held as shadow:
        policy = (
            loopback_service("shadow.default.svc.cluster.local", shadow.port)
            + "---\n"
            + virtual_service(
                "- route: [{destination: {host: reviews}}]\n  mirror: {host: shadow}\n"
            )
        )
        made = [make_mesh(policy) for _ in range(meshes)]
        mirrors = [mesh.cluster(("shadow.default.svc.cluster.local", None, 9080)) for mesh in made]
        session = requests.Session()
        meshlib.instrument(made[0])
        try:
            assert [session.get(URL + "/", timeout=5).status_code for _ in range(5)] == [200] * 5
            wait_until_sync(lambda: len(shadow.heads) == 4, "four copies held")
            assert mirrors[0].limits.active_requests == 5  # and the fifth, queued
            if meshes == 2:
                meshlib.instrument(made[1])
                assert session.get(URL + "/", timeout=5).status_code == 200
            started = time.monotonic()
            session.close()
            assert time.monotonic() - started < 2.0  # not waiting for the held copies
        finally:
            meshlib.uninstrument()
            held.loop.call_soon_threadsafe(release.set)
        for mirror in mirrors:
            wait_until_sync(lambda m=mirror: m.limits.active_requests == 0, "the copies to end")
        assert len(shadow.heads) == 4 + meshes
        assert all(b"\r\nconnection: close\r\n" in head.lower() for head in shadow.heads[4:])
        wait_until_sync(lambda: shadow.active == 0, "the copies' connections to close", 2.0)


@pytest.mark.parametrize("meshes", [1, 2], ids=["one-mesh", "another-mesh-since"])
def test_closing_a_stock_httpx_client_neither_waits_for_its_copies_nor_leaks_them(
    make_mesh: MeshFactory, meshes: int
) -> None:
    """A stock `httpx.Client` under `instrument()` closed while its mirrored copies are held
    by the mirror (four, one per mirroring thread) and a fifth waits for a thread: `close()`
    returns at once (Envoy never holds a caller for its shadow, and `httpx.get()` closes a
    client on every call), as a requests session's does; every copy still goes; and once the
    mirror answers no connection to it stays open — the copies' pool is closed by the last
    copy in flight, and the queued one goes after the close through a pool of its own, closed
    after it. Also when `instrument(another_mesh)` came between (a sixth call, whose
    copy queues too, makes the transport's new facade, which shares the copies' pool)."""
    from tests.rawserver import ThreadServer, held_until, wait_until_sync

    release = asyncio.Event()
    held = ThreadServer(held_until(release))
    with held as shadow:
        made = [make_mesh(held_mirror(shadow.port)) for _ in range(meshes)]
        mirrors = [mesh.cluster(("shadow.default.svc.cluster.local", None, 9080)) for mesh in made]
        client = httpx.Client()
        meshlib.instrument(made[0])
        try:
            assert [client.get(URL + "/").status_code for _ in range(5)] == [200] * 5
            wait_until_sync(lambda: len(shadow.heads) == 4, "four copies held")
            assert mirrors[0].limits.active_requests == 5  # and the fifth, queued
            if meshes == 2:
                meshlib.instrument(made[1])
                assert client.get(URL + "/").status_code == 200
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < 2.0  # not waiting for the held copies
        finally:
            meshlib.uninstrument()
            held.loop.call_soon_threadsafe(release.set)
        for mirror in mirrors:
            wait_until_sync(lambda m=mirror: m.limits.active_requests == 0, "the copies to end")
        assert len(shadow.heads) == 4 + meshes
        wait_until_sync(lambda: shadow.active == 0, "the copies' connections to close", 2.0)


@pytest.mark.parametrize("meshes", [1, 2], ids=["one-mesh", "another-mesh-since"])
def test_closing_a_stock_async_client_stops_its_copies(make_mesh: MeshFactory, meshes: int) -> None:
    """A stock `httpx.AsyncClient` under `instrument()`, its mirror allowing one connection
    (maxConnections 1): a first copy is held by the mirror, a second waits for the
    connection. `aclose()` gives them their grace and cancels them — the waiting one is not
    sent once the connection frees, through a pool opened anew whose connection to the
    mirror nothing would close. Also when `instrument(another_mesh)` came between (a third
    call, whose copy the other Mesh's cluster lets through, makes the transport's new
    facade): closing stops the copy its predecessor left waiting. The loop runs on until
    every copy has ended, as an app's does."""
    from tests.rawserver import ThreadServer, held_until, wait_until, wait_until_sync

    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: shadow}\n"
        "spec:\n  host: shadow.default.svc.cluster.local\n  trafficPolicy:\n"
        "    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 10}}\n"
    )
    release = asyncio.Event()
    held = ThreadServer(held_until(release))
    with held as shadow:
        made = [make_mesh(held_mirror(shadow.port, rule)) for _ in range(meshes)]
        mirrors = [mesh.cluster(("shadow.default.svc.cluster.local", None, 9080)) for mesh in made]

        async def main() -> None:
            client = httpx.AsyncClient(timeout=5)
            meshlib.instrument(made[0])
            try:
                assert [(await client.get(URL + "/")).status_code for _ in range(2)] == [200] * 2
                await wait_until(lambda: len(shadow.heads) == 1, "the first copy held")
                assert mirrors[0].limits.active_requests == 2  # and the second, waiting
                if meshes == 2:
                    meshlib.instrument(made[1])
                    assert (await client.get(URL + "/")).status_code == 200
                    await wait_until(lambda: len(shadow.heads) == 2, "the third copy held")
                await client.aclose()
            finally:
                meshlib.uninstrument()
                held.loop.call_soon_threadsafe(release.set)
            for mirror in mirrors:
                await wait_until(lambda m=mirror: m.limits.active_requests == 0, "the copies")

        asyncio.run(main())
        assert len(shadow.heads) == meshes
        wait_until_sync(lambda: shadow.active == 0, "the copies' connections to close", 2.0)


@pytest.mark.parametrize("meshes", [1, 2], ids=["one-mesh", "another-mesh-since"])
def test_closing_a_stock_session_under_a_call_lets_the_call_finish(
    make_mesh: MeshFactory, upstreams: dict[str, Upstream], meshes: int
) -> None:
    """A stock `requests.Session` closed while a meshed call is in flight: the call finishes
    with its answer, sent once, as without the mesh (requests' `close()` empties the pools of
    idle connections and leaves a connection in use to finish; the session stays usable).
    Also when `instrument(another_mesh)` came between (a call routed to v2 by the other Mesh):
    the call in flight under the earlier Mesh is not cut off by the close either."""
    import threading

    upstreams["v1"].behaviour.delay = 1.0
    mesh = make_mesh(
        virtual_service(
            "- route: [{destination: {host: reviews, subset: v1}}]\n"
            "  retries: {attempts: 3, retryOn: 'reset,connect-failure'}\n"
        )
    )
    to_v2 = make_mesh(virtual_service("- route: [{destination: {host: reviews, subset: v2}}]\n"))
    outcome: list[object] = []
    session = requests.Session()
    meshlib.instrument(mesh)
    try:

        def call() -> None:
            try:
                outcome.append(session.get(URL + "/", timeout=5).status_code)
            except requests.RequestException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        while upstreams["v1"].behaviour.active == 0:  # poll: the call reached the upstream
            time.sleep(0.005)
        if meshes == 2:
            meshlib.instrument(to_v2)
            assert session.get(URL + "/", timeout=5).headers["x-upstream"] == "v2"
        started = time.monotonic()
        session.close()
        assert time.monotonic() - started < 0.5  # close() does not wait for the call (1 s)
        caller.join(10)
        assert outcome == [200]
        assert upstreams["v1"].behaviour.received == 1  # sent once: not retried after close
        # The session is still usable after close(), as a stock one is.
        expected = "v2" if meshes == 2 else "v1"
        upstreams["v1"].behaviour.delay = 0.0
        assert session.get(URL + "/", timeout=5).headers["x-upstream"] == expected
    finally:
        meshlib.uninstrument()
        session.close()
