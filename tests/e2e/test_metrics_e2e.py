"""Istio metrics from real calls: reporter="source" from clients, "destination" from middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshlib
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry.metrics import render
from tests.upstream import AsgiServer

LABELS = [
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_canonical_service",
    "destination_canonical_revision", "destination_service_name", "destination_service_namespace",
    "destination_cluster", "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
]  # fmt: skip


def samples(mesh: meshlib.Mesh, name: str) -> list[tuple[dict[str, str], float]]:
    text = render(mesh.registry).decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def ratings_service(mesh: meshlib.Mesh) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("five stars")

    return meshlib.MeshMiddleware(Starlette(routes=[Route("/ratings/{id}", ok)]), mesh=mesh)


def test_source_and_destination_reports_carry_istio_labels() -> None:
    """A call productpage -> ratings is counted once on each side with all 25 labels right."""
    ratings_mesh = meshlib.Mesh(MeshConfig(service="ratings", version="v1", namespace="bookinfo"))
    server = AsgiServer(ratings_service(ratings_mesh), "ratings").start()
    policy = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: bookinfo}}
spec:
  hosts: [ratings.bookinfo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {server.port}}}}}]
"""
    config = MeshConfig(service="productpage", version="v1", namespace="bookinfo")
    result = load_text(policy)
    client_mesh = meshlib.Mesh(config, policy=Snapshot.build(result.resources, config))
    try:
        with meshlib.Client(mesh=client_mesh) as client:
            for _ in range(3):
                assert client.get("http://ratings:9080/ratings/1").status_code == 200

        async def one_async() -> None:
            async with meshlib.AsyncClient(mesh=client_mesh) as client:
                assert (await client.get("http://ratings:9080/ratings/2")).status_code == 200

        asyncio.run(one_async())
        with meshlib.Session(mesh=client_mesh) as session:
            assert session.get("http://ratings:9080/ratings/3", timeout=5).status_code == 200
    finally:
        server.stop()
        ratings_mesh.close()
        client_mesh.close()
    ((source_labels, source_count),) = samples(client_mesh, "istio_requests_total")
    ((dest_labels, dest_count),) = samples(ratings_mesh, "istio_requests_total")
    assert source_count == dest_count == 5
    assert list(source_labels) == LABELS and list(dest_labels) == LABELS
    common = {
        "source_workload": "productpage",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "bookinfo",
        "source_principal": "spiffe://cluster.local/ns/bookinfo/sa/default",
        "source_app": "productpage",
        "source_version": "v1",
        "destination_workload": "ratings",
        "destination_workload_namespace": "bookinfo",
        "destination_app": "ratings",
        "destination_version": "v1",
        "destination_canonical_service": "ratings",
        "destination_service": "ratings.bookinfo.svc.cluster.local",
        "destination_service_name": "ratings",
        "destination_service_namespace": "bookinfo",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
    }
    assert source_labels | common == source_labels and source_labels["reporter"] == "source"
    assert dest_labels | common == dest_labels and dest_labels["reporter"] == "destination"
    assert source_labels["connection_security_policy"] == "unknown"
    assert dest_labels["connection_security_policy"] == "none"
    buckets = [
        s
        for s in samples(client_mesh, "istio_request_duration_milliseconds_bucket")
        if s[0]["le"] == "+Inf"
    ]
    assert buckets[0][1] == 5


def test_local_answers_are_counted_with_their_flags() -> None:
    """A synthesized 404 NR is counted with reporter="source", response_flags="NR", unknown peer."""
    policy = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.internal]
  http: [{match: [{uri: {prefix: /a}}], route: [{destination: {host: api.internal}}]}]
"""
    config = MeshConfig(service="web")
    mesh = meshlib.Mesh(config, policy=Snapshot.build(load_text(policy).resources, config))
    with meshlib.Client(
        mesh=mesh, transport=httpx.MockTransport(lambda r: httpx.Response(200))
    ) as client:
        assert client.get("http://api.internal/zzz").status_code == 404
    ((labels, count),) = samples(mesh, "istio_requests_total")
    assert count == 1
    assert labels["response_code"] == "404" and labels["response_flags"] == "NR"
    assert labels["destination_workload"] == "unknown"
    assert labels["destination_service"] == "api.internal"
    mesh.close()


def test_metrics_port_serves_both_paths() -> None:
    """A Mesh serves its registry on /metrics and /stats/prometheus."""
    mesh = meshlib.Mesh(MeshConfig(service="web"))
    server = mesh.serve_metrics(0, host="127.0.0.1")
    try:
        for path in ("/metrics", "/stats/prometheus"):
            response = httpx.get(f"http://127.0.0.1:{server.port}{path}")
            assert response.status_code == 200
            assert "meshlib_policy_generation" in response.text
    finally:
        mesh.close()


def test_a_host_outside_the_mesh_cannot_name_itself_in_the_metrics() -> None:
    """A passthrough host is not sent this workload's identity, and what it answers in the
    metadata-exchange header is not read: its destination labels stay Istio's unknown, as
    the docs say, however it claims to be a mesh workload (Kiali would draw that edge)."""
    claim = b"w=payments-v1;n=prod;a=payments;cs=payments;p=spiffe://cluster.local/ns/prod/sa/pay"

    async def impostor(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"x-meshlib-peer-metadata", claim), (b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    server = AsgiServer(impostor, "impostor").start()
    mesh = meshlib.Mesh(MeshConfig(service="productpage", metrics_port=None), watch=False)
    try:
        with meshlib.Client(mesh=mesh) as client:
            response = client.get(f"http://127.0.0.1:{server.port}/")
        assert response.status_code == 200
        assert "x-meshlib-peer-metadata" not in response.request.headers
        text = render(mesh.registry).decode()
        (labels,) = [
            sample.labels
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "istio_requests_total"
        ]
        assert labels["destination_service_name"] == "PassthroughCluster"
        for name in ("destination_workload", "destination_principal", "destination_app"):
            assert labels[name] == "unknown", name
    finally:
        mesh.close()
        server.stop()


def test_source_side_counts_no_body_for_head_and_304() -> None:
    """A HEAD answer and a 304 carry a Content-Length but no body on the wire: the source
    report counts 0 response bytes, as Envoy counts what came (and the middleware does)."""
    from tests.rawserver import ThreadServer, answering
    from tests.upstream import loopback_service, mesh_for

    def reply(target: bytes) -> bytes:
        if target == b"/head":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
        if target == b"/cached":
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7000\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    with ThreadServer(answering(reply)) as server:
        mesh = mesh_for(
            MeshConfig(service="productpage", metrics_port=None),
            loopback_service("reviews.default.svc.cluster.local", server.port),
        )
        try:
            with meshlib.Client(mesh=mesh) as client:
                assert client.head("http://reviews:9080/head").status_code == 200
                assert client.get("http://reviews:9080/cached").status_code == 304
                assert client.get("http://reviews:9080/").status_code == 200
            sums = {
                labels["response_code"]: value
                for labels, value in samples(mesh, "istio_response_bytes_sum")
                if labels["reporter"] == "source"
            }
        finally:
            mesh.close()
    assert sums == {"200": 2.0, "304": 0.0}


RELAYED = b"w=ratings-v1;n=default;a=ratings"  # an upstream's identity, relayed as is


@pytest.mark.parametrize("relay", ["asgi+httpx", "wsgi+requests"])
def test_a_relayed_identity_header_never_names_the_wrong_workload(relay: str) -> None:
    """productpage -> reviews -> ratings, reviews relaying ratings' response headers (a proxy,
    a BFF). As with Istio's metadata exchange, each hop's identity header is read and removed
    (ratings' request, reviews' response from its meshed client) and the middleware sets its
    own, replacing any the app relayed (here one a client outside the mesh would have passed
    on): productpage sees reviews' identity only, and labels its series with it."""
    from tests.upstream import WsgiServer, loopback_service, mesh_for

    seen: dict[str, Any] = {}
    ratings_mesh = mesh_for(
        MeshConfig(service="ratings", workload="ratings-v1", metrics_port=None), ""
    )

    async def ratings(scope: Any, receive: Any, send: Any) -> None:
        seen["ratings request"] = [name.decode() for name, _ in scope["headers"]]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"stars": 5}'})

    ratings_server = AsgiServer(meshlib.MeshMiddleware(ratings, mesh=ratings_mesh)).start()
    reviews_mesh = mesh_for(
        MeshConfig(service="reviews", workload="reviews-v2", metrics_port=None),
        loopback_service("ratings.default.svc.cluster.local", ratings_server.port),
    )
    upstream = "http://ratings.default.svc.cluster.local:9080/ratings/1"
    forged = (b"X-Meshlib-Peer-Metadata", RELAYED)
    hop_by_hop = (b"content-length", b"transfer-encoding", b"date", b"server")

    async def asgi_reviews(scope: Any, receive: Any, send: Any) -> None:
        async with meshlib.AsyncClient(mesh=reviews_mesh) as client:
            answer = await client.get(upstream)
        seen["reviews response"] = list(answer.headers.keys())
        relayed = [(k, v) for k, v in answer.headers.raw if k.lower() not in hop_by_hop]
        headers = [*relayed, forged]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.content})

    def wsgi_reviews(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with meshlib.Session(mesh=reviews_mesh) as session:
            answer = session.get(upstream)
        seen["reviews response"] = [name.lower() for name in answer.headers]
        relayed = [
            (k, v) for k, v in answer.headers.items() if k.lower().encode() not in hop_by_hop
        ]
        start_response("200 OK", [*relayed, (forged[0].decode(), forged[1].decode())])
        return [answer.content]

    if relay == "asgi+httpx":
        server: Any = AsgiServer(meshlib.MeshMiddleware(asgi_reviews, mesh=reviews_mesh))
        port, stop = server.start().port, server.stop
    else:
        server = WsgiServer(meshlib.MeshWSGIMiddleware(wsgi_reviews, mesh=reviews_mesh))
        port, stop = server.__enter__().port, server.__exit__
    productpage = mesh_for(
        MeshConfig(service="productpage", workload="productpage-v1", metrics_port=None),
        loopback_service("reviews.default.svc.cluster.local", port),
    )
    try:
        with meshlib.Client(mesh=productpage) as client:
            answer = client.get("http://reviews.default.svc.cluster.local:9080/reviews/1")
    finally:
        stop()
        ratings_server.stop()
    assert answer.status_code == 200
    assert "x-meshlib-peer-metadata" not in seen["ratings request"]
    assert "x-meshlib-peer-metadata" not in seen["reviews response"]
    assert "x-meshlib-peer-metadata" not in answer.headers  # read and removed by the client
    (labels,) = [labels for labels, _ in samples(productpage, "istio_requests_total")]
    assert labels["destination_service_name"] == "reviews"
    assert (labels["destination_workload"], labels["destination_app"]) == ("reviews-v2", "reviews")
    for mesh in (ratings_mesh, reviews_mesh, productpage):
        mesh.close()
