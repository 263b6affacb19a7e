"""Retry decisions as Envoy makes them, and the tenacity policy that runs them.

`AttemptResult` describes how one attempt ended; `is_retriable` says whether the route's
`retryOn` conditions cover it; `EnvoyBackoff` waits as Envoy does (fully jittered exponential,
25 ms base, 250 ms cap). `retrying_kwargs` builds the arguments for a tenacity `Retrying` or
`AsyncRetrying` — one policy, run under both. A fresh tenacity object is made per request:
a shared `AsyncRetrying` mixes up attempt counts between concurrent requests.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tenacity

from meshlib.dataplane.outcome import LocalReply
from meshlib.policy.routes import RetryPolicy

if TYPE_CHECKING:
    from meshlib.dataplane.exchange import Attempt, Exchange

# How an attempt ended without an upstream response.
CONNECT_FAILURE = "connect-failure"
RESET = "reset"  # the connection closed or was reset (Envoy's UC, "connection termination")
STREAM_RESET = "stream-reset"  # the upstream reset an HTTP/2 stream (Envoy's UR)
PER_TRY_TIMEOUT = "per-try-timeout"
REFUSED_STREAM = "refused-stream"  # an HTTP/2 stream reset with REFUSED_STREAM (UR)

_GRPC_RETRY_CODES = {
    "cancelled": "1",
    "deadline-exceeded": "4",
    "resource-exhausted": "8",
    "internal": "13",
    "unavailable": "14",
}


@dataclass(slots=True)
class AttemptResult:
    """One attempt's outcome: an upstream response, a failure, or a local answer."""

    status: int | None = None  # upstream HTTP status
    failure: str | None = None  # CONNECT_FAILURE, RESET, STREAM_RESET, PER_TRY_TIMEOUT, ...
    reply: LocalReply | None = None  # meshlib answered instead (UO, UH, UT, ...)
    grpc_status: str | None = None
    response: Any = None  # the adapter's response object, to return or to close
    error: BaseException | None = None  # the transport error behind `failure`
    endpoint: str | None = None
    rate_limited: bool = False  # the response carries x-envoy-ratelimited
    client_timeout: bool = False  # the caller's own timeout fired, not the mesh's
    # The connection was lost reading the body, after the headers: never retried (Envoy does
    # not retry a started response); the caller gets the error, as behind a sidecar.
    broke_off: bool = False
    headers: Mapping[str, str] | None = None  # response headers the adapter read, lowercase
    # When the response headers came (time.perf_counter()); stamped only for an Exchange that
    # measures Envoy's upstream service time (`Exchange.began`), else None.
    answered: float | None = None


def is_retriable(policy: RetryPolicy, result: AttemptResult) -> bool:
    """Whether `retryOn` covers this outcome (ISTIO.md §3.2)."""
    if result.reply is not None or result.client_timeout or result.broke_off:
        return False  # local answers, the caller's own timeout, a started response: final
    on = policy.retry_on
    failure = result.failure
    if failure is not None:
        if failure == CONNECT_FAILURE:  # nothing was sent: safe even for reset-before-request
            return bool(
                on & {"connect-failure", "5xx", "gateway-error", "reset", "reset-before-request"}
            )
        # Any other reset, a refused stream included: Envoy's wouldRetryFromReset retries it
        # under reset, 5xx or gateway-error. (reset-before-request never covers these:
        # meshlib sent the request by then, or cannot tell it did not.)
        if failure == REFUSED_STREAM:
            return bool(on & {"refused-stream", "5xx", "gateway-error", "reset"})
        return bool(on & {"5xx", "gateway-error", "reset"})  # a reset or per-try timeout
    if result.rate_limited:
        # Envoy's wouldRetryFromHeaders: an upstream's rate limit is retried only when asked
        # for, whatever else its status would match
        return "envoy-ratelimited" in on
    status = result.status or 0
    if status >= 500 and "5xx" in on:
        return True
    if status in (502, 503, 504) and "gateway-error" in on:
        return True
    if status == 409 and "retriable-4xx" in on:
        return True
    if status in policy.retriable_status_codes:
        return True
    if result.grpc_status is not None:
        for condition in policy.grpc_conditions:
            if _GRPC_RETRY_CODES[condition] == result.grpc_status:
                return True
    return False


class EnvoyBackoff(tenacity.wait.wait_base):
    """Retry n waits uniformly in [0, interval n): the interval starts at base and doubles
    while it is below half the cap (10 x base), then is the cap — Envoy's jittered back-off
    (`JitteredBackOffStrategy`): 25, 50, 100, 200, then 250 ms for the default base."""

    def __init__(self, base: float, rng: random.Random, clamp: Callable[[float], float]) -> None:
        self.base = base
        self.cap = 10 * base
        self.rng = rng
        self.clamp = clamp  # never sleep past the route deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        retry = retry_state.attempt_number  # the retry about to happen is retry number n
        return self.clamp(self.rng.uniform(0, self.interval(retry)))

    def interval(self, retry: int) -> float:
        """The upper bound of retry `retry`'s wait (1 for the first retry)."""
        interval, half_cap = self.base, self.cap / 2
        for _ in range(retry - 1):
            if interval >= half_cap:
                return self.cap
            interval *= 2
        return interval


def retrying_kwargs(
    exchange: Exchange,
    before_sleep: Callable[..., Any],
    should_retry: Callable[[AttemptResult], bool] | None = None,
) -> dict[str, Any]:
    """Arguments for `tenacity.Retrying(**kw)` / `AsyncRetrying(**kw)` for one request."""
    policy = exchange.retries
    base = policy.backoff if policy is not None else 0.025
    return {
        "retry": tenacity.retry_if_result(should_retry or exchange.should_retry),
        "stop": tenacity.stop_never,  # should_retry counts attempts, deadline and budget
        "wait": EnvoyBackoff(base, exchange.rng, exchange.clamp_wait),
        "before_sleep": before_sleep,
        "reraise": True,
    }


def run_attempts(
    exchange: Exchange,
    send: Callable[[Attempt], AttemptResult],
    discard: Callable[[Any], None],
) -> AttemptResult:
    """Try, retry and back off as the route says; the final attempt's result.

    The first try runs directly: most requests need no retry and skip tenacity's machinery.
    When it must be retried, a fresh tenacity `Retrying` takes over, starting from that
    result, so the back-off, the sleeps and the loop are tenacity's.
    """
    first = _attempt(exchange, send)
    if not exchange.should_retry(first):
        return first
    replay = _Replay(exchange, first)

    def attempt() -> AttemptResult:
        return replay.take() or _attempt(exchange, send)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and not state.outcome.failed:
            discard(state.outcome.result().response)  # a retried response is never returned

    retrying = tenacity.Retrying(**retrying_kwargs(exchange, before_sleep, replay.should_retry))
    try:
        result: AttemptResult = retrying(attempt)
    except BaseException:
        exchange.abandon()  # e.g. Ctrl-C during the back-off
        raise
    return result


async def run_attempts_async(
    exchange: Exchange,
    send: Callable[[Attempt], Awaitable[AttemptResult]],
    discard: Callable[[Any], Awaitable[None]],
) -> AttemptResult:
    """`run_attempts` for asyncio, on a fresh AsyncRetrying per request."""
    first = await _attempt_async(exchange, send)
    if not exchange.should_retry(first):
        return first
    replay = _Replay(exchange, first)

    async def attempt() -> AttemptResult:
        return replay.take() or await _attempt_async(exchange, send)

    async def before_sleep(state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and not state.outcome.failed:
            await discard(state.outcome.result().response)

    kwargs = retrying_kwargs(exchange, before_sleep, replay.should_retry)
    try:
        result: AttemptResult = await tenacity.AsyncRetrying(**kwargs)(attempt)
    except BaseException:
        exchange.abandon()  # cancelled during the back-off
        raise
    return result


class _Replay:
    """Hands tenacity the first try's result, already judged retriable, as its attempt 1."""

    def __init__(self, exchange: Exchange, first: AttemptResult) -> None:
        self.exchange = exchange
        self.first: AttemptResult | None = first
        self.judged: AttemptResult | None = first

    def take(self) -> AttemptResult | None:
        first, self.first = self.first, None
        return first

    def should_retry(self, result: AttemptResult) -> bool:
        if result is self.judged:
            self.judged = None
            return True  # decided, and a retry slot taken, before tenacity started
        return self.exchange.should_retry(result)


def _start_shadow(exchange: Exchange) -> None:
    """Send the route's mirrored copies, once: as Envoy starts its shadows only when the
    request has an upstream, a request answered locally before that (no healthy upstream,
    overflow; no route, a fault abort never get here) is not mirrored, and one that reached an
    upstream is, whatever came of it."""
    shadow, exchange.shadow = exchange.shadow, None
    if shadow is not None:
        shadow()


def _attempt(exchange: Exchange, send: Callable[[Attempt], AttemptResult]) -> AttemptResult:
    setup = exchange.start_attempt()
    if isinstance(setup, LocalReply):
        return AttemptResult(reply=setup)
    try:
        if exchange.shadow is not None:
            _start_shadow(exchange)
        ticket = setup.ticket  # not granted: maxConnections are in use, wait for one
        if not ticket.granted and not (
            ticket.wait(exchange.wait_bound()) and exchange.connected(setup)
        ):
            return exchange.waited_too_long(setup)
        result = send(setup)
    except BaseException:
        exchange.abandon_attempt(setup)  # never reports: give back what it holds
        raise
    return exchange.finish_attempt(setup, result)


async def _attempt_async(
    exchange: Exchange, send: Callable[[Attempt], Awaitable[AttemptResult]]
) -> AttemptResult:
    setup = exchange.start_attempt()
    if isinstance(setup, LocalReply):
        return AttemptResult(reply=setup)
    try:
        if exchange.shadow is not None:
            _start_shadow(exchange)
        ticket = setup.ticket  # not granted: maxConnections are in use, wait for one
        if not ticket.granted and not (
            await ticket.wait_async(exchange.wait_bound()) and exchange.connected(setup)
        ):
            return exchange.waited_too_long(setup)
        result = await send(setup)
    except BaseException:
        exchange.abandon_attempt(setup)  # cancelled, or the sender raised
        raise
    return exchange.finish_attempt(setup, result)
