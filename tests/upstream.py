"""Real upstream servers for tests: uvicorn on 127.0.0.1, an OS-assigned port, in a thread.

Each `Upstream` answers every request with JSON describing what it received (its name,
method, path, query, headers) and can be told to fail a share of requests, to answer with a
given status, or to delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Behaviour:
    """How an upstream answers; tests change it while the server runs."""

    fail_every: float = 0.0  # share of requests answered with `fail_status`, spread evenly
    fail_status: int = 503
    status: int = 200
    delay: float = 0.0
    received: int = 0
    active: int = 0  # requests being handled now
    peak: int = 0  # the most handled at once
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self) -> int:
        with self.lock:
            n = self.received
            self.received += 1
        if self.fail_every and int((n + 1) * self.fail_every) > int(n * self.fail_every):
            return self.fail_status
        return self.status


async def read_body(receive: Receive) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


class Upstream:
    """A uvicorn server in a daemon thread. Use as a context manager or call start()/stop()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.behaviour = Behaviour()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            interface="asgi3",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"upstream-{name}", daemon=True)
        self.port = 0

    def start(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:  # poll readiness
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"upstream {self.name} did not start")
            time.sleep(0.005)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = await read_body(receive)
        behaviour = self.behaviour
        status = behaviour.next_status()
        with behaviour.lock:
            behaviour.active += 1
            behaviour.peak = max(behaviour.peak, behaviour.active)
        try:
            if behaviour.delay:
                await asyncio.sleep(behaviour.delay)
        finally:
            with behaviour.lock:
                behaviour.active -= 1
        record = {
            "name": self.name,
            "method": scope["method"],
            "path": scope["path"],
            "query": scope["query_string"].decode(),
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            "body": body.decode("utf-8", "replace"),
            "client_port": (scope.get("client") or (None, None))[1],  # one per connection
        }
        with behaviour.lock:
            behaviour.requests.append(record)
        payload = json.dumps(record).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-upstream", self.name.encode()),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def service_entry(
    host: str, port: int, upstreams: dict[str, Upstream], *, namespace: str = "default"
) -> str:
    """A ServiceEntry for `host` whose endpoints are the upstreams, labelled version=<key>."""
    endpoints = "\n".join(
        f"  - {{address: 127.0.0.1, ports: {{http: {u.port}}}, labels: {{app: {host.split('.')[0]}, version: {v}}}}}"
        for v, u in upstreams.items()
    )
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host.split(".")[0]}, namespace: {namespace}}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints:
{endpoints}
"""


def subsets_rule(host: str, versions: list[str], traffic_policy: str = "") -> str:
    subsets = "\n".join(f"  - {{name: {v}, labels: {{version: {v}}}}}" for v in versions)
    policy = f"  trafficPolicy:\n{traffic_policy}" if traffic_policy else ""
    return f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host.split(".")[0]}}}
spec:
  host: {host}
{policy}
  subsets:
{subsets}
"""


class AsgiServer:
    """Any ASGI app served by uvicorn in a daemon thread on 127.0.0.1 (or another loopback
    address: on Linux all of 127.0.0.0/8 is loopback), an OS-assigned port."""

    def __init__(self, app: Any, name: str = "asgi", *, host: str = "127.0.0.1") -> None:
        config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="auto")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"server-{name}", daemon=True)
        self.host = host
        self.port = 0
        self.name = name

    def start(self) -> AsgiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server {self.name} did not start")
            time.sleep(0.005)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class HypercornServer:
    """Any ASGI app served by hypercorn in a daemon thread on 127.0.0.1, an OS-assigned port:
    HTTP/1.1, and HTTP/2 to a client that speaks it from the start (h2c prior knowledge),
    over which hypercorn sends response trailers. Same interface as `AsgiServer`. With
    `certfile` (a PEM file holding the key and the certificate chain), TLS instead, HTTP/2
    chosen by ALPN when the client offers it."""

    def __init__(self, app: Any, name: str = "hypercorn", *, certfile: str | None = None) -> None:
        from hypercorn.config import Config

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)  # listening already: ready once serving (connections queue)
        self.port: int = listener.getsockname()[1]
        self.config = Config()
        self.config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket now
        self.config.errorlog = None  # the app errors the tests make on purpose
        self.config.graceful_timeout = 0.5  # stop() waits no longer for open connections
        self.config.certfile = self.config.keyfile = certfile
        self.app = app
        self.name = name
        self._serving = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name=f"server-{name}", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from hypercorn.asyncio import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._serving.set()
        await serve(self.app, self.config, shutdown_trigger=self._stop.wait, mode="asgi")

    def start(self) -> HypercornServer:
        self.thread.start()
        if not self._serving.wait(10):
            raise RuntimeError(f"server {self.name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)


class WsgiServer:
    """Any WSGI app served by wsgiref (threaded) in a daemon thread on 127.0.0.1, an
    OS-assigned port; `with WsgiServer(app) as server: server.port`."""

    def __init__(self, app: Any) -> None:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        class Threaded(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        self.server = make_server("127.0.0.1", 0, app, server_class=Threaded, handler_class=Quiet)
        self.port: int = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WsgiServer:
        self.thread.start()  # the socket listens already: ready once serving
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def refused_port() -> socket.socket:
    """A socket bound to a loopback port and not listening: connecting to its port is
    refused (and no other server can take the port while it is held). Close it after."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    return held


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listen queue is full: the kernel drops the SYNs of every new
    connection to it (Linux), so connecting there takes until the connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # takes the queue's only place
    try:
        yield port
    finally:
        filler.close()
        listener.close()


def loopback_service(
    host: str, endpoint_port: int, *, port: int = 9080, namespace: str = "default"
) -> str:
    """A ServiceEntry for `host` (an FQDN) with one endpoint on 127.0.0.1:`endpoint_port`."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host.split(".")[0]}, namespace: {namespace}}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {endpoint_port}}}}}]
"""


def mesh_for(config: Any, policy: str, **kwargs: Any) -> Any:
    """A Mesh serving `policy` (YAML text) for the workload `config` describes; `kwargs` go to
    the Mesh (a tracer_provider, say)."""
    import meshlib
    from meshlib.policy.loader import load_text
    from meshlib.policy.snapshot import Snapshot

    result = load_text(policy)
    result.raise_for_errors()
    return meshlib.Mesh(config, policy=Snapshot.build(result.resources, config), **kwargs)


def child_env(*paths: str, **variables: str) -> dict[str, str]:
    """The environment of a child process (a server, a script) that imports the meshlib under
    test — the compiled copy under `make unit-compiled` — and modules in `paths`."""
    import os
    from pathlib import Path

    import meshlib

    tested = str(Path(meshlib.__file__ or "").parent.parent)
    path = os.pathsep.join(filter(None, (tested, *paths, os.environ.get("PYTHONPATH"))))
    return {**os.environ, **variables, "PYTHONPATH": path}


def run_script(script: str, *args: str, timeout: float = 120) -> Any:
    """`python -c script args...` in a child process on the meshlib under test (`child_env`):
    its CompletedProcess, stdout and stderr as text."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )
