"""The request being served, as context variables, and carrying it into another thread.

What `Propagator.extract` reads from a request (an `InboundContext`) is made current by
`Propagator.activate` in `current`, beside OpenTelemetry's context and the deadline
(`meshlib.dataplane.deadline.inbound_deadline`); the meshed clients read it from there for
each call they send. `capture()` and `run_in()` take those three values as a whole into a
worker thread and back out again (`meshlib.telemetry.threads`). The Propagator decides what
the values are; this module only holds them, so the clients and the thread hooks depend on
it without the header logic. Activating is on every served request's path: OpenTelemetry's
own context variable is used directly when its runtime context is the standard one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import NamedTuple, TypeVar

from opentelemetry import context as otel_context_api
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

from meshlib.dataplane.deadline import inbound_deadline

__all__ = ["Activation", "InboundContext", "RequestContext", "capture", "current", "run_in"]

# The propagation module's log, where these records have always gone.
logger = logging.getLogger("meshlib.telemetry.propagation")

_T = TypeVar("_T")

_NO_FORMATS: frozenset[str] = frozenset()


class InboundContext(NamedTuple):
    """What the request being served carries on to the outbound calls made for it.

    An immutable tuple (cheaper to build per request than a frozen dataclass).
    """

    request_id: str
    """`x-request-id`: the incoming one, or a new UUIDv4 when absent or invalid."""
    headers: tuple[tuple[str, str], ...]
    """The `MeshConfig.propagate_headers` present inbound, lowercase names, one entry each."""
    otel_context: Context
    """The extracted trace context and baggage (empty when none or malformed)."""
    deadline: float | None
    """Absolute `time.monotonic()` by which the caller wants an answer, if it said."""
    sampled: bool | None
    """The caller's sampling decision, None when it made none (or deferred it)."""
    formats: frozenset[str] = _NO_FORMATS
    """The trace formats the inbound request used (`tracecontext`, `b3multi`, `b3`)."""


current: ContextVar[InboundContext | None] = ContextVar("meshlib_inbound_context", default=None)
"""The InboundContext of the request being served in this context, if any."""


class Activation:
    """What one `activate` changed (the tokens `deactivate` resets), innermost first."""

    __slots__ = ("current", "deadline", "otel")

    def __init__(
        self,
        current_token: Token[InboundContext | None],
        otel_token: Token[Context] | None,
        deadline_token: Token[float | None] | None,
    ) -> None:
        self.current: Token[InboundContext | None] | None = current_token  # None once undone
        self.otel = otel_token
        self.deadline = deadline_token


def _otel_var() -> ContextVar[Context] | None:
    """OpenTelemetry's own ContextVar, when its runtime context is the standard one (whose
    attach, detach and get_current are that variable's set, reset and get), else None."""
    runtime = getattr(otel_context_api, "_RUNTIME_CONTEXT", None)
    if type(runtime) is ContextVarsRuntimeContext:
        var = getattr(runtime, "_current_context", None)
        if isinstance(var, ContextVar):
            return var
    return None


# Activating a request is on every request's path: with the standard runtime context, its
# variable is set directly (the API adds two Python calls each way, which show in servers).
_OTEL_VAR = _otel_var()
_otel_current: Callable[[], Context]
_otel_attach: Callable[[Context], Token[Context]]
if _OTEL_VAR is not None:
    _otel_current, _otel_attach = _OTEL_VAR.get, _OTEL_VAR.set
else:
    _otel_current, _otel_attach = otel_context_api.get_current, otel_context_api.attach


class RequestContext(NamedTuple):
    """The request context as it was when captured, to carry into another thread: the
    request being served, its deadline and the OpenTelemetry context (the app's own spans
    included). Only these travel: the thread's other context variables stay its own."""

    inbound: InboundContext | None
    deadline: float | None
    otel: Context


def capture() -> RequestContext | None:
    """The request context current here; None when there is none (no request, no span)."""
    inbound = current.get()
    deadline = inbound_deadline.get()
    otel = _otel_current()
    if inbound is None and deadline is None and not otel:  # an empty OTel Context is falsy
        return None
    return RequestContext(inbound, deadline, otel)


def run_in(
    captured: RequestContext, fn: Callable[..., _T], /, *args: object, **kwargs: object
) -> _T:
    """Call `fn` with `captured` current, then restore what was current before: a pool's
    worker thread keeps nothing of it for its next task."""
    token = current.set(captured.inbound)
    deadline_token = inbound_deadline.set(captured.deadline)
    if _OTEL_VAR is None:
        otel_token = otel_context_api.attach(captured.otel)
    else:
        otel_token = _OTEL_VAR.set(captured.otel)
    try:
        return fn(*args, **kwargs)
    finally:
        if _OTEL_VAR is None:
            otel_context_api.detach(otel_token)
        else:
            _reset(_OTEL_VAR, otel_token)
        _reset(inbound_deadline, deadline_token)
        _reset(current, token)


def _reset(var: ContextVar[_T], token: Token[_T]) -> None:
    try:
        var.reset(token)
    except (ValueError, RuntimeError):  # made in another context, or already used
        logger.debug("meshlib: %s token not reset", var.name, exc_info=True)
