"""The caller's trace as an extracted Context holds it: its span, and its sampling decision.

The propagator writes these, the tracing module reads them, and neither needs the other for
it:

- `CallerSpan`: the caller's span from a canonical `traceparent`, the common request's, made
  without OpenTelemetry's propagator and with its SpanContext built only when read (most
  served requests never read it); `SPAN_KEY` is where a Context holds it.
- The caller's sampling decision where W3C has no words for it: one sent without trace ids
  (`CALLER_DECISION`, which the sampler honours), and B3's deferred and debug states
  (`B3_SAMPLING_KEY`); `decided` makes this hop's decision for a deferred one.

The rules are in `meshlib.telemetry.propagation`'s docstring ("B3 sampling states").
"""

from __future__ import annotations

import re
from collections.abc import Callable

from opentelemetry.context import Context, create_key
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)

__all__ = [
    "B3_DEBUG",
    "B3_DEFERRED",
    "B3_SAMPLING_KEY",
    "CALLER_DECISION",
    "SPAN_KEY",
    "CallerSpan",
    "decided",
]

B3_SAMPLING_KEY = create_key("meshlib-b3-sampling")
"""Where an extracted Context says the B3 caller's sampling state: `B3_DEFERRED` (ids without
a decision: this hop decides) or `B3_DEBUG`; absent otherwise."""
B3_DEFERRED = "deferred"
B3_DEBUG = "debug"
CALLER_DECISION = create_key("meshlib-caller-decision")
"""The caller's sampling decision when it sent one without trace ids (B3's `b3: 0`,
`x-b3-sampled: 1`, `x-b3-flags: 1`): the trace starts at this hop, as the caller decided
(MeshSampler honours it, as Envoy's Zipkin tracer does)."""

# The canonical traceparent: version 00, no padding, nothing after the flags; all-zero
# (invalid) ids excluded.
_CANONICAL_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_SHORT_TRACESTATE = 512  # well under any limit OpenTelemetry applies to tracestate


def _caller_span(traceparent: str, states: list[str] | None) -> CallerSpan | None:
    """The caller's span for a canonical `traceparent` (and a short `tracestate`), built
    directly (several times faster than OpenTelemetry's propagator); None for anything else,
    which then goes through OpenTelemetry's own TraceContextTextMapPropagator, whatever its
    version's rules."""
    if _CANONICAL_TRACEPARENT.fullmatch(traceparent) is None:
        return None
    if states is not None and sum(len(state) for state in states) > _SHORT_TRACESTATE:
        return None
    return CallerSpan(traceparent, states)


SPAN_KEY = next(iter(set_span_in_context(INVALID_SPAN, Context())))
"""The key OpenTelemetry keeps a Context's span under, found through its public API."""
_SAMPLED_DIGITS = frozenset("13579bdf")  # the last hex digit of flags with the sampled bit


class CallerSpan(NonRecordingSpan):
    """The caller's span from a canonical `traceparent`, as OpenTelemetry's propagator would
    give it (a NonRecordingSpan with a remote SpanContext), but with the SpanContext built on
    first use: most served requests never read it (an unsampled trace, no outbound call)."""

    def __init__(self, traceparent: str, states: list[str] | None) -> None:
        # NonRecordingSpan.__init__ is not called: `_context` is a property here.
        self._traceparent = traceparent  # canonical: 00-<32 hex>-<16 hex>-<2 hex>
        self._states = states
        self._built: SpanContext | None = None
        self.sampled = traceparent[54] in _SAMPLED_DIGITS
        """The caller's sampled flag, read without building the SpanContext."""

    @property
    def _context(self) -> SpanContext:
        built = self._built
        if built is None:
            value, states = self._traceparent, self._states
            built = self._built = SpanContext(
                trace_id=int(value[3:35], 16),
                span_id=int(value[36:52], 16),
                is_remote=True,
                trace_flags=TraceFlags(int(value[53:55], 16)),
                trace_state=None if states is None else TraceState.from_header(states),
            )
        return built

    @_context.setter
    def _context(self, value: SpanContext) -> None:
        self._built = value


def _with_decision(context: Context, sampled: bool) -> Context:
    """`context` with its (remote) span's sampled flag set to `sampled`."""
    span_context = get_current_span(context).get_span_context()
    span = NonRecordingSpan(
        SpanContext(
            trace_id=span_context.trace_id,
            span_id=span_context.span_id,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
            trace_state=span_context.trace_state,
        )
    )
    return set_span_in_context(span, context)


def decided(context: Context, decide: Callable[[int], bool]) -> Context:
    """An extracted `context` whose B3 caller deferred the sampling decision (marked
    `B3_DEFERRED`), with this hop's decision `decide(trace_id)` made: the caller's span
    sampled or not, and no longer marked, so the decision is what goes on."""
    trace_id = get_current_span(context).get_span_context().trace_id
    kept = Context({key: value for key, value in context.items() if key != B3_SAMPLING_KEY})
    return _with_decision(kept, decide(trace_id))
