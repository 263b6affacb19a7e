"""How a try over httpx ends, in Envoy's terms: httpx's exceptions read in one place.

A transport error becomes the `AttemptResult` the retry policy and outlier detection act on
(a connect failure, a reset connection, a stream the upstream reset or refused, the try's own
timeout or the caller's), an exception the app gets becomes Envoy's response flag for the
metrics and access log, and the errors that are the request's own fault (`_CALLERS_OWN`) are
told apart from the upstream's. The sync and async transports (`_httpx_transport`) and their
mirrored copies share these, so both read an error the same way.

Split out of `meshlib.clients.httpx`, and, like it, not compiled (see pyproject.toml).
"""

from __future__ import annotations

import time

import httpcore
import httpx

from meshlib.clients._common import body_broke_off
from meshlib.clients._httpx_call import _TRY_DEADLINE
from meshlib.dataplane.exchange import CALLERS_TIMEOUT, Attempt
from meshlib.dataplane.outcome import Flag
from meshlib.dataplane.retry import (
    CONNECT_FAILURE,
    PER_TRY_TIMEOUT,
    REFUSED_STREAM,
    RESET,
    STREAM_RESET,
    AttemptResult,
)


def _exception_flag(exc: BaseException) -> str:
    """Envoy's flag for a call that raised: the caller gave up (DC), or the connection failed."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return Flag.UPSTREAM_CONNECTION_FAILURE
    if isinstance(exc, httpx.TimeoutException) or not isinstance(exc, Exception):
        return Flag.DOWNSTREAM_TERMINATION  # the caller's timeout, a cancellation, Ctrl-C
    return Flag.UPSTREAM_CONNECTION_TERMINATION


# Transport errors that say the request is wrong, not the upstream: never retried, never held
# against an endpoint, raised to the app as httpx raises them.
_CALLERS_OWN = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def _read_timeout_first(request: httpx.Request, delay: float) -> float | None:
    """The caller's read timeout, when a fault's `delay` would outlast it: behind a sidecar
    the app's read times out while the sidecar holds its request (see `_delay_timed_out`)."""
    read = (request.extensions.get("timeout") or {}).get("read")
    return read if read is not None and read < delay else None


def _delay_timed_out(request: httpx.Request) -> httpx.ReadTimeout:
    """The caller's read timeout, run out during a fault's delay: as httpx raises it."""
    return httpx.ReadTimeout("timed out", request=request)


def _body_failed(exc: Exception, request: httpx.Request, attempt: Attempt) -> AttemptResult:
    """How a try ends when reading the body of a response read whole fails."""
    timed_out = isinstance(exc, httpx.TimeoutException)
    caller = request.extensions.get("timeout") or {}
    mesh_owned = timed_out and attempt.timeouts(caller.get("connect"), caller.get("read"))[2]
    return body_broke_off(exc, timed_out, timed_out and not mesh_owned)


def _failed(exc: httpx.TransportError, request: httpx.Request, attempt: Attempt) -> AttemptResult:
    """How a transport error ends an attempt, in Envoy's terms."""
    caller = request.extensions.get("timeout") or {}
    if isinstance(exc, httpx.TimeoutException) and _try_expired(exc):
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc)  # the try's time: Envoy's UT
    if isinstance(exc, httpx.ConnectTimeout):
        cause = attempt.connect_timed_out(caller.get("connect"))
        if cause == CALLERS_TIMEOUT:
            return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=True)
        return AttemptResult(failure=cause, error=exc)
    if isinstance(exc, httpx.ConnectError):
        return AttemptResult(failure=CONNECT_FAILURE, error=exc)
    if isinstance(exc, httpx.PoolTimeout):  # the route deadline bounds it too (see above)
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=True)
    if isinstance(exc, httpx.TimeoutException):
        # the try's time bounds each phase; the caller's own for this phase may be shorter
        phase = "write" if isinstance(exc, httpx.WriteTimeout) else "read"
        mesh_owned = attempt.timeouts(caller.get("connect"), caller.get(phase))[2]
        return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=not mesh_owned)
    return AttemptResult(failure=_reset_kind(exc), error=exc)


_REFUSED_STREAM_CODE = 0x7  # HTTP/2's REFUSED_STREAM error code


def _reset_kind(exc: httpx.TransportError) -> str:
    """A lost connection (Envoy's UC), or, over HTTP/2, a stream the upstream reset (UR),
    which httpcore reports as a RemoteProtocolError holding h2's `StreamReset` event."""
    cause = exc.__cause__
    if isinstance(cause, httpcore.RemoteProtocolError) and cause.args:
        event = cause.args[0]
        if type(event).__name__ == "StreamReset":
            code = getattr(event, "error_code", None)
            return REFUSED_STREAM if code == _REFUSED_STREAM_CODE else STREAM_RESET
    return RESET


def _try_expired(exc: httpx.TimeoutException) -> bool:
    """Whether the try's own deadline (`_TRY_DEADLINE`, which the default async transport
    enforces) has passed: then the timeout is the mesh's, whichever phase raised it."""
    try:
        deadline = exc.request.extensions.get(_TRY_DEADLINE)
    except RuntimeError:  # an exception raised without its request
        return False
    return deadline is not None and time.monotonic() >= deadline - 0.002
