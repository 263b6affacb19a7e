"""What a failed call through meshlib's requests adapter (`meshlib.clients.requests`) was:
requests' and urllib3's exceptions classified as the retry policy and Envoy's response flags
see them, the caller's timeouts read, and a fault's delay waited out as a sidecar would.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from requests.exceptions import ConnectTimeout
from urllib3.exceptions import ProtocolError, ReadTimeoutError, TimeoutStateError
from urllib3.util import Timeout

from meshlib.dataplane.exchange import CALLERS_TIMEOUT, Attempt
from meshlib.dataplane.outcome import Flag
from meshlib.dataplane.retry import CONNECT_FAILURE, PER_TRY_TIMEOUT, RESET, AttemptResult


class ConnectionWaitTimeout(ConnectTimeout):
    """The caller's connect timeout ran out while its request waited for a connection the
    DestinationRule's `tcp.maxConnections` had all in use (requests has no pool timeout)."""


def _exception_flag(exc: BaseException) -> str:
    """Envoy's flag for a call that raised: the caller gave up (DC), or the connection failed."""
    failure = _classify(exc) if isinstance(exc, requests.RequestException) else None
    if isinstance(exc, ConnectionWaitTimeout):
        return Flag.DOWNSTREAM_TERMINATION  # gave up waiting: nothing was sent
    if failure == PER_TRY_TIMEOUT or not isinstance(exc, Exception):
        return Flag.DOWNSTREAM_TERMINATION  # the caller's timeout, Ctrl-C
    if failure == CONNECT_FAILURE:
        return Flag.UPSTREAM_CONNECTION_FAILURE
    return Flag.UPSTREAM_CONNECTION_TERMINATION


def _fault_delay(
    seconds: float, read_timeout: float | None, request: requests.PreparedRequest
) -> None:
    """Wait out a fault's delay. When the caller's read timeout is shorter, wait that long and
    raise its `ReadTimeout`: behind a sidecar, the app's read times out while the sidecar holds
    its request."""
    if read_timeout is not None and read_timeout < seconds:
        time.sleep(read_timeout)
        raise requests.ReadTimeout(
            f"Read timed out. (read timeout={read_timeout})", request=request
        )
    time.sleep(seconds)


def _classify(exc: requests.RequestException) -> str:
    # A proxy that fails is a failure to connect, as httpx reports it. (requests' SSLError is
    # not: it also comes from a TLS failure while sending, after the request went out.)
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.ProxyError)):
        return CONNECT_FAILURE
    reason = exc.args[0] if exc.args else None
    if (
        isinstance(exc, requests.Timeout)
        # a read timeout met while reading the body comes as a ConnectionError
        or isinstance(reason, ReadTimeoutError)
        # and one met while sending the body as "Connection aborted", with the timeout inside
        or (isinstance(reason, ProtocolError) and isinstance(reason.args[-1], TimeoutError))
    ):
        return PER_TRY_TIMEOUT
    text = f"{type(reason).__name__} {reason}"
    if "NewConnectionError" in text or "NameResolutionError" in text or "Failed to resolve" in text:
        return CONNECT_FAILURE
    return RESET


def _failure(
    exc: requests.RequestException,
    attempt: Attempt,
    caller_connect: float | None,
    mesh_owned: bool,
) -> AttemptResult:
    """How a transport error ends a try, in Envoy's terms: a connect timeout by which bound
    on connecting was the smallest, and a read timeout the caller's own unless the mesh's
    (`mesh_owned`) was the binding one."""
    if isinstance(exc, requests.ConnectTimeout):
        cause = attempt.connect_timed_out(caller_connect)
        if cause == CALLERS_TIMEOUT:
            return AttemptResult(failure=PER_TRY_TIMEOUT, error=exc, client_timeout=True)
        return AttemptResult(failure=cause, error=exc)
    failure = _classify(exc)
    client_timeout = failure == PER_TRY_TIMEOUT and not mesh_owned
    return AttemptResult(failure=failure, error=exc, client_timeout=client_timeout)


def _caller_timeouts(timeout: Any) -> tuple[float | None, float | None]:
    """(connect, read) seconds of a requests `timeout` — a number, a (connect, read) pair or
    urllib3's `Timeout` — refused with ValueError where requests' own adapter refuses it.
    A `Timeout`'s `total` bounds each of the two (the mesh gives the transport a timeout per
    phase, not one over both)."""
    if isinstance(timeout, tuple):
        try:
            connect, read = timeout
            return _seconds(connect), _seconds(read)
        except ValueError:
            raise ValueError(
                f"Invalid timeout {timeout}. Pass a (connect, read) timeout tuple, "
                "or a single float to set both timeouts to the same value."
            ) from None
    if isinstance(timeout, Timeout):
        try:
            read = timeout.read_timeout
        except TimeoutStateError:  # `total` alone: the read gets what connecting leaves
            read = None
        total = _seconds(timeout.total)
        read = _seconds(read)
        if total is not None:
            read = total if read is None else min(read, total)
        return _seconds(timeout.connect_timeout), read  # (connect_timeout: at most `total`)
    seconds = _seconds(timeout)
    return seconds, seconds


def _seconds(value: Any) -> float | None:
    """A timeout's value as requests' adapter takes it (urllib3 checks it: ValueError if it is
    no number of seconds); None for none, or for urllib3's "the socket's default"."""
    if value is None or (type(value) in (int, float) and value > 0):
        return value  # type: ignore[no-any-return]
    if value is Timeout.DEFAULT_TIMEOUT:
        return None
    Timeout(connect=value)  # raises urllib3's ValueError for what is no timeout
    return value  # type: ignore[no-any-return]  # a number of another type (Decimal, ...)
