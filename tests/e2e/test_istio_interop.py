"""A meshlib workload and Envoy-sidecar workloads name each other, as two sidecars do.

Istio's sidecars exchange workload metadata in `x-envoy-peer-metadata` (a base64 protobuf
Struct) and `x-envoy-peer-metadata-id`: the caller's sidecar adds them to the request, the
callee's reads and removes them, and answers with its own only when the request carried
them. Real servers on loopback play both sides here; the sidecars' headers are ones captured
from Istio 1.14.5's bookinfo (tests/telemetry/test_peer_istio.py), and one built as an older
sidecar of a pod with many labels would send it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google.protobuf import struct_pb2

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry import peer
from tests.e2e.test_metrics_e2e import samples
from tests.telemetry.test_peer_istio import SIDECAR_RATINGS_V1, SIDECAR_REVIEWS_V3, sidecar_header
from tests.upstream import AsgiServer, WsgiServer, loopback_service, mesh_for

EXCHANGE = ("x-meshlib-peer-metadata", "x-envoy-peer-metadata", "x-envoy-peer-metadata-id")
REVIEWS_V3_ID = "sidecar~172.16.0.133~reviews-v3-58b6479b-62rv5.default~default.svc.cluster.local"
RATINGS_V1_ID = "sidecar~172.16.0.69~ratings-v1-85cc46b6d4-n7qdg.default~default.svc.cluster.local"
RATINGS = MeshConfig(service="ratings", version="v1", namespace="default", workload="ratings-v1")
REVIEWS = MeshConfig(service="reviews", version="v2", namespace="default", workload="reviews-v2")


def struct_of(value: str) -> dict[str, Any]:
    """A metadata header as the protobuf runtime (Envoy's) reads it."""
    message = struct_pb2.Struct()
    message.ParseFromString(base64.b64decode(value, validate=True))
    return {
        key: dict(field.struct_value) if field.HasField("struct_value") else field.string_value
        for key, field in message.fields.items()
    }


def sidecar_view(config: MeshConfig) -> dict[str, Any]:
    """What an Envoy sidecar learns of a meshlib workload from its header."""
    app, version = config.labels["app"], config.labels["version"]
    return {
        "NAMESPACE": config.namespace,
        "WORKLOAD_NAME": config.workload,
        "CLUSTER_ID": "Kubernetes",
        "LABELS": {
            "app": app,
            "version": version,
            "service.istio.io/canonical-name": app,
            "service.istio.io/canonical-revision": version,
        },
    }


def recorded(mesh: meshlib.Mesh, n: int) -> list[tuple[dict[str, str], float]]:
    """The server's request series once it counted `n` requests: the middleware counts one
    after its response went (a WSGI response once the server closes it)."""
    deadline = time.monotonic() + 10
    while True:
        series = samples(mesh, "istio_requests_total")
        if sum(value for _, value in series) >= n:
            return series
        assert time.monotonic() < deadline, series
        time.sleep(0.01)


def asgi_ratings(mesh: meshlib.Mesh) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen = [name.decode() for name, _ in scope["headers"] if name.decode() in EXCHANGE]
        left = meshlib.remaining_deadline()
        body = f"{','.join(seen)}|{left is not None and left <= 1.5}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return meshlib.MeshMiddleware(app, mesh=mesh)


def wsgi_ratings(mesh: meshlib.Mesh) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen = [
            name
            for name in EXCHANGE
            if "HTTP_" + name.upper().replace("-", "_") in environ  # as a WSGI app reads them
        ]
        left = meshlib.remaining_deadline()
        start_response("200 OK", [("content-type", "text/plain")])
        return [f"{','.join(seen)}|{left is not None and left <= 1.5}".encode()]

    return meshlib.MeshWSGIMiddleware(app, mesh=mesh)


@pytest.fixture(params=["asgi", "wsgi"])
def ratings(request: pytest.FixtureRequest) -> Iterator[tuple[meshlib.Mesh, str]]:
    """ratings-v1, meshed by meshlib, served by uvicorn (ASGI) or wsgiref (WSGI)."""
    mesh = meshlib.Mesh(RATINGS, watch=False)
    try:
        if request.param == "asgi":
            server = AsgiServer(asgi_ratings(mesh), "ratings").start()
            try:
                yield mesh, f"http://127.0.0.1:{server.port}"
            finally:
                server.stop()
        else:
            with WsgiServer(wsgi_ratings(mesh)) as wsgi:
                yield mesh, f"http://127.0.0.1:{wsgi.port}"
    finally:
        mesh.close()


def test_a_sidecar_caller_is_named_and_answered_in_its_form(
    ratings: tuple[meshlib.Mesh, str],
) -> None:
    """reviews-v3's sidecar calls meshlib's ratings: ratings counts reviews-v3 by the labels
    Istio's stats give it, answers its own metadata in Istio's form (the id only to a caller
    that sent one), trusts the sidecar's expected timeout, and its app sees none of it."""
    mesh, url = ratings
    sidecar = {
        "x-envoy-peer-metadata": SIDECAR_REVIEWS_V3,
        "x-envoy-expected-rq-timeout-ms": "1500",
    }
    with httpx.Client(base_url=url) as caller:
        with_id = caller.get(
            "/ratings/1", headers={**sidecar, "x-envoy-peer-metadata-id": REVIEWS_V3_ID}
        )
        without_id = caller.get("/ratings/1", headers=sidecar)
        outside = caller.get("/ratings/1", headers={"x-envoy-expected-rq-timeout-ms": "1500"})
    assert with_id.text == without_id.text == "|True"  # headers removed; the deadline taken
    assert outside.text == "|False"  # no peer header: Envoy's x-envoy-* not trusted
    assert struct_of(with_id.headers["x-envoy-peer-metadata"]) == sidecar_view(RATINGS)
    assert with_id.headers["x-envoy-peer-metadata-id"].startswith("meshlib~")
    assert struct_of(without_id.headers["x-envoy-peer-metadata"]) == sidecar_view(RATINGS)
    assert "x-envoy-peer-metadata-id" not in without_id.headers
    for response in (with_id, without_id, outside):
        assert "x-meshlib-peer-metadata" not in response.headers
    assert not any(name in outside.headers for name in EXCHANGE)
    counted = {labels["source_workload"]: (labels, value) for labels, value in recorded(mesh, 3)}
    labels, value = counted["reviews-v3"]
    assert value == 2
    assert {
        name: labels[name]
        for name in (
            "source_app",
            "source_version",
            "source_canonical_service",
            "source_canonical_revision",
            "source_workload_namespace",
            "source_cluster",
            "source_principal",
            "destination_workload",
        )
    } == {
        "source_app": "reviews",
        "source_version": "v3",
        "source_canonical_service": "reviews",
        "source_canonical_revision": "v3",
        "source_workload_namespace": "default",
        "source_cluster": "Kubernetes",
        "source_principal": "unknown",  # a sidecar's principal is its mTLS certificate's
        "destination_workload": "ratings-v1",
    }
    assert counted["unknown"][1] == 1


def test_a_sidecar_sending_its_whole_node_metadata_is_named(
    ratings: tuple[meshlib.Mesh, str],
) -> None:
    """An older sidecar sends its whole node metadata, every pod label and the node's
    platform metadata included: with 60 labels of a usual length that is 6.6 KiB, over three
    times meshlib's own form's limit. ratings counts the caller by it, on every request."""
    mesh, url = ratings
    value = sidecar_header(60)
    assert len(value) > 3 * peer.MAX_HEADER_LENGTH
    headers = {"x-envoy-peer-metadata": value, "x-envoy-peer-metadata-id": REVIEWS_V3_ID}
    with httpx.Client(base_url=url) as caller:
        answers = [caller.get("/ratings/1", headers=headers) for _ in range(3)]
    assert [answer.text for answer in answers] == ["|False"] * 3  # the app saw none of it
    assert struct_of(answers[0].headers["x-envoy-peer-metadata"]) == sidecar_view(RATINGS)
    ((labels, value),) = recorded(mesh, 3)
    assert value == 3
    assert {
        name: labels[name]
        for name in ("source_workload", "source_workload_namespace", "source_app", "source_version")
    } == {
        "source_workload": "reviews-v3",
        "source_workload_namespace": "default",
        "source_app": "reviews",
        "source_version": "v3",
    }


def test_a_meshlib_caller_is_answered_in_meshlibs_form(ratings: tuple[meshlib.Mesh, str]) -> None:
    """A meshlib client sends both forms; a meshlib server answers its own only, which
    carries the claimed principal Istio's form has no place for."""
    mesh, url = ratings
    client_mesh = mesh_for(
        REVIEWS, loopback_service("ratings.default.svc.cluster.local", int(url.rsplit(":", 1)[1]))
    )
    try:
        with meshlib.Client(mesh=client_mesh) as client:
            response = client.get("http://ratings.default.svc.cluster.local:9080/ratings/1")
    finally:
        client_mesh.close()
    assert response.text == "|False"  # the app saw none of the three headers
    ((labels, value),) = samples(client_mesh, "istio_requests_total")
    assert value == 1
    assert (labels["destination_workload"], labels["destination_principal"]) == (
        "ratings-v1",
        "spiffe://cluster.local/ns/default/sa/default",
    )
    ((labels, value),) = recorded(mesh, 1)
    assert labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/default"
    assert value == 1


def ratings_sidecar(received: list[dict[str, str]]) -> Any:
    """ratings-v1 behind its Envoy sidecar, as a meshlib caller sees it: it answers its
    metadata (and id) only to a request that carried the caller's."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        received.append(headers)
        answer = []
        if "x-envoy-peer-metadata" in headers:
            answer.append((b"x-envoy-peer-metadata", SIDECAR_RATINGS_V1.encode()))
        if "x-envoy-peer-metadata-id" in headers:
            answer.append((b"x-envoy-peer-metadata-id", RATINGS_V1_ID.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": answer})
        await send({"type": "http.response.body", "body": b"five stars"})

    return app


def test_a_sidecar_callee_is_named_by_every_client() -> None:
    """httpx (sync and async) and requests, meshed, send this workload's metadata in Istio's
    form to a sidecar'd ratings-v1, count its answer's labels, and hand the app a response
    without the exchange headers."""
    received: list[dict[str, str]] = []
    server = AsgiServer(ratings_sidecar(received), "ratings-sidecar").start()
    mesh = mesh_for(REVIEWS, loopback_service("ratings.default.svc.cluster.local", server.port))
    url = "http://ratings.default.svc.cluster.local:9080/ratings/1"
    responses = []
    try:
        with meshlib.Client(mesh=mesh) as client:
            responses.append(client.get(url))

        async def call() -> None:
            async with meshlib.AsyncClient(mesh=mesh) as client:
                responses.append(await client.get(url))

        asyncio.run(call())
        with meshlib.Session(mesh=mesh) as session:
            responses.append(session.get(url, timeout=5))
    finally:
        server.stop()
        mesh.close()
    assert len(received) == 3
    for headers in received:
        assert struct_of(headers["x-envoy-peer-metadata"]) == sidecar_view(REVIEWS)
        assert headers["x-envoy-peer-metadata-id"].startswith("meshlib~")
    for response in responses:
        assert response.status_code == 200
        assert not any(name in response.headers for name in EXCHANGE)
    ((labels, value),) = samples(mesh, "istio_requests_total")
    assert value == 3
    assert {
        name: labels[name]
        for name in (
            "destination_workload",
            "destination_app",
            "destination_version",
            "destination_canonical_service",
            "destination_canonical_revision",
            "destination_workload_namespace",
            "destination_cluster",
            "destination_principal",
        )
    } == {
        "destination_workload": "ratings-v1",
        "destination_app": "ratings",
        "destination_version": "v1",
        "destination_canonical_service": "ratings",
        "destination_canonical_revision": "v1",
        "destination_workload_namespace": "default",
        "destination_cluster": "Kubernetes",
        "destination_principal": "unknown",
    }


def test_a_meshlib_header_relayed_past_a_sidecar_names_no_one(
    ratings: tuple[meshlib.Mesh, str],
) -> None:
    """reviews-v3 (a sidecar workload, a proxy that copies its request's headers on) calls
    ratings with the meshlib header of its own caller, productpage, beside the Istio header
    its sidecar set: ratings counts reviews-v3, its real caller, and answers in Istio's form,
    which reviews-v3's sidecar reads. A caller that sent only an id gets only ours."""
    mesh, url = ratings
    relayed = peer.encode(MeshConfig(service="productpage", workload="productpage-v1"))
    with httpx.Client(base_url=url) as caller:
        response = caller.get(
            "/ratings/1",
            headers={
                "x-meshlib-peer-metadata": relayed,
                "x-envoy-peer-metadata": SIDECAR_REVIEWS_V3,
                "x-envoy-peer-metadata-id": REVIEWS_V3_ID,
            },
        )
        id_only = caller.get("/ratings/1", headers={"x-envoy-peer-metadata-id": REVIEWS_V3_ID})
    assert response.text == id_only.text == "|False"  # no header reached the app
    assert struct_of(response.headers["x-envoy-peer-metadata"]) == sidecar_view(RATINGS)
    assert "x-envoy-peer-metadata-id" in response.headers
    assert "x-meshlib-peer-metadata" not in response.headers
    assert [name for name in EXCHANGE if name in id_only.headers] == ["x-envoy-peer-metadata-id"]
    counted = {labels["source_workload"]: value for labels, value in recorded(mesh, 2)}
    assert counted == {"reviews-v3": 1, "unknown": 1}


def test_a_client_takes_the_sidecars_answer_over_a_relayed_one() -> None:
    """A sidecar workload that relays its upstream's response headers (a proxy) hands back
    that upstream's meshlib header beside the Istio header its own sidecar set: the meshlib
    client counts the workload it called, not the one behind it."""
    relayed = peer.encode(MeshConfig(service="details", workload="details-v1"))

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"x-meshlib-peer-metadata", relayed.encode()),  # from the upstream, copied on
            (b"x-envoy-peer-metadata", SIDECAR_RATINGS_V1.encode()),  # its own sidecar's
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    server = AsgiServer(proxy, "ratings-proxy").start()
    mesh = mesh_for(REVIEWS, loopback_service("ratings.default.svc.cluster.local", server.port))
    try:
        with meshlib.Client(mesh=mesh) as client:
            response = client.get("http://ratings.default.svc.cluster.local:9080/")
    finally:
        server.stop()
        mesh.close()
    assert not any(name in response.headers for name in EXCHANGE)
    ((labels, _),) = samples(mesh, "istio_requests_total")
    assert labels["destination_workload"] == "ratings-v1"
