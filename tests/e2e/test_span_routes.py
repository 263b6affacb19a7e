"""SERVER spans named by the route the framework matched, not by the path.

A span name with the path gives every id its own name (`GET /reviews/1`, `GET /reviews/2`...),
which tracing backends list as as many operations. Starlette and FastAPI say which route they
matched; the middleware names the span by its template once the app ran, and sets
`http.route`, as OpenTelemetry's HTTP conventions ask. Real apps on uvicorn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from tests.test_inbound_failures import Traced
from tests.upstream import AsgiServer, WsgiServer


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/reviews/{id:int}", ok),
            Mount("/api/v1", routes=[Route("/items/{name}", ok)]),
            Mount("/users/{uid}", routes=[Route("/posts/{pid}", ok)]),
            Mount("/static", app=StaticFiles(directory=".", check_dir=False)),
        ]
    )


def fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/reviews/{review_id}")
    async def review(review_id: int) -> dict[str, int]:
        return {"id": review_id}

    return app


@pytest.fixture
def traced() -> Iterator[Traced]:
    setup = Traced()
    yield setup
    setup.close()


def served(traced: Traced, app: Any, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Each path requested once (sampled by the caller); the SERVER spans by path."""
    server = AsgiServer(meshlib.MeshMiddleware(app, mesh=traced.mesh)).start()
    sampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
            for path in paths:
                client.get(path, headers=sampled)
    finally:
        server.stop()
    spans = {}
    for span in traced.spans():
        attributes = dict(span.attributes or {})
        spans[str(attributes["url.path"])] = {"name": span.name, **attributes}
    return spans


def test_starlette_routes_name_the_spans(traced: Traced) -> None:
    spans = served(
        traced,
        starlette_app(),
        [
            "/reviews/1",
            "/reviews/2",
            "/api/v1/items/pen",
            "/users/7/posts/9",
            "/static/x.css",
            "/nowhere",
        ],
    )
    for path in ("/reviews/1", "/reviews/2"):  # one name for every id, convertors left out
        assert spans[path]["name"] == "GET /reviews/{id}"
        assert spans[path]["http.route"] == "/reviews/{id}"
    assert spans["/api/v1/items/pen"]["name"] == "GET /api/v1/items/{name}"  # mounted
    # A Mount with a parameter of its own: its values are in root_path, not in a template.
    assert spans["/users/7/posts/9"]["name"] == "GET /users/7/posts/9"
    assert "http.route" not in spans["/users/7/posts/9"]
    # A Mount of an app without routes, and no route at all: no template, the path stays.
    assert spans["/static/x.css"]["name"] == "GET /static/x.css"
    assert spans["/nowhere"]["name"] == "GET /nowhere"
    assert "http.route" not in spans["/nowhere"]


def test_fastapi_routes_name_the_spans(traced: Traced) -> None:
    spans = served(traced, fastapi_app(), ["/reviews/7"])
    assert spans["/reviews/7"]["name"] == "GET /reviews/{review_id}"
    assert spans["/reviews/7"]["http.route"] == "/reviews/{review_id}"
    assert spans["/reviews/7"]["http.response.status_code"] == 200


def test_flask_rules_name_the_spans(traced: Traced) -> None:
    """Under the WSGI middleware, Flask's URL rule names the span (`/reviews/<int:id>`, as
    OpenTelemetry's Flask instrumentation has it), read while Flask still holds its request;
    a path no rule matched (404) keeps its name."""
    from flask import Flask

    app = Flask("reviews")

    @app.get("/reviews/<int:review_id>")
    def review(review_id: int) -> dict[str, int]:
        return {"id": review_id}

    sampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    with WsgiServer(meshlib.MeshWSGIMiddleware(app.wsgi_app, mesh=traced.mesh)) as server:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert client.get("/reviews/3", headers=sampled).status_code == 200
            assert client.get("/nowhere", headers=sampled).status_code == 404
        deadline = time.monotonic() + 10  # a WSGI span ends once the server closes the body
        while len(traced.spans()) < 2:
            assert time.monotonic() < deadline, traced.spans()
            time.sleep(0.01)
    names = {str((span.attributes or {})["url.path"]): span for span in traced.spans()}
    assert names["/reviews/3"].name == "GET /reviews/<int:review_id>"
    assert (names["/reviews/3"].attributes or {})["http.route"] == "/reviews/<int:review_id>"
    assert names["/nowhere"].name == "GET /nowhere"
