"""Tracing: SERVER/CLIENT spans, parent-based sampling, Telemetry precedence, provider choice."""

from __future__ import annotations

import logging
import random
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util._once import Once

from meshlib.config import MeshConfig
from meshlib.errors import ConfigError
from meshlib.mesh import Mesh
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry import _tracer_provider
from meshlib.telemetry.tracing import (
    MeshSampler,
    Tracing,
    build_tracer_provider,
    effective_tracing,
    sampling_percentage,
)
from tests.upstream import run_script

CONFIG = MeshConfig(service="productpage", version="v1", namespace="default")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CLUSTER = "outbound|9080|v2|reviews.default.svc.cluster.local"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[SdkTracerProvider]:
    tp = build_tracer_provider(CONFIG, exporter, sampler=MeshSampler(100.0), batch=False)
    yield tp
    tp.shutdown()


@pytest.fixture
def tracing(provider: SdkTracerProvider) -> Tracing:
    return Tracing(CONFIG, tracer_provider=provider)


@pytest.fixture
def no_global_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process with no global TracerProvider yet; the real global state comes back after."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)


def inbound(sampled: bool) -> otel_context.Context:
    flags = "01" if sampled else "00"
    carrier = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-{flags}"}
    return TraceContextTextMapPropagator().extract(carrier)


def by_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def test_server_span_attributes_and_status(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    """A served request gives one SERVER span with HTTP semconv attributes; 5xx is an error."""
    with tracing.server_span(
        "get", "/productpage?u=normal", scheme="http", host="productpage:9080", context=None
    ) as span:
        assert trace.get_current_span() is span
        tracing.finish_server(span, 503, "UO")
    with tracing.server_span(
        "POST", "/login", scheme="https", host="pp", context=None, route="/login"
    ) as span:
        tracing.finish_server(span, 404)
    assert trace.get_current_span() is trace.INVALID_SPAN

    failed, missing = by_kind(exporter, SpanKind.SERVER)
    assert failed.name == "GET /productpage"
    assert dict(failed.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/productpage",
        "url.scheme": "http",
        "server.address": "productpage",
        "server.port": 9080,
        "http.response.status_code": 503,
        "error.type": "503",
        "meshlib.response_flags": "UO",
    }
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.parent is None
    assert failed.resource.attributes["service.name"] == "productpage"
    assert failed.resource.attributes["service.version"] == "v1"
    assert failed.resource.attributes["k8s.namespace.name"] == "default"
    assert missing.name == "POST /login"
    assert missing.attributes is not None
    assert missing.attributes["http.route"] == "/login"
    assert missing.attributes["http.response.status_code"] == 404
    assert missing.status.status_code is StatusCode.UNSET  # 4xx is the caller's fault


def test_client_spans_are_children_one_per_attempt(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    """Each outbound attempt is a CLIENT span under the SERVER span, retries with resend_count."""
    with tracing.server_span(
        "GET", "/productpage", scheme="http", host="pp", context=inbound(sampled=True)
    ) as server:
        for attempt, status in ((1, None), (2, 200)):
            with tracing.client_span(
                "GET",
                "http://user:secret@reviews:9080/reviews/1?x=1",
                attempt=attempt,
                cluster=CLUSTER,
                subset="v2",
                upstream="10.0.0.2:9080",
            ) as span:
                assert trace.get_current_span() is span  # what propagation injects as parent
                assert otel_context.get_value(_SUPPRESS_HTTP_INSTRUMENTATION_KEY) is True
                tracing.finish_client(span, status, ["UF"] if status is None else "-")
        assert trace.get_current_span() is server
        tracing.finish_server(server, 200)

    (server_span,) = by_kind(exporter, SpanKind.SERVER)
    first, second = by_kind(exporter, SpanKind.CLIENT)
    assert server_span.context is not None and server_span.parent is not None
    assert format(server_span.context.trace_id, "032x") == TRACE_ID
    assert format(server_span.parent.span_id, "016x") == PARENT_ID
    for finished in (first, second):
        assert finished.parent is not None and finished.context is not None
        assert finished.parent.span_id == server_span.context.span_id
        assert finished.context.trace_id == server_span.context.trace_id
        assert finished.name == "GET reviews:9080"
    assert dict(first.attributes or {}) == {
        "http.request.method": "GET",
        "url.full": "http://reviews:9080/reviews/1?x=1",
        "server.address": "reviews",
        "server.port": 9080,
        "meshlib.upstream_cluster": CLUSTER,
        "meshlib.subset": "v2",
        "network.peer.address": "10.0.0.2",
        "network.peer.port": 9080,
        "meshlib.response_flags": "UF",
        "error.type": "UF",
    }
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes is not None
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["meshlib.response_flags"] == "-"
    assert second.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        pytest.param(200, StatusCode.UNSET, None, id="200"),
        pytest.param(302, StatusCode.UNSET, None, id="302"),
        pytest.param(404, StatusCode.ERROR, "404", id="404"),
        pytest.param(429, StatusCode.ERROR, "429", id="429"),
        pytest.param(503, StatusCode.ERROR, "503", id="503"),
        pytest.param(None, StatusCode.ERROR, "UF", id="no-response"),
    ],
)
def test_client_span_status_follows_http_semconv(
    tracing: Tracing,
    exporter: InMemorySpanExporter,
    status: int | None,
    code: StatusCode,
    error: str | None,
) -> None:
    """OpenTelemetry's HTTP conventions for CLIENT spans: 4xx and 5xx are errors, with the
    status code as `error.type` (on SERVER spans 4xx are the caller's: left unset)."""
    with tracing.client_span(
        "GET", "http://reviews:9080/", attempt=1, cluster=None, subset=None, upstream=None
    ) as span:
        tracing.finish_client(span, status, "-" if status else "UF")
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code is code
    assert (finished.attributes or {}).get("error.type") == error


def test_server_span_query_and_unsent_status(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    """`url.query` when the request had a query (read only for a recording span); a
    request that ended with nothing sent (status 0) has no `http.response.status_code`."""
    asked: list[str] = []

    def query(value: str) -> Any:
        return lambda: asked.append(value) or value

    with tracing.server_span(
        "GET", "/r", scheme="http", host="pp", context=None, query=query("u=alice&x=%20")
    ) as span:
        tracing.finish_server(span, 200)
    with tracing.server_span(
        "GET", "/r", scheme="http", host="pp", context=None, query=query("")
    ) as span:
        tracing.finish_server(span, 0, "DC")
    tracing.set_sampling(0.0)
    with tracing.server_span(
        "GET", "/r", scheme="http", host="pp", context=None, query=query("unsampled")
    ) as span:
        tracing.finish_server(span, 200)
    with_query, unsent = by_kind(exporter, SpanKind.SERVER)
    assert (with_query.attributes or {})["url.query"] == "u=alice&x=%20"
    assert (with_query.attributes or {})["http.response.status_code"] == 200
    attributes = dict(unsent.attributes or {})
    assert "url.query" not in attributes and "http.response.status_code" not in attributes
    assert attributes["meshlib.response_flags"] == "DC"
    assert asked == ["u=alice&x=%20", ""]  # never for the span that does not record


def test_exception_is_recorded(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    """An exception escaping a span marks it ERROR with the exception event and error.type."""
    with (
        pytest.raises(RuntimeError),
        tracing.server_span("GET", "/", scheme="http", host="pp", context=None),
    ):
        raise RuntimeError("boom")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in span.events] == ["exception"]


def test_sampling_is_parent_based(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """An inbound sampled parent is sampled even at 0%; an unsampled one is dropped at 100%."""
    tracing = Tracing(CONFIG, tracer_provider=provider)
    tracing.set_sampling(0.0)
    with tracing.server_span(
        "GET", "/", scheme="http", host="pp", context=inbound(sampled=True)
    ) as span:
        assert span.is_recording()
        with tracing.client_span(
            "GET", "http://reviews/", attempt=1, cluster=None, subset=None, upstream=None
        ) as child:
            assert child.is_recording()
    assert len(exporter.get_finished_spans()) == 2

    exporter.clear()
    tracing.set_sampling(100.0)
    with tracing.server_span(
        "GET", "/", scheme="http", host="pp", context=inbound(sampled=False)
    ) as span:
        assert not span.is_recording()
        assert format(span.get_span_context().trace_id, "032x") == TRACE_ID  # trace goes on
        assert not span.get_span_context().trace_flags.sampled
        tracing.finish_server(span, 500)  # a no-op on a non-recording span
        with tracing.client_span(
            "GET", "http://reviews/", attempt=1, cluster=None, subset=None, upstream=None
        ) as child:
            assert not child.is_recording()
            assert trace.get_current_span() is child
    assert exporter.get_finished_spans() == ()


def test_root_sampling_ratio(tracing: Tracing) -> None:
    """10,000 root traces at 10% are sampled 10% of the time, within one point."""
    state = random.getstate()
    random.seed(20240611)  # the SDK's id generator draws from `random`
    try:
        tracing.set_sampling(10.0)
        sampled = 0
        for _ in range(10_000):
            with tracing.server_span("GET", "/", scheme="http", host="pp", context=None) as span:
                sampled += span.is_recording()
    finally:
        random.setstate(state)
    assert 900 <= sampled <= 1100


def test_set_sampling_changes_it_live(tracing: Tracing) -> None:
    """set_sampling takes effect on the next root trace; out-of-range values are refused."""

    def sampled(n: int = 200) -> int:
        count = 0
        for _ in range(n):
            with tracing.server_span("GET", "/", scheme="http", host="pp", context=None) as span:
                count += span.is_recording()
        return count

    tracing.set_sampling(0.0)
    assert sampled() == 0
    tracing.set_sampling(100.0)
    assert sampled() == 200
    assert tracing.sampling == 100.0
    tracing.set_sampling(10.0)
    assert tracing.sampling == 10.0
    tracing.set_sampling(0.0)
    assert sampled() == 0
    with pytest.raises(ValueError, match="between 0 and 100"):
        tracing.set_sampling(100.5)


TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{spec}
"""


def telemetry(name: str, namespace: str, spec: str) -> str:
    return TELEMETRY.format(name=name, namespace=namespace, spec=textwrap.indent(spec, "  "))


def snapshot(*docs: str, config: MeshConfig = CONFIG) -> Snapshot:
    result = load_text("---".join(docs), "telemetry.yaml")
    result.raise_for_errors()
    return Snapshot.build(result.resources, config)


def test_sampling_percentage_precedence() -> None:
    """Workload (selector) > namespace > root namespace, field by field; default 1%."""
    mesh = telemetry(
        "mesh-default",
        "istio-system",
        "tracing: [{randomSamplingPercentage: 50, customTags: {a: {literal: {value: x}}}}]",
    )
    namespace = telemetry("ns", "default", "tracing: [{randomSamplingPercentage: 20}]")
    workload = telemetry(
        "reviews",
        "default",
        "selector: {matchLabels: {app: reviews}}\ntracing: [{randomSamplingPercentage: 5}]",
    )
    elsewhere = telemetry(
        "other-reviews",
        "other",
        "selector: {matchLabels: {app: reviews}}\ntracing: [{randomSamplingPercentage: 70}]",
    )
    reviews = MeshConfig(service="reviews", namespace="default")
    ratings = MeshConfig(service="ratings", namespace="default")
    other = MeshConfig(service="reviews", namespace="other")
    lone = MeshConfig(service="details", namespace="lone")

    assert sampling_percentage(snapshot(config=reviews), reviews) == 1.0
    docs = (mesh, namespace, workload, elsewhere)
    assert sampling_percentage(snapshot(*docs, config=reviews), reviews) == 5.0
    assert sampling_percentage(snapshot(*docs, config=ratings), ratings) == 20.0
    assert sampling_percentage(snapshot(*docs, config=other), other) == 70.0
    assert sampling_percentage(snapshot(*docs, config=lone), lone) == 50.0
    assert sampling_percentage(snapshot(namespace, workload, config=lone), lone) == 1.0

    # Field by field: a level that does not set the percentage inherits it.
    quiet = telemetry("ns", "default", "tracing: [{disableSpanReporting: true}]")
    merged = effective_tracing(snapshot(mesh, quiet, config=ratings), ratings)
    assert merged.random_sampling_percentage == 50.0
    assert merged.disable_span_reporting is True
    assert set(merged.custom_tags) == {"a"}

    tracing = Tracing(reviews)
    tracing.apply(snapshot(*docs, config=reviews))
    assert tracing.sampling == 5.0


@pytest.mark.usefixtures("no_global_provider")
def test_app_provider_is_used_not_replaced() -> None:
    """A TracerProvider the app installed globally gets meshlib's spans and stays global."""
    app_exporter = InMemorySpanExporter()
    app_provider = SdkTracerProvider()
    app_provider.add_span_processor(SimpleSpanProcessor(app_exporter))
    trace.set_tracer_provider(app_provider)

    tracing = Tracing(CONFIG, exporter="console")
    assert tracing.enabled and not tracing.owns_provider
    assert tracing.provider is app_provider
    with tracing.server_span("GET", "/", scheme="http", host="pp", context=None) as span:
        tracing.finish_server(span, 200)
    tracing.shutdown()
    with tracing.server_span("GET", "/again", scheme="http", host="pp", context=None):
        pass
    assert trace.get_tracer_provider() is app_provider
    assert [s.name for s in app_exporter.get_finished_spans()] == ["GET /", "GET /again"]
    app_provider.shutdown()


@pytest.mark.usefixtures("no_global_provider")
def test_own_provider_is_not_installed_globally() -> None:
    """Without an app provider meshlib builds its own for the exporter and keeps it private."""
    tracing = Tracing(CONFIG, exporter="console")
    assert tracing.owns_provider
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert isinstance(tracing.provider, SdkTracerProvider)
    assert isinstance(tracing.provider.sampler, MeshSampler)
    assert tracing.provider.sampler.percentage == 1.0
    tracing.shutdown()
    assert not tracing.enabled


@pytest.mark.usefixtures("no_global_provider")
def test_exporter_none_makes_no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """With exporter none and no app provider, tracing is off and the context passes through."""
    monkeypatch.setenv("MESHLIB_TRACES_EXPORTER", "none")
    tracing = Tracing(CONFIG)
    assert not tracing.enabled
    parent = inbound(sampled=True)
    token = otel_context.attach(parent)
    try:
        with tracing.server_span("GET", "/", scheme="http", host="pp", context=parent) as span:
            assert not span.is_recording()
            assert otel_context.get_current() is parent
            with tracing.client_span(
                "GET", "http://reviews/", attempt=1, cluster=None, subset=None, upstream=None
            ):
                assert otel_context.get_current() is parent
    finally:
        otel_context.detach(token)


@pytest.mark.usefixtures("no_global_provider")
def test_exporter_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """otlp without the extra names the extra to install; an unknown exporter names the variable."""
    monkeypatch.setitem(sys.modules, _tracer_provider._OTLP_MODULE, None)  # as if not installed
    with pytest.raises(ConfigError, match=r"meshlib-istio\[otlp\]"):
        Tracing(CONFIG, exporter="otlp")
    monkeypatch.setenv("MESHLIB_TRACES_EXPORTER", "jaeger")
    with pytest.raises(ConfigError, match="MESHLIB_TRACES_EXPORTER='jaeger'"):
        Tracing(CONFIG)


def test_an_exporter_the_app_provider_overrides_is_warned_of(
    provider: SdkTracerProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """An exporter set beside the app's own provider would silently do nothing: a warning
    says so, and the spans go to the app's provider."""
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        tracing = Tracing(CONFIG, exporter="console", tracer_provider=provider)
    assert tracing.provider is provider and not tracing.owns_provider
    assert "traces exporter 'console' is not used" in caplog.text
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        caplog.clear()
        Tracing(CONFIG, exporter="none", tracer_provider=provider)
    assert not caplog.text


@pytest.mark.usefixtures("no_global_provider")
@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]
)
def test_otlp_protocol_errors(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """http/json (which OpenTelemetry's Python exporters do not send) is refused at start-up,
    naming the variable, rather than sent as protobuf to a JSON receiver; another unknown value
    is told the choices (without the http/json note); grpc without its exporter names the extra
    to install."""
    monkeypatch.setenv(variable, "http/json")
    with pytest.raises(ConfigError, match=f"{variable}='http/json'.*have no 'http/json'"):
        Tracing(CONFIG, exporter="otlp")
    monkeypatch.setenv(variable, "htp/protobuf")  # a typo is told the choices, nothing more
    with pytest.raises(ConfigError) as raised:
        Tracing(CONFIG, exporter="otlp")
    assert str(raised.value) == (
        f"{variable}='htp/protobuf': meshlib's OTLP exporter sends 'http/protobuf' or 'grpc'"
    )
    monkeypatch.setenv(variable, "grpc")
    monkeypatch.setitem(sys.modules, _tracer_provider._OTLP_GRPC_MODULE, None)  # not installed
    with pytest.raises(ConfigError, match=rf"over grpc \({variable}\).*meshlib-istio\[otlp-grpc\]"):
        Tracing(CONFIG, exporter="otlp")


def test_no_double_server_span(
    tracing: Tracing, provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A SERVER span already current (opentelemetry-instrumentation-asgi) is reused, not nested."""
    instrumentation = provider.get_tracer("opentelemetry.instrumentation.asgi")
    with instrumentation.start_as_current_span("GET /", kind=SpanKind.SERVER) as outer:
        with tracing.server_span("GET", "/", scheme="http", host="pp", context=None) as span:
            assert span is outer
            tracing.finish_server(span, 500, "UH")
        assert outer.is_recording()  # meshlib did not end the app's span
        assert trace.get_current_span() is outer
    (server,) = by_kind(exporter, SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["meshlib.response_flags"] == "UH"
    assert "http.response.status_code" not in server.attributes  # the owner's to set
    assert server.status.status_code is StatusCode.UNSET


def test_no_double_client_span(
    tracing: Tracing, provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A CLIENT span already current (instrumentation-httpx/requests) is annotated, not nested."""
    instrumentation = provider.get_tracer("opentelemetry.instrumentation.httpx")
    with instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT) as outer:
        for attempt in (1, 2):
            with tracing.client_span(
                "GET",
                "http://reviews:9080/",
                attempt=attempt,
                cluster=CLUSTER,
                subset="v2",
                upstream=None,
            ) as span:
                assert span is outer
                tracing.finish_client(span, 503 if attempt == 1 else 200, "-")
    (client,) = by_kind(exporter, SpanKind.CLIENT)
    assert client.attributes is not None
    assert client.attributes["http.request.resend_count"] == 1
    assert client.attributes["meshlib.upstream_cluster"] == CLUSTER
    assert client.attributes["meshlib.subset"] == "v2"
    assert client.status.status_code is StatusCode.UNSET


# -- custom tags ------------------------------------------------------------------------------

TAGS_POLICY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.9}]
"""


def serve_once(
    mesh: Mesh,
    headers: list[tuple[bytes, bytes]],
    *,
    upstream_status: int = 200,
    calls: int = 1,
    sent: list[dict[str, str]] | None = None,
) -> None:
    """One request through MeshMiddleware, whose app makes meshed calls to ratings (the
    headers of each go into `sent`)."""
    import asyncio

    import httpx

    import meshlib

    def ratings(request: httpx.Request) -> httpx.Response:
        if sent is not None:
            sent.append(dict(request.headers))
        return httpx.Response(upstream_status)

    client = meshlib.AsyncClient(mesh=mesh, transport=httpx.MockTransport(ratings))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(calls):
            await client.get("http://ratings:9080/ratings/1")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/reviews/1", "scheme": "http"}
    scope["headers"] = [(b"host", b"reviews:9080"), *headers]
    asyncio.run(meshlib.MeshMiddleware(app, mesh=mesh)(scope, receive, send))


def tagged_mesh(spec: str, provider: SdkTracerProvider, **config: Any) -> Mesh:
    mesh_config = MeshConfig(service="reviews", **config)
    policy = snapshot(TAGS_POLICY, telemetry("tags", "default", spec), config=mesh_config)
    return Mesh(mesh_config, policy=policy, tracer_provider=provider)


def test_custom_tags_go_on_server_and_client_spans(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Telemetry `customTags`: literal and environment values, and request headers (the
    served request's on the SERVER span, the outbound one's — propagated headers included —
    on the CLIENT span; absent ones take defaultValue or are left out)."""
    monkeypatch.setenv("MESHLIB_TEST_REGION", "eu-west-1")
    spec = """
tracing:
- randomSamplingPercentage: 100
  customTags:
    team: {literal: {value: bookinfo}}
    region: {environment: {name: MESHLIB_TEST_REGION}}
    zone: {environment: {name: MESHLIB_TEST_UNSET, defaultValue: none}}
    user: {header: {name: End-User}}
    tier: {header: {name: x-tier, defaultValue: free}}
    fmt: {formatter: {value: "%REQ(:PATH)%"}}
"""
    mesh = tagged_mesh(spec, provider, propagate_headers=("end-user",))
    serve_once(mesh, [(b"end-user", b"jason")])
    expected = {
        "team": "bookinfo",
        "region": "eu-west-1",
        "zone": "none",
        "user": "jason",
        "tier": "free",
    }
    for kind in (SpanKind.SERVER, SpanKind.CLIENT):
        (span,) = by_kind(exporter, kind)
        attributes = dict(span.attributes or {})
        assert {k: attributes.get(k) for k in expected} == expected, kind
        assert "fmt" not in attributes  # formatter tags are not supported (left out, warned)
    mesh.close()


def test_match_mode_and_disable_span_reporting(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """`match.mode` picks the entry per side; `disableSpanReporting` on the SERVER side makes
    no SERVER span, and the caller's trace still reaches the CLIENT span as its parent."""
    spec = """
tracing:
- match: {mode: SERVER}
  disableSpanReporting: true
- match: {mode: CLIENT}
  customTags: {side: {literal: {value: client}}}
"""
    mesh = tagged_mesh(spec, provider)
    serve_once(mesh, [(b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode())])
    assert by_kind(exporter, SpanKind.SERVER) == []
    (client,) = by_kind(exporter, SpanKind.CLIENT)
    assert (client.attributes or {}).get("side") == "client"
    assert client.context is not None and client.parent is not None
    assert f"{client.context.trace_id:032x}" == TRACE_ID
    assert f"{client.parent.span_id:016x}" == PARENT_ID
    mesh.close()

    exporter.clear()
    mesh = tagged_mesh("tracing: [{match: {mode: CLIENT}, disableSpanReporting: true}]", provider)
    serve_once(mesh, [(b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode())])
    assert by_kind(exporter, SpanKind.CLIENT) == []
    assert len(by_kind(exporter, SpanKind.SERVER)) == 1
    mesh.close()


def test_a_policy_change_brings_new_header_tags(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Tags follow the Telemetry live: the middleware reads a newly tagged header (any header,
    in any spelling) on the next request."""
    config = MeshConfig(service="reviews")
    mesh = Mesh(config, policy=snapshot(TAGS_POLICY, config=config), tracer_provider=provider)
    headers = [(b"traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01".encode()), (b"X-Tier", b"gold")]
    serve_once(mesh, headers)
    tagged = telemetry(
        "tags", "default", "tracing: [{customTags: {tier: {header: {name: x-tier}}}}]"
    )
    mesh.tracing.apply(snapshot(TAGS_POLICY, tagged, config=config))
    assert mesh.tracing.tags.header_names == {"x-tier"}
    serve_once(mesh, headers)
    before, after = by_kind(exporter, SpanKind.SERVER)
    assert "tier" not in (before.attributes or {})
    assert (after.attributes or {}).get("tier") == "gold"
    mesh.close()


def test_client_reporting_off_leaves_the_server_span_alone(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """With CLIENT spans switched off, a failed upstream call must not mark the SERVER span."""
    mesh = tagged_mesh(
        "tracing: [{randomSamplingPercentage: 100, match: {mode: CLIENT}, disableSpanReporting: true}]",
        provider,
    )
    serve_once(mesh, [], upstream_status=503)
    (server,) = by_kind(exporter, SpanKind.SERVER)
    assert server.status.status_code is not StatusCode.ERROR
    assert "error.type" not in (server.attributes or {})
    assert by_kind(exporter, SpanKind.CLIENT) == []
    mesh.close()


def test_server_reporting_off_still_gives_one_trace_per_request(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """No trace came in and SERVER spans are off: the request still has one trace, which its
    calls' CLIENT spans share (the unreported root's ids go on)."""
    mesh = tagged_mesh(
        "tracing: [{randomSamplingPercentage: 100}, {match: {mode: SERVER}, disableSpanReporting: true}]",
        provider,
    )
    serve_once(mesh, [], calls=2)
    assert by_kind(exporter, SpanKind.SERVER) == []
    clients = by_kind(exporter, SpanKind.CLIENT)
    assert len(clients) == 2
    assert len({span.context.trace_id for span in clients if span.context}) == 1
    mesh.close()


def test_an_outer_unsampled_span_keeps_the_request_in_its_trace(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The app's own instrumentation made a SERVER span its sampler dropped (valid ids, not
    recording): the request stays in that span's trace and unsampled, though meshlib samples
    100% and no trace header came in — not a second trace, sampled on its own."""
    mesh = tagged_mesh("tracing: [{randomSamplingPercentage: 100}]", provider)
    dropped = trace.NonRecordingSpan(
        trace.SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), is_remote=False)
    )
    sent: list[dict[str, str]] = []
    with trace.use_span(dropped):
        serve_once(mesh, [], sent=sent)
    assert exporter.get_finished_spans() == ()
    (headers,) = sent
    assert headers["traceparent"].split("-")[1] == TRACE_ID
    assert headers["traceparent"].endswith("-00")
    mesh.close()


def test_a_bad_header_tag_name_is_left_out(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    mesh = tagged_mesh(
        "tracing: [{randomSamplingPercentage: 100, customTags: {u: {header: {name: x-пользователь}}, t: {literal: {value: ok}}}}]",
        provider,
    )
    serve_once(mesh, [])  # would fail every request if the name reached the header set
    (server,) = by_kind(exporter, SpanKind.SERVER)
    assert (server.attributes or {}).get("t") == "ok" and "u" not in (server.attributes or {})
    mesh.close()


B3_TRACE = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN = "e457b5a2e4d86bd1"
B3_DEFERRED = {
    "multi": [(b"x-b3-traceid", B3_TRACE.encode()), (b"x-b3-spanid", B3_SPAN.encode())],
    "single": [(b"b3", f"{B3_TRACE}-{B3_SPAN}".encode())],
}


@pytest.mark.parametrize("form", ["multi", "single"])
@pytest.mark.parametrize("percentage", [100, 0])
def test_a_deferred_b3_decision_is_made_here_and_passed_on(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter, form: str, percentage: int
) -> None:
    """B3 ids without a sampling state leave the decision to this hop: it is made at the
    Telemetry's randomSamplingPercentage (the caller's trace and span kept as the parent),
    and callees are told that decision."""
    mesh = tagged_mesh(f"tracing: [{{randomSamplingPercentage: {percentage}}}]", provider)
    sent: list[dict[str, str]] = []
    serve_once(mesh, B3_DEFERRED[form], sent=sent)
    (out,) = sent
    servers = by_kind(exporter, SpanKind.SERVER)
    if percentage:
        (server,) = servers
        assert server.parent is not None and f"{server.parent.span_id:016x}" == B3_SPAN
        assert server.context is not None and f"{server.context.trace_id:032x}" == B3_TRACE
        assert out["traceparent"].endswith("-01")
    else:
        assert servers == []
        assert out["traceparent"].endswith("-00")
    flag = "1" if percentage else "0"
    if form == "multi":
        assert (out["x-b3-traceid"], out["x-b3-sampled"]) == (B3_TRACE, flag)
    else:
        assert out["b3"].startswith(B3_TRACE) and out["b3"].endswith(f"-{flag}")
    mesh.close()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [
                (b"x-b3-traceid", B3_TRACE.encode()),
                (b"x-b3-spanid", B3_SPAN.encode()),
                (b"x-b3-flags", b"1"),
            ],
            {"x-b3-flags": "1"},
            id="multi",
        ),
        pytest.param([(b"b3", f"{B3_TRACE}-{B3_SPAN}-d".encode())], {}, id="single"),
    ],
)
def test_a_b3_debug_trace_is_sampled_and_passed_on_as_debug(
    provider: SdkTracerProvider,
    exporter: InMemorySpanExporter,
    headers: list[tuple[bytes, bytes]],
    expected: dict[str, str],
) -> None:
    """Debug implies sampled, whatever the percentage, and goes on as debug
    (`x-b3-flags: 1` without `x-b3-sampled`, or `-d`), not as a plain sampled flag."""
    mesh = tagged_mesh("tracing: [{randomSamplingPercentage: 0}]", provider)
    sent: list[dict[str, str]] = []
    serve_once(mesh, headers, sent=sent)
    (out,) = sent
    (server,) = by_kind(exporter, SpanKind.SERVER)
    (client,) = by_kind(exporter, SpanKind.CLIENT)
    assert server.parent is not None and f"{server.parent.span_id:016x}" == B3_SPAN
    assert client.context is not None
    if "x-b3-flags" in expected:
        assert out["x-b3-flags"] == "1" and "x-b3-sampled" not in out
        assert out["x-b3-spanid"] == f"{client.context.span_id:016x}"
    else:
        assert out["b3"] == f"{B3_TRACE}-{client.context.span_id:016x}-d"
    mesh.close()


def test_signed_url_credentials_are_redacted(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    """The values of a signed URL's credential parameters (AWSAccessKeyId, Signature, sig,
    X-Goog-Signature) are recorded as REDACTED, as OpenTelemetry's HTTP conventions say, in a
    SERVER span's url.query and a CLIENT span's url.full; other parameters stay."""
    query = "X-Goog-Signature=abc&page=2&sig=s3cr3t"
    with tracing.server_span(
        "GET", "/r", scheme="http", host="pp", context=None, query=lambda: query
    ) as span:
        tracing.finish_server(span, 200)
    url = "https://bucket.example/o?AWSAccessKeyId=AKIA&Signature=xyz&design=1"
    with tracing.client_span(
        "GET", url, attempt=1, cluster=None, subset=None, upstream=None
    ) as span:
        tracing.finish_client(span, 200)
    (server,) = by_kind(exporter, SpanKind.SERVER)
    (client,) = by_kind(exporter, SpanKind.CLIENT)
    assert (server.attributes or {})["url.query"] == (
        "X-Goog-Signature=REDACTED&page=2&sig=REDACTED"
    )
    assert (client.attributes or {})["url.full"] == (
        "https://bucket.example/o?AWSAccessKeyId=REDACTED&Signature=REDACTED&design=1"
    )


@pytest.mark.parametrize(
    ("headers", "percentage", "sampled"),
    [
        pytest.param([(b"b3", b"0")], 100.0, False, id="b3-0-at-100%"),
        pytest.param([(b"x-b3-sampled", b"0")], 100.0, False, id="x-b3-sampled-0-at-100%"),
        pytest.param([(b"b3", b"1")], 0.0, True, id="b3-1-at-0%"),
        pytest.param([(b"x-b3-sampled", b"true")], 0.0, True, id="x-b3-sampled-true-at-0%"),
        pytest.param([(b"b3", b"d")], 0.0, True, id="b3-debug-at-0%"),
        pytest.param([(b"x-b3-flags", b"1")], 0.0, True, id="x-b3-flags-debug-at-0%"),
    ],
)
def test_a_b3_decision_without_ids_starts_the_trace_as_decided(
    headers: list[tuple[bytes, bytes]], percentage: float, sampled: bool
) -> None:
    """B3 lets a caller send only its sampling decision (`b3: 0`, `x-b3-sampled: 1`, debug),
    no ids: the trace starts at this hop and follows that decision, not the sampling
    percentage (as Envoy's Zipkin tracer does) — spans recorded or not, and the same decision
    sent on in W3C and B3 alike."""
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(CONFIG, exporter, sampler=MeshSampler(percentage), batch=False)
    mesh = tagged_mesh(f"tracing: [{{randomSamplingPercentage: {percentage}}}]", provider)
    sent: list[dict[str, str]] = []
    try:
        serve_once(mesh, headers, sent=sent)
    finally:
        mesh.close()
        provider.shutdown()
    kinds = sorted(span.kind.name for span in exporter.get_finished_spans())
    assert kinds == (["CLIENT", "SERVER"] if sampled else [])
    (outbound,) = sent
    flags = int(outbound["traceparent"].rsplit("-", 1)[1], 16)
    assert bool(flags & 1) is sampled
    b3 = outbound.get("b3", "").rsplit("-", 1)[-1] or outbound.get("x-b3-sampled")
    if (b"x-b3-flags", b"1") not in headers:
        assert b3 in (("1", "d") if sampled else ("0",))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"b3", b"nothex-zz-1")], id="b3"),
        pytest.param([(b"b3", b"nothex-zz-d")], id="b3-debug"),
        pytest.param(
            [(b"x-b3-traceid", b"not-hex"), (b"x-b3-spanid", b"zz"), (b"x-b3-sampled", b"1")],
            id="multi",
        ),
        pytest.param(
            [(b"x-b3-traceid", b"not-hex"), (b"x-b3-spanid", b"zz"), (b"x-b3-flags", b"1")],
            id="multi-debug",
        ),
    ],
)
@pytest.mark.parametrize("percentage", [0.0, 100.0])
def test_a_sampled_flag_with_malformed_b3_ids_decides_nothing(
    headers: list[tuple[bytes, bytes]], percentage: float
) -> None:
    """Malformed B3 ids are ignored, and the flag sent with them too: the request starts a
    new trace sampled at the Telemetry percentage (a decision counts only without ids)."""
    import asyncio

    import meshlib

    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(CONFIG, exporter, sampler=MeshSampler(percentage), batch=False)
    mesh = tagged_mesh(f"tracing: [{{randomSamplingPercentage: {percentage}}}]", provider)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "method": "GET", "path": "/", "scheme": "http"}
    scope["headers"] = [(b"host", b"reviews:9080"), *headers]
    try:
        asyncio.run(meshlib.MeshMiddleware(app, mesh=mesh)(scope, receive, send))
    finally:
        mesh.close()
        provider.shutdown()
    servers = by_kind(exporter, SpanKind.SERVER)
    if percentage:
        (server,) = servers
        assert server.parent is None  # a new trace, not one the flag joined
    else:
        assert servers == []


def test_an_attempt_without_a_response_carries_envoys_flag(
    provider: SdkTracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Through a real client: an attempt refused (UF) or out of the route's time (UT) is an
    ERROR CLIENT span whose error.type and meshlib.response_flags are Envoy's flag."""
    import asyncio

    import meshlib
    from tests.rawserver import ThreadServer, held_until
    from tests.upstream import loopback_service, refused_port

    closed = refused_port()  # held for the test: nothing listens on its port
    refused = closed.getsockname()[1]
    release = asyncio.Event()
    server = ThreadServer(held_until(release))
    with server as held:
        policy = "---\n".join(
            [
                loopback_service("refused.default.svc.cluster.local", refused),
                loopback_service("slow.default.svc.cluster.local", held.port),
                telemetry("all", "default", "tracing: [{randomSamplingPercentage: 100}]"),
                textwrap.dedent("""\
                    apiVersion: networking.istio.io/v1
                    kind: VirtualService
                    metadata: {name: slow}
                    spec:
                      hosts: [slow]
                      http:
                      - route: [{destination: {host: slow}}]
                        timeout: 100ms
                    """),
            ]
        )
        config = MeshConfig(service="productpage")
        mesh = Mesh(
            config,
            policy=Snapshot.build(load_text(policy).resources, config),
            tracer_provider=provider,
        )
        try:
            with meshlib.Client(mesh=mesh) as client:
                assert client.get("http://refused:9080/").status_code == 503
                assert client.get("http://slow:9080/").status_code == 504
        finally:
            server.loop.call_soon_threadsafe(release.set)
            mesh.close()
            closed.close()
    spans = by_kind(exporter, SpanKind.CLIENT)
    flags = [
        ((s.attributes or {}).get("error.type"), (s.attributes or {}).get("meshlib.response_flags"))
        for s in spans
    ]
    assert ("UF", "UF") in flags and ("UT", "UT") in flags
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)


def test_a_flush_keeps_to_its_timeout_when_the_collector_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flush a server's shutdown makes (`Tracing.flush`) returns after its timeout, False,
    when the collector accepts the connection and does not answer: the SDK's own
    `force_flush` ignores its timeout and waits out the exporter's (10 s a batch, retries on
    top), which would hold a pod's termination past its grace period. The export goes on
    meanwhile, and ends once the collector answers."""
    import contextlib
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    answering = threading.Event()
    stop = threading.Event()

    def collector() -> None:  # holds every request until `answering`, then answers 200
        held: list[socket.socket] = []
        while not stop.is_set():
            with contextlib.suppress(OSError):  # no one connected within 0.1 s
                held.append(listener.accept()[0])
            if answering.is_set():
                for sock in held:
                    sock.recv(65536)
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    sock.close()
                held.clear()

    thread = threading.Thread(target=collector, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    tracing = Tracing(CONFIG, exporter="otlp")
    try:
        assert tracing.provider is not None
        tracing.set_sampling(100)
        tracer = tracing.provider.get_tracer("test")
        for _ in range(3):
            tracer.start_span("queued", context=otel_context.Context()).end()
        started = time.monotonic()
        assert tracing.flush(timeout=0.5) is False
        assert time.monotonic() - started < 2
        answering.set()
        assert tracing.flush(timeout=10) is True  # the first one's export ended too
    finally:
        answering.set()
        tracing.shutdown()
        stop.set()
        thread.join(5)
        listener.close()


HUNG_AT_EXIT = """
import socket, sys, threading
from meshlib.config import MeshConfig
from meshlib.telemetry.tracing import Tracing
from opentelemetry import context

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
held = []
threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in iter(int, 1)],
                 daemon=True).start()
import os
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{listener.getsockname()[1]}"
tracing = Tracing(MeshConfig(service="reviews", metrics_port=None), exporter="otlp")
tracing.set_sampling(100)
tracer = tracing.provider.get_tracer("test")
for _ in range(3):
    tracer.start_span("queued", context=context.Context()).end()
print(tracing.flush(timeout=0.5))
"""


def test_a_process_exits_soon_after_a_flush_gave_up() -> None:
    """Once a flush gave up on a collector that hangs, the process's exit does not wait for
    the export either: OpenTelemetry's exit handler would shut the provider down, waiting for
    that export and then up to 30 s more."""
    import time

    started = time.monotonic()
    result = run_script(HUNG_AT_EXIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
    assert time.monotonic() - started < 8
