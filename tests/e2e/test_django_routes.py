"""SERVER spans of a Django app named by the route Django's URL resolver matched.

Django's handlers keep the route they resolved (`request.resolver_match`) on a request
object the middleware never sees, so for a sampled request meshlib asks Django's resolver
again, while the handler still holds the request: its URLconf (the request's own, when a
middleware set one) and its language (for `i18n_patterns`) are in force. The span is named
and `http.route` set as OpenTelemetry's Django instrumentation does (`GET reviews/<int:id>/`:
Django's route, without a leading slash). A real Django site (tests/e2e/django_site.py) on
wsgiref under `MeshWSGIMiddleware` and on uvicorn under `MeshMiddleware`.

Django's settings are the process's: they are configured once, here, and nothing else in
the suite uses Django (its apps ran after these keep their own names: the next tests).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from tests.test_inbound_failures import Traced
from tests.upstream import AsgiServer, WsgiServer

SETTINGS: dict[str, Any] = {
    "ROOT_URLCONF": "tests.e2e.django_site",
    "ALLOWED_HOSTS": ["127.0.0.1"],
    "MIDDLEWARE": [
        "django.middleware.locale.LocaleMiddleware",
        "tests.e2e.django_site.tenants",
    ],
    "LANGUAGES": [("en", "English"), ("fr", "French")],
    "LOGGING_CONFIG": None,  # the suite's logging left alone
}
SAMPLED = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
UNSAMPLED = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}


@pytest.fixture(scope="module")
def site() -> Any:
    """Django configured for this process (once: settings cannot be configured twice), and
    the site's module."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(**SETTINGS)
        django.setup()
    assert settings.ROOT_URLCONF == "tests.e2e.django_site", "Django configured elsewhere"
    return importlib.import_module("tests.e2e.django_site")


@pytest.fixture
def traced() -> Iterator[Traced]:
    setup = Traced()
    yield setup
    setup.close()


@contextlib.contextmanager
def serving(kind: str, app: Any, traced: Traced) -> Iterator[httpx.Client]:
    """`app` (WSGI or ASGI, by `kind`) behind meshlib's middleware on a loopback server; a
    client of it."""
    if kind == "wsgi":
        server: Any = WsgiServer(meshlib.MeshWSGIMiddleware(app, mesh=traced.mesh)).__enter__()
        stop = server.__exit__
    else:
        server = AsgiServer(meshlib.MeshMiddleware(app, mesh=traced.mesh)).start()
        stop = server.stop
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        stop()


def django_app(kind: str) -> Any:
    if kind == "wsgi":
        from django.core.wsgi import get_wsgi_application

        return get_wsgi_application()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def spans_by_path(traced: Traced, count: int) -> dict[str, dict[str, Any]]:
    """The SERVER spans by path, once `count` ended (a WSGI span ends once the server closed
    the response, after the caller has it)."""
    deadline = time.monotonic() + 10
    while len(traced.spans()) < count:
        assert time.monotonic() < deadline, traced.spans()
        time.sleep(0.01)
    spans = {}
    for span in traced.spans():
        attributes = dict(span.attributes or {})
        spans[str(attributes["url.path"])] = {"name": span.name, **attributes}
    return spans


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_django_routes_name_the_spans(site: Any, traced: Traced, kind: str) -> None:
    with serving(kind, django_app(kind), traced) as client:
        for path in ("/reviews/1/", "/reviews/2/", "/api/v1/items/pen/", "/ratings/7"):
            assert client.get(path, headers=SAMPLED).status_code == 200
        for path in ("/fr/hello/", "/en/hello/", "/"):
            assert client.get(path, headers=SAMPLED).status_code == 200
        assert client.get("/nowhere", headers=SAMPLED).status_code == 404
        tenant = {**SAMPLED, "x-tenant": "acme"}
        assert client.get("/shop/pens/", headers=tenant).status_code == 200
    spans = spans_by_path(traced, 9)
    for path in ("/reviews/1/", "/reviews/2/"):  # one name for every id
        assert spans[path]["name"] == "GET reviews/<int:id>/"
        assert spans[path]["http.route"] == "reviews/<int:id>/"
        assert spans[path]["http.response.status_code"] == 200
    # An include()'s prefix joined to its route, and a regex route as written.
    assert spans["/api/v1/items/pen/"]["http.route"] == "api/v1/items/<slug:name>/"
    assert spans["/ratings/7"]["name"] == "GET ^ratings/(?P<id>[0-9]+)$"
    # i18n_patterns: resolved in the request's language, its prefix in Django's route.
    assert spans["/fr/hello/"]["http.route"] == "fr/hello/"
    assert spans["/en/hello/"]["http.route"] == "en/hello/"
    # The request's own URLconf, set by a middleware: its route.
    assert spans["/shop/pens/"]["name"] == "GET shop/<slug:name>/"
    # The root's route is empty (no name in it: the path, one name anyway), and a path no
    # pattern matched keeps its name, with no http.route.
    for path in ("/", "/nowhere"):
        assert spans[path]["name"] == f"GET {path}"
        assert "http.route" not in spans[path]


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_an_unsampled_request_is_not_resolved_again(site: Any, traced: Traced, kind: str) -> None:
    """Django resolves each request once (its converter runs once); meshlib resolves it
    once more for a sampled request only: not for a caller's unsampled trace, nor for a
    trace of its own left unsampled (its span made, not recording)."""
    counted = site.Counted
    with serving(kind, django_app(kind), traced) as client:
        before = counted.calls
        assert client.get("/counted/1/", headers=SAMPLED).status_code == 200
        assert counted.calls == before + 2
        assert client.get("/counted/2/", headers=UNSAMPLED).status_code == 200
        assert counted.calls == before + 3
        traced.mesh.tracing.set_sampling(0)
        assert client.get("/counted/3/").status_code == 200
        assert counted.calls == before + 4
    (span,) = spans_by_path(traced, 1).values()
    assert span["name"] == "GET counted/<counted:n>/"


def plain_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


async def plain_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def dispatcher(kind: str) -> Any:
    """An app in front of Django (as a router or a static-files wrapper would be): a request
    with `x-plain` goes to a plain app, every other to Django."""
    django = django_app(kind)
    if kind == "wsgi":
        return lambda environ, start: (plain_wsgi if "HTTP_X_PLAIN" in environ else django)(
            environ, start
        )

    async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        plain = (b"x-plain", b"1") in scope["headers"]
        await (plain_asgi if plain else django)(scope, receive, send)

    return dispatch


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_django_behind_another_app_and_beside_one(site: Any, traced: Traced, kind: str) -> None:
    """Django wrapped in another app is still asked; an app beside it in the process, serving
    a path Django's URLconf matches, is not named by Django's routes (Django does not serve
    its request)."""
    with serving(kind, dispatcher(kind), traced) as client:
        assert client.get("/reviews/1/", headers=SAMPLED).status_code == 200
        assert client.get("/reviews/2/", headers={**SAMPLED, "x-plain": "1"}).text == "ok"
    spans = spans_by_path(traced, 2)
    assert spans["/reviews/1/"]["name"] == "GET reviews/<int:id>/"
    assert spans["/reviews/2/"]["name"] == "GET /reviews/2/"
    assert "http.route" not in spans["/reviews/2/"]


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_force_script_name_is_stripped_where_django_strips_it(
    site: Any, traced: Traced, kind: str
) -> None:
    """With `FORCE_SCRIPT_NAME`, Django's ASGI handler strips that prefix from the path in
    place of the scope's root_path, and its WSGI handler resolves PATH_INFO as it came (the
    setting changes only the URLs Django reverses): meshlib resolves the path Django did."""
    from django.test import override_settings

    path = "/front/reviews/1/" if kind == "asgi" else "/reviews/1/"
    with (
        override_settings(FORCE_SCRIPT_NAME="/front"),
        serving(kind, django_app(kind), traced) as client,
    ):
        assert client.get(path, headers=SAMPLED).status_code == 200
    (span,) = spans_by_path(traced, 1).values()
    assert span["name"] == "GET reviews/<int:id>/"
    assert span["http.route"] == "reviews/<int:id>/"
