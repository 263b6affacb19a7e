"""A small Django site for tests/e2e/test_django_routes.py: its root URLconf (the settings
there name this module), views and middleware. Imported by Django once the test configured
it (`i18n_patterns` reads the settings)."""

from __future__ import annotations

from typing import Any

from django.conf.urls.i18n import i18n_patterns
from django.http import HttpRequest, HttpResponse
from django.urls import include, path, re_path, register_converter


class Counted:
    """A path converter counting how often a path is resolved with it: once by Django for
    each request, and once more where meshlib asks Django's resolver again."""

    regex = "[0-9]+"
    calls = 0

    def to_python(self, value: str) -> int:
        Counted.calls += 1
        return int(value)

    def to_url(self, value: int) -> str:
        return str(value)


register_converter(Counted, "counted")


def ok(request: HttpRequest, **params: Any) -> HttpResponse:
    return HttpResponse("ok")


def tenants(get_response: Any) -> Any:
    """A request with `x-tenant` is routed by a URLconf of its own (`request.urlconf`), as
    multi-tenant and per-host routing middleware do."""

    def middleware(request: HttpRequest) -> HttpResponse:
        if "x-tenant" in request.headers:
            request.urlconf = "tests.e2e.django_tenant"
        return get_response(request)  # type: ignore[no-any-return]

    return middleware


urlpatterns = [
    path("", ok),
    path("reviews/<int:id>/", ok),
    re_path(r"^ratings/(?P<id>[0-9]+)$", ok),
    path("api/v1/", include([path("items/<slug:name>/", ok)])),
    path("counted/<counted:n>/", ok),
    *i18n_patterns(path("hello/", ok)),
]
