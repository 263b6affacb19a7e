"""B3, as the caller sent it: its sampling flags, and its ids passed on unchanged.

OpenTelemetry's B3 propagators read and write the ids; what they do not keep is done here.
Extracting, the caller's decision is read from its flags (`_sampled`: sampled, not, deferred
to this hop, or debug) and its ids are kept as received (`_received_b3`: a 64-bit trace id,
a parent span id). Injecting, while the caller's span is still the current one, B3 goes on
in the form received, with a deferred decision still deferred and debug still debug
(`_inject_b3_multi`, `_inject_b3_single`). Only the Propagator uses this module; the rules
are in `meshlib.telemetry.propagation`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from opentelemetry.context import Context, create_key
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.textmap import default_setter
from opentelemetry.trace import get_current_span

from meshlib.telemetry._caller_trace import B3_DEBUG, B3_DEFERRED, B3_SAMPLING_KEY

_B3_YES = frozenset(("1", "true", "True", "d"))
_B3_NO = frozenset(("0", "false", "False"))
_RECEIVED_B3 = create_key("meshlib-received-b3")
"""Where an extracted Context keeps the B3 ids it came with, as received (a `_ReceivedB3`)."""


class _ReceivedB3(NamedTuple):
    """The B3 ids a request came with, in the form received: what OpenTelemetry's propagators
    drop (the parent span id) or change (a 64-bit trace id, sent padded to 128 bits)."""

    trace_id: str
    """16 or 32 lowercase hex, as received."""
    span_id: int
    parent: str | None
    """`x-b3-parentspanid` or single `b3`'s fourth field: 16 lowercase hex; None if absent
    or malformed."""


def _sampled(carrier: Mapping[str, list[str]], ctx: Context) -> tuple[bool | None, str | None]:
    """The caller's decision — a valid traceparent's flag, else B3's explicit one, else None —
    and its B3 sampling state: `B3_DEBUG`, `B3_DEFERRED` (B3 ids without a decision), or None.
    A B3 flag counts only with valid ids or with none at all (`b3: 1`, a lone
    `x-b3-sampled`): one sent with malformed ids is malformed input, so a new trace starts
    at this hop's own percentage."""
    span_context = get_current_span(ctx).get_span_context()
    valid = span_context.is_valid
    if valid:
        parent = carrier.get("traceparent")
        if parent is not None and f"{span_context.trace_id:032x}" in parent[0]:
            return span_context.trace_flags.sampled, None
    sampled: bool | None = None
    single = carrier.get("b3")
    if single is not None and single[0]:  # what OpenTelemetry's B3 propagators read first
        fields = single[0].strip().split("-")
        if len(fields) > 1 and not valid:
            return None, None  # malformed ids: ignored, and the flag sent with them too
        flag = fields[0] if len(fields) == 1 else fields[2] if len(fields) > 2 else ""
        if flag == "d":
            return True, B3_DEBUG
        sampled = True if flag == "1" else False if flag == "0" else None
    else:
        if not valid and ("x-b3-traceid" in carrier or "x-b3-spanid" in carrier):
            return None, None  # malformed ids: ignored, and the flag sent with them too
        flags = carrier.get("x-b3-flags")
        if flags is not None and flags[0].strip() == "1":
            return True, B3_DEBUG
        value = carrier.get("x-b3-sampled")
        if value is not None:
            flag = value[0].strip()
            sampled = True if flag in _B3_YES else False if flag in _B3_NO else None
    return sampled, (B3_DEFERRED if sampled is None and valid else None)


_B3_TRACE_ID = re.compile(r"[0-9a-fA-F]{16}|[0-9a-fA-F]{32}")  # as OpenTelemetry's B3 reads
_B3_SPAN_ID = re.compile(r"[0-9a-fA-F]{16}")


def _received_b3(carrier: Mapping[str, list[str]], ctx: Context) -> _ReceivedB3 | None:
    """The B3 ids received, when the extracted span is theirs and OpenTelemetry's propagator
    would send them on changed (a 64-bit trace id, a parent span id); else None."""
    first = carrier.get("b3")
    single = first[0] if first else ""
    parent: str | None
    if single:  # what OpenTelemetry's B3 propagators read first (split as they split it)
        fields = single.split("-", 4)
        if len(fields) < 2:
            return None
        trace_id, span_id = fields[0], fields[1]
        parent = fields[3] if len(fields) == 4 else None
    else:
        trace_ids, span_ids = carrier.get("x-b3-traceid"), carrier.get("x-b3-spanid")
        if not trace_ids or not span_ids:
            return None
        trace_id, span_id = trace_ids[0], span_ids[0]
        parents = carrier.get("x-b3-parentspanid")
        parent = parents[0].strip() if parents else None
    if _B3_TRACE_ID.fullmatch(trace_id) is None or _B3_SPAN_ID.fullmatch(span_id) is None:
        return None
    if parent is not None and (_B3_SPAN_ID.fullmatch(parent) is None or int(parent, 16) == 0):
        parent = None  # malformed: dropped, as OpenTelemetry drops every parent id
    if len(trace_id) == 32 and parent is None:
        return None  # nothing the propagator would change
    span_context = get_current_span(ctx).get_span_context()
    trace_id = trace_id.lower()
    if not span_context.is_valid or f"{span_context.trace_id:032x}" != trace_id.rjust(32, "0"):
        return None  # a valid traceparent won with other ids
    if span_context.span_id != int(span_id, 16):
        return None
    return _ReceivedB3(trace_id, span_context.span_id, None if parent is None else parent.lower())


def _as_received(ctx: Context) -> _ReceivedB3 | None:
    """The B3 ids received, while the current span is still the caller's (no tracer made a
    span of its own, whose ids B3 must then carry); else None."""
    received = ctx.get(_RECEIVED_B3)
    if not isinstance(received, _ReceivedB3):
        return None
    span_context = get_current_span(ctx).get_span_context()
    # A span made here is local, with ids of its own; a B3 decision made here keeps the ids.
    if span_context.is_remote and span_context.span_id == received.span_id:
        return received
    return None


def _inject_b3_multi(propagator: B3MultiFormat, carrier: dict[str, str], ctx: Context) -> None:
    """B3 multi-header, with the caller's debug flag or deferred decision kept, and the
    caller's ids as received while its span is current."""
    propagator.inject(carrier, ctx, setter=default_setter)
    if "x-b3-traceid" not in carrier:
        return
    state = ctx.get(B3_SAMPLING_KEY)
    if state is not None:
        del carrier["x-b3-sampled"]  # debug implies it; deferred has none
        if state == B3_DEBUG:
            carrier["x-b3-flags"] = "1"
    received = _as_received(ctx)
    if received is not None:
        carrier["x-b3-traceid"] = received.trace_id
        if received.parent is not None:
            carrier["x-b3-parentspanid"] = received.parent


def _inject_b3_single(propagator: B3SingleFormat, carrier: dict[str, str], ctx: Context) -> None:
    """B3 single header, with the caller's debug flag or deferred decision kept, and the
    caller's ids as received while its span is current."""
    propagator.inject(carrier, ctx, setter=default_setter)
    value = carrier.get("b3")
    if value is None:
        return
    state = ctx.get(B3_SAMPLING_KEY)
    if state is not None:
        ids = value.rpartition("-")[0]  # {trace}-{span}, without the sampled field
        value = f"{ids}-d" if state == B3_DEBUG else ids
    received = _as_received(ctx)
    if received is not None:
        span_and_rest = value.partition("-")[2]
        value = f"{received.trace_id}-{span_and_rest}"
        # The parent follows a sampling state only (a deferred `{trace}-{span}` has none).
        if received.parent is not None and span_and_rest.count("-") == 1:
            value = f"{value}-{received.parent}"
    carrier["b3"] = value
