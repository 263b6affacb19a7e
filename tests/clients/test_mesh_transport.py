"""MeshTransport's client-side decisions: routing, retries, header edits, mirrors, timeouts,
cookies, metrics and circuit-breaker slots.

Tests that send a request send it through the clients' real default transports (httpx's
HTTPTransport, meshlib's HTTP/1.1 pool under AsyncClient, requests' HTTPAdapter) to real
servers on loopback:

- `Servers`: four uvicorn servers shared by the module — api.internal's three endpoints on
  127.0.0.1, 127.0.0.2 and 127.0.0.3 (on Linux all of 127.0.0.0/8 is loopback) and `other` on
  127.0.0.1 (a mirror; a second port) — which record every request and answer as the test
  says: a status, headers, or holding the answer until the client gives up;
- raw-socket servers (`tests.rawserver`) where exact bytes matter: a `Set-Cookie` name in
  capitals, and HTTP/2 (prior knowledge) stream resets written with h2;
- a port whose listen queue is full (`unanswered_port`) for a connect that never completes,
  and a bound port that does not listen (`refused_port`) for a refused one.

What the mesh hands the real transport — each try's timeouts and a mirrored copy's — cannot be
seen from a server: the `tap` fixture gives those tests a real HTTPTransport (httpx) or
HTTPAdapter (requests) that records what it is handed, then sends it as usual.

Five tests keep an httpx.MockTransport, each saying why: the inner transport itself raising an
arbitrary exception (test_a_transport_that_raises_gives_back_its_slots), and answers httpx's
real transport refuses before the mesh sees them, as h11 rejects them
(test_a_content_length_of_thousands_of_digits_is_no_number,
test_hostile_upstream_numbers_never_fail_the_call, test_a_non_ascii_propagated_value_is_sent_as_received).
A fifth needs a call that never yields to the event loop, so that a mirrored copy's task
is cancelled before it ever ran
(test_a_mirrored_copy_cancelled_before_it_ran_gives_back_its_slot): a real socket yields.
The tests of URL parsing, proxies, client certificates and the mirror tracker send nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import textwrap
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests

import meshlib
from meshlib.clients.requests import MeshAdapter
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from tests.rawserver import OK, Peer, ThreadServer, answering, wait_until, wait_until_sync
from tests.upstream import AsgiServer, refused_port, unanswered_port

# -- real servers ---------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as a server received it."""

    endpoint: str  # the server's address, e.g. "127.0.0.2:41234"
    method: str
    path: str
    headers: list[tuple[str, str]]  # lowercase names, in the order received (Latin-1)
    connection: int  # the client's port: one per connection

    def get(self, name: str) -> str | None:
        values = self.get_list(name)
        return values[0] if values else None

    def get_list(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


@dataclass
class Answer:
    """What a server answers."""

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b"ok"
    hold: float = 0.0  # seconds before answering; a client that goes away ends the wait


class Servers:
    """`api`: three uvicorn servers, on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (api.internal's
    endpoints); `other`: a fourth on 127.0.0.1 (a mirror's endpoint, a second port). Each
    answers what `answer(seen)` says (200 "ok" unless the test says otherwise) and records
    every request in `seen`, in the order they arrive at any of the four."""

    def __init__(self) -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:  # a function: ASGI 3
            await self.serve(scope, receive, send)

        self.api = [AsgiServer(app, f"api-{n}", host=f"127.0.0.{n}") for n in (1, 2, 3)]
        self.other = AsgiServer(app, "other")
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.answer: Callable[[Seen], Answer] = lambda seen: Answer()

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.answer = lambda seen: Answer()

    @property
    def endpoints(self) -> list[str]:
        """api.internal's endpoints, "address:port", as the mesh keys them."""
        return [f"{server.host}:{server.port}" for server in self.api]

    def entry(self) -> str:
        """The ServiceEntry of api.internal (port 80) with the three `api` servers."""
        return api_entry(*((server.host, server.port) for server in self.api))

    async def serve(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        host, port = scope["server"]
        seen = Seen(
            f"{host}:{port}",
            scope["method"],
            scope["path"],
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            scope["client"][1],
        )
        with self.lock:
            self.seen.append(seen)
            answer = self.answer(seen)
        if answer.hold:
            with contextlib.suppress(asyncio.TimeoutError):
                if (await asyncio.wait_for(receive(), answer.hold))["type"] == "http.disconnect":
                    return  # the client gave up
        headers = [(b"content-length", str(len(answer.body)).encode()), *answer.headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})


@pytest.fixture(scope="module")
def running() -> Iterator[Servers]:
    servers = Servers()
    started: list[AsgiServer] = []
    try:
        for server in (*servers.api, servers.other):
            started.append(server.start())
        yield servers
    finally:
        for server in started:
            server.stop()


# How long a test waits for a mirrored copy: copies from every sync client in the process share
# four threads, where an earlier test's copy to a slow mirror may still be waiting its turn.
COPY_WAIT = 30.0


@pytest.fixture
def servers(running: Servers) -> Servers:
    running.reset()
    return running


@dataclass
class Handed:
    """A request as the mesh handed it to the real transport."""

    url: str
    headers: Mapping[str, str]
    timeout: Any  # httpx: the `timeout` extension; requests: the `timeout` argument


class _TappedTransport(httpx.HTTPTransport):
    """httpx's own transport, recording each request the mesh hands it before sending it."""

    def __init__(self, handed: list[Handed], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed = handed

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._handed.append(
            Handed(str(request.url), request.headers, request.extensions["timeout"])
        )
        return super().handle_request(request)


class _TappedAdapter(requests.adapters.HTTPAdapter):
    """requests' own adapter, recording each request the mesh hands it before sending it."""

    def __init__(self, handed: list[Handed]) -> None:
        super().__init__()
        self._handed = handed

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        self._handed.append(Handed(str(request.url), request.headers, kwargs.get("timeout")))
        return super().send(request, **kwargs)


class Tap(list[Handed]):
    """What the mesh handed the real transport, in order: a test gives its client
    `tap.transport()` (httpx) or its MeshAdapter `inner=tap.adapter()` (requests)."""

    def transport(self, **kwargs: Any) -> httpx.HTTPTransport:
        return _TappedTransport(self, **kwargs)

    def adapter(self) -> requests.adapters.HTTPAdapter:
        return _TappedAdapter(self)


@pytest.fixture
def tap() -> Tap:
    return Tap()


def api_entry(*endpoints: tuple[str, int] | tuple[str, int, str]) -> str:
    """A ServiceEntry of api.internal (port 80) with these endpoints: (address, port) or
    (address, port, kind), `kind` a label."""
    lines = []
    for address, port, *kind in endpoints:
        labels = f", labels: {{kind: {kind[0]}}}" if kind else ""
        lines.append(f"  - {{address: {address}, ports: {{http: {port}}}{labels}}}")
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\n"
        "spec:\n  hosts: [api.internal]\n  location: MESH_INTERNAL\n  resolution: STATIC\n"
        "  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints:\n"
        + "\n".join(lines)
        + "\n"
    )


def mesh_with(policy: str, config: MeshConfig | None = None) -> Mesh:
    result = load_text(policy, "t.yaml")
    result.raise_for_errors()
    config = config or MeshConfig()
    return Mesh(config, policy=Snapshot.build(result.resources, config), rng=random.Random(1))


def mesh_of(servers: Servers, extra: str, config: MeshConfig | None = None) -> Mesh:
    """A mesh where api.internal's endpoints are the three `api` servers."""
    return mesh_with(servers.entry() + "---\n" + textwrap.dedent(extra), config)


def client(servers: Servers, extra: str, **kwargs: Any) -> httpx.Client:
    """meshlib.Client, its default transport, with api.internal on the `api` servers."""
    return meshlib.Client(mesh=mesh_of(servers, extra), **kwargs)


# -- the mocked tests' service --------------------------------------------------------------

SERVICE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1}
  - {address: 10.0.0.2}
  - {address: 10.0.0.3}
"""

Handler = Callable[[httpx.Request], httpx.Response]


def mocked(extra: str, handler: Handler, **kwargs: object) -> httpx.Client:
    result = load_text(SERVICE + "---\n" + textwrap.dedent(extra), "t.yaml")
    result.raise_for_errors()
    config = MeshConfig()
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config), rng=random.Random(1))
    return meshlib.Client(transport=httpx.MockTransport(handler), mesh=mesh, **kwargs)


def _mesh_of(policy: str) -> Mesh:
    return mesh_with(SERVICE + "---\n" + policy)


def vs(http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
        "spec:\n  hosts: [api.internal]\n  http:\n"
        + textwrap.indent(textwrap.dedent(http).strip(), "  ")
        + "\n"
    )


def _dr(traffic_policy: str) -> str:
    return (
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        f"spec:\n  host: api.internal\n  trafficPolicy:\n    {traffic_policy}\n"
    )


ROUTE = "- route: [{destination: {host: api.internal}}]"


def _calls(mesh: Mesh, code: str, flags: str) -> float | None:
    labels = {"reporter": "source", "destination_service": "api.internal"}
    samples = [
        s
        for metric in mesh.registry.collect()
        for s in metric.samples
        if s.name == "istio_requests_total"
        and s.labels.items() >= {**labels, "response_code": code, "response_flags": flags}.items()
    ]
    return sum(s.value for s in samples) if samples else None


def held(seconds: float = 30.0) -> Callable[[Seen], Answer]:
    """Answers held back until the client gives up (or `seconds` pass)."""
    return lambda seen: Answer(hold=seconds)


def in_turn(*answers: Answer) -> Callable[[Seen], Answer]:
    """These answers, one per request in turn, then 200s."""
    left = list(answers)
    return lambda seen: left.pop(0) if left else Answer()


# -- timeouts -------------------------------------------------------------------------------


def test_callers_own_timeout_raises_its_exception(servers: Servers, tap: Tap) -> None:
    """When the caller's timeout (0.2 s) is shorter than the route's (10 s), expiry is its
    exception; the call is counted as Envoy logs a request the caller gave up on: 0, DC."""
    servers.answer = held()
    mesh = mesh_of(servers, vs(ROUTE + "\n  timeout: 10s"))
    with (
        meshlib.Client(mesh=mesh, timeout=0.2, transport=tap.transport()) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.get("http://api.internal/")
    assert [t.timeout["read"] for t in tap] == [0.2]
    wait_until_sync(lambda: len(servers.seen) == 1, "the server to see the request")
    assert _calls(mesh, "0", "DC") == 1.0


def test_mesh_per_try_timeout_is_the_mesh_answer(servers: Servers, tap: Tap) -> None:
    """When the route's per-try timeout is the shorter one, expiry is retried, then 504 UT."""
    servers.answer = held()
    policy = vs(ROUTE + "\n  retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}")
    with client(servers, policy, timeout=5.0, transport=tap.transport()) as c:
        response = c.get("http://api.internal/")
    assert response.status_code == 504
    assert response.extensions["response_flags"] == ["UT", "URX"]
    assert [t.timeout["read"] for t in tap] == [0.1] * 3
    wait_until_sync(lambda: len(servers.seen) == 3, "the servers to see the tries")
    endpoints = Counter(seen.endpoint for seen in servers.seen)
    assert sorted(endpoints) == sorted(servers.endpoints)  # three tries, three different hosts
    assert sum(endpoints.values()) == 3


def test_connect_timeout_from_destination_rule(servers: Servers, tap: Tap) -> None:
    """tcp.connectTimeout becomes the attempt's connect timeout (Istio's default is 10 s)."""
    policy = vs(ROUTE) + _dr("connectionPool: {tcp: {connectTimeout: 250ms}}")
    with client(servers, policy, timeout=30.0, transport=tap.transport()) as c:
        assert c.get("http://api.internal/").status_code == 200
    with client(servers, vs(ROUTE), timeout=30.0, transport=tap.transport()) as c:
        assert c.get("http://api.internal/").status_code == 200
    assert [t.timeout["connect"] for t in tap] == [0.25, 10.0]
    assert len(servers.seen) == 2


def test_the_callers_own_timeouts_do_not_eject_endpoints(servers: Servers) -> None:
    """The app's own timeout says nothing about the endpoint (Envoy does not count a caller
    giving up against the upstream): three on each endpoint in turn, with
    consecutive5xxErrors 3, eject nothing (they once ejected all three: 503 UH after)."""
    servers.answer = held()
    mesh = mesh_of(
        servers,
        vs(ROUTE + "\n  retries: {attempts: 0}")
        + _dr(
            "loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection: {consecutive5xxErrors: 3,"
            " baseEjectionTime: 60s, maxEjectionPercent: 100}"
        ),
    )
    with meshlib.Client(mesh=mesh, timeout=0.1) as c:
        for _ in range(9):
            with pytest.raises(httpx.ReadTimeout):
                c.get("http://api.internal/")
        wait_until_sync(lambda: len(servers.seen) == 9, "the servers to see the calls")
        assert Counter(seen.endpoint for seen in servers.seen) == dict.fromkeys(
            servers.endpoints, 3
        )
        assert mesh.cluster(("api.internal", None, 80)).outlier.ejected() == frozenset()
        servers.reset()  # answering at once again
        assert c.get("http://api.internal/").status_code == 200


def test_connecting_is_bounded_by_the_route_deadline_not_the_tries_time(
    tap: Tap,
) -> None:
    """Connecting comes before the try's time (Envoy starts the per-try timer once
    connected): with a 100 ms per-try timeout and a 300 ms route timeout the transport gets
    connect and pool timeouts of what is left of the route (not 100 ms, not the caller's
    5 s), and running out of it while connecting is the route's timeout (504 UT, no retry),
    not a connection failure (503 UF). (This test used to expect 100 ms: the per-try time.)"""
    policy = vs(
        ROUTE + "\n  timeout: 300ms\n"
        "  retries: {attempts: 2, perTryTimeout: 100ms, retryOn: connect-failure}"
    )
    with (
        unanswered_port() as port,
        meshlib.Client(
            mesh=mesh_with(api_entry(("127.0.0.1", port)) + "---\n" + policy),
            timeout=5.0,
            transport=tap.transport(),
        ) as c,
    ):
        started = time.monotonic()
        response = c.get("http://api.internal/")
        took = time.monotonic() - started
    assert len(tap) == 1
    assert all(0.25 < tap[0].timeout[phase] <= 0.3 for phase in ("connect", "pool")), tap
    assert tap[0].timeout["read"] == 0.1
    assert response.status_code == 504
    assert response.extensions["response_flags"] == ["UT"]
    assert 0.25 < took < 2.0  # the connect really waited for the route's time


def _serving(mesh: Mesh, budget_ms: str) -> contextlib.AbstractContextManager[object]:
    """The context of a served request whose caller left `budget_ms` milliseconds."""
    inbound = {"x-envoy-expected-rq-timeout-ms": [budget_ms], "x-meshlib-peer-metadata": ["w=a"]}
    return mesh.propagator.activated(mesh.propagator.extract(inbound.get))


def test_a_passthrough_call_ends_at_the_served_requests_deadline(servers: Servers) -> None:
    """A passthrough call (a host the mesh does not know) made while serving a request with
    500 ms left waits no longer than that for a held answer, though the caller's own timeout
    is 5 s: meshlib does not answer for such a host, so it ends as each client's own read
    timeout. (It used to wait for the upstream's answer, past the deadline.) Each call's
    budget is what is left when it is sent: at least half of it on a loaded machine."""
    servers.answer = held(3.0)
    mesh = mesh_of(servers, vs(ROUTE))
    url = f"http://127.0.0.1:{servers.other.port}/"
    took: list[float] = []

    async def call_async() -> None:
        async with meshlib.AsyncClient(mesh=mesh, timeout=5.0) as c:
            with _serving(mesh, "500"), pytest.raises(httpx.ReadTimeout):
                started = time.monotonic()
                try:
                    await c.get(url)
                finally:
                    took.append(time.monotonic() - started)

    with meshlib.Client(mesh=mesh, timeout=5.0) as c, requests.Session() as s:
        s.mount("http://", MeshAdapter(mesh=mesh))
        with _serving(mesh, "500"), pytest.raises(httpx.ReadTimeout):
            started = time.monotonic()
            try:
                c.get(url)
            finally:
                took.append(time.monotonic() - started)
        asyncio.run(call_async())
        with _serving(mesh, "500"), pytest.raises(requests.exceptions.ReadTimeout):
            started = time.monotonic()
            try:
                s.get(url, timeout=5.0)
            finally:
                took.append(time.monotonic() - started)
    assert len(took) == 3 and all(0.25 < t < 2.0 for t in took), took
    wait_until_sync(lambda: len(servers.seen) == 3, "the server to see the calls")
    budgets = [int(seen.get("x-envoy-expected-rq-timeout-ms") or 0) for seen in servers.seen]
    assert all(250 <= ms <= 500 for ms in budgets), budgets


def test_a_passthrough_calls_timeouts_end_within_the_deadline(tap: Tap) -> None:
    """Each timeout a passthrough call hands its transport ends within what is left of the
    served request's deadline; a shorter one of the caller's stays as it is; with no time
    left at all each is the least wait (1 ms, not 0, which a transport refuses or does not
    wait on), so the call fails at once with the client's own timeout exception."""
    mesh = mesh_with(SERVICE)
    with unanswered_port() as port:  # a connect that never completes: the timeout must end it
        url = f"http://127.0.0.1:{port}/"
        with meshlib.Client(mesh=mesh, transport=tap.transport()) as c:
            with _serving(mesh, "10000"), pytest.raises(httpx.ConnectTimeout):
                c.get(url, timeout=httpx.Timeout(30.0, connect=0.2, pool=None))
            (handed,) = tap
            assert handed.timeout["connect"] == 0.2
            assert all(9.0 < handed.timeout[phase] <= 10.0 for phase in ("read", "write", "pool"))
            tap.clear()
            with _serving(mesh, "1"):
                time.sleep(0.01)  # no time left
                started = time.monotonic()
                with pytest.raises(httpx.ConnectTimeout):
                    c.get(url)
                took = time.monotonic() - started
            phases = ("connect", "read", "write", "pool")
            assert [dict(t.timeout) for t in tap] == [dict.fromkeys(phases, 0.001)]
            assert took < 2.0  # not the client's default 5 s
        tap.clear()
        with requests.Session() as session:
            session.mount("http://", MeshAdapter(mesh=mesh, inner=tap.adapter()))
            with _serving(mesh, "10000"), pytest.raises(requests.exceptions.ConnectTimeout):
                session.get(url, timeout=(0.2, 30.0))
            ((connect, read),) = [t.timeout for t in tap]
            assert connect == 0.2 and 9.0 < read <= 10.0
            tap.clear()
            with _serving(mesh, "1"), pytest.raises(requests.exceptions.ConnectTimeout):
                time.sleep(0.01)  # no time left
                session.get(url)  # no timeout of its own
            assert [t.timeout for t in tap] == [(0.001, 0.001)]


def test_callers_own_connect_timeout_is_its_own_error_httpx(tap: Tap) -> None:
    """httpx: the caller's connect timeout, when it is the shortest bound on connecting, is
    the caller's: the transport gets it, and its expiry raises httpx.ConnectTimeout, not
    retried (as without the mesh), though the route retries connect failures."""
    policy = vs(ROUTE + "\n  retries: {attempts: 2, retryOn: connect-failure}")
    timeout = httpx.Timeout(5.0, connect=0.2)
    with (
        unanswered_port() as port,
        meshlib.Client(
            mesh=mesh_with(api_entry(("127.0.0.1", port)) + "---\n" + policy),
            timeout=timeout,
            transport=tap.transport(),
        ) as c,
        pytest.raises(httpx.ConnectTimeout),
    ):
        c.get("http://api.internal/")
    assert [(t.timeout["connect"], t.timeout["read"]) for t in tap] == [(0.2, 5.0)]


def test_callers_own_connect_timeout_is_its_own_error_requests(tap: Tap) -> None:
    """requests: `timeout=(connect, read)` keeps its meaning — connecting gets the caller's
    connect value (not one capped by the read value), and its expiry raises requests'
    ConnectTimeout unretried; the DestinationRule's connect timeout, when shorter, stays the
    mesh's (503 UF, retried on connect-failure)."""
    route = ROUTE + "\n  retries: {attempts: 2, retryOn: connect-failure}"
    rule = _dr("connectionPool: {tcp: {connectTimeout: 100ms}}")
    with unanswered_port() as port:
        entry = api_entry(("127.0.0.1", port)) + "---\n"
        for policy, timeout, expect_raise, tries in (
            (vs(route), (0.4, 0.1), True, [(0.4, 0.1)]),
            (vs(route), (0.1, 3.0), True, [(0.1, 3.0)]),
            (vs(route) + rule, (3.0, 5.0), False, [(0.1, 5.0)] * 3),
        ):
            tap.clear()
            with requests.Session() as session:
                mesh = mesh_with(entry + policy)
                session.mount("http://", MeshAdapter(mesh=mesh, inner=tap.adapter()))
                if expect_raise:
                    with pytest.raises(requests.ConnectTimeout):
                        session.get("http://api.internal/", timeout=timeout)
                else:
                    response = session.get("http://api.internal/", timeout=timeout)
                    assert response.status_code == 503
                    assert response.response_flags == ["UF", "URX"]  # type: ignore[attr-defined]
            assert [t.timeout for t in tap] == tries


def test_waiting_for_the_clients_pool_is_not_the_tries_time(servers: Servers, tap: Tap) -> None:
    """Waiting for a connection of the client's own pool comes before the try's time: with
    a 100 ms perTryTimeout and no route timeout, the pool wait gets the caller's 0.3 s, and
    its expiry is the caller's httpx.PoolTimeout, not the mesh's 504."""
    policy = vs(ROUTE + "\n  retries: {attempts: 2, perTryTimeout: 100ms, retryOn: 5xx}")
    with (
        client(
            servers,
            policy,
            timeout=httpx.Timeout(5.0, pool=0.3),
            transport=tap.transport(limits=httpx.Limits(max_connections=1)),
        ) as c,
        c.stream("GET", "http://api.internal/busy"),  # unread: it keeps the only connection
        pytest.raises(httpx.PoolTimeout),
    ):
        c.get("http://api.internal/waits")
    waited = [t.timeout for t in tap if t.url.endswith("/waits")]
    assert [(t["pool"], t["read"]) for t in waited] == [(0.3, 0.1)]
    assert [seen.path for seen in servers.seen] == ["/busy"]


def test_a_request_the_transport_refuses_is_the_apps_error(servers: Servers, tap: Tap) -> None:
    """An unsupported scheme or a request httpx cannot send is raised as httpx raises it —
    not retried, not answered 503, not held against an endpoint."""
    policy = vs(ROUTE + "\n  retries: {attempts: 3, retryOn: reset}")
    with (
        client(servers, policy, transport=tap.transport()) as c,
        pytest.raises(httpx.UnsupportedProtocol),
    ):
        c.get("ftp://api.internal/")
    ((handed,),) = [tap]  # sent once, to an endpoint
    assert handed.url in [f"ftp://{endpoint}/" for endpoint in servers.endpoints]
    assert servers.seen == []


def test_requests_routes_a_url_with_credentials_and_bounds_connecting(
    servers: Servers, tap: Tap
) -> None:
    """requests keeps `user:password@` in the URL: the mesh still routes the host (it once
    passed it through), and connecting gets no more than what is left of the route's
    timeout (not the try's time, which starts once connected, as Envoy's per-try timer)."""
    mesh = mesh_of(
        servers, vs(ROUTE + "\n  timeout: 300ms\n  retries: {attempts: 1, perTryTimeout: 100ms}")
    )
    with requests.Session() as session:
        session.mount("http://", MeshAdapter(mesh=mesh, inner=tap.adapter()))
        response = session.get("http://user:secret@api.internal/x", timeout=5.0)
    assert response.status_code == 200
    ((seen,),) = [servers.seen]
    assert seen.path == "/x" and seen.endpoint in servers.endpoints  # routed to an endpoint
    ((handed,),) = [tap]
    assert handed.url == f"http://{seen.endpoint}/x"
    connect, read = handed.timeout
    assert 0.25 < connect <= 0.3 and read == 0.1


# -- retries --------------------------------------------------------------------------------


def test_retry_goes_back_to_a_tried_host_when_it_is_the_only_one_left(servers: Servers) -> None:
    """With the other endpoints ejected, a retry may reuse the host already tried (as Envoy does)."""
    servers.answer = in_turn(Answer(503))
    policy = vs(ROUTE + "\n  retries: {attempts: 3, retryOn: 5xx}") + _dr(
        "outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 100}"
    )
    first, *others = servers.endpoints
    with client(servers, policy) as c:
        mesh = c._transport.mesh  # type: ignore[attr-defined]
        outlier = mesh.cluster(("api.internal", None, 80)).outlier
        for key in others:  # eject the other two endpoints
            for _ in range(2):
                outlier.record(key, status=503, total_endpoints=3)
        assert outlier.ejected() == set(others)
        response = c.get("http://api.internal/")
    assert response.status_code == 200
    assert [seen.endpoint for seen in servers.seen] == [first, first]


_WEIGHTED = (
    "- route: [{destination: {host: api.internal}, weight: 100},"
    " {destination: {host: api.internal, subset: all}, weight: 0}]"
)


@pytest.mark.parametrize(
    ("route", "hosts"),
    [
        pytest.param(ROUTE + "\n  retries: {attempts: 2, retryOn: 5xx}", 1, id="single"),
        pytest.param(ROUTE, 1, id="single-default-policy"),
        pytest.param(
            ROUTE + "\n  retries: {attempts: 2, retryOn: 5xx, retryIgnorePreviousHosts: true}",
            3,
            id="single-explicit",
        ),
        pytest.param(_WEIGHTED + "\n  retries: {attempts: 2, retryOn: 5xx}", 3, id="weighted"),
        pytest.param(None, 3, id="no-virtual-service"),
    ],
)
def test_consistent_hash_retries_and_previous_hosts(
    route: str | None, hosts: int, servers: Servers
) -> None:
    """Under consistent hashing pilot drops the previous-hosts rule only for a route with a
    single destination that does not set retryIgnorePreviousHosts (retry.ConvertPolicy's
    hashPolicy): retries then reach the hashed host again. A weighted route (even one whose
    other entry weighs 0), an explicit `true`, or no VirtualService keep it: retries go on
    to other hosts."""
    # grpc-status 14 (unavailable): Istio's default policy retries it, as `5xx` does a 503
    servers.answer = lambda seen: Answer(503, [(b"grpc-status", b"14")])
    policy = (vs(route) if route else "") + _dr(
        "loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n"
        "  subsets: [{name: all, labels: {}}]"
    )
    with client(servers, policy) as c:
        assert c.get("http://api.internal/", headers={"x-user": "ann"}).status_code == 503
    assert len(servers.seen) == 3 and len({seen.endpoint for seen in servers.seen}) == hosts


def test_envoy_ratelimited_is_retriable(servers: Servers) -> None:
    """retryOn envoy-ratelimited retries responses carrying x-envoy-ratelimited."""
    servers.answer = in_turn(Answer(429, [(b"x-envoy-ratelimited", b"true")]))
    policy = vs(ROUTE + "\n  retries: {attempts: 1, retryOn: envoy-ratelimited}")
    with client(servers, policy) as c:
        assert c.get("http://api.internal/").status_code == 200
    assert len(servers.seen) == 2


@pytest.mark.parametrize("retry_on", ["5xx", "gateway-error", "retriable-status-codes,503"])
def test_a_ratelimited_answer_is_retried_only_on_envoy_ratelimited(
    retry_on: str, servers: Servers
) -> None:
    """A 503 carrying x-envoy-ratelimited is final unless retryOn has envoy-ratelimited, as
    Envoy's wouldRetryFromHeaders decides before any other condition."""
    servers.answer = lambda seen: Answer(503, [(b"x-envoy-ratelimited", b"true")])
    policy = vs(ROUTE + f"\n  retries: {{attempts: 2, retryOn: '{retry_on}'}}")
    with client(servers, policy) as c:
        response = c.get("http://api.internal/")
    assert (response.status_code, response.extensions["response_flags"]) == (503, [])
    assert len(servers.seen) == 1


def resetting(code: int, streams: list[int]) -> Callable[[Peer], Awaitable[None]]:
    """An HTTP/2 server (prior knowledge) resetting every request's stream with `code`."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import RequestReceived

    async def handle(peer: Peer) -> None:
        connection = H2Connection(H2Configuration(client_side=False))
        connection.initiate_connection()
        await peer.send(connection.data_to_send())
        while data := await peer.reader.read(65536):
            for event in connection.receive_data(data):
                if isinstance(event, RequestReceived) and event.stream_id is not None:
                    streams.append(event.stream_id)
                    connection.reset_stream(event.stream_id, error_code=code)
            await peer.send(connection.data_to_send())

    return handle


@pytest.mark.parametrize(
    ("code", "retry_on", "sent", "flags", "reason"),
    [
        pytest.param(8, "reset", 2, "UR,URX", "remote reset", id="cancel"),
        pytest.param(8, "refused-stream", 1, "UR", "remote reset", id="cancel-not-refused"),
        pytest.param(7, "refused-stream", 2, "UR,URX", "remote refused stream reset", id="refused"),
        pytest.param(
            7, "gateway-error", 2, "UR,URX", "remote refused stream reset", id="gw-refused"
        ),
        pytest.param(7, "5xx", 2, "UR,URX", "remote refused stream reset", id="5xx-refused"),
        pytest.param(8, "gateway-error", 2, "UR,URX", "remote reset", id="gw-cancel"),
        pytest.param(7, "connect-failure", 1, "UR", "remote refused stream reset", id="cf-refused"),
    ],
)
def test_an_http2_stream_reset_is_ur(
    code: int, retry_on: str, sent: int, flags: str, reason: str
) -> None:
    """An HTTP/2 stream the upstream resets (RST_STREAM) is Envoy's 503 UR, not UC (a lost
    connection); REFUSED_STREAM is what `refused-stream` retries, and any reset is what
    `reset`, `5xx` and `gateway-error` retry (Envoy's wouldRetryFromReset), not
    `connect-failure`."""
    pytest.importorskip("h2.events")
    streams: list[int] = []
    policy = vs(ROUTE + f"\n  retries: {{attempts: 1, retryOn: {retry_on}}}")
    with ThreadServer(resetting(code, streams)) as server:
        mesh = mesh_with(api_entry(("127.0.0.1", server.port)) + "---\n" + policy)
        with meshlib.Client(mesh=mesh, http1=False, http2=True) as c:
            response = c.get("http://api.internal/")
    assert (response.status_code, response.headers["x-meshlib-response-flags"]) == (503, flags)
    assert response.text.endswith(f"reset reason: {reason}")
    assert len(streams) == sent


# -- routing --------------------------------------------------------------------------------


def test_mounts_are_meshed(servers: Servers) -> None:
    """Transports given as `mounts=` go through the mesh too."""
    mesh = mesh_of(servers, vs(ROUTE))
    with meshlib.Client(mesh=mesh, mounts={"http://": httpx.HTTPTransport()}) as c:
        assert c.get("http://api.internal/").status_code == 200
    assert [seen.endpoint in servers.endpoints for seen in servers.seen] == [True]


def test_max_requests_per_connection_above_one_closes_every_nth_per_endpoint(
    servers: Servers,
) -> None:
    """With N > 1 meshlib counts requests per endpoint (it cannot see the client's
    connections): every Nth request to an endpoint says `Connection: close`."""
    policy = vs(ROUTE) + _dr(
        "loadBalancer: {simple: ROUND_ROBIN}\n"
        "    connectionPool: {http: {maxRequestsPerConnection: 2}}"
    )
    with client(servers, policy) as c:
        for _ in range(6):
            c.get("http://api.internal/")
    per_host: dict[str, list[str | None]] = {}
    for seen in servers.seen:
        per_host.setdefault(seen.endpoint, []).append(seen.get("connection"))
    assert sorted(per_host) == sorted(servers.endpoints)
    assert all(values == ["keep-alive", "close"] for values in per_host.values()), per_host


def test_use_source_ip_sends_each_instance_to_one_endpoint(servers: Servers) -> None:
    """`consistentHash.useSourceIp`: a sidecar sees its app's connections come from the
    pod's IP, so all calls from one instance go to one endpoint; instances spread out."""
    policy = vs(ROUTE) + _dr("loadBalancer: {consistentHash: {useSourceIp: true}}")
    chosen: dict[str, set[str]] = {}
    for n in range(24):
        config = MeshConfig(instance_ip=f"10.8.0.{n + 1}")
        servers.reset()
        with meshlib.Client(mesh=mesh_of(servers, policy, config)) as c:
            for _ in range(10):
                c.get("http://api.internal/")
        assert len(servers.seen) == 10
        chosen[config.instance_ip or ""] = {seen.endpoint for seen in servers.seen}
    assert all(len(hosts) == 1 for hosts in chosen.values())  # sticky per instance
    assert len(set().union(*chosen.values())) > 1  # 24 instances on 3 endpoints: ~1e-11 to fail


@pytest.mark.parametrize(
    ("url", "port"),
    [
        pytest.param("http://web.internal/x", "http", id="no-port"),
        pytest.param("http://web.internal:80/x", "http", id="port-80"),
        pytest.param("http://web.internal:8080/x", "http-alt", id="port-8080"),
    ],
)
def test_a_url_without_a_port_reaches_port_80_of_a_multi_port_service(
    url: str, port: str, servers: Servers, tap: Tap
) -> None:
    """httpx drops the default port from a URL; meshlib still routes it to service port 80
    (it answered 503 NC for a service with several ports)."""
    ports = {"http": servers.api[0].port, "http-alt": servers.other.port}
    web = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web}}
spec:
  hosts: [web.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 8080, name: http-alt, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {ports["http"]}, http-alt: {ports["http-alt"]}}}}}
"""
    with meshlib.Client(mesh=mesh_with(web), transport=tap.transport()) as c:
        assert c.get(url).status_code == 200
    upstream = f"127.0.0.1:{ports[port]}"
    assert [t.url for t in tap] == [f"http://{upstream}/x"]
    assert [(seen.endpoint, seen.path) for seen in servers.seen] == [(upstream, "/x")]


def test_a_local_answer_to_head_has_no_body(servers: Servers) -> None:
    """A synthesized answer (here a fault abort) to a HEAD carries headers only, as Envoy's."""
    policy = vs(ROUTE + "\n  fault: {abort: {httpStatus: 503, percentage: {value: 100}}}")
    with client(servers, policy) as c:
        head = c.head("http://api.internal/")
        get = c.get("http://api.internal/")
    assert head.status_code == get.status_code == 503
    assert head.content == b"" and get.content == b"fault filter abort"
    assert servers.seen == []  # answered by the mesh


def test_a_local_answer_streams_raw_as_a_servers_does(servers: Servers) -> None:
    """Streamed, a synthesized answer (a fault abort) is read raw as an upstream's answer is:
    a proxy forwarding `iter_raw()` works whoever answered (sync, async, instrumented)."""
    policy = vs(ROUTE + "\n  fault: {abort: {httpStatus: 503, percentage: {value: 100}}}")
    with client(servers, policy) as c, c.stream("GET", "http://api.internal/") as streamed:
        assert b"".join(streamed.iter_raw()) == b"fault filter abort"

    async def raw_async() -> bytes:
        async with (
            meshlib.AsyncClient(mesh=mesh_of(servers, policy)) as a,
            a.stream("GET", "http://api.internal/") as answer,
        ):
            return b"".join([chunk async for chunk in answer.aiter_raw()])

    assert asyncio.run(raw_async()) == b"fault filter abort"


# -- cookies --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Set-Cookie", "set-cookie"])
def test_cookies_set_by_a_response_are_kept_and_sent(header: str) -> None:
    """meshlib's clients skip the cookie jar only for responses that set no cookie: cookies
    still arrive in `client.cookies` and go out with the next request, as with httpx."""
    login = (
        f"HTTP/1.1 200 OK\r\n{header}: session=abc; Path=/\r\nContent-Length: 2\r\n\r\nok"
    ).encode()

    def reply(target: bytes) -> bytes:  # the header's name as written, in a raw server
        return login if target == b"/login" else OK

    with ThreadServer(answering(reply)) as server:
        mesh = mesh_with(api_entry(("127.0.0.1", server.port)) + "---\n" + vs(ROUTE))
        with meshlib.Client(mesh=mesh) as c:
            c.get("http://api.internal/before")
            c.get("http://api.internal/login")
            c.get("http://api.internal/after")
            assert dict(c.cookies) == {"session": "abc"}
            c.cookies = {"other": "1"}  # replacing the store keeps meshlib's kind
            c.get("http://api.internal/replaced")
            assert type(c.cookies) is type(meshlib.Client().cookies)
        heads = [httpx.Headers(_header_lines(head)) for head in server.heads]
    assert [h.get("cookie") for h in heads] == [None, None, "session=abc", "other=1"]


def _header_lines(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(n.strip(), v.strip()) for n, _, v in (line.partition(b":") for line in lines if line)]


def test_a_cookie_jar_given_to_the_client_is_the_one_used(servers: Servers) -> None:
    """As with httpx, `Client(cookies=jar)` keeps using the app's jar (e.g. to save it)."""
    from http.cookiejar import CookieJar

    servers.answer = lambda seen: Answer(headers=[(b"set-cookie", b"session=abc; Path=/")])
    jar = CookieJar()
    with client(servers, vs(ROUTE), cookies=jar) as c:
        assert c.cookies.jar is jar
        c.get("http://api.internal/login")
    assert [cookie.name for cookie in jar] == ["session"]


# -- headers --------------------------------------------------------------------------------


def test_route_header_edits_apply_to_propagated_headers(servers: Servers) -> None:
    """Headers meshlib propagates for the app count as the app's own: a route's `set` wins
    over them and `remove` drops them, each name sent once (httpx and requests alike)."""
    policy = vs(
        """
        - headers:
            request:
              set: {end-user: edge-override}
              remove: [x-user-group]
          route: [{destination: {host: api.internal}}]
        """
    )
    mesh = mesh_of(servers, policy, MeshConfig(propagate_headers=("end-user", "x-user-group")))
    inbound = mesh.propagator.extract({"end-user": ["jason"], "x-user-group": ["beta"]}.get)
    with mesh.propagator.activated(inbound):
        with meshlib.Client(mesh=mesh) as c:
            assert c.get("http://api.internal/").status_code == 200
        with requests.Session() as s:
            s.mount("http://", MeshAdapter(mesh=mesh))
            assert s.get("http://api.internal/").status_code == 200
    sent = [
        [(k, v) for k, v in seen.headers if k in ("end-user", "x-user-group")]
        for seen in servers.seen
    ]
    assert sent == [[("end-user", "edge-override")]] * 2


def _budgets(
    servers: Servers,
    http: str,
    *,
    inbound: dict[str, list[str]] | None = None,
    app: dict[str, str] | None = None,
) -> list[str | None]:
    """x-envoy-expected-rq-timeout-ms as the upstream saw it, from httpx then requests."""
    servers.reset()
    mesh = mesh_of(servers, vs(http))
    # The clients are made first: only the calls spend the served request's budget.
    with meshlib.Client(mesh=mesh) as c, requests.Session() as s:
        s.mount("http://", MeshAdapter(mesh=mesh))
        with mesh.propagator.activated(mesh.propagator.extract((inbound or {}).get)):
            assert c.get("http://api.internal/", headers=app).status_code == 200
            assert s.get("http://api.internal/", headers=app).status_code == 200
    assert len(servers.seen) == 2
    return [seen.get("x-envoy-expected-rq-timeout-ms") for seen in servers.seen]


def _ms(values: list[str | None]) -> list[int]:
    assert all(v is not None for v in values), values
    return [int(v) for v in values if v is not None]


def test_the_attempt_budget_is_sent_upstream(servers: Servers) -> None:
    """As Envoy's router does, each attempt tells the upstream its time budget in
    x-envoy-expected-rq-timeout-ms: the route timeout, the per-try timeout when smaller, and
    never more than what the served request's caller left."""
    route = ROUTE + "\n  timeout: 0.5s"
    assert all(400 <= ms <= 500 for ms in _ms(_budgets(servers, route)))
    per_try = route + "\n  retries: {attempts: 2, perTryTimeout: 0.2s}"
    assert all(150 <= ms <= 200 for ms in _ms(_budgets(servers, per_try)))
    # A caller's 300 ms under the route's 500: its time left (less what the calls took).
    inbound = {"x-envoy-expected-rq-timeout-ms": ["300"], "x-meshlib-peer-metadata": ["w=a"]}
    assert all(100 <= ms <= 300 for ms in _ms(_budgets(servers, route, inbound=inbound)))


def test_no_timeout_sends_no_budget_and_the_app_header_stays(servers: Servers) -> None:
    assert _budgets(servers, ROUTE) == [None, None]
    timed = ROUTE + "\n  timeout: 0.5s"
    app = {"x-envoy-expected-rq-timeout-ms": "42"}
    assert _budgets(servers, timed, app=app) == ["42", "42"]


HEADER_ORDER = [
    pytest.param(
        "{add: {x: a}}", "{set: {x: b}}", ["b", "a"], id="route-add-follows-destination-set"
    ),
    pytest.param("{set: {x: ''}}", "{add: {x: ''}}", ["in"], id="empty-values-skipped"),
    pytest.param("{add: {x: a}}", "{add: {x: b}}", ["in", "a", "b"], id="adds-in-order"),
    pytest.param("{set: {x: a}}", "{remove: [x]}", ["a"], id="removes-go-first"),
    pytest.param("{set: {x: a}, remove: [x]}", "{}", ["a"], id="same-route-set-and-remove"),
    pytest.param("{add: {x: a}, remove: [x]}", "{}", ["a"], id="same-route-add-and-remove"),
]


@pytest.mark.parametrize(("route_ops", "dest_ops", "sent"), HEADER_ORDER)
def test_header_operations_apply_in_envoys_order(
    route_ops: str, dest_ops: str, sent: list[str], servers: Servers
) -> None:
    """With one destination, pilot puts route then destination operations in one Envoy
    parser: every remove first, then route set, destination set, route add, destination add;
    an empty value is skipped."""
    route = (
        f"- headers: {{request: {route_ops}}}\n"
        f"  route: [{{destination: {{host: api.internal}}, headers: {{request: {dest_ops}}}}}]"
    )
    with client(servers, vs(route)) as c:
        assert c.get("http://api.internal/", headers={"x": "in"}).status_code == 200
    assert [seen.get_list("x") for seen in servers.seen] == [sent]


def test_with_several_destinations_route_header_operations_come_last(servers: Servers) -> None:
    """Each of several destinations is an Envoy weighted cluster, whose header parser runs
    before the route's: the route's `set` wins over the destination's, and its remove takes
    out what the destination added."""
    dest = "headers: {request: {set: {x-tier: destination}, add: {x-d: '1'}}}"
    policy = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        "spec: {host: api.internal, subsets: [{name: a}, {name: b}]}\n---\n"
    ) + vs(
        f"""
        - headers: {{request: {{set: {{x-tier: route}}, remove: [x-d]}}}}
          route:
          - {{destination: {{host: api.internal, subset: a}}, weight: 50, {dest}}}
          - {{destination: {{host: api.internal, subset: b}}, weight: 50, {dest}}}
        """
    )
    with client(servers, policy) as c:
        for _ in range(4):
            assert c.get("http://api.internal/").status_code == 200
    assert [(seen.get_list("x-tier"), seen.get_list("x-d")) for seen in servers.seen] == [
        (["route"], [])
    ] * 4


# -- metrics --------------------------------------------------------------------------------


def test_calls_that_raise_are_counted_for_requests_too(servers: Servers) -> None:
    """requests: the caller's own read timeout counts as 0 DC, a refused connection as 0 UF."""
    servers.answer = held()
    refused = refused_port()
    with contextlib.closing(refused):
        entry = api_entry(
            ("127.0.0.1", servers.api[0].port, "slow"),
            ("127.0.0.1", refused.getsockname()[1], "refused"),
        )
        rule = (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
            "spec:\n  host: api.internal\n  subsets:\n"
            "  - {name: slow, labels: {kind: slow}}\n  - {name: refused, labels: {kind: refused}}\n"
        )
        routes = vs(
            """
            - match: [{uri: {prefix: /slow}}]
              route: [{destination: {host: api.internal, subset: slow}}]
              retries: {attempts: 0}
            - route: [{destination: {host: api.internal, subset: refused}}]
              retries: {attempts: 0}
            """
        )
        mesh = mesh_with(entry + "---\n" + rule + "---\n" + routes)
        with requests.Session() as s:
            s.mount("http://", MeshAdapter(mesh=mesh))
            with pytest.raises(requests.ReadTimeout):
                s.get("http://api.internal/slow", timeout=0.2)
            response = s.get("http://api.internal/refused", timeout=0.2)
    assert response.status_code == 503  # a refused connection is the mesh's answer, 503 UF
    assert [seen.path for seen in servers.seen] == ["/slow"]
    assert _calls(mesh, "0", "DC") == 1.0
    assert _calls(mesh, "503", "UF") == 1.0


# -- circuit-breaker slots ------------------------------------------------------------------


def test_cancelled_calls_give_back_their_circuit_breaker_slots(servers: Servers) -> None:
    """Calls cancelled while in flight (asyncio.wait_for, a caller that went away) give back
    their request slot and in-flight count: with http2MaxRequests 2, two cancelled calls once
    left every later call answered 503 UO for good."""
    servers.answer = lambda seen: Answer(hold=30 if seen.path == "/slow" else 0)
    mesh = mesh_of(servers, vs(ROUTE) + _dr("connectionPool: {http: {http2MaxRequests: 2}}"))

    def slow() -> int:
        return [seen.path for seen in servers.seen].count("/slow")

    async def main() -> None:
        async with meshlib.AsyncClient(mesh=mesh) as c:
            for n in range(3):
                calls = asyncio.gather(
                    c.get("http://api.internal/slow"), c.get("http://api.internal/slow")
                )
                await wait_until(lambda: slow() == 2 * (n + 1), "both calls to reach a server")  # noqa: B023
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(calls, 0.01)
            assert (await c.get("http://api.internal/")).status_code == 200

    asyncio.run(main())
    cluster = mesh.cluster(("api.internal", None, 80))
    assert cluster.limits.active_requests == 0
    assert all(cluster.in_flight.get(endpoint) == 0 for endpoint in servers.endpoints)


def test_a_transport_that_raises_gives_back_its_slots() -> None:
    """An inner transport raising something that is not a transport error (a bug, Ctrl-C):
    the app gets it, and the slots it held are free again."""
    # Mocked: it is about the inner transport object itself raising an arbitrary exception.
    mesh = _mesh_of(vs(ROUTE) + _dr("connectionPool: {http: {http2MaxRequests: 1}}"))
    failures = [RuntimeError("bug"), RuntimeError("bug")]

    def handler(request: httpx.Request) -> httpx.Response:
        if failures:
            raise failures.pop()
        return httpx.Response(200)

    with meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="bug"):
                c.get("http://api.internal/")
        assert c.get("http://api.internal/").status_code == 200
    assert mesh.cluster(("api.internal", None, 80)).limits.active_requests == 0


# -- mirrors --------------------------------------------------------------------------------


def shadow_entry(servers: Servers) -> str:
    """shadow.internal, one port (8080), its endpoint the `other` server."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shadow}}
spec:
  hosts: [shadow.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {servers.other.port}}}}}]
---
"""


def test_a_mirror_to_a_one_port_service_uses_that_port(servers: Servers, tap: Tap) -> None:
    """A mirror without a port goes to the mirror service's only port, as a route destination
    does, even when the request went to another port (it was silently dropped)."""
    policy = shadow_entry(servers) + vs(ROUTE + "\n  mirror: {host: shadow.internal}")
    with client(servers, policy, transport=tap.transport()) as c:
        assert c.get("http://api.internal/x").status_code == 200
        # Before the close: through the app's own transport, a copy ends with it.
        wait_until_sync(lambda: len(servers.seen) == 2, "the mirrored copy", COPY_WAIT)
    shadow = f"127.0.0.1:{servers.other.port}"
    (called,) = [seen.endpoint for seen in servers.seen if seen.endpoint != shadow]
    assert sorted(t.url for t in tap) == sorted([f"http://{called}/x", f"http://{shadow}/x"])
    assert sorted((seen.endpoint, seen.path) for seen in servers.seen) == sorted(
        [(called, "/x"), (shadow, "/x")]
    )


def test_a_mirrored_copy_never_waits_for_good(servers: Servers, tap: Tap) -> None:
    """With `timeout=None`, the caller's request may wait as long as it takes, but its
    mirrored copy gets 10 s in every phase: copies to a mirror that never answers cannot fill
    the slots for mirrored copies."""
    policy = vs(ROUTE + "\n  mirror: {host: api.internal}")
    with client(servers, policy, timeout=None, transport=tap.transport()) as c:
        assert c.get("http://api.internal/m").status_code == 200
        wait_until_sync(lambda: len(servers.seen) == 2, "the mirrored copy", COPY_WAIT)
    copies = [t.timeout for t in tap if "x-envoy-attempt-count" not in t.headers]
    assert copies == [dict.fromkeys(("connect", "read", "write", "pool"), 10.0)]
    assert len(tap) == 2


@pytest.mark.parametrize(
    ("timeout", "mirrored"),
    [
        pytest.param(None, (10.0, 10.0), id="none"),
        pytest.param((2, None), (2, 10.0), id="no-read"),
        pytest.param((None, 3), (10.0, 3), id="no-connect"),
        pytest.param(4, (4, 4), id="both"),
    ],
)
def test_a_mirrored_copy_never_waits_for_good_requests(
    timeout: Any, mirrored: tuple[float, float], servers: Servers, tap: Tap
) -> None:
    """requests: a mirrored copy takes the caller's connect and read timeouts, and 10 s for
    each the caller left unset — `(2, None)` once sent the copy with no read timeout, holding
    a mirroring thread for good when the mirror never answers."""
    policy = vs(ROUTE + "\n  mirror: {host: api.internal}")
    with requests.Session() as session:
        session.mount("http://", MeshAdapter(mesh=mesh_of(servers, policy), inner=tap.adapter()))
        assert session.get("http://api.internal/m", timeout=timeout).status_code == 200
        wait_until_sync(lambda: len(servers.seen) == 2, "the mirrored copy", COPY_WAIT)
    copies = [t.timeout for t in tap if "x-envoy-attempt-count" not in t.headers]
    assert copies == [mirrored]
    assert len(tap) == 2


def test_mirrored_copies_pending_are_bounded() -> None:
    """Copies to a mirror that never answers do not pile up: past MAX_MIRRORS_PENDING
    pending, new ones are dropped; once the pending ones end, copies are sent again."""
    from meshlib.clients import _common
    from meshlib.clients._common import MAX_MIRRORS_PENDING, MirrorTracker

    # The bound is the process's: copies an earlier test's closed client still sends hold
    # places until they end (closing a sync client neither waits for nor drops them).
    slots: Any = _common._mirror_slots
    wait_until_sync(lambda: slots._value == MAX_MIRRORS_PENDING, "earlier copies to end", 15)
    hold = threading.Event()
    tracker = MirrorTracker()
    try:
        sent = [tracker.submit(hold.wait, 10) for _ in range(MAX_MIRRORS_PENDING + 20)]
        assert sent == [True] * MAX_MIRRORS_PENDING + [False] * 20
    finally:
        hold.set()
    wait_until_sync(lambda: slots._value == MAX_MIRRORS_PENDING, "the held copies to end", 15)
    assert tracker.submit(lambda: None)
    wait_until_sync(lambda: slots._value == MAX_MIRRORS_PENDING, "the last copy to end")


# -- responses ------------------------------------------------------------------------------


def _redirecting(seen: Seen) -> Answer:
    if seen.path == "/old":
        return Answer(301, [(b"location", b"/new")], b"moved")
    return Answer(body=b"hello")


def _is_freed(box: list[httpx.Response]) -> None:
    """Content, `elapsed`, history as in httpx, and the response (the only one in `box`) and
    its history freed by reference counting alone once dropped."""
    response = box.pop()
    assert response.content == b"hello" and response.text == "hello"
    assert response.is_closed and response.elapsed.total_seconds() >= 0
    assert [r.status_code for r in response.history] == [301]
    assert response.history[0].content == b"moved"
    refs = [weakref.ref(response), weakref.ref(response.history[0])]
    del response
    assert [ref() for ref in refs] == [None, None]  # freed by reference counting alone


def _keeps_its_stream(streamed: httpx.Response) -> None:
    assert not streamed.is_closed
    assert type(streamed.stream).__name__.startswith("Bound")  # httpx's own, untouched


@pytest.mark.parametrize("make", [meshlib.Client, meshlib.AsyncClient])
def test_a_read_response_is_freed_without_the_cycle_collector(
    make: Callable[..., Any], servers: Servers
) -> None:
    """httpx binds each response's stream back to the response (a reference cycle); meshlib's
    clients undo that once the body is read, so a response the app drops — and the responses
    in its redirect history — are freed at once, not at the next cyclic collection. Content,
    `elapsed`, history and closing behave as in httpx; a streamed response keeps its stream."""
    servers.answer = _redirecting
    mesh = mesh_of(servers, vs(ROUTE))

    async def fetch_async() -> None:
        async with meshlib.AsyncClient(mesh=mesh) as c:

            async def get(stream: bool) -> httpx.Response:
                request = c.build_request("GET", "http://api.internal/old")
                return await c.send(request, stream=stream, follow_redirects=True)

            _is_freed([await get(False)])
            streamed = await get(True)
            _keeps_its_stream(streamed)
            await streamed.aclose()

    gc.collect()
    gc.disable()
    try:
        if make is meshlib.AsyncClient:
            asyncio.run(fetch_async())
        else:
            with meshlib.Client(mesh=mesh) as c:

                def get(stream: bool) -> httpx.Response:
                    request = c.build_request("GET", "http://api.internal/old")
                    return c.send(request, stream=stream, follow_redirects=True)

                _is_freed([get(False)])
                with contextlib.closing(get(True)) as streamed:
                    _keeps_its_stream(streamed)
    finally:
        gc.enable()
    assert [seen.path for seen in servers.seen] == ["/old", "/new"] * 2


def test_a_content_length_of_thousands_of_digits_is_no_number() -> None:
    """Python's `int` refuses strings of more than 4,300 digits: an upstream's absurd
    Content-Length is counted as no size, never a meshlib traceback."""

    # Mocked: httpx's real transport (h11) refuses such a response before the mesh sees it.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"content-length", b"9" * 4400)])

    with mocked(vs(ROUTE), handler) as c:
        assert c.get("http://api.internal/").status_code == 200


def test_hostile_upstream_numbers_never_fail_the_call() -> None:
    """'²' passes `str.isdigit()` but not `int()`: an upstream's `Content-Length: ²` (or an
    app's `Host: api.internal:²`) is read as no number, never a meshlib traceback."""

    # Mocked: httpx's real transport (h11) refuses `Content-Length: ²` before the mesh sees it.
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"content-length", "\u00b2".encode("latin-1"))])

    with mocked(vs(ROUTE), handler) as c:
        assert c.get("http://api.internal/").status_code == 200
        response = c.get("http://api.internal/", headers=[(b"host", b"api.internal:\xb2")])
        assert response.status_code in (200, 404)


@pytest.mark.parametrize("edits", [False, True], ids=["no-edits", "route-edits"])
def test_a_non_ascii_propagated_value_is_sent_as_received(edits: bool) -> None:
    """`end-user: jürgen` arrives as Latin-1 bytes; it goes on as the same bytes, with or
    without route header edits, and never fails the call."""
    # Mocked: the answer's header name `x-café` is no HTTP token, which h11 (httpx's real
    # transport) refuses before the mesh sees it.
    http = ROUTE
    if edits:
        http += "\n  headers: {request: {set: {x-env: prod}}, response: {add: {x-served-by: mesh}}}"
    result = load_text(SERVICE + "---\n" + vs(http), "t.yaml")
    result.raise_for_errors()
    config = MeshConfig(propagate_headers=("end-user",))
    mesh = Mesh(config, policy=Snapshot.build(result.resources, config))
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.extend(v for k, v in request.headers.raw if k.lower() == b"end-user")
        return httpx.Response(200, headers=[(b"x-caf\xe9", b"\xe9t\xe9")])

    inbound = mesh.propagator.extract({"end-user": [b"j\xfcrgen".decode("latin-1")]}.get)
    with (
        mesh.propagator.activated(inbound),
        meshlib.Client(mesh=mesh, transport=httpx.MockTransport(handler)) as c,
    ):
        response = c.get("http://api.internal/")
    assert response.status_code == 200
    assert seen == [b"j\xfcrgen"]
    assert dict(response.headers.raw)[b"x-caf\xe9"] == b"\xe9t\xe9"


# -- clients, no request sent ---------------------------------------------------------------


@pytest.mark.parametrize("make", [meshlib.Client, meshlib.AsyncClient])
def test_parsed_urls_follow_base_url_and_stay_bounded(make: Callable[..., httpx.Client]) -> None:
    """meshlib's clients parse each URL string once, but a changed `base_url` is honoured,
    a bad URL fails every time as in httpx, and the cache never grows past its bound."""
    from meshlib.clients import httpx as meshed

    c = make(base_url="http://a.example/v1/")
    first = c.build_request("GET", "items?x=1")
    assert str(first.url) == "http://a.example/v1/items?x=1"
    assert c.build_request("GET", "items?x=1").url == first.url
    c.base_url = "http://b.example/v2/"
    assert str(c.build_request("GET", "items?x=1").url) == "http://b.example/v2/items?x=1"
    assert str(c.build_request("GET", "http://c.example/").url) == "http://c.example/"
    for _ in range(2):
        with pytest.raises(httpx.InvalidURL):
            c.build_request("GET", "http://example.com:abc/")
    for n in range(meshed._PARSED_URLS * 2):
        assert c.build_request("GET", f"/n/{n}").url.path == f"/v2/n/{n}"
    assert c._parsed is not None and len(c._parsed[1]) <= meshed._PARSED_URLS
    assert c.build_request("GET", httpx.URL("x")).url == httpx.URL("http://b.example/v2/x")


@pytest.mark.parametrize("make", [meshlib.Client, meshlib.AsyncClient])
def test_proxies_are_meshed_and_taken_from_the_environment_as_httpx_does(
    make: Callable[..., httpx.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx sends through a proxy transport of its own (`proxy=`, or HTTP_PROXY & co. from
    the environment): meshlib's clients mesh it too — a `proxy=` once made every request skip
    the mesh — and honour the environment's proxies and NO_PROXY as stock httpx does."""
    from meshlib.clients import httpx as meshed

    def transports(c: httpx.Client) -> dict[str, object]:
        return {p.pattern: t for p, t in c._mounts.items()}

    explicit = make(proxy="http://127.0.0.1:3128")
    assert all(getattr(t, meshed._MESHED, False) for t in transports(explicit).values())
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", "localhost")
    stock = httpx.Client() if make is meshlib.Client else httpx.AsyncClient()
    from_env = make()
    assert transports(from_env).keys() == transports(stock).keys() == {"http://", "all://localhost"}
    assert transports(from_env)["all://localhost"] is None  # NO_PROXY: the default transport
    assert getattr(transports(from_env)["http://"], meshed._MESHED, False)
    assert getattr(from_env._transport, meshed._MESHED, False)
    assert make(trust_env=False)._mounts == {}


@pytest.mark.filterwarnings("ignore:`cert=...` is deprecated:DeprecationWarning")
def test_async_client_certificates_use_httpx_transport() -> None:
    """meshlib's HTTP/1.1 transport takes no client certificate: with `cert=` the async client sends
    through httpx's own (a missing file fails as in httpx, instead of being ignored)."""
    with pytest.raises(FileNotFoundError):
        meshlib.AsyncClient(cert="/nonexistent/client.pem")
    with pytest.raises(FileNotFoundError):
        httpx.AsyncClient(cert="/nonexistent/client.pem")


MIRROR_LIMITED = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow}
spec:
  hosts: [shadow.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shadow}
spec:
  host: shadow.internal
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}
---
""" + vs("- route: [{destination: {host: api.internal}}]\n  mirror: {host: shadow.internal}")


def test_a_mirrored_copy_cancelled_before_it_ran_gives_back_its_slot() -> None:
    """A copy's task cancelled before its first step (its `finally` never runs) still gives
    back the request slot and in-flight count it took on the mirror cluster: with
    http2MaxRequests 1 there, one lost slot would drop every later copy."""
    import asyncio

    from tests.rawserver import wait_until

    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.host)
        return httpx.Response(200)

    mesh = _mesh_of(MIRROR_LIMITED)
    shadow = mesh.cluster(("shadow.internal", None, 80))

    async def main() -> None:
        transport = meshlib.AsyncMeshTransport(httpx.MockTransport(handler), mesh=mesh)
        async with httpx.AsyncClient(transport=transport) as c:
            await c.get("http://api.internal/")  # the mock never yields: the copy has not run
            (task,) = transport._mirrors._asyncio  # the copy's asyncio task
            assert shadow.limits.active_requests == 1
            task.cancel()
            await wait_until(lambda: task.done() and not transport._mirrors, "the cancellation")
            assert shadow.limits.active_requests == 0
            assert shadow.in_flight.get("10.0.1.1:80") == 0
            await c.get("http://api.internal/")  # the next copy gets the slot and is sent
            await asyncio.wait(transport._mirrors._asyncio)
        assert [host.startswith("10.0.0.") for host in sent] == [True, True, False]
        assert sent[2] == "10.0.1.1"  # the second call's copy; the first's never went out

    asyncio.run(main())
