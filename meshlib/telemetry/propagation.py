"""Context propagation: what an inbound request carries on to the calls made while serving it.

With a sidecar, the app still has to copy trace headers from its inbound request to its
outbound ones (Istio's documented duty). meshlib does it for the app:

1. The inbound middleware calls `Propagator.extract(get_all)` once per request: trace
   context and baggage through the OpenTelemetry propagators (W3C `traceparent`/`tracestate`,
   W3C `baggage`, B3 multi-header and single `b3`), `x-request-id` (kept when sane, else a new
   UUIDv4 — Envoy generates one at the first hop), the app headers named in
   `MeshConfig.propagate_headers` (e.g. `end-user`, so header routing holds down the whole
   call chain), and the caller's remaining time budget (`x-envoy-expected-rq-timeout-ms`, or
   `grpc-timeout`) as an absolute deadline.
2. It then calls `Propagator.activate(inbound)`: the `InboundContext` goes into the
   `current` ContextVar, its OpenTelemetry context is attached (so spans started while serving
   the request are its children), and its deadline goes into
   `meshlib.dataplane.deadline.inbound_deadline` (which clamps every outbound timeout).
3. Each meshed client calls `Propagator.outbound(has)` for the headers to add to the request
   it is about to send.

Everything lives in `contextvars`, so it follows the request into tasks it spawns, into
`asyncio.to_thread` and Starlette's threadpool, and — with `meshlib.telemetry.threads` — into
`ThreadPoolExecutor`, `loop.run_in_executor` and `threading.Thread`.

Rules chosen (what a user of Istio would expect):

- **Formats injected.** W3C trace context is always sent (it is OpenTelemetry's and Istio's
  current default), and `baggage` whenever the context holds baggage. B3 multi-header is
  added when the inbound request carried any `x-b3-*` header, single `b3` when it carried
  `b3`: a service answers its callers' dialect to its callees, as Envoy does. The formats sent
  always can be changed (`Propagator(always=...)`, names as in `OTEL_PROPAGATORS`:
  `tracecontext`, `baggage`, `b3multi`, `b3`); a `Mesh` takes them from
  `MeshConfig.propagators` (`OTEL_PROPAGATORS`, or `MESHLIB_PROPAGATORS`).
- **Which trace wins.** When an inbound request carries both W3C and B3 ids, a valid
  `traceparent` wins (the W3C propagator runs last in the composite): meshlib never rewrites
  a valid incoming `traceparent` trace id.
- **An outer span stays.** `activate` attaches the extracted context only when no valid span
  is current: when OpenTelemetry's own ASGI/WSGI instrumentation runs outside meshlib, its
  SERVER span (already a child of the caller) stays current, and so does a span the
  tracing module started before activation.
- **What is injected** is the *current* OpenTelemetry context at the time of the call: the
  caller's span when no tracer runs (headers pass through unchanged), the client span when
  the tracing module started one. While the caller's span is current, B3 goes on in the form
  received (see `_b3`): OpenTelemetry's B3 propagator drops the parent span id and pads a
  64-bit trace id to 128 bits. No trace is invented without a tracer; a request with no
  or malformed trace headers starts a new trace at the tracing module's root span. A B3
  sampling decision without ids (`b3: 0`, `x-b3-sampled: 0`) is passed on as such.
- **B3 sampling states.** A B3 caller that sent ids without a decision (no `x-b3-sampled`, or
  `b3: {trace}-{span}`) deferred it to this hop: the extracted context holds the caller's span
  as unsampled, marked deferred (`B3_SAMPLING_KEY`). The tracing module decides it at the
  mesh's sampling percentage (`decided`); with no tracer the decision goes on still deferred
  (B3 headers without a sampled flag). A debug caller (`x-b3-flags: 1`, `b3: ...-d`) is
  sampled, and passed on as debug (`x-b3-flags: 1`, `-d`), not as `x-b3-sampled: 1`.
- **Baggage goes on as it came.** OpenTelemetry's W3C baggage propagator re-encodes what it
  injects (properties and `+` come out changed), so while the app has not changed the baggage
  since it was extracted, the `baggage` value received (several joined with `,`) is sent on
  unchanged, up to W3C's 8192 bytes; baggage the app changed is injected by the propagator.
- **The app wins.** A header the app set itself is never overridden: a trace format is
  skipped whole when the app set any of its headers (`traceparent`/`tracestate`, any
  `x-b3-*`, `b3`, `baggage`); likewise `x-request-id`, each propagated app header and
  `x-envoy-expected-rq-timeout-ms` (a tighter budget set by the data plane stays).
- **Deadline.** `x-envoy-expected-rq-timeout-ms` is an integer of milliseconds, taken only from
  a caller that sent `x-meshlib-peer-metadata` (a mesh workload: Envoy honours `x-envoy-*` from
  trusted callers only), `grpc-timeout` gRPC's `1*8DIGIT unit`, from any caller (gRPC's own
  deadline); when both arrive the smaller wins, and 0 means no deadline (Envoy
  reads a zero timeout as infinite). Outbound, the remaining time is sent in whole
  milliseconds, at least 1 (0 would read as "no deadline").
- **Malformed input is ignored, never raised:** invalid `traceparent` or B3 ids leave the
  context empty (a new trace starts), and a B3 sampling flag sent with invalid ids is ignored
  with them (only one sent without ids is a decision); an invalid `x-request-id` (empty, over
  128 characters, anything but visible ASCII) is replaced by a new UUIDv4, an invalid timeout
  means no deadline, and an app header value holding a control character (CR, LF, NUL ...; a
  tab is fine) is dropped. Repeated values of an app header are joined with "," ("; " for
  `cookie`), so each name is sent once, as a WSGI server joins them; a repeated
  `x-request-id` or timeout header is read as the comma-joined list (`_single`).
- Names in `propagate_headers` that a format already handles (trace, request-id and timeout
  headers) are ignored there.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

from opentelemetry import baggage as baggage_api
from opentelemetry import context as otel_context_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context, create_key
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import Getter, TextMapPropagator, default_setter
from opentelemetry.trace import get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshlib.dataplane.deadline import inbound_deadline
from meshlib.telemetry._b3 import (
    _RECEIVED_B3,
    _inject_b3_multi,
    _inject_b3_single,
    _received_b3,
    _sampled,
)
from meshlib.telemetry._caller_trace import (
    B3_DEBUG,
    B3_DEFERRED,
    B3_SAMPLING_KEY,
    CALLER_DECISION,
    SPAN_KEY,
    CallerSpan,
    _caller_span,
    _with_decision,
    decided,
)
from meshlib.telemetry._request_context import (
    _NO_FORMATS,
    _OTEL_VAR,
    Activation,
    InboundContext,
    _otel_attach,
    _otel_current,
    _reset,
    current,
)
from meshlib.telemetry.log_limit import limit_caller_warnings
from meshlib.telemetry.peer import HEADER as PEER_HEADER
from meshlib.telemetry.peer import ISTIO_HEADER as ISTIO_PEER_HEADER

# The request context (`InboundContext`, `current`, `Activation`) and the caller's trace
# (`CallerSpan`, `SPAN_KEY`, the B3 sampling states, `decided`) live in modules of their own
# (`_request_context`, `_caller_trace`); they are named here too, as what `extract` gives
# and `activate` sets.
__all__ = [
    "B3_DEBUG",
    "B3_DEFERRED",
    "B3_MULTI",
    "B3_SAMPLING_KEY",
    "B3_SINGLE",
    "BAGGAGE",
    "SPAN_KEY",
    "TRACECONTEXT",
    "Activation",
    "CallerSpan",
    "InboundContext",
    "Propagator",
    "current",
    "decided",
    "new_request_id",
]

logger = logging.getLogger(__name__)

# Format names, as OpenTelemetry's OTEL_PROPAGATORS spells them.
TRACECONTEXT = "tracecontext"
BAGGAGE = "baggage"
B3_MULTI = "b3multi"
B3_SINGLE = "b3"
_FORMATS = frozenset((TRACECONTEXT, BAGGAGE, B3_MULTI, B3_SINGLE))

REQUEST_ID = "x-request-id"
EXPECTED_TIMEOUT = "x-envoy-expected-rq-timeout-ms"
GRPC_TIMEOUT = "grpc-timeout"

_W3C_FIELDS = ("traceparent", "tracestate")
_B3_MULTI_FIELDS = ("x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags")
_B3_MULTI_ALL = (*_B3_MULTI_FIELDS, "x-b3-parentspanid")
# The headers the OpenTelemetry propagators read, and the B3 parent id (sent on as received);
# looked up once per inbound request.
_TRACE_FIELDS = (*_W3C_FIELDS, "baggage", "b3", *_B3_MULTI_ALL)
_TRACE_SET = frozenset(_TRACE_FIELDS)
_TIMEOUTS = frozenset((EXPECTED_TIMEOUT, GRPC_TIMEOUT))
_RESERVED = frozenset((*_TRACE_FIELDS, REQUEST_ID, EXPECTED_TIMEOUT, GRPC_TIMEOUT))

_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # not to be sent in a value (a tab may)
_EXPECTED_MS = re.compile(r"[ \t]*([0-9]{1,12})[ \t]*")
_GRPC_TIMEOUT = re.compile(r"[ \t]*([0-9]{1,8})([HMSmun])[ \t]*")
_MAX_BUDGET = 30 * 86400.0  # seconds: a caller's deadline further away is taken as 30 days
_GRPC_UNIT = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}

_RECEIVED_BAGGAGE = create_key("meshlib-received-baggage")
"""Where an extracted Context keeps the `baggage` it came with (a `_Received`)."""
_MAX_BAGGAGE = 8192  # W3C Baggage: the most bytes a baggage-string may hold


class _Received(NamedTuple):
    """The baggage a request came with: the header value, and what was extracted from it."""

    value: str
    extracted: Mapping[str, object]


_Inject = Callable[[dict[str, str], Context], None]
HeaderLookup = Callable[[str], "list[str] | None"]
"""`lookup(name)`: the values received for header `name` (lowercase); [] or None if absent."""

_EMPTY_CONTEXT = Context()
_new_tuple = tuple.__new__


class _ListGetter(Getter[Mapping[str, list[str]]]):
    """Reads the per-request carrier: header name -> the values received (no copies)."""

    def get(self, carrier: Mapping[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key)

    def keys(self, carrier: Mapping[str, list[str]]) -> list[str]:
        return list(carrier)


_GETTER = _ListGetter()


class Propagator:
    """Extracts an InboundContext from request headers; gives outbound calls their headers.

    Build one per Mesh (it is immutable and thread-safe) and share it between the middleware
    and the clients.
    """

    __slots__ = (
        "_always",
        "_app_headers",
        "_extractors",
        "_injectors",
        "_uncommon",
        "inbound_headers",
    )

    def __init__(
        self,
        propagate_headers: Sequence[str] = (),
        *,
        always: Iterable[str] = (TRACECONTEXT, BAGGAGE),
    ) -> None:
        names: list[str] = []
        for name in propagate_headers:
            low = name.strip().lower()
            if low and low not in _RESERVED and low not in names:
                names.append(low)
        self._app_headers = tuple(names)
        self._always = frozenset(always)
        unknown = self._always - _FORMATS
        if unknown:
            raise ValueError(
                f"unknown propagation format(s) {sorted(unknown)} (known: {sorted(_FORMATS)})"
            )
        w3c = TraceContextTextMapPropagator()
        baggage = W3CBaggagePropagator()
        limit_caller_warnings()  # its warnings quote what callers send
        b3_multi = B3MultiFormat()
        b3_single = B3SingleFormat()
        # Later extractors override earlier ones: B3 first, so a valid traceparent wins. Only
        # those whose headers arrived run (what a CompositePropagator of all four would give).
        self._extractors: tuple[tuple[TextMapPropagator, tuple[str, ...]], ...] = (
            (b3_multi, _B3_MULTI_FIELDS),
            (b3_single, ("b3",)),
            (w3c, _W3C_FIELDS),
            (baggage, ("baggage",)),
        )
        self.inbound_headers: frozenset[str] = frozenset(
            (*_TRACE_FIELDS, REQUEST_ID, EXPECTED_TIMEOUT, GRPC_TIMEOUT, *self._app_headers)
        )
        """Every header `extract` reads (lowercase): an adapter need collect no others."""
        # What a request needs to be read by extract's general path.
        self._uncommon = self.inbound_headers - {"traceparent", REQUEST_ID}
        # (format, inject(carrier, context), the headers it writes, needs a valid span to
        # write anything)
        self._injectors: tuple[tuple[str, _Inject, tuple[str, ...], bool], ...] = (
            (TRACECONTEXT, w3c.inject, _W3C_FIELDS, True),
            (BAGGAGE, partial(_inject_baggage, baggage), ("baggage",), False),
            (B3_MULTI, partial(_inject_b3_multi, b3_multi), _B3_MULTI_ALL, True),
            (B3_SINGLE, partial(_inject_b3_single, b3_single), ("b3",), True),
        )

    @property
    def propagate_headers(self) -> tuple[str, ...]:
        """The app headers carried on (lowercase, without the ones a format handles)."""
        return self._app_headers

    # -- inbound ------------------------------------------------------------------------

    def extract(
        self, get_all: HeaderLookup, present: Collection[str] | None = None
    ) -> InboundContext:
        """Read the inbound request's propagation headers; never raises.

        `get_all(name)` returns the values of the header `name` (given lowercase), [] or None
        when absent — e.g. the `get` of a dict of the request's headers. `present`, when the
        caller knows it, holds the name of every header `get_all` has (e.g. that dict's keys):
        the others are not looked up.
        """
        try:
            return self._extract(get_all, present)
        except Exception:  # a bug here must never fail the request being served
            logger.warning("meshlib: could not read propagation headers", exc_info=True)
            return InboundContext(new_request_id(), (), _EMPTY_CONTEXT, None, None)

    def extract_found(
        self, first: Mapping[str, str], more: Mapping[str, list[str]] | None = None
    ) -> InboundContext:
        """`extract` for the headers an adapter collected: `first` holds the first value of
        each, `more` every value of those that came more than once; never raises. The common
        request — one canonical `traceparent` and one sane `x-request-id` as its only
        propagation headers — is read here in one step (this runs on every request)."""
        try:
            if more is None and self._uncommon.isdisjoint(first):
                parent = first.get("traceparent")
                request_id = first.get(REQUEST_ID)
                span = None
                if request_id is not None and _SANE_REQUEST_ID.fullmatch(request_id) is not None:
                    span = _caller_span(parent, None) if parent is not None else None
                if span is not None:
                    # tuple.__new__: a NamedTuple's own __new__ is one more Python call.
                    return _new_tuple(
                        InboundContext,
                        (
                            request_id,
                            (),
                            Context({SPAN_KEY: span}),
                            None,
                            span.sampled,
                            _TRACECONTEXT_ONLY,
                        ),
                    )
        except Exception:  # whatever it was, the general path reads it and never raises
            pass

        def get_all(name: str) -> list[str] | None:
            if more is not None and name in more:
                return more[name]
            value = first.get(name)
            return None if value is None else [value]

        return self.extract(get_all, first.keys())

    def _extract(self, get_all: HeaderLookup, present: Collection[str] | None) -> InboundContext:
        carrier: dict[str, list[str]] = {}
        for name in _TRACE_FIELDS if present is None else _TRACE_SET.intersection(present):
            values = get_all(name)
            # Trace ids are ASCII; B3's `\d` would otherwise take other scripts' digits.
            if values and values[0].isascii():
                carrier[name] = values
        received_baggage = carrier.get("baggage")
        if received_baggage is not None:
            if len(received_baggage) > 1:
                # Several baggage headers are one list (RFC 9110 §5.3); the propagator reads
                # one, and drops a value over W3C's limit whole: then the first goes alone.
                joined = ",".join(received_baggage)
                if len(joined) <= _MAX_BAGGAGE:
                    carrier["baggage"] = received_baggage = [joined]
                else:
                    carrier["baggage"] = received_baggage = received_baggage[:1]
            if len(received_baggage[0]) > _MAX_BAGGAGE:
                # The propagator would drop it too, after logging a warning holding all of it:
                # a caller's header of any size, written to the log on every request. (ASCII
                # only here: its length is its bytes, which the propagator counts.)
                del carrier["baggage"]
                received_baggage = None
        if len(carrier.get("traceparent", ())) > 1:
            # Sent twice: as a proxy joining them would, an invalid traceparent (W3C's test
            # suite restarts the trace), and no tracestate without it.
            del carrier["traceparent"]
            carrier.pop("tracestate", None)

        formats = _NO_FORMATS
        sampled: bool | None = None
        otel_context = _EMPTY_CONTEXT
        parent = carrier.get("traceparent") if carrier.keys() <= _W3C_ONLY else None
        span = _caller_span(parent[0], carrier.get("tracestate")) if parent else None
        if span is not None:  # the common case: a canonical traceparent, parsed here
            otel_context, sampled = Context({SPAN_KEY: span}), span.sampled
            formats = _TRACECONTEXT_ONLY
        elif carrier:
            otel_context = Context()
            for propagator, fields in self._extractors:
                for name in fields:
                    if name in carrier:
                        otel_context = propagator.extract(carrier, otel_context, getter=_GETTER)
                        break
            formats = _formats_of(carrier)
            sampled, b3_state = _sampled(carrier, otel_context)
            if (
                sampled is not None
                and not get_current_span(otel_context).get_span_context().is_valid
            ):
                otel_context = otel_context_api.set_value(CALLER_DECISION, sampled, otel_context)
            if b3_state is not None:
                if b3_state == B3_DEFERRED:  # held as unsampled (OpenTelemetry has no deferred)
                    otel_context = _with_decision(otel_context, False)
                otel_context = otel_context_api.set_value(B3_SAMPLING_KEY, b3_state, otel_context)
            received_b3 = _received_b3(carrier, otel_context)
            if received_b3 is not None:
                otel_context = otel_context_api.set_value(_RECEIVED_B3, received_b3, otel_context)
            if received_baggage is not None:
                raw = received_baggage[0]
                extracted = baggage_api.get_all(otel_context)
                if extracted and len(raw) <= _MAX_BAGGAGE and raw.isascii():
                    # Passed on byte for byte (none of it when nothing in it was valid).
                    otel_context = otel_context_api.set_value(
                        _RECEIVED_BAGGAGE, _Received(raw, extracted), otel_context
                    )

        ids = get_all(REQUEST_ID)
        request_id = _single(ids) if ids else ""
        if _SANE_REQUEST_ID.fullmatch(request_id) is None:
            request_id = new_request_id()

        headers: tuple[tuple[str, str], ...] = ()
        if self._app_headers:
            found = []
            for name in self._app_headers:
                values = get_all(name)
                if values:
                    value = _join(name, values)
                    if value is not None:
                        found.append((name, value))
            headers = tuple(found)

        deadline = None
        if present is None or not _TIMEOUTS.isdisjoint(present):
            deadline = _deadline(get_all)
        return InboundContext(  # positional: cheaper per request than keywords
            request_id, headers, otel_context, deadline, sampled, formats
        )

    # -- activation ---------------------------------------------------------------------

    def activate(self, inbound: InboundContext) -> Activation:
        """Make `inbound` the request being served in this context (until `deactivate`).

        Sets `current` and `inbound_deadline`, and attaches the extracted OpenTelemetry
        context unless a valid span is current already (see the module rules).
        `deactivate(activation)` undoes all of it.
        """
        token = current.set(inbound)
        otel_token = None
        outer = _otel_current()
        # An empty context (the usual case) holds no span: no need to look one up.
        if not outer or not get_current_span(outer).get_span_context().is_valid:
            otel_token = _otel_attach(inbound.otel_context)
        deadline_token = None
        if inbound.deadline is not None or inbound_deadline.get() is not None:
            deadline_token = inbound_deadline.set(inbound.deadline)  # else None stays None
        return Activation(token, otel_token, deadline_token)

    def deactivate(self, activation: Activation) -> None:
        """Undo `activate`, in the context that activated, innermost first; never raises.
        A second call with the same activation does nothing; tokens from another context
        are logged and skipped."""
        token = activation.current
        if token is None:
            return
        activation.current = None
        if activation.deadline is not None:
            _reset(inbound_deadline, activation.deadline)
        elif inbound_deadline.get() is not None:
            inbound_deadline.set(None)  # the app set one while it served: it was None before
        otel = activation.otel
        if otel is not None:
            if _OTEL_VAR is None:
                otel_context_api.detach(otel)  # logs, never raises
            else:
                try:
                    _OTEL_VAR.reset(otel)
                except (ValueError, RuntimeError):
                    otel_context_api.detach(otel)  # fails again, logged as OpenTelemetry does
        try:
            current.reset(token)
        except (ValueError, RuntimeError):  # made in another context, or already used
            logger.debug("meshlib: %s token not reset", current.name, exc_info=True)

    @contextmanager
    def activated(self, inbound: InboundContext) -> Iterator[InboundContext]:
        """`with propagator.activated(inbound):` — activate for the block."""
        activation = self.activate(inbound)
        try:
            yield inbound
        finally:
            self.deactivate(activation)

    # -- outbound -----------------------------------------------------------------------

    def outbound(
        self, has: Callable[[str], bool], budget: float | None = None
    ) -> list[tuple[str, str]]:
        """Headers to add to an outbound request sent now; never raises.

        `has(name)` tells whether the request already carries header `name` (lowercase):
        those are left as the app set them. `budget` is the seconds this try may take, when
        the data plane knows it (a route or per-try timeout, already clamped by the served
        request's deadline): it is what `x-envoy-expected-rq-timeout-ms` says, as Envoy's
        router sends it; without one, the served request's time left is.
        """
        try:
            return self._outbound(has, budget)
        except Exception:  # a bug here must never fail the app's call
            logger.warning("meshlib: could not compute propagation headers", exc_info=True)
            return []

    def _outbound(self, has: Callable[[str], bool], budget: float | None) -> list[tuple[str, str]]:
        inbound = current.get()
        always = self._always
        used = _NO_FORMATS if inbound is None else inbound.formats
        ctx = otel_context_api.get_current()
        valid = get_current_span(ctx).get_span_context().is_valid

        carrier: dict[str, str] = {}
        # A B3 caller's deferred decision, still undecided (no tracer here): W3C cannot say
        # "deferred", and a traceparent flagged 00 would decide "no" for the next hop.
        deferred = valid and ctx.get(B3_SAMPLING_KEY) == B3_DEFERRED
        for fmt, inject, fields, needs_span in self._injectors:
            if (fmt not in always and fmt not in used) or (needs_span and not valid):
                continue
            if deferred and fmt == TRACECONTEXT:
                continue
            if _any_set(has, fields):
                continue
            inject(carrier, ctx)

        if not valid and inbound is not None and inbound.sampled is not None:
            # A sampling decision without ids (`b3: 0`): pass the decision on.
            debug = inbound.otel_context.get(B3_SAMPLING_KEY) == B3_DEBUG
            flag = "1" if inbound.sampled else "0"
            b3_multi = B3_MULTI in always or B3_MULTI in used
            if b3_multi and not _any_set(has, _B3_MULTI_ALL):
                if debug:
                    carrier["x-b3-flags"] = "1"
                else:
                    carrier["x-b3-sampled"] = flag
            if (B3_SINGLE in always or B3_SINGLE in used) and not has("b3"):
                carrier["b3"] = "d" if debug else flag

        out = list(carrier.items())
        if not has(REQUEST_ID):
            out.append((REQUEST_ID, new_request_id() if inbound is None else inbound.request_id))
        if inbound is not None:
            for name, value in inbound.headers:
                if not has(name):
                    out.append((name, value))
        if budget is None:
            at = inbound_deadline.get()
            budget = None if at is None else at - time.monotonic()
        if budget is not None and not has(EXPECTED_TIMEOUT):
            left_ms = int(budget * 1000.0)
            out.append((EXPECTED_TIMEOUT, str(left_ms if left_ms > 1 else 1)))
        return out


# Request ids come from a generator of their own (an app seeding `random` must not make them
# repeat), seeded from os.urandom, and again in each forked worker.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """A random UUIDv4 string, as Envoy makes for `x-request-id` (what `str(uuid.uuid4())`
    gives, at a fraction of the cost). Unique, not secret."""
    n = _ids.getrandbits(128)
    n = (n & ~(0xC000 << 48) & ~(0xF000 << 64)) | (0x8000 << 48) | (4 << 76)  # variant, v4
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _any_set(has: Callable[[str], bool], names: tuple[str, ...]) -> bool:
    for name in names:
        if has(name):
            return True
    return False


_W3C_ONLY = frozenset(_W3C_FIELDS)
_TRACECONTEXT_ONLY = frozenset((TRACECONTEXT,))


def _formats_of(carrier: Mapping[str, list[str]]) -> frozenset[str]:
    found = []
    if "traceparent" in carrier:
        found.append(TRACECONTEXT)
    if "b3" in carrier:
        found.append(B3_SINGLE)
    for name in _B3_MULTI_FIELDS:
        if name in carrier:
            found.append(B3_MULTI)
            break
    return frozenset(found) if found else _NO_FORMATS


def _inject_baggage(
    propagator: W3CBaggagePropagator, carrier: dict[str, str], ctx: Context
) -> None:
    """The baggage received, as received, while the app has not changed it; else injected."""
    received = ctx.get(_RECEIVED_BAGGAGE)
    if isinstance(received, _Received) and baggage_api.get_all(ctx) == received.extracted:
        carrier["baggage"] = received.value
    else:
        propagator.inject(carrier, ctx, setter=default_setter)


def _deadline(get_all: HeaderLookup) -> float | None:
    """The caller's budget as an absolute monotonic time; the smaller of the two headers."""
    budget: float | None = None
    # Envoy honours x-envoy-* request headers only from callers it trusts: meshlib takes this
    # one only from a caller that named itself a mesh workload (its metadata-exchange header,
    # meshlib's or an Envoy sidecar's).
    trusted = get_all(PEER_HEADER) or get_all(ISTIO_PEER_HEADER)
    values = get_all(EXPECTED_TIMEOUT) if trusted else None
    if values:
        match = _EXPECTED_MS.fullmatch(_single(values))
        if match is not None:
            ms = int(match[1])
            if ms > 0:
                budget = ms / 1000.0
    values = get_all(GRPC_TIMEOUT)
    if values:
        match = _GRPC_TIMEOUT.fullmatch(_single(values))
        if match is not None:
            seconds = int(match[1]) * _GRPC_UNIT[match[2]]
            if seconds > 0 and (budget is None or seconds < budget):
                budget = seconds
    if budget is None:
        return None
    # grpc-timeout allows 8 digits of hours (11,000 years): timeouts that large overflow
    # the socket layer (OverflowError in urllib3). No caller's budget is that long.
    return time.monotonic() + min(budget, _MAX_BUDGET)


def _single(values: list[str]) -> str:
    """The value of a header that takes one (x-request-id, the timeouts), from the values
    received: a header sent more than once is the comma-joined list HTTP makes of it (RFC
    9110 §5.3), as Envoy reads its own headers and as WSGI servers hand them over (gunicorn
    joins with `,`, waitress with `, `): the same string under every adapter and server. A
    timeout that came twice no longer matches its syntax: no deadline, as with Envoy."""
    value = values[0]
    if len(values) == 1 and "," not in value:
        return value.strip(" \t")
    return ",".join(part.strip(" \t") for value in values for part in value.split(","))


def _join(name: str, values: list[str]) -> str | None:
    """One header value from the values received; None when unsafe to send on. Joined with
    `,` as gunicorn (and Envoy) join a repeated header, so an ASGI and a WSGI app send the
    same (`; ` for `cookie`, RFC 9113 §8.2.3)."""
    kept = [v for v in values if _CONTROL.search(v) is None]
    if not kept:
        return None
    if len(kept) == 1:
        return kept[0]
    return ("; " if name == "cookie" else ",").join(kept)
