"""Access logs: Istio's TEXT/JSON lines, Telemetry accessLogging switches, filters, cost."""

from __future__ import annotations

import calendar
import dataclasses
import json
import logging
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from meshlib.config import MeshConfig
from meshlib.errors import ConfigError
from meshlib.policy.loader import load_text
from meshlib.policy.snapshot import Snapshot
from meshlib.telemetry.access_log import (
    AccessLog,
    AccessLogEntry,
    UnsupportedExpression,
    compile_filter,
    effective_access_logging,
)

REVIEWS = MeshConfig(service="reviews", version="v2", namespace="default")
RATINGS = MeshConfig(service="ratings", version="v1", namespace="default")
# 2020-11-25T21:26:18.409Z, the start time of Istio's documented example line
START = calendar.timegm((2020, 11, 25, 21, 26, 18, 0, 0, 0)) + 0.409

TELEMETRY = """
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{spec}
"""


def telemetry(name: str, namespace: str, spec: str) -> str:
    return TELEMETRY.format(name=name, namespace=namespace, spec=textwrap.indent(spec, "  "))


def snapshot(*docs: str, config: MeshConfig = REVIEWS) -> Snapshot:
    result = load_text("---".join(docs), "telemetry.yaml")
    result.raise_for_errors()
    return Snapshot.build(result.resources, config)


MESH_ON = telemetry("mesh-default", "istio-system", "accessLogging: [{providers: [{name: envoy}]}]")


def entry(**changes: Any) -> AccessLogEntry:
    base = AccessLogEntry(
        start_time=START,
        method="GET",
        path="/reviews/1?u=normal",
        protocol="HTTP/1.1",
        response_code=200,
        response_flags="-",
        bytes_received=0,
        bytes_sent=295,
        duration_ms=12.9,
        upstream_service_time_ms=11.2,
        x_forwarded_for="10.0.0.1",
        user_agent="python-httpx/0.27.0",
        request_id="84961386-6d84-929d-98bd-c5aee93b5c88",
        authority="reviews:9080",
        upstream_host="10.44.1.27:9080",
        upstream_cluster="outbound|9080|v2|reviews.default.svc.cluster.local",
        route_name="default",
        downstream_remote_address="10.44.1.23:46520",
        direction="outbound",
        response_code_details="via_upstream",
    )
    return dataclasses.replace(base, **changes)


class ListHandler(logging.Handler):
    def __init__(self, logger: logging.Logger | None = None) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def handler(request: pytest.FixtureRequest) -> Iterator[ListHandler]:
    """A private logger per test, so no global logging state leaks between tests."""
    logger = logging.getLogger(f"test.access.{request.node.name}")
    logger.propagate = False
    capture = ListHandler(logger)
    logger.addHandler(capture)
    yield capture
    logger.removeHandler(capture)
    logger.setLevel(logging.NOTSET)


def access_log(handler: ListHandler, **kwargs: Any) -> AccessLog:
    """An AccessLog writing to the test's private logger, whose records `handler` keeps."""
    return AccessLog(handler.logger, **kwargs)


def forced_on(handler: ListHandler, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> AccessLog:
    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "on")
    return access_log(handler, **kwargs)


# -- line formats ---------------------------------------------------------------------------


def test_text_line_field_by_field(handler: ListHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TEXT line is Istio's default format, field by field, in Istio's order."""
    log = forced_on(handler, monkeypatch)
    log.log(entry())
    (record,) = handler.records
    assert record.levelno == logging.INFO
    expected = (
        '[2020-11-25T21:26:18.409Z] "GET /reviews/1?u=normal HTTP/1.1" 200 - via_upstream - "-" '
        '0 295 12 11 "10.0.0.1" "python-httpx/0.27.0" "84961386-6d84-929d-98bd-c5aee93b5c88" '
        '"reviews:9080" "10.44.1.27:9080" outbound|9080|v2|reviews.default.svc.cluster.local '
        "- - 10.44.1.23:46520 - default"
    )
    assert record.getMessage() == expected
    fields = expected.split(" ")
    assert fields[0] == "[2020-11-25T21:26:18.409Z]"  # start time, ISO 8601 UTC, ms
    assert fields[1:4] == ['"GET', "/reviews/1?u=normal", 'HTTP/1.1"']  # request line
    assert fields[4] == "200"  # response code
    assert fields[5] == "-"  # response flags
    assert fields[6] == "via_upstream"  # response code details
    assert fields[7] == "-"  # connection termination details
    assert fields[8] == '"-"'  # upstream transport failure reason
    assert fields[9:12] == ["0", "295", "12"]  # bytes received, bytes sent, duration (truncated)
    assert fields[12] == "11"  # x-envoy-upstream-service-time
    assert fields[13] == '"10.0.0.1"'  # x-forwarded-for
    assert fields[14] == '"python-httpx/0.27.0"'  # user agent
    assert fields[15] == '"84961386-6d84-929d-98bd-c5aee93b5c88"'  # x-request-id
    assert fields[16] == '"reviews:9080"'  # authority
    assert fields[17] == '"10.44.1.27:9080"'  # upstream host
    assert fields[18] == "outbound|9080|v2|reviews.default.svc.cluster.local"  # upstream cluster
    assert fields[19:21] == ["-", "-"]  # upstream local address, downstream local address
    assert fields[21] == "10.44.1.23:46520"  # downstream remote address
    assert fields[22] == "-"  # requested server name
    assert fields[23] == "default"  # route name
    assert len(fields) == 24


def test_json_keys_and_values(handler: ListHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON encoding: Istio's default keys, numbers for codes/bytes/duration, null if missing."""
    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "json")
    log = access_log(handler)
    assert log.encoding == "JSON"
    log.log(entry(response_code=503, response_flags="UF,URX", x_forwarded_for=None))
    (record,) = handler.records
    assert json.loads(record.getMessage()) == {
        "start_time": "2020-11-25T21:26:18.409Z",
        "method": "GET",
        "path": "/reviews/1?u=normal",
        "protocol": "HTTP/1.1",
        "response_code": 503,
        "response_flags": "UF,URX",
        "response_code_details": "via_upstream",
        "connection_termination_details": None,
        "upstream_transport_failure_reason": None,
        "bytes_received": 0,
        "bytes_sent": 295,
        "duration": 12,
        "upstream_service_time": "11",
        "x_forwarded_for": None,
        "user_agent": "python-httpx/0.27.0",
        "request_id": "84961386-6d84-929d-98bd-c5aee93b5c88",
        "authority": "reviews:9080",
        "upstream_host": "10.44.1.27:9080",
        "upstream_cluster": "outbound|9080|v2|reviews.default.svc.cluster.local",
        "upstream_local_address": None,
        "downstream_local_address": None,
        "downstream_remote_address": "10.44.1.23:46520",
        "requested_server_name": None,
        "route_name": "default",
    }
    assert "\n" not in record.getMessage()
    # The same fields, plus the direction, for structured handlers.
    structured = record.__dict__["meshlib_access"]
    assert structured["direction"] == "outbound"
    assert structured["response_code"] == 503
    assert structured["x_forwarded_for"] is None


def test_encoding_argument_and_structured_fields_in_text(
    handler: ListHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encoding="JSON" picks JSON; TEXT records carry the same structured fields in `extra`."""
    json_log = forced_on(handler, monkeypatch, encoding="JSON")
    json_log.log(entry())
    assert json.loads(handler.lines[0])["route_name"] == "default"
    text_log = forced_on(handler, monkeypatch)
    text_log.log(entry(direction="inbound"))
    record = handler.records[1]
    assert record.getMessage().startswith("[2020-11-25T21:26:18.409Z]")
    assert record.__dict__["meshlib_access"]["direction"] == "inbound"
    assert record.__dict__["meshlib_access"]["start_time"] == "2020-11-25T21:26:18.409Z"
    with pytest.raises(ConfigError, match="TEXT or JSON"):
        AccessLog(encoding="XML")  # type: ignore[arg-type]


def test_missing_values_print_dash(handler: ListHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every optional value that is None (or empty) prints `-`, as Envoy prints it."""
    log = forced_on(handler, monkeypatch)
    log.log(
        entry(
            response_flags="",
            upstream_service_time_ms=None,
            x_forwarded_for=None,
            user_agent=None,
            request_id="",
            authority=None,
            upstream_host=None,
            upstream_cluster=None,
            route_name=None,
            downstream_remote_address=None,
            response_code_details=None,
            response_code=0,
        )
    )
    assert handler.lines == [
        '[2020-11-25T21:26:18.409Z] "GET /reviews/1?u=normal HTTP/1.1" 0 - - - "-" 0 295 12 - '
        '"-" "-" "-" "-" "-" - - - - - -'
    ]


def test_control_characters_cannot_split_the_line(
    handler: ListHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value with CR/LF, or NEL (a Latin-1 header byte some log readers end lines at), or
    a Unicode line or paragraph separator (a percent-decoded ASGI path can hold one), is
    escaped: one request is always exactly one line."""
    log = forced_on(handler, monkeypatch)
    log.log(entry(user_agent="evil\r\n[fake] line\x85[fake 2]", path="/a\tb\u2028c\u2029d"))
    (line,) = handler.lines
    assert len(line.splitlines()) == 1
    assert '"evil\\x0d\\x0a[fake] line\\x85[fake 2]"' in line
    assert " /a\\x09b\\u2028c\\u2029d " in line


# -- switched by Telemetry ------------------------------------------------------------------


def test_off_by_default(handler: ListHandler) -> None:
    """Without a Telemetry accessLogging entry nothing is logged, either direction."""
    log = access_log(handler)
    tracing_only = telemetry(
        "mesh-default", "istio-system", "tracing: [{randomSamplingPercentage: 5}]"
    )
    for docs in ((), (tracing_only,)):
        log.apply(snapshot(*docs), REVIEWS)
        assert not log.enabled("inbound") and not log.enabled("outbound")
        log.log(entry())
        log.log(entry(direction="inbound"))
    assert handler.records == []


def test_root_enables_namespace_disables_workload_reenables(handler: ListHandler) -> None:
    """Root namespace turns it on, a namespace `disabled: true` off, a workload selector on again."""
    namespace_off = telemetry("ns", "default", "accessLogging: [{disabled: true}]")
    workload_on = telemetry(
        "reviews",
        "default",
        "selector: {matchLabels: {app: reviews}}\naccessLogging: [{disabled: false}]",
    )
    log = access_log(handler)

    log.apply(snapshot(MESH_ON), REVIEWS)
    assert log.enabled("inbound") and log.enabled("outbound")
    log.log(entry())
    assert len(handler.records) == 1

    log.apply(snapshot(MESH_ON, namespace_off), REVIEWS)
    assert not log.enabled("inbound") and not log.enabled("outbound")
    log.log(entry())
    assert len(handler.records) == 1

    docs = (MESH_ON, namespace_off, workload_on)
    log.apply(snapshot(*docs), REVIEWS)
    assert log.enabled("inbound") and log.enabled("outbound")
    log.log(entry())
    assert len(handler.records) == 2

    # The workload selector picks reviews only: ratings in the same namespace stays off.
    ratings = access_log(handler)
    ratings.apply(snapshot(*docs, config=RATINGS), RATINGS)
    assert not ratings.enabled("inbound")
    # Another namespace only sees the mesh level.
    other = MeshConfig(service="reviews", namespace="other")
    elsewhere = access_log(handler)
    elsewhere.apply(snapshot(*docs, config=other), other)
    assert elsewhere.enabled("inbound")
    # Turning it off again through a new Snapshot takes effect immediately.
    log.apply(snapshot(), REVIEWS)
    assert not log.enabled("outbound")


def test_providers_inherit_and_scope() -> None:
    """Entries without providers inherit `envoy`; the lowest level naming providers sets scope."""
    assert effective_access_logging(
        snapshot(telemetry("m", "istio-system", "accessLogging: [{}]")), REVIEWS, "SERVER"
    ) == {"envoy": None}
    otel = telemetry(
        "ns",
        "default",
        'accessLogging: [{providers: [{name: otel}], filter: {expression: "response.code >= 500"}}]',
    )
    # The namespace's otel provider replaces the mesh's envoy (Istio's in-scope rule).
    assert effective_access_logging(snapshot(MESH_ON, otel), REVIEWS, "CLIENT") == {
        "otel": "response.code >= 500"
    }
    # Disabling a provider that is not on changes nothing.
    off_otel = telemetry(
        "ns", "default", "accessLogging: [{providers: [{name: otel}], disabled: true}]"
    )
    assert effective_access_logging(snapshot(MESH_ON, off_otel), REVIEWS, "CLIENT") == {}
    # Disabled at the root, nothing below: off.
    root_off = telemetry("m", "istio-system", "accessLogging: [{disabled: true}]")
    assert effective_access_logging(snapshot(root_off), REVIEWS, "SERVER") == {}


def test_match_mode_limits_direction(handler: ListHandler) -> None:
    """match.mode CLIENT logs outbound only, SERVER inbound only, CLIENT_AND_SERVER both."""
    for mode, inbound, outbound in (
        ("CLIENT", False, True),
        ("SERVER", True, False),
        ("CLIENT_AND_SERVER", True, True),
    ):
        spec = f"accessLogging: [{{match: {{mode: {mode}}}, providers: [{{name: envoy}}]}}]"
        log = access_log(handler)
        log.apply(snapshot(telemetry("mesh-default", "istio-system", spec)), REVIEWS)
        assert (log.enabled("inbound"), log.enabled("outbound")) == (inbound, outbound), mode
        before = len(handler.records)
        log.log(entry(direction="inbound"))
        log.log(entry(direction="outbound"))
        assert len(handler.records) - before == inbound + outbound

    # Server logging on everywhere, then turned off for the client side of one namespace.
    client_off = telemetry(
        "ns", "default", "accessLogging: [{match: {mode: CLIENT}, disabled: true}]"
    )
    log = access_log(handler)
    log.apply(snapshot(MESH_ON, client_off), REVIEWS)
    assert log.enabled("inbound") and not log.enabled("outbound")


def test_filter_expression_from_telemetry(handler: ListHandler) -> None:
    """`response.code >= 400` logs a 503 and not a 200; a lower level replaces the filter."""
    errors_only = telemetry(
        "mesh-default",
        "istio-system",
        'accessLogging: [{providers: [{name: envoy}], filter: {expression: "response.code >= 400"}}]',
    )
    log = access_log(handler)
    log.apply(snapshot(errors_only), REVIEWS)
    assert log.enabled("outbound")  # the filter is applied per request, in log()
    log.log(entry(response_code=200))
    log.log(entry(response_code=503, response_flags="UF"))
    log.log(entry(response_code=404, direction="inbound"))
    assert [line.split(" ")[4] for line in handler.lines] == ["503", "404"]

    # A filter on an entry without providers applies to the providers it inherits.
    only_flagged = telemetry(
        "ns", "default", "accessLogging: [{filter: {expression: 'response.flags != \"-\"'}}]"
    )
    log.apply(snapshot(errors_only, only_flagged), REVIEWS)
    log.log(entry(response_code=503))
    log.log(entry(response_code=200, response_flags="DI"))
    assert [line.split(" ")[4:6] for line in handler.lines[2:]] == [["200", "DI"]]

    # Naming the provider again without a filter removes it.
    unfiltered = telemetry("ns", "default", "accessLogging: [{providers: [{name: envoy}]}]")
    log.apply(snapshot(errors_only, unfiltered), REVIEWS)
    log.log(entry(response_code=200))
    assert len(handler.records) == 4


@pytest.mark.parametrize(
    ("expression", "code", "flags", "expected"),
    [
        ("response.code >= 400", 503, "-", True),
        ("response.code >= 400", 200, "-", False),
        ("response.code == 503", 503, "-", True),
        ("response.code != 503", 503, "-", False),
        ("response.code < 300", 204, "-", True),
        ("response.code <= 299", 300, "-", False),
        ("response.code > 499", 500, "-", True),
        ("400 <= response.code", 404, "-", True),
        ("response.code >= 400u", 404, "-", True),
        ('response.flags != "-"', 200, "UF,URX", True),
        ('response.flags != "-"', 200, "-", False),
        ("response.flags == 'UO'", 503, "UO", True),
        ("response.flags != 0", 503, "UO", True),
        ("response.flags == 0", 200, "-", True),
        ("response.code >= 500 || response.code == 429", 429, "-", True),
        ("response.code >= 500 && response.flags != '-'", 503, "-", False),
        ("response.code >= 500 && response.flags != '-'", 503, "UF", True),
        ("!(response.code < 400)", 400, "-", True),
        ("(response.code == 200 || response.code == 201) && response.flags == '-'", 201, "-", True),
        ("response.code == 1 || response.code == 2 && response.code == 3", 1, "-", True),
    ],
)
def test_filter_subset(expression: str, code: int, flags: str, expected: bool) -> None:
    """The CEL subset: response.code comparisons, response.flags, &&, ||, !, parentheses."""
    assert compile_filter(expression)(entry(response_code=code, response_flags=flags)) is expected


@pytest.mark.parametrize(
    "expression",
    [
        "xds.cluster_name == 'BlackHoleCluster'",
        "response.code >= 400 || connection.mtls",
        "response.code >= '400'",
        "response.flags > 'UF'",
        "response.flags == 4",
        "size(request.headers) > 0",
        "response.code >=",
        "(response.code == 200",
        "response.code == 200 response.code",
        "response.code == 200 | response.code == 201",
        "(" * 5000 + "response.code == 200" + ")" * 5000,
        "(" * 65 + "response.code == 200" + ")" * 65,
        "!" * 65 + "response.code == 200",
    ],
)
def test_unsupported_expressions_are_refused(expression: str) -> None:
    """Anything outside the subset raises UnsupportedExpression (nothing is ever eval'ed)."""
    with pytest.raises(UnsupportedExpression):
        compile_filter(expression)


def test_nesting_limit_is_64() -> None:
    """64 levels of '(' compile (65 are refused above): a limit of the parser's own, well
    inside Python's recursion limit. A run of '!' does not nest: CEL keeps one of an odd run
    and drops an even one."""
    nested = compile_filter("(" * 64 + "response.code == 200" + ")" * 64)
    assert nested(entry(response_code=200)) and not nested(entry(response_code=201))
    negated = compile_filter("!" * 64 + "response.code == 200")  # an even count: itself
    assert negated(entry(response_code=200)) and not negated(entry(response_code=201))


def test_long_chains_evaluate_flat() -> None:
    """20,000 terms joined by || or && compile and evaluate without recursing per term."""
    terms = [f"response.code == {code}" for code in range(20_000)]
    either = compile_filter(" || ".join(terms))
    assert either(entry(response_code=19_999)) and not either(entry(response_code=20_000))
    both = compile_filter(" && ".join(f"response.code != {code}" for code in range(20_000)))
    assert both(entry(response_code=20_000)) and not both(entry(response_code=7))


def test_unsupported_filter_warns_once_and_logs_everything(
    handler: ListHandler, caplog: pytest.LogCaptureFixture
) -> None:
    """An unsupported filter logs one warning and is treated as always true."""
    spec = (
        "accessLogging: [{providers: [{name: envoy}], "
        "filter: {expression: \"response.code >= 400 || xds.cluster_name == 'BlackHoleCluster'\"}}]"
    )
    docs = snapshot(telemetry("mesh-default", "istio-system", spec))
    log = access_log(handler)
    with caplog.at_level(logging.WARNING, logger="meshlib.telemetry"):
        log.apply(docs, REVIEWS)
        log.apply(docs, REVIEWS)
    warnings = [r for r in caplog.records if r.name == "meshlib.telemetry"]
    assert len(warnings) == 1
    assert "xds.cluster_name" in warnings[0].getMessage()
    assert "logging every request" in warnings[0].getMessage()
    log.log(entry(response_code=200))
    assert len(handler.records) == 1


# -- environment override ------------------------------------------------------------------


def test_environment_override(handler: ListHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    """MESHLIB_ACCESS_LOG=on|json forces logging (Telemetry ignored), off forces it off."""
    filtered = telemetry(
        "mesh-default",
        "istio-system",
        'accessLogging: [{providers: [{name: envoy}], filter: {expression: "response.code >= 400"}}]',
    )
    monkeypatch.setenv("MESHLIB_ACCESS_LOG", " ON ")
    log = access_log(handler)
    assert log.forced == "on" and log.encoding == "TEXT"
    assert log.enabled("inbound") and log.enabled("outbound")
    log.apply(snapshot(filtered), REVIEWS)  # no effect: forced on, unfiltered
    log.apply(snapshot(), REVIEWS)
    log.log(entry(response_code=200))
    assert len(handler.records) == 1

    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "off")
    log = access_log(handler)
    log.apply(snapshot(MESH_ON), REVIEWS)
    assert not log.enabled("inbound") and not log.enabled("outbound")
    log.log(entry())
    assert len(handler.records) == 1

    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "json")
    log = access_log(handler)
    log.log(entry(direction="inbound"))
    assert json.loads(handler.lines[-1])["response_code"] == 200

    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "")
    assert access_log(handler).forced is None

    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "yes")
    with pytest.raises(ConfigError, match="MESHLIB_ACCESS_LOG='yes'"):
        access_log(handler)


# -- logging behaviour ---------------------------------------------------------------------


def test_never_raises_with_a_broken_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler whose emit raises does not reach the request; the failure is counted."""

    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("disk full")

    class BrokenFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise ValueError("bad filter")

    monkeypatch.setenv("MESHLIB_ACCESS_LOG", "on")
    logger = logging.getLogger("test.access.broken")
    logger.propagate = False
    broken = Broken()
    logger.addHandler(broken)
    try:
        log = AccessLog(logger)
        log.log(entry())
        assert log.failures == 1
        logger.addFilter(BrokenFilter())
        log.log(entry(direction="inbound"))
        assert log.failures == 2
        log.log(entry(start_time=float("nan")))  # a bad value in the entry itself
        assert log.failures == 3
    finally:
        logger.removeHandler(broken)
        logger.filters.clear()
        logger.setLevel(logging.NOTSET)


def test_default_logger_and_level() -> None:
    """Default logger is meshlib.access; switching it on sets INFO only if its level is NOTSET."""
    logger = logging.getLogger("meshlib.access")
    original = logger.level
    logger.setLevel(logging.NOTSET)
    handler = ListHandler(logger)
    logger.addHandler(handler)
    try:
        log = AccessLog()
        assert log.logger is logger
        log.apply(snapshot(), REVIEWS)
        assert logger.level == logging.NOTSET  # off: nothing touched
        log.apply(snapshot(MESH_ON), REVIEWS)
        assert logger.level == logging.INFO
        log.log(entry())
        assert len(handler.records) == 1
        logger.setLevel(logging.WARNING)  # the app's choice wins, and silences it
        log.apply(snapshot(MESH_ON), REVIEWS)
        assert logger.level == logging.WARNING
        log.log(entry())
        assert len(handler.records) == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(original)


def test_cost_when_disabled_is_under_a_microsecond(handler: ListHandler) -> None:
    """`enabled()` and `log()` for a disabled direction cost well under 1 µs per call."""
    log = access_log(handler)
    spec = "accessLogging: [{match: {mode: SERVER}, providers: [{name: envoy}]}]"
    log.apply(snapshot(telemetry("mesh-default", "istio-system", spec)), REVIEWS)
    outbound = entry(direction="outbound")
    calls = 100_000

    def per_call(fn: Any, arg: Any) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                fn(arg)
            best = min(best, (time.perf_counter() - started) / calls)
        return best

    enabled_cost = per_call(log.enabled, "outbound")
    log_cost = per_call(log.log, outbound)
    print(f"\ndisabled: enabled() {enabled_cost * 1e9:.0f} ns, log() {log_cost * 1e9:.0f} ns")
    assert handler.records == []
    assert enabled_cost < 1e-6
    assert log_cost < 1e-6
