"""Propagation: extract from inbound headers, activate, inject into outbound requests.

Headers are plain dicts here; the middleware and clients pass `get_all` / `has` callables over
their own request objects. No tracer is configured unless a test builds an SDK
TracerProvider of its own (never the global one).
"""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Callable, Iterator, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshlib.dataplane.deadline import Deadline, inbound_deadline
from meshlib.telemetry import propagation
from meshlib.telemetry.propagation import (
    B3_MULTI,
    B3_SINGLE,
    TRACECONTEXT,
    InboundContext,
    Propagator,
    current,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
B3_TRACE_ID = "80f198ee56343ba864fe8b2a57d3eff7"
B3_SPAN_ID = "e457b5a2e4d86bd1"
B3_PARENT_ID = "05e3ac9a4f6e3b90"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"

HeaderValues = str | list[str]


def get_all(headers: Mapping[str, HeaderValues]) -> Callable[[str], list[str]]:
    """A `get_all` over a dict of header -> value(s), case-insensitive like real requests."""
    lowered = {k.lower(): ([v] if isinstance(v, str) else list(v)) for k, v in headers.items()}
    return lambda name: lowered.get(name, [])


def has_none(name: str) -> bool:
    return False


def has_of(*names: str) -> Callable[[str], bool]:
    present = set(names)
    return lambda name: name in present


def outbound(
    p: Propagator, inbound: InboundContext | None, has: Callable[[str], bool] = has_none
) -> dict[str, str]:
    """The outbound headers while `inbound` is being served (None: no inbound request)."""
    if inbound is None:
        out = p.outbound(has)
    else:
        with p.activated(inbound):
            out = p.outbound(has)
    names = [name for name, _ in out]
    assert len(names) == len(set(names)), f"a header sent twice: {out}"
    return dict(out)


def span_ids(ctx: otel_context.Context) -> tuple[str, str] | None:
    sc = trace.get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"


def is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4 and str(uuid.UUID(value)) == value
    except ValueError:
        return False


@pytest.fixture
def tracer() -> Iterator[trace.Tracer]:
    """An SDK tracer of the test's own (the global provider stays untouched)."""
    provider = TracerProvider(shutdown_on_exit=False)
    yield provider.get_tracer("test")
    provider.shutdown()


@pytest.fixture(autouse=True)
def no_leftover_context() -> Iterator[None]:
    """Every test starts and ends with no inbound request and an empty OTel context."""
    assert current.get() is None
    assert inbound_deadline.get() is None
    yield
    assert current.get() is None
    assert inbound_deadline.get() is None
    assert span_ids(otel_context.get_current()) is None


# -- W3C ---------------------------------------------------------------------------------


def test_w3c_round_trip() -> None:
    """traceparent/tracestate come in and go out unchanged when no tracer makes spans."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}))
    assert span_ids(inbound.otel_context) == (TRACE_ID, SPAN_ID)
    assert inbound.sampled is True
    assert inbound.formats == {TRACECONTEXT}
    out = outbound(p, inbound)
    assert out["traceparent"] == TRACEPARENT
    assert out["tracestate"] == "congo=t61rcWkgMzE"
    assert not {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"} & out.keys()


def test_w3c_unsampled_flag_is_kept() -> None:
    """Flags 00: the caller decided not to sample, and the callee hears the same."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"}))
    assert inbound.sampled is False
    assert outbound(p, inbound)["traceparent"].endswith("-00")


def test_client_span_becomes_the_parent(tracer: trace.Tracer) -> None:
    """With a tracer, the span current at call time is the parent the callee sees; same trace."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": TRACEPARENT, "x-b3-traceid": TRACE_ID}))
    with (
        p.activated(inbound),
        tracer.start_as_current_span("server", kind=trace.SpanKind.SERVER),
        tracer.start_as_current_span("client", kind=trace.SpanKind.CLIENT) as client,
    ):
        out = dict(p.outbound(has_none))
    client_span = f"{client.get_span_context().span_id:016x}"
    assert out["traceparent"] == f"00-{TRACE_ID}-{client_span}-01"
    assert (out["x-b3-traceid"], out["x-b3-spanid"]) == (TRACE_ID, client_span)


# -- B3 ------------------------------------------------------------------------------------


def test_b3_multi_round_trip() -> None:
    """x-b3-* in, x-b3-* out as received (same ids, parent id and decision), plus W3C which
    is always sent."""
    p = Propagator()
    inbound = p.extract(
        get_all(
            {
                "X-B3-TraceId": B3_TRACE_ID,
                "X-B3-SpanId": B3_SPAN_ID,
                "X-B3-ParentSpanId": B3_PARENT_ID,
                "X-B3-Sampled": "1",
            }
        )
    )
    assert span_ids(inbound.otel_context) == (B3_TRACE_ID, B3_SPAN_ID)
    assert inbound.formats == {B3_MULTI}
    assert inbound.sampled is True
    out = outbound(p, inbound)
    assert out["x-b3-traceid"] == B3_TRACE_ID
    assert out["x-b3-spanid"] == B3_SPAN_ID
    assert out["x-b3-parentspanid"] == B3_PARENT_ID
    assert out["x-b3-sampled"] == "1"
    assert out["traceparent"] == f"00-{B3_TRACE_ID}-{B3_SPAN_ID}-01"
    assert "b3" not in out


@pytest.mark.parametrize(
    ("headers", "b3_out"),
    [
        pytest.param(
            {"x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": B3_SPAN_ID, "x-b3-sampled": "0"},
            None,
            id="multi",
        ),
        pytest.param(
            {"b3": f"a3ce929d0e0e4736-{B3_SPAN_ID}-0"},
            f"a3ce929d0e0e4736-{B3_SPAN_ID}-0",
            id="single",
        ),
    ],
)
def test_b3_64_bit_trace_id_goes_on_as_received(
    headers: dict[str, str], b3_out: str | None
) -> None:
    """A 16-hex B3 trace id is accepted and sent on in B3 as received (a B3 callee keys the
    trace by it); W3C, which has 128-bit ids only, gets it zero-padded."""
    p = Propagator()
    inbound = p.extract(get_all(headers))
    assert inbound.sampled is False
    out = outbound(p, inbound)
    if b3_out is None:
        assert out["x-b3-traceid"] == "a3ce929d0e0e4736"
        assert out["x-b3-sampled"] == "0"
    else:
        assert out["b3"] == b3_out
    assert out["traceparent"] == f"00-0000000000000000a3ce929d0e0e4736-{B3_SPAN_ID}-00"


def test_an_empty_b3_header_leaves_the_multi_headers_their_decision() -> None:
    """An empty `b3` beside valid x-b3-* headers: OpenTelemetry's propagator reads the multi
    headers then (an empty single header is none), and so does the decision they carry."""
    p = Propagator()
    inbound = p.extract(
        get_all(
            {"b3": "", "x-b3-traceid": B3_TRACE_ID, "x-b3-spanid": B3_SPAN_ID, "x-b3-sampled": "1"}
        )
    )
    assert span_ids(inbound.otel_context) == (B3_TRACE_ID, B3_SPAN_ID)
    assert inbound.sampled is True
    assert outbound(p, inbound)["x-b3-sampled"] == "1"


def test_b3_multi_debug_flag_means_sampled_and_goes_on_as_debug() -> None:
    """X-B3-Flags: 1 (debug) implies sampled, and is sent on as debug: `x-b3-flags: 1`
    without `x-b3-sampled` (which the B3 spec says not to send with it)."""
    p = Propagator()
    inbound = p.extract(
        get_all({"x-b3-traceid": B3_TRACE_ID, "x-b3-spanid": B3_SPAN_ID, "x-b3-flags": "1"})
    )
    assert inbound.sampled is True
    out = outbound(p, inbound)
    assert out["x-b3-flags"] == "1" and "x-b3-sampled" not in out
    assert out["traceparent"] == f"00-{B3_TRACE_ID}-{B3_SPAN_ID}-01"


def test_b3_multi_deferred_decision_is_none() -> None:
    """Ids without X-B3-Sampled: the caller deferred the decision, `sampled` is None."""
    p = Propagator()
    inbound = p.extract(get_all({"x-b3-traceid": B3_TRACE_ID, "x-b3-spanid": B3_SPAN_ID}))
    assert span_ids(inbound.otel_context) == (B3_TRACE_ID, B3_SPAN_ID)
    assert inbound.sampled is None


@pytest.mark.parametrize(
    ("headers", "b3_out"),
    [
        pytest.param(
            {
                "x-b3-traceid": B3_TRACE_ID,
                "x-b3-spanid": B3_SPAN_ID,
                "x-b3-parentspanid": B3_PARENT_ID,
            },
            None,
            id="multi",
        ),
        pytest.param(
            {"b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}"}, f"{B3_TRACE_ID}-{B3_SPAN_ID}", id="single"
        ),
    ],
)
def test_b3_deferred_decision_goes_on_deferred_without_a_tracer(
    headers: dict[str, str], b3_out: str | None
) -> None:
    """No tracer here to decide: the B3 headers go on without a sampling state (neither
    `x-b3-sampled: 0` nor `-1`), for a hop that has one; no traceparent goes with them: W3C
    has no deferred state, and a `-00` would make the next hop decide "not sampled"."""
    p = Propagator()
    out = outbound(p, p.extract(get_all(headers)))
    if b3_out is None:
        assert (out["x-b3-traceid"], out["x-b3-spanid"]) == (B3_TRACE_ID, B3_SPAN_ID)
        assert out["x-b3-parentspanid"] == B3_PARENT_ID
        assert "x-b3-sampled" not in out and "x-b3-flags" not in out
    else:
        assert out["b3"] == b3_out
    assert "traceparent" not in out


def test_b3_single_debug_goes_on_as_debug() -> None:
    """`b3: {trace}-{span}-d-{parent}`: sampled, sent on as received, with `d`."""
    p = Propagator()
    inbound = p.extract(get_all({"b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}-d-{B3_PARENT_ID}"}))
    assert inbound.sampled is True
    assert outbound(p, inbound)["b3"] == f"{B3_TRACE_ID}-{B3_SPAN_ID}-d-{B3_PARENT_ID}"


def test_a_valid_traceparent_decides_over_a_deferred_b3() -> None:
    """When the traceparent wins, its flag is the decision: B3 goes on with it, not deferred."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": TRACEPARENT, "b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}"}))
    assert inbound.sampled is True
    assert outbound(p, inbound)["b3"] == f"{TRACE_ID}-{SPAN_ID}-1"


def test_b3_single_round_trip() -> None:
    """`b3: {trace}-{span}-{sampled}-{parent}` in, the same `b3` out (no x-b3-*), plus W3C."""
    p = Propagator()
    inbound = p.extract(get_all({"b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}-1-{B3_PARENT_ID}"}))
    assert span_ids(inbound.otel_context) == (B3_TRACE_ID, B3_SPAN_ID)
    assert inbound.formats == {B3_SINGLE}
    assert inbound.sampled is True
    out = outbound(p, inbound)
    assert out["b3"] == f"{B3_TRACE_ID}-{B3_SPAN_ID}-1-{B3_PARENT_ID}"
    assert out["traceparent"] == f"00-{B3_TRACE_ID}-{B3_SPAN_ID}-01"
    assert "x-b3-traceid" not in out


B3_WITH_PARENT = [
    pytest.param(
        {
            "x-b3-traceid": "a3ce929d0e0e4736",
            "x-b3-spanid": B3_SPAN_ID,
            "x-b3-parentspanid": B3_PARENT_ID,
            "x-b3-sampled": "1",
        },
        id="multi",
    ),
    pytest.param({"b3": f"a3ce929d0e0e4736-{B3_SPAN_ID}-1-{B3_PARENT_ID}"}, id="single"),
]


@pytest.mark.parametrize("headers", B3_WITH_PARENT)
def test_b3_describes_a_span_made_here_not_the_callers(
    headers: dict[str, str], tracer: trace.Tracer
) -> None:
    """With a CLIENT span current, B3 carries that span's ids (as OpenTelemetry writes them:
    128-bit trace id), never the caller's parent id, which is not this span's parent."""
    p = Propagator()
    inbound = p.extract(get_all(headers))
    with (
        p.activated(inbound),
        tracer.start_as_current_span("client", kind=trace.SpanKind.CLIENT) as client,
    ):
        out = dict(p.outbound(has_none))
    client_span = f"{client.get_span_context().span_id:016x}"
    padded = "0000000000000000a3ce929d0e0e4736"
    if "b3" in headers:
        assert out["b3"] == f"{padded}-{client_span}-1"
    else:
        assert (out["x-b3-traceid"], out["x-b3-spanid"]) == (padded, client_span)
        assert "x-b3-parentspanid" not in out


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            {
                "x-b3-traceid": "a3ce929d0e0e4736",
                "x-b3-spanid": B3_SPAN_ID,
                "x-b3-parentspanid": B3_PARENT_ID,
            },
            {
                "x-b3-traceid": "a3ce929d0e0e4736",
                "x-b3-spanid": B3_SPAN_ID,
                "x-b3-parentspanid": B3_PARENT_ID,
                "x-b3-sampled": "1",
            },
            id="multi",
        ),
        pytest.param(
            {"b3": f"a3ce929d0e0e4736-{B3_SPAN_ID}"},
            {"b3": f"a3ce929d0e0e4736-{B3_SPAN_ID}-1"},
            id="single",
        ),
    ],
)
def test_b3_goes_on_as_received_after_a_decision_made_here(
    headers: dict[str, str], expected: dict[str, str]
) -> None:
    """A deferred decision made at this hop without a span of its own (`decided`, as the
    tracing module does when it reports no SERVER span) keeps the caller's ids: B3 goes on
    as received, with the decision."""
    p = Propagator()
    inbound = p.extract(get_all(headers))
    assert inbound.sampled is None
    decided = propagation.decided(inbound.otel_context, lambda trace_id: True)
    out = outbound(p, inbound._replace(otel_context=decided))
    assert out.items() >= expected.items()


def test_b3_goes_on_with_the_ids_of_a_traceparent_that_won() -> None:
    """A valid traceparent with other ids wins: B3 carries its ids, and not the B3 caller's
    parent id (no parent of that span)."""
    p = Propagator()
    inbound = p.extract(
        get_all(
            {
                "traceparent": TRACEPARENT,
                "x-b3-traceid": "a3ce929d0e0e4736",
                "x-b3-spanid": B3_SPAN_ID,
                "x-b3-parentspanid": B3_PARENT_ID,
                "b3": f"a3ce929d0e0e4736-{B3_SPAN_ID}-1-{B3_PARENT_ID}",
            }
        )
    )
    out = outbound(p, inbound)
    assert (out["x-b3-traceid"], out["x-b3-spanid"]) == (TRACE_ID, SPAN_ID)
    assert "x-b3-parentspanid" not in out
    assert out["b3"] == f"{TRACE_ID}-{SPAN_ID}-1"


def test_b3_with_the_traceparents_ids_goes_on_as_received() -> None:
    """A caller sending both formats for one span (the same ids): B3 still goes on as
    received, its parent id included."""
    p = Propagator()
    inbound = p.extract(
        get_all(
            {
                "traceparent": TRACEPARENT,
                "x-b3-traceid": TRACE_ID,
                "x-b3-spanid": SPAN_ID,
                "x-b3-parentspanid": B3_PARENT_ID,
                "x-b3-sampled": "1",
            }
        )
    )
    out = outbound(p, inbound)
    assert (out["x-b3-traceid"], out["x-b3-spanid"]) == (TRACE_ID, SPAN_ID)
    assert out["x-b3-parentspanid"] == B3_PARENT_ID


@pytest.mark.parametrize(
    "parent", ["zz", "05e3ac9a4f6e3b9", "0000000000000000", "", "05E3AC9A4F6E3B90"]
)
def test_a_malformed_b3_parent_id_is_dropped(parent: str) -> None:
    """A parent span id that is no 16 hex digits (or all zeros) is not sent on; the ids it
    came with still are. Upper-case hex is valid, and sent on in lower case as B3 spells it."""
    p = Propagator()
    headers = {"x-b3-traceid": B3_TRACE_ID, "x-b3-spanid": B3_SPAN_ID, "x-b3-parentspanid": parent}
    out = outbound(p, p.extract(get_all(headers)))
    assert (out["x-b3-traceid"], out["x-b3-spanid"]) == (B3_TRACE_ID, B3_SPAN_ID)
    if parent == "05E3AC9A4F6E3B90":
        assert out["x-b3-parentspanid"] == B3_PARENT_ID
    else:
        assert "x-b3-parentspanid" not in out


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        (f"{B3_TRACE_ID}-{B3_SPAN_ID}-d", True),
        (f"{B3_TRACE_ID}-{B3_SPAN_ID}-0", False),
        (f"{B3_TRACE_ID}-{B3_SPAN_ID}", None),
    ],
)
def test_b3_single_sampling_states(value: str, sampled: bool | None) -> None:
    """Single-header sampling field: `d` debug (sampled), `0` denied, absent deferred."""
    assert Propagator().extract(get_all({"b3": value})).sampled is sampled


@pytest.mark.parametrize(("value", "sampled"), [("0", False), ("1", True), ("d", True)])
def test_b3_decision_without_ids_is_passed_on(value: str, sampled: bool) -> None:
    """`b3: 0` carries only a sampling decision: no trace to join, the decision goes on."""
    p = Propagator()
    inbound = p.extract(get_all({"b3": value}))
    assert span_ids(inbound.otel_context) is None
    assert inbound.sampled is sampled
    out = outbound(p, inbound)
    assert out["b3"] == value  # `d` (debug) stays debug
    assert "traceparent" not in out


def test_b3_multi_debug_without_ids_is_passed_on() -> None:
    """X-B3-Flags: 1 alone is a debug decision without ids: it goes on as such."""
    p = Propagator()
    inbound = p.extract(get_all({"x-b3-flags": "1"}))
    assert inbound.sampled is True
    out = outbound(p, inbound)
    assert out["x-b3-flags"] == "1" and "x-b3-sampled" not in out


def test_b3_multi_decision_without_ids_is_passed_on() -> None:
    """X-B3-Sampled alone is the multi-header form of a decision-only request."""
    p = Propagator()
    inbound = p.extract(get_all({"x-b3-sampled": "0"}))
    assert inbound.sampled is False
    out = outbound(p, inbound)
    assert out["x-b3-sampled"] == "0"
    assert "x-b3-traceid" not in out


def test_valid_traceparent_wins_over_b3() -> None:
    """Both formats with different ids: the W3C ids are kept and sent in every format."""
    p = Propagator()
    inbound = p.extract(
        get_all(
            {
                "traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00",
                "x-b3-traceid": B3_TRACE_ID,
                "x-b3-spanid": B3_SPAN_ID,
                "x-b3-sampled": "1",
                "b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}-1",
            }
        )
    )
    assert span_ids(inbound.otel_context) == (TRACE_ID, SPAN_ID)
    assert inbound.sampled is False  # the decision of the traceparent that won
    assert inbound.formats == {TRACECONTEXT, B3_MULTI, B3_SINGLE}
    out = outbound(p, inbound)
    assert out["x-b3-traceid"] == TRACE_ID
    assert out["b3"] == f"{TRACE_ID}-{SPAN_ID}-0"


def test_b3_is_used_when_traceparent_is_malformed() -> None:
    """A broken traceparent next to valid B3: the B3 trace is joined."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": "00-zz", "b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}-1"}))
    assert span_ids(inbound.otel_context) == (B3_TRACE_ID, B3_SPAN_ID)
    assert inbound.sampled is True


def test_always_sent_formats_are_configurable() -> None:
    """`always=` adds formats sent whatever the caller used; an unknown name is an error."""
    p = Propagator(always=("tracecontext", "baggage", "b3multi"))
    out = outbound(p, p.extract(get_all({"traceparent": TRACEPARENT})))
    assert out["x-b3-traceid"] == TRACE_ID
    assert "b3" not in out
    with pytest.raises(ValueError, match="zipkin"):
        Propagator(always=("zipkin",))


# -- baggage -------------------------------------------------------------------------------


def test_baggage_round_trip() -> None:
    """W3C baggage is extracted into the OTel context and sent on, with or without a trace."""
    p = Propagator()
    inbound = p.extract(get_all({"baggage": "user=alice, tier=gold%20plus;ttl=3"}))
    assert baggage.get_all(inbound.otel_context) == {"user": "alice", "tier": "gold plus;ttl=3"}
    assert span_ids(inbound.otel_context) is None
    out = outbound(p, inbound)
    with p.activated(p.extract(get_all({"baggage": out["baggage"]}))):
        assert baggage.get_all() == {"user": "alice", "tier": "gold plus;ttl=3"}
    assert "traceparent" not in out


@pytest.mark.parametrize(
    "received",
    [
        pytest.param(["userId=alice,serverNode=DF%2028;p=1"], id="property-and-escape"),
        pytest.param(["a=1+2", "b=x%3By;k"], id="two-headers"),
        pytest.param(["k = v , bad entry, t=1"], id="spaces-and-an-invalid-member"),
    ],
)
def test_baggage_goes_on_as_received(received: list[str]) -> None:
    """Baggage the app left alone is sent on as received (several headers joined with `,`),
    not as OpenTelemetry's propagator re-encodes it (`DF+28%3Bp%3D1`,
    open-telemetry/opentelemetry-python#5566), with or without a trace."""
    p = Propagator()
    for headers in ({"baggage": received}, {"baggage": received, "traceparent": TRACEPARENT}):
        inbound = p.extract(get_all(headers))
        assert outbound(p, inbound)["baggage"] == ",".join(received)


@pytest.mark.parametrize("received", ["%%%", ",,,,", "k", "=,=,;;;"])
def test_baggage_with_no_valid_member_is_not_sent_on(received: str) -> None:
    """A baggage header nothing valid could be read from gives the app no baggage, and none is
    sent on: what goes out is what the context holds, byte for byte only when it is that."""
    p = Propagator()
    inbound = p.extract(get_all({"baggage": received, "traceparent": TRACEPARENT}))
    assert baggage.get_all(inbound.otel_context) == {}
    assert "baggage" not in outbound(p, inbound)


def test_all_baggage_headers_are_read() -> None:
    """Two baggage headers are one list: the app sees the entries of both."""
    p = Propagator()
    with p.activated(p.extract(get_all({"baggage": ["a=1", "b=2;p"]}))):
        assert baggage.get_all() == {"a": "1", "b": "2;p"}


def test_baggage_the_app_changed_is_injected() -> None:
    """Once the app changes the baggage (adds, changes or removes an entry), the propagator
    writes what the context holds; set back as it came, it goes on as received again."""
    p = Propagator()
    received = "user=alice,node=DF%2028;p=1"
    inbound = p.extract(get_all({"baggage": received, "traceparent": TRACEPARENT}))
    with p.activated(inbound):
        for ctx, expected in [
            (baggage.set_baggage("user", "bob"), "user=bob,node=DF+28%3Bp%3D1"),
            (baggage.remove_baggage("node"), "user=alice"),
            (baggage.set_baggage("user", "alice"), received),
        ]:
            token = otel_context.attach(ctx)
            try:
                assert dict(p.outbound(has_none))["baggage"] == expected
            finally:
                otel_context.detach(token)
        token = otel_context.attach(baggage.clear())
        try:
            assert "baggage" not in dict(p.outbound(has_none))
        finally:
            otel_context.detach(token)


def test_oversized_baggage_is_left_to_the_propagator() -> None:
    """Over W3C's 8192 bytes, the received value is not sent on as it is: the propagator
    decides (OpenTelemetry's drops a header that long)."""
    p = Propagator()
    long_value = ",".join(f"k{i}=" + "v" * 90 for i in range(90))
    assert len(long_value) > 8192
    assert "baggage" not in outbound(p, p.extract(get_all({"baggage": long_value})))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(["k=" + "v" * 70_000], id="one-header"),
        pytest.param(["k=" + "v" * 9_000, "a=1"], id="the-first-of-two"),
    ],
)
def test_oversized_baggage_is_dropped_without_logging_it(
    headers: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A baggage value over W3C's 8192 bytes is dropped, as OpenTelemetry's propagator drops
    it, but without the propagator's warning, which holds the whole header: a caller could
    otherwise have every request write 70 KB of its own to the log. The trace still joins."""
    p = Propagator()
    with caplog.at_level("DEBUG"):
        inbound = p.extract(get_all({"baggage": headers, "traceparent": TRACEPARENT}))
    assert baggage.get_all(inbound.otel_context) == {}
    assert span_ids(inbound.otel_context) == (TRACE_ID, SPAN_ID)
    assert "baggage" not in outbound(p, inbound)
    assert not [r for r in caplog.records if "vvvv" in r.getMessage()]


def test_baggage_set_by_the_app_goes_on() -> None:
    """Baggage the app adds to the current context while serving is sent too."""
    p = Propagator()
    with p.activated(p.extract(get_all({"traceparent": TRACEPARENT}))):
        token = otel_context.attach(baggage.set_baggage("k", "v"))
        try:
            out = dict(p.outbound(has_none))
        finally:
            otel_context.detach(token)
    assert out["baggage"] == "k=v"
    assert out["traceparent"] == TRACEPARENT


# -- no headers, first hop -----------------------------------------------------------------


def test_headerless_request_gets_new_ids() -> None:
    """No propagation headers: a new UUIDv4 request id, an empty context, no deadline."""
    p = Propagator()
    first = p.extract(get_all({}))
    second = p.extract(get_all({}))
    assert is_uuid4(first.request_id)
    assert first.request_id != second.request_id
    assert first.otel_context == otel_context.Context()
    assert first.headers == ()
    assert (first.deadline, first.sampled, first.formats) == (None, None, frozenset())
    assert outbound(p, first) == {"x-request-id": first.request_id}


def test_headerless_request_starts_a_new_trace(tracer: trace.Tracer) -> None:
    """With a tracer, the root span it starts for a header-less request is what goes on."""
    p = Propagator()
    inbound = p.extract(get_all({}))
    with p.activated(inbound), tracer.start_as_current_span("server") as span:
        out = dict(p.outbound(has_none))
    sc = span.get_span_context()
    assert out["traceparent"].split("-")[1:3] == [f"{sc.trace_id:032x}", f"{sc.span_id:016x}"]
    assert out["x-request-id"] == inbound.request_id


def test_first_hop_without_inbound_request() -> None:
    """Outside any served request (a job, a script) each call gets a fresh x-request-id."""
    p = Propagator(["end-user"])
    first, second = outbound(p, None), outbound(p, None)
    assert first.keys() == {"x-request-id"}
    assert is_uuid4(first["x-request-id"])
    assert first["x-request-id"] != second["x-request-id"]


def test_request_id_is_kept() -> None:
    """A sane incoming x-request-id travels unchanged (surrounding blanks stripped)."""
    p = Propagator()
    inbound = p.extract(get_all({"x-request-id": " 3e0f2b66-5e6a-9d2c-b1a4-0b3c8f1e2d77 "}))
    assert inbound.request_id == "3e0f2b66-5e6a-9d2c-b1a4-0b3c8f1e2d77"
    assert outbound(p, inbound)["x-request-id"] == inbound.request_id
    assert p.extract(get_all({"x-request-id": "r" * 128})).request_id == "r" * 128


# -- malformed input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"00-{'0' * 32}-{SPAN_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE_ID}-{SPAN_ID}-01",  # forbidden version
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",  # uppercase hex
        f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 has no more fields
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID}-0",
        "00-" + "a" * 600,
        f"00-{TRACE_ID}-{SPAN_ID}-0\uff11",  # a full-width digit one
        "\x00\r\n",
    ],
)
def test_malformed_traceparent_starts_a_new_trace(value: str) -> None:
    """An invalid traceparent is ignored: empty context, no traceparent sent without a tracer."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": value, "tracestate": "a=b"}))
    assert span_ids(inbound.otel_context) is None
    assert inbound.sampled is None
    assert "traceparent" not in outbound(p, inbound)


def test_malformed_tracestate_is_dropped() -> None:
    """A bad tracestate loses only the tracestate; the valid traceparent still joins the trace."""
    p = Propagator()
    inbound = p.extract(get_all({"traceparent": TRACEPARENT, "tracestate": "bad key=!,,=="}))
    assert span_ids(inbound.otel_context) == (TRACE_ID, SPAN_ID)
    out = outbound(p, inbound)
    assert out["traceparent"] == TRACEPARENT
    assert "tracestate" not in out


@pytest.mark.parametrize(
    "headers",
    [
        {"b3": "xyz"},
        {"b3": "abc-def"},
        {"b3": f"{B3_TRACE_ID}-{'0' * 16}-1"},
        {"b3": f"{B3_TRACE_ID[:-2]}zz-{B3_SPAN_ID}-1"},
        {"b3": "\u0661" * 16 + "-" + "\u0662" * 16 + "-1"},  # Arabic-Indic: `\\d`, not hex
        {"b3": "-" * 10},
        {"x-b3-traceid": B3_TRACE_ID},  # no span id
        {"x-b3-traceid": "x" * 32, "x-b3-spanid": B3_SPAN_ID},
        {"x-b3-traceid": B3_TRACE_ID, "x-b3-spanid": B3_SPAN_ID[:-1]},
        {"x-b3-traceid": B3_TRACE_ID * 2, "x-b3-spanid": B3_SPAN_ID},
        # A sampling flag sent with malformed ids is no decision without ids (`b3: 1`).
        {"b3": "nothex-zz-1"},
        {"b3": "nothex-zz-d"},
        {"b3": f"{B3_TRACE_ID}-zz-0-{B3_SPAN_ID}"},
        {"x-b3-traceid": "not-hex", "x-b3-spanid": "zz", "x-b3-sampled": "1"},
        {"x-b3-traceid": "not-hex", "x-b3-spanid": "zz", "x-b3-flags": "1"},
        {"x-b3-traceid": B3_TRACE_ID, "x-b3-sampled": "0"},  # no span id
        {"x-b3-spanid": B3_SPAN_ID, "x-b3-sampled": "true"},  # no trace id
    ],
)
def test_malformed_b3_starts_a_new_trace(headers: dict[str, str]) -> None:
    """Invalid B3 ids are ignored, never raised; the context stays empty, and so does the
    sampling decision: a flag sent with them is ignored too (the new trace is sampled at this
    hop's percentage), and no B3 header goes on."""
    p = Propagator()
    inbound = p.extract(get_all(headers))
    assert span_ids(inbound.otel_context) is None
    assert inbound.sampled is None
    assert inbound.otel_context.get(propagation.CALLER_DECISION) is None
    out = outbound(p, inbound)
    assert "traceparent" not in out
    assert not {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"} & out.keys()


@pytest.mark.parametrize(
    "value", ["", "   ", "a" * 129, "has space", "tab\there", "caf\u00e9", "nul\x00", "\r\n"]
)
def test_malformed_request_id_is_replaced(value: str) -> None:
    """An empty, overlong or non-visible-ASCII x-request-id is replaced by a new UUIDv4."""
    inbound = Propagator().extract(get_all({"x-request-id": value}))
    assert is_uuid4(inbound.request_id)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-envoy-expected-rq-timeout-ms": "0"},  # zero: no timeout, as Envoy reads it
        {"x-envoy-expected-rq-timeout-ms": "-5"},
        {"x-envoy-expected-rq-timeout-ms": "1.5"},
        {"x-envoy-expected-rq-timeout-ms": "soon"},
        {"x-envoy-expected-rq-timeout-ms": ""},
        {"x-envoy-expected-rq-timeout-ms": "9" * 5000},  # past int()'s digit limit
        {"x-envoy-expected-rq-timeout-ms": "\u0661\u0662\u0663"},
        {"grpc-timeout": "1"},  # no unit
        {"grpc-timeout": "1s"},  # units are H M S m u n
        {"grpc-timeout": "123456789S"},  # more than 8 digits
        {"grpc-timeout": "0m"},
        {"grpc-timeout": "-1S"},
    ],
)
def test_malformed_timeout_means_no_deadline(headers: dict[str, str]) -> None:
    """A timeout header that does not parse (or says 0) gives no deadline, never an error."""
    p = Propagator()
    inbound = p.extract(get_all(headers))
    assert inbound.deadline is None
    assert "x-envoy-expected-rq-timeout-ms" not in outbound(p, inbound)


def test_failing_callables_never_raise() -> None:
    """Even a broken adapter callable does not fail the request: a fresh context, no headers."""
    p = Propagator(["end-user"])

    def broken(name: str) -> list[str]:
        raise RuntimeError("adapter bug")

    def broken_has(name: str) -> bool:
        raise RuntimeError("adapter bug")

    inbound = p.extract(broken)
    assert is_uuid4(inbound.request_id)
    assert p.outbound(broken_has) == []


TRACE_NAMES = [
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
    "x-envoy-expected-rq-timeout-ms",
    "grpc-timeout",
    "end-user",
    "cookie",
]
near_valid = st.one_of(
    st.text(),
    st.from_regex(r"[0-9a-fA-F\-]{0,80}", fullmatch=True),
    st.from_regex(r"0[0-9a-f]-[0-9a-f]{30,34}-[0-9a-f]{14,18}-[0-9a-f]{1,3}.{0,4}", fullmatch=True),
    st.from_regex(r"[0-9]{0,14}[HMSmun ]?", fullmatch=True),
    st.from_regex(r"([a-z0-9%=;, \t]{0,10}){0,4}", fullmatch=True),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(
        st.sampled_from(TRACE_NAMES), st.lists(near_valid, min_size=1, max_size=3), max_size=8
    ),
    app_has=st.sets(st.sampled_from(TRACE_NAMES)),
)
def test_arbitrary_header_values_never_raise(
    headers: dict[str, list[str]], app_has: set[str]
) -> None:
    """Property: any values in any propagation header extract, activate and inject cleanly,
    and everything sent on is a single-line string."""
    p = Propagator(["end-user", "cookie"])
    inbound = p.extract(get_all(headers))
    assert _SANE(inbound.request_id)

    def run() -> list[tuple[str, str]]:
        with p.activated(inbound):
            return p.outbound(app_has.__contains__)

    out = contextvars.copy_context().run(run)
    for name, value in out:
        assert name not in app_has
        assert isinstance(value, str)
        assert not any((c < " " and c != "\t") or c == "\x7f" for c in value), value


def _SANE(request_id: str) -> bool:
    return 0 < len(request_id) <= 128 and all("\x21" <= c <= "\x7e" for c in request_id)


# -- app headers ---------------------------------------------------------------------------


def test_app_headers_are_propagated() -> None:
    """The configured headers present inbound go out; names are matched case-insensitively."""
    p = Propagator(["End-User", "x-user-group", "x-absent"])
    assert p.propagate_headers == ("end-user", "x-user-group", "x-absent")
    inbound = p.extract(get_all({"END-USER": "jason", "x-user-group": "beta", "other": "no"}))
    assert inbound.headers == (("end-user", "jason"), ("x-user-group", "beta"))
    out = outbound(p, inbound)
    assert (out["end-user"], out["x-user-group"]) == ("jason", "beta")
    assert "x-absent" not in out
    assert "other" not in out


def test_app_headers_set_by_the_app_are_not_overridden() -> None:
    """A header the app already put on the outbound request is left as the app set it."""
    p = Propagator(["end-user", "x-user-group"])
    inbound = p.extract(get_all({"end-user": "jason", "x-user-group": "beta"}))
    out = outbound(p, inbound, has_of("end-user"))
    assert "end-user" not in out
    assert out["x-user-group"] == "beta"


def test_trace_request_id_and_deadline_set_by_the_app_are_not_overridden() -> None:
    """The app's own trace headers (a whole format), x-request-id and budget win."""
    p = Propagator()
    inbound = p.extract(
        get_all(
            {
                "traceparent": TRACEPARENT,
                "b3": f"{TRACE_ID}-{SPAN_ID}-1",
                "x-b3-traceid": TRACE_ID,
                "x-b3-spanid": SPAN_ID,
                "x-envoy-expected-rq-timeout-ms": "5000",
            }
        )
    )
    out = outbound(
        p,
        inbound,
        has_of("tracestate", "x-b3-sampled", "x-request-id", "x-envoy-expected-rq-timeout-ms"),
    )
    assert out.keys() == {"b3"}


def test_repeated_app_header_values_are_joined_and_unsafe_ones_dropped() -> None:
    """Repeated values go out once, joined (cookies with "; "); values holding a control
    character but a tab are dropped (CR or LF would split the outbound request, and the
    transport refuses the others: the call would fail)."""
    p = Propagator(["x-user-group", "cookie", "x-evil", "x-escape", "x-tabbed"])
    inbound = p.extract(
        get_all(
            {
                "x-user-group": ["a", "b\r\nx-injected: 1", "c", "d\x7f"],
                "cookie": ["s=1", "t=2"],
                "x-evil": ["\n"],
                "x-escape": ["\x1b[31mred"],
                "x-tabbed": ["a\tb"],
            }
        )
    )
    assert dict(inbound.headers) == {
        "x-user-group": "a,c",
        "cookie": "s=1; t=2",
        "x-tabbed": "a\tb",
    }


def test_format_headers_in_propagate_headers_are_ignored() -> None:
    """Listing a trace, request-id or timeout header as an app header does not send it twice."""
    p = Propagator(["traceparent", "X-Request-Id", "b3", "grpc-timeout", "end-user", "end-user"])
    assert p.propagate_headers == ("end-user",)


# -- deadline ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "budget"),
    [
        ({"x-envoy-expected-rq-timeout-ms": "1500"}, 1.5),
        ({"grpc-timeout": "2S"}, 2.0),
        ({"grpc-timeout": "250m"}, 0.25),
        ({"grpc-timeout": "1M"}, 60.0),
        ({"grpc-timeout": "1H"}, 3600.0),
        ({"grpc-timeout": "300000u"}, 0.3),
        ({"grpc-timeout": "40000000n"}, 0.04),
        ({"x-envoy-expected-rq-timeout-ms": "800", "grpc-timeout": "1S"}, 0.8),
        ({"x-envoy-expected-rq-timeout-ms": "3000", "grpc-timeout": "1S"}, 1.0),
    ],
)
def test_deadline_from_headers(headers: dict[str, str], budget: float) -> None:
    """The caller's budget becomes an absolute monotonic deadline; the smaller header wins."""
    before = time.monotonic()
    deadline = Propagator().extract(get_all({**headers, "x-meshlib-peer-metadata": "w=a"})).deadline
    assert deadline is not None
    assert before + budget - 1e-9 <= deadline <= time.monotonic() + budget + 1e-9


MESHED = {"x-meshlib-peer-metadata": "w=productpage-v1"}  # a caller in the mesh


def test_deadline_round_trip() -> None:
    """Activated, the deadline clamps the data plane's timeouts and goes out as what is left."""
    p = Propagator()
    inbound = p.extract(get_all({"x-envoy-expected-rq-timeout-ms": "1500", **MESHED}))
    with p.activated(inbound):
        assert inbound_deadline.get() == inbound.deadline
        assert Deadline.after(10.0).at == inbound.deadline  # a longer route timeout is clamped
        time.sleep(0.02)
        sent = int(dict(p.outbound(has_none))["x-envoy-expected-rq-timeout-ms"])
    assert 1000 < sent <= 1480
    again = p.extract(get_all({"x-envoy-expected-rq-timeout-ms": str(sent), **MESHED}))
    assert again.deadline is not None and inbound.deadline is not None
    assert again.deadline <= inbound.deadline + 0.001


def test_expired_deadline_is_sent_as_one_millisecond() -> None:
    """Past the deadline the callee still gets a budget (1 ms), never 0 (which means none)."""
    p = Propagator()
    inbound = InboundContext("rid", (), otel_context.Context(), time.monotonic() - 5, None)
    assert outbound(p, inbound)["x-envoy-expected-rq-timeout-ms"] == "1"


# -- activation ----------------------------------------------------------------------------


def test_activate_sets_and_deactivate_restores_everything() -> None:
    """activate sets `current`, the OTel context and `inbound_deadline`; deactivate undoes all."""
    p = Propagator()
    inbound = p.extract(
        get_all({"traceparent": TRACEPARENT, "x-envoy-expected-rq-timeout-ms": "100"})
    )
    token = p.activate(inbound)
    assert current.get() is inbound
    assert span_ids(otel_context.get_current()) == (TRACE_ID, SPAN_ID)
    assert inbound_deadline.get() == inbound.deadline
    p.deactivate(token)
    assert current.get() is None
    assert span_ids(otel_context.get_current()) is None
    assert inbound_deadline.get() is None


def test_nested_activations_unwind_in_order() -> None:
    """An inner activation (e.g. a second middleware) restores the outer one on exit; the
    outer trace stays current inside, as any span already current does."""
    p = Propagator()
    outer = p.extract(get_all({"traceparent": TRACEPARENT, "grpc-timeout": "5S"}))
    inner = p.extract(get_all({"b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}-1"}))
    with p.activated(outer):
        with p.activated(inner):
            assert current.get() is inner
            assert inbound_deadline.get() is None
            assert span_ids(otel_context.get_current()) == (TRACE_ID, SPAN_ID)
        assert current.get() is outer
        assert inbound_deadline.get() == outer.deadline
        assert span_ids(otel_context.get_current()) == (TRACE_ID, SPAN_ID)
    inner_alone = p.extract(get_all({"b3": f"{B3_TRACE_ID}-{B3_SPAN_ID}-1"}))
    with p.activated(inner_alone):
        assert span_ids(otel_context.get_current()) == (B3_TRACE_ID, B3_SPAN_ID)


def test_span_current_before_activation_is_kept(tracer: trace.Tracer) -> None:
    """OpenTelemetry's own server instrumentation outside meshlib already made the SERVER
    span (a child of the caller): activation keeps it current, so it is the parent sent on."""
    p = Propagator()
    headers = {"traceparent": TRACEPARENT, "end-user": "jason"}
    outer_ctx = Propagator().extract(get_all(headers)).otel_context
    with tracer.start_as_current_span("outer server", context=outer_ctx) as server:
        with p.activated(p.extract(get_all(headers))):
            out = dict(p.outbound(has_none))
        assert trace.get_current_span() is server
    assert out["traceparent"] == f"00-{TRACE_ID}-{server.get_span_context().span_id:016x}-01"


def test_deactivate_out_of_order_does_not_raise() -> None:
    """Misuse (deactivating the outer token first) is logged, not raised."""
    p = Propagator()
    ctx = contextvars.copy_context()

    def misuse() -> None:
        first = p.activate(p.extract(get_all({})))
        p.activate(p.extract(get_all({})))
        p.deactivate(first)
        p.deactivate(first)

    ctx.run(misuse)


def test_current_is_the_module_contextvar() -> None:
    """`current` is the one ContextVar clients read; its default is None."""
    assert propagation.current is current
    assert contextvars.Context().run(current.get) is None


_HEX = "0123456789abcdef"
_traceparents = st.one_of(
    st.builds(
        lambda v, t, s, f, rest: f"{v}-{t}-{s}-{f}{rest}",
        st.sampled_from(["00", "01", "cc", "ff", "0g", "0"]),
        st.one_of(st.text(_HEX, min_size=32, max_size=32), st.text(_HEX + "A-", max_size=33)),
        st.one_of(st.text(_HEX, min_size=16, max_size=16), st.just("0" * 16)),
        st.one_of(st.text(_HEX, min_size=2, max_size=2), st.text(_HEX + "Z", max_size=3)),
        st.sampled_from(["", "-", "-x", "-00", " ", "\t", "\n"]),
    ),
    st.text(max_size=80),
    # past OpenTelemetry's 512-character limit: padding, or a long tail after the flags
    st.builds(lambda n: " " * n + TRACEPARENT, st.integers(400, 700)),
    st.builds(lambda n: f"01-{TRACE_ID}-{SPAN_ID}-01-" + "x" * n, st.integers(400, 700)),
    # canonical ones, the fast path's own input
    st.builds(
        lambda t, s, f: f"00-{t}-{s}-{f}",
        st.text(_HEX, min_size=32, max_size=32),
        st.text(_HEX, min_size=16, max_size=16),
        st.sampled_from(["00", "01", "ff", "03"]),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    value=_traceparents,
    state=st.one_of(
        st.none(),
        st.sampled_from(["", "a=b", "congo=t61rcWkgMzE,rojo=00f067", "bad key=!"]),
        # long ones: past meshlib's short-cut (512), and past OpenTelemetry's limit (8192)
        st.builds(
            lambda n, size: ",".join(f"k{i}={'v' * size}" for i in range(n)),
            st.integers(1, 32),
            st.sampled_from([10, 100, 256]),
        ),
    ),
)
def test_w3c_fast_path_reads_as_opentelemetry_does(value: str, state: str | None) -> None:
    """meshlib reads a W3C-only request itself (for speed); it must agree with OpenTelemetry's
    TraceContextTextMapPropagator on every input: ids, flags, tracestate, or nothing."""
    headers = (
        {"traceparent": value} if state is None else {"traceparent": value, "tracestate": state}
    )
    ours = trace.get_current_span(Propagator().extract(get_all(headers)).otel_context)
    carrier = {k: v for k, v in headers.items() if v.isascii()}
    theirs = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier))
    assert ours.get_span_context() == theirs.get_span_context()
    assert ours.get_span_context().trace_state == theirs.get_span_context().trace_state


def test_new_request_ids_are_distinct_uuid4_strings() -> None:
    ids = [propagation.new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_request_ids_do_not_follow_the_apps_random_seed() -> None:
    import random

    random.seed(7)
    first = propagation.new_request_id()
    random.seed(7)
    assert propagation.new_request_id() != first


def test_deactivating_twice_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A second deactivate of the same activation is a no-op (no second OTel detach)."""
    p = Propagator()
    ctx = contextvars.copy_context()

    def twice() -> None:
        activation = p.activate(p.extract(get_all({"traceparent": TRACEPARENT})))
        p.deactivate(activation)
        p.deactivate(activation)
        assert current.get() is None
        assert span_ids(otel_context.get_current()) is None

    with caplog.at_level("DEBUG"):
        ctx.run(twice)
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_baggage_headers_too_long_together_keep_the_first() -> None:
    """Several baggage headers whose sum passes W3C's 8,192 bytes (the propagator would drop
    the joined value whole): the first header goes on, as before they were joined."""
    p = Propagator()
    first = ",".join(f"a{i}=v" for i in range(700))  # ~4.5 KB each
    second = ",".join(f"b{i}=v" for i in range(700))
    inbound = p.extract(lambda name: [first, second] if name == "baggage" else None)
    assert outbound(p, inbound)["baggage"] == first


def test_an_envoy_budget_is_taken_from_mesh_callers_only() -> None:
    """x-envoy-expected-rq-timeout-ms from a caller outside the mesh (no metadata-exchange
    header) is ignored, as Envoy ignores x-envoy-* from untrusted callers: it cannot shrink
    the app's calls. grpc-timeout is gRPC's own deadline, honoured from any caller."""
    p = Propagator()
    assert p.extract(get_all({"x-envoy-expected-rq-timeout-ms": "1"})).deadline is None
    assert p.extract(get_all({"x-envoy-expected-rq-timeout-ms": "1", **MESHED})).deadline
    assert p.extract(get_all({"grpc-timeout": "1n"})).deadline is not None
