"""End-to-end fixtures: real uvicorn upstreams and the three meshed clients."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import meshlib.clients.httpx as meshed_httpx
import meshlib.clients.requests as meshed_requests
from meshlib.config import MeshConfig
from meshlib.mesh import Mesh
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from tests.upstream import Upstream, service_entry, subsets_rule

HOST = "reviews.default.svc.cluster.local"
PORT = 9080
URL = f"http://reviews:{PORT}"


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: Any
    flags: list[str]

    @property
    def upstream(self) -> str | None:
        return self.headers.get("x-upstream")


class Caller:
    """Sends requests through one kind of meshed client and normalises the answers."""

    def __init__(self, kind: str, mesh: Mesh) -> None:
        self.kind = kind
        self.mesh = mesh

    def many(
        self,
        n: int,
        path: str = "/",
        *,
        method: str = "GET",
        concurrency: int | None = None,
        **kwargs: Any,
    ) -> list[Result]:
        """`n` requests; at most `concurrency` at a time (async: 16 by default; the sync
        clients send one after another unless it is given, then from that many threads
        sharing one client)."""
        if self.kind == "httpx":
            with meshed_httpx.Client(mesh=self.mesh, timeout=30) as client:
                return _map(
                    lambda: _from_httpx(client.request(method, URL + path, **kwargs)),
                    n,
                    concurrency,
                )
        if self.kind == "requests":
            if "content" in kwargs:
                kwargs["data"] = kwargs.pop("content")
            with meshed_requests.Session(mesh=self.mesh) as session:
                return _map(
                    lambda: _from_requests(
                        session.request(method, URL + path, timeout=30, **kwargs)
                    ),
                    n,
                    concurrency,
                )
        return asyncio.run(self._many_async(n, path, method, concurrency or 16, kwargs))

    async def _many_async(
        self, n: int, path: str, method: str, concurrency: int, kwargs: dict[str, Any]
    ) -> list[Result]:
        limit = asyncio.Semaphore(concurrency)
        async with meshed_httpx.AsyncClient(mesh=self.mesh, timeout=30) as client:

            async def one() -> Result:
                async with limit:
                    return _from_httpx(await client.request(method, URL + path, **kwargs))

            return list(await asyncio.gather(*(one() for _ in range(n))))

    def one(self, path: str = "/", **kwargs: Any) -> Result:
        return self.many(1, path, **kwargs)[0]


def _map(call: Callable[[], Result], n: int, concurrency: int | None) -> list[Result]:
    if concurrency is None:
        return [call() for _ in range(n)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda _: call(), range(n)))


def _body(content: bytes, content_type: str) -> Any:
    if content_type.startswith("application/json"):
        import json

        return json.loads(content)
    return content.decode("utf-8", "replace")


def _from_httpx(response: httpx.Response) -> Result:
    response.read()
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Result(
        response.status_code,
        headers,
        _body(response.content, headers.get("content-type", "")),
        list(response.extensions.get("response_flags", [])),
    )


def _from_requests(response: Any) -> Result:
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Result(
        response.status_code,
        headers,
        _body(response.content, headers.get("content-type", "")),
        list(getattr(response, "response_flags", [])),
    )


@pytest.fixture(scope="session")
def upstreams() -> Iterator[dict[str, Upstream]]:
    """v1, v2, v3 endpoints of the reviews service, shared by the e2e tests."""
    servers = {v: Upstream(v).start() for v in ("v1", "v2", "v3")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def reset_behaviour(upstreams: dict[str, Upstream]) -> None:
    from tests.upstream import Behaviour

    for server in upstreams.values():
        server.behaviour = Behaviour()


MeshFactory = Callable[..., Mesh]


@pytest.fixture
def make_mesh(upstreams: dict[str, Upstream]) -> Iterator[MeshFactory]:
    """Build a Mesh from extra YAML plus the reviews ServiceEntry (and subsets v1-v3)."""
    meshes: list[Mesh] = []

    def make(
        policy: str = "",
        *,
        traffic_policy: str = "",
        seed: int = 7,
        endpoints: dict[str, Upstream] | None = None,
    ) -> Mesh:
        import random

        text = service_entry(HOST, PORT, endpoints or upstreams) + "---\n"
        text += subsets_rule(
            HOST,
            ["v1", "v2", "v3"],
            textwrap.indent(textwrap.dedent(traffic_policy), "    ") if traffic_policy else "",
        )
        if policy:
            text += "---\n" + textwrap.dedent(policy)
        result = load_text(text, "e2e.yaml")
        result.raise_for_errors()
        config = MeshConfig(service="productpage")
        mesh = Mesh(
            config, policy=Snapshot.build(result.resources, config), rng=random.Random(seed)
        )
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.close()


@pytest.fixture(params=["httpx", "httpx-async", "requests"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def virtual_service(http: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n"
        + textwrap.indent(textwrap.dedent(http).strip("\n"), "  ")
        + "\n"
    )


def held_mirror(port: int, rule: str = "") -> str:
    """reviews mirrored to `shadow` on 127.0.0.1:`port` (`rule`: a DestinationRule for it)."""
    from tests.upstream import loopback_service

    return (
        loopback_service("shadow.default.svc.cluster.local", port)
        + (f"---\n{rule}" if rule else "")
        + "---\n"
        + virtual_service("- route: [{destination: {host: reviews}}]\n  mirror: {host: shadow}\n")
    )
