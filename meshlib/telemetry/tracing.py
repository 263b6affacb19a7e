"""Tracing: an OpenTelemetry SERVER span per served request, a CLIENT span per outbound attempt.

    tracing = Tracing(config)                       # exporter: MESHLIB_TRACES_EXPORTER or "none"
    tracing.set_sampling(sampling_percentage(snapshot, config))   # on every Snapshot swap
    with tracing.server_span("GET", "/productpage", scheme="http", host="pp:9080",
                             context=inbound_otel_context) as span:
        with tracing.client_span("GET", "http://reviews:9080/reviews/1", attempt=1,
                                 cluster="outbound|9080|v2|reviews.default.svc.cluster.local",
                                 subset="v2", upstream="10.0.0.7:9080") as attempt:
            ...
            tracing.finish_client(attempt, 200, "-")
        tracing.finish_server(span, 200)

Rules (what a user of Istio and of OpenTelemetry would expect; see also the README table):

- **Which TracerProvider.** An explicit `tracer_provider` argument wins; else a real provider
  the app installed globally (`opentelemetry.trace.set_tracer_provider`, anything but the API's
  proxy / no-op provider) is used as it is — its sampler, processors and exporters; meshlib
  never replaces or changes the global provider. Only when there is none does meshlib build
  its own SDK provider (resource `service.name` = canonical service, `service.version`,
  `k8s.namespace.name`), and never installs it globally. The choice is made once, in
  `Tracing.__init__`: configure the app's OpenTelemetry before meshlib.
- **Exporter** (`exporter=` or `MESHLIB_TRACES_EXPORTER`): `otlp` (OTLP/HTTP, the `otlp` extra;
  Jaeger and the OpenTelemetry Collector take it; endpoint and transport from the standard
  `OTEL_EXPORTER_OTLP_*` variables, `..._PROTOCOL=grpc` with the gRPC exporter installed) with
  a BatchSpanProcessor, `console` with a
  SimpleSpanProcessor, `none` (default). With `none` and no app provider, tracing is off: no
  spans are made and the inbound trace context passes through unchanged (what a proxy without
  a tracer does), which keeps downstream spans attached to the caller's span.
- **Sampling** (own provider only): ParentBased — a request with an inbound sampled parent is
  sampled, one with an unsampled parent is not, whatever the percentage; root traces are
  sampled at Telemetry `randomSamplingPercentage` (default 1%, Istio's PILOT_TRACE_SAMPLING),
  changed live by `set_sampling`. An app provider keeps its own sampler. A B3 caller that
  deferred its decision (ids without a sampled flag) leaves it to this hop: it is made at
  that percentage from the trace id (as a root's would be), and that decision goes on.
- **No double spans** with opentelemetry-instrumentation. SERVER: if a recording SERVER span
  is already current (instrumentation-asgi/wsgi outside meshlib), meshlib makes none and
  annotates that one with its `meshlib.*` attributes only; instrumentation running *inside*
  meshlib sees meshlib's current span and makes an INTERNAL span (its own rule). CLIENT: if a
  recording CLIENT span is current (instrumentation-httpx/requests outside meshlib's attempt
  loop), meshlib annotates it (`meshlib.*`, resend count of the latest attempt) instead of
  nesting; while meshlib's own CLIENT span is current it sets OpenTelemetry's
  "suppress HTTP instrumentation" context key, so instrumented transports *under* meshlib skip
  theirs. Spans meshlib did not make are never ended or given a status by meshlib.
- **Cost.** When a span is not sampled it is the SDK's non-recording span and no attribute is
  built (`is_recording()` is checked first). With meshlib's ParentBased sampler, a request whose
  inbound parent is unsampled gets no span at all (the caller's context is made current and
  passes through unchanged), nor do attempts under an unsampled span: the sampler would drop
  them, and nothing about them is ever exported.
- Span names: SERVER `"<METHOD> <route or path>"` (query dropped, path cut at 128
  characters; the query goes in `url.query`); CLIENT `"<METHOD> <host[:port]>"` (the URL's
  authority, low cardinality, as Istio names client spans by host). Status, as OpenTelemetry's
  HTTP semantic conventions say: ERROR with `error.type` for 5xx on SERVER spans (4xx are the
  caller's), for 4xx and 5xx on CLIENT spans, and for attempts with no response. A request
  that ended with no status sent has no `http.response.status_code`.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace import TracerProvider as ApiTracerProvider

from meshlib._version import __version__
from meshlib.config import MeshConfig
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry._caller_trace import SPAN_KEY, CallerSpan
from meshlib.telemetry._span_scopes import ServerScope, _ClientScope, _peer, _unsampled
from meshlib.telemetry._tracer_provider import (
    ENV_EXPORTER,
    EXPORTERS,
    MeshSampler,
    RatioSampler,
    _app_provider,
    _exporter_name,
    _make_exporter,
    _ratio,
    build_tracer_provider,
)
from meshlib.telemetry._tracing_policy import (
    DEFAULT_SAMPLING_PERCENTAGE,
    NO_TAGS,
    HeaderLookup,
    SpanTags,
    effective_tracing,
    sampling_percentage,
)

# What this workload's Telemetry says (`_tracing_policy`), meshlib's own provider and its
# sampler (`_tracer_provider`) and the span scopes (`_span_scopes`) live in modules of their
# own; the names documented here are importable from here too.
__all__ = [
    "DEFAULT_SAMPLING_PERCENTAGE",
    "ENV_EXPORTER",
    "EXPORTERS",
    "TRACER_NAME",
    "MeshSampler",
    "RatioSampler",
    "Tracing",
    "build_tracer_provider",
    "effective_tracing",
    "sampling_percentage",
]

log = logging.getLogger(__name__)

TRACER_NAME = "meshlib"
_NO_FLAGS = "-"

FLUSH_TIMEOUT_S = 5.0
"""How long a flush at a server's shutdown may wait for the exporter (a collector that is
down should not hold a pod's termination past its grace period)."""


class Tracing:
    """Makes meshlib's spans on the right TracerProvider (see the module docstring for rules)."""

    def __init__(
        self,
        config: MeshConfig,
        *,
        exporter: str | None = None,
        tracer_provider: ApiTracerProvider | None = None,
    ) -> None:
        self.config = config
        self.exporter = _exporter_name(exporter)
        self._percentage = DEFAULT_SAMPLING_PERCENTAGE
        self._sampler: MeshSampler | None = None
        self._owned: SdkTracerProvider | None = None
        provider = tracer_provider if tracer_provider is not None else _app_provider()
        if provider is not None:
            sampler = getattr(provider, "sampler", None)
            if isinstance(sampler, MeshSampler):
                self._sampler = sampler
                self._percentage = sampler.percentage
            if self.exporter != "none":  # a setting that does nothing is worth a warning
                log.warning(
                    "meshlib: traces exporter %r is not used: meshlib's spans go to the app's "
                    "TracerProvider and its exporters (set the exporter there, or leave "
                    "meshlib's at 'none')",
                    self.exporter,
                )
        elif self.exporter != "none":
            self._sampler = MeshSampler(self._percentage)
            provider = self._owned = build_tracer_provider(
                config,
                _make_exporter(self.exporter),
                sampler=self._sampler,
                batch=self.exporter == "otlp",
            )
        self.provider: ApiTracerProvider | None = provider
        self._tracer = provider.get_tracer(TRACER_NAME, __version__) if provider else None
        self.tags: SpanTags = NO_TAGS
        """The Telemetry's `customTags` for this workload's SERVER spans."""
        self.client_tags: SpanTags = NO_TAGS
        """... and for its CLIENT spans (they differ only with `match.mode` entries)."""
        self.report_server = True
        """False when the Telemetry says `disableSpanReporting` for SERVER spans."""
        self.report_client = True

    @property
    def enabled(self) -> bool:
        """Whether meshlib makes spans at all (False: exporter none and no app provider)."""
        return self._tracer is not None

    def needs_server_span(self, context: Context, sampled: bool | None) -> bool:
        """Whether a request served under `context` (its caller's decision `sampled`, None
        when the context is not the one current) needs a SERVER span scope: not when meshlib
        makes no spans, nor for the caller's unsampled trace, already current, when meshlib's
        sampler follows the parent — the span would only pass the caller's context on."""
        if self._tracer is None:
            return False
        if sampled is not False or self._sampler is None:
            return True
        span = context.get(SPAN_KEY)  # what trace.get_current_span(context) reads, directly
        if type(span) is CallerSpan:
            return span.sampled
        return not _unsampled(trace.get_current_span(context))

    def decide(self, trace_id: int) -> bool:
        """This hop's sampling decision for a trace whose caller deferred it: the root
        decision, at the sampling percentage (the mesh's sampler's, when it has one)."""
        if self._sampler is not None:
            return self._sampler.root.samples(trace_id)
        return RatioSampler(_ratio(self._percentage)).samples(trace_id)

    @property
    def owns_provider(self) -> bool:
        return self._owned is not None

    @property
    def sampling(self) -> float:
        """The root-trace sampling percentage last set (applied only with a MeshSampler)."""
        return self._percentage

    def set_sampling(self, percentage: float) -> None:
        """Sample this percentage (0-100) of root traces from now on; parents still decide."""
        _ratio(percentage)  # refuses values outside 0-100 before anything changes
        self._percentage = float(percentage)
        if self._sampler is not None:
            self._sampler.percentage = percentage

    def apply(self, snapshot: Snapshot) -> None:
        """Take the sampling percentage and custom tags a new Snapshot's Telemetry gives
        this workload."""
        spec = effective_tracing(snapshot, self.config)
        percentage = spec.random_sampling_percentage
        self.set_sampling(DEFAULT_SAMPLING_PERCENTAGE if percentage is None else percentage)
        server = effective_tracing(snapshot, self.config, "SERVER")
        client = effective_tracing(snapshot, self.config, "CLIENT")
        tags = SpanTags.of(server)
        if tags != self.tags:
            self.tags = tags
        client_tags = SpanTags.of(client)
        if client_tags != self.client_tags:
            self.client_tags = client_tags
        self.report_server = not server.disable_span_reporting
        self.report_client = not client.disable_span_reporting

    def server_span(
        self,
        method: str,
        path: str,
        *,
        scheme: str,
        host: str,
        context: Context | None,
        route: str | None = None,
        headers: HeaderLookup | None = None,
        query: Callable[[], str] | None = None,
    ) -> ServerScope:
        """A SERVER span for one served request, current inside the `with` block.

        `context` is the inbound context extracted from the request's headers (its span is
        the remote parent); `route` (e.g. `/reviews/{id}`) names the span when known;
        `headers` reads the request's headers for `header` custom tags; `query()` gives the
        query string (`url.query`), called only when the span records. Set the scope's
        `end_time` before the block ends when the response was complete earlier.
        """
        return ServerScope(self, method, path, scheme, host, context, route, headers, query)

    def finish_server(
        self, span: Span, status: int, flags: str | Iterable[str] | None = None
    ) -> None:
        """Record the response status (ERROR for 5xx; 0, none sent, leaves the attribute out)
        and meshlib's response flags."""
        if not span.is_recording():
            return
        attributes: dict[str, str | int] = {}
        flag_text = _flags(flags)
        if flag_text is not None:
            attributes["meshlib.response_flags"] = flag_text
        if _owned(span):
            if status:
                attributes["http.response.status_code"] = status
            if status >= 500:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)

    def client_span(
        self,
        method: str,
        url: str,
        *,
        attempt: int,
        cluster: str | None,
        subset: str | None,
        upstream: str | None,
        headers: HeaderLookup | None = None,
    ) -> AbstractContextManager[Span]:
        """A CLIENT span for one outbound attempt (attempt 1, 2, ...), current while it runs;
        `headers` reads the outbound request's headers for `header` custom tags."""
        return _ClientScope(self, method, url, attempt, cluster, subset, upstream, headers)

    def finish_client(
        self,
        span: Span,
        status: int | None,
        flags: str | Iterable[str] | None = None,
        *,
        upstream: str | None = None,
    ) -> None:
        """Record the attempt's status (None: no response) and Envoy response flags.

        ERROR for 4xx and 5xx (OpenTelemetry's rule for CLIENT spans) and for attempts without
        a response (local failures: UF, UT, UO ...).
        """
        if not span.is_recording():
            return
        attributes: dict[str, str | int] = {}
        flag_text = _flags(flags)
        if flag_text is not None:
            attributes["meshlib.response_flags"] = flag_text
        if _owned(span):
            if upstream:
                _peer(attributes, upstream)
            if status:
                attributes["http.response.status_code"] = status
            if not status or status >= 400:
                attributes["error.type"] = str(status) if status else (flag_text or "_OTHER")
                span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> bool:
        """Export the spans meshlib's own provider still holds in its batch, waiting at most
        `timeout` seconds; an app's provider is left alone. False when the export did not end
        in time: it goes on in a daemon thread, which the process does not wait for, at exit
        either. (The SDK's `force_flush` does not keep to its own timeout: it exports every
        batch queued, each with the exporter's retries.)"""
        owned = self._owned
        if owned is None:
            return True
        exporting = threading.Thread(
            target=owned.force_flush, name="meshlib-span-flush", daemon=True
        )
        exporting.start()
        exporting.join(timeout)
        if not exporting.is_alive():
            return True
        # Nor does the process wait for it at exit: the SDK's exit handler would shut the
        # provider down, waiting on this export first, and then up to 30 s more.
        atexit.unregister(owned.shutdown)
        return False

    def shutdown(self) -> None:
        """Flush and stop meshlib's own provider; an app's provider is left alone."""
        owned, self._owned = self._owned, None
        if owned is not None:
            self._tracer = None
            owned.shutdown()


def _owned(span: Span) -> bool:
    """Whether meshlib's tracer made `span` (spans of other instrumentations are annotated)."""
    scope = getattr(span, "instrumentation_scope", None)
    return scope is None or scope.name == TRACER_NAME


def _flags(flags: str | Iterable[str] | None) -> str | None:
    if flags is None:
        return None
    if not isinstance(flags, str):
        flags = ",".join(flags) or _NO_FLAGS
    return flags or _NO_FLAGS
