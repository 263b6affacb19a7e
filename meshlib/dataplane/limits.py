"""Connection-pool circuit breaking and the retry budget of one cluster, as Envoy does it.

Envoy's thresholds are per cluster (every endpoint of the destination/subset/port) per client
(ISTIO.md §2.4, §3.5). Going over a limit fails at once (503 `UO`, or no retry). The one
wait is Envoy's pending queue: a request admitted while `maxConnections` are in use waits,
first come first served, until one is given back. Istio writes 2^32-1 for every unset limit,
and pilot only applies values > 0, so unset and 0 both mean unlimited.

Exact rules:

- Requests. The model is HTTP/1: a request in flight holds a connection. A new request
  connects if fewer than `maxConnections` are connected — and is refused if
  `http2MaxRequests` are (Envoy checks that limit as a request is given a connection, so
  requests waiting for one do not count) — waits if fewer than `http1MaxPendingRequests` are
  waiting, and is refused if not. So maxConnections=1 with http1MaxPendingRequests=1 admits
  two concurrent requests, one of them waiting. Without maxConnections nothing ever waits, so
  the pending limit has no effect (as for Envoy's HTTP/2 once connected). A pending limit of 0
  is "unset": there is no way to forbid waiting. How long a request may wait is its caller's
  business (`Ticket.wait`): the route deadline, the client's pool timeout. A waiting request
  is given a connection only while fewer than `http2MaxRequests` are connected (after a
  policy update lowers it, waiting requests wait longer, where Envoy would refuse them).
- `maxRequestsPerConnection` is not an admission limit; the transport reads it from
  `max_requests_per_connection` (None = unlimited).
- Retries. Without `retryBudget`: a retry is admitted when `active_retries < maxRetries`.
  With `retryBudget` (Envoy: "the retry budget will override any configured retry circuit
  breaker", so maxRetries is then ignored): admitted when
  `active_retries < max(minRetryConcurrency, floor(percent / 100 * active))`, with percent
  20 and minRetryConcurrency 3 when unset (a minRetryConcurrency of 0 is unset, as in pilot;
  a percent of 0 leaves only the minimum). `budgetInterval` is not modelled: only requests in
  flight count (Envoy's behaviour with the default interval 0).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any

from meshlib.policy.destination_rule import ConnectionPoolSettings, RetryBudget

__all__ = ["UNLIMITED", "ClusterLimits", "Thresholds", "Ticket"]

UNLIMITED = 2**32 - 1
_DEFAULT_BUDGET_PERCENT = 20.0
_DEFAULT_MIN_RETRY_CONCURRENCY = 3


def _limit(value: int | None) -> int:
    return value if value else UNLIMITED


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The effective limits of a cluster, defaults applied."""

    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    max_requests_per_connection: int | None = None  # None = unlimited
    budget_percent: float | None = None  # None = no retry budget (maxRetries applies)
    min_retry_concurrency: int = _DEFAULT_MIN_RETRY_CONCURRENCY

    @classmethod
    def of(cls, pool: ConnectionPoolSettings | None, budget: RetryBudget | None) -> Thresholds:
        tcp = pool.tcp if pool is not None else None
        http = pool.http if pool is not None else None
        per_connection = http.max_requests_per_connection if http is not None else None
        percent: float | None = None
        min_concurrency = _DEFAULT_MIN_RETRY_CONCURRENCY
        if budget is not None:
            percent = (
                budget.percent.value if budget.percent is not None else _DEFAULT_BUDGET_PERCENT
            )
            min_concurrency = budget.min_retry_concurrency or _DEFAULT_MIN_RETRY_CONCURRENCY
        return cls(
            max_connections=_limit(tcp.max_connections if tcp else None),
            max_pending_requests=_limit(http.http1_max_pending_requests if http else None),
            max_requests=_limit(http.http2_max_requests if http else None),
            max_retries=_limit(http.max_retries if http else None),
            max_requests_per_connection=per_connection or None,
            budget_percent=percent,
            min_retry_concurrency=min_concurrency,
        )


class Ticket:
    """A request's hold on a connection of its cluster: granted at once, or waiting its turn.

    Whoever got the ticket either sends (once it is granted) or gives it back with
    `ClusterLimits.release_request`, whatever happened — a waiting ticket given back leaves
    the queue, a granted one passes its connection to the next in line.
    """

    __slots__ = ("_event", "_future", "_limits", "_trio", "granted", "released")

    def __init__(self, limits: ClusterLimits | None, granted: bool) -> None:
        self.granted = granted
        self.released = False  # given back (a waiting ticket's second release is ignored)
        self._limits = limits
        self._event: threading.Event | None = None
        self._future: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._trio: tuple[Any, Any] | None = None  # (trio token, trio.Event) of a trio waiter

    def wait(self, timeout: float | None) -> bool:
        """Block until granted (True), or for `timeout` seconds (False: out of the queue)."""
        limits = self._limits
        if self.granted or limits is None:
            return True
        with limits._lock:
            if self.granted:
                return True
            event = self._event = threading.Event()
        return event.wait(timeout) or not limits._withdraw(self)

    async def wait_async(self, timeout: float | None) -> bool:
        """`wait` for asyncio, or trio; a cancelled waiter still gives its ticket back."""
        limits = self._limits
        if self.granted or limits is None:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if "trio" not in sys.modules:
                raise
            return await self._wait_trio(limits, sys.modules["trio"], timeout)
        with limits._lock:
            if self.granted:
                return True
            future: asyncio.Future[None] = loop.create_future()
            self._future = (loop, future)
        # asyncio.wait, not wait_for: before Python 3.12, wait_for can swallow a cancellation
        # that lands as the future completes (CPython gh-86296), and the request would go on.
        done, _ = await asyncio.wait((future,), timeout=timeout)
        return bool(done) or not limits._withdraw(self)  # granted meanwhile: go ahead

    async def _wait_trio(self, limits: ClusterLimits, trio: Any, timeout: float | None) -> bool:
        event = trio.Event()
        with limits._lock:
            if self.granted:
                return True
            self._trio = (trio.lowlevel.current_trio_token(), event)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await event.wait()
        return bool(event.is_set()) or not limits._withdraw(self)

    def _wake(self) -> None:
        """Tell the waiter it was granted (called outside the limits' lock)."""
        if self._event is not None:
            self._event.set()
        if self._future is not None:
            loop, future = self._future
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # its event loop is closed: the waiter is gone for good,
                if self._limits is not None:  # so the connection goes to the next in line
                    self._limits.release_request(self)
        if self._trio is not None:
            token, event = self._trio
            try:
                token.run_sync_soon(event.set)  # thread-safe, as call_soon_threadsafe
            except RuntimeError:  # trio.RunFinishedError: as a closed event loop, above
                if self._limits is not None:
                    self._limits.release_request(self)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_CONNECTED = Ticket(None, granted=True)  # shared by every request that did not wait


class ClusterLimits:
    """Connection-pool limits and retry budget of one cluster; thread-safe.

    Nothing here blocks: a request beyond `maxConnections` gets a waiting `Ticket` and waits
    on it where it runs (a thread or an event loop).
    """

    def __init__(self, pool: ConnectionPoolSettings | None, budget: RetryBudget | None) -> None:
        self._lock = threading.Lock()
        self._thresholds = Thresholds.of(pool, budget)
        self._connected = 0
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._retries = 0
        self._overflows = 0
        self._retry_overflows = 0

    def update(self, pool: ConnectionPoolSettings | None, budget: RetryBudget | None) -> None:
        """Apply new settings; requests and retries in flight stay counted, and waiting
        requests connect if the new `maxConnections` has room for them."""
        thresholds = Thresholds.of(pool, budget)
        with self._lock:
            self._thresholds = thresholds
            granted = self._grant_waiting()
        for ticket in granted:
            ticket._wake()

    # -- requests -----------------------------------------------------------------------------

    def try_acquire_request(self) -> Ticket | None:
        """Admit a request: a granted ticket, a waiting one, or None for an overflow (answer
        503 UO)."""
        with self._lock:
            t = self._thresholds
            connected = self._connected
            waiting = self._waiting
            if connected < t.max_connections:
                if connected >= t.max_requests:  # Envoy's check as a stream gets a connection
                    self._overflows += 1
                    return None
                self._connected = connected + 1
                return _CONNECTED
            if len(waiting) >= t.max_pending_requests:
                self._overflows += 1
                return None
            ticket = Ticket(self, granted=False)
            waiting.append(ticket)
            return ticket

    def release_request(self, ticket: Ticket) -> None:
        """Give back an admitted request's ticket: its connection goes to the next request
        waiting, or a waiting ticket leaves the queue. Extra releases are ignored."""
        with self._lock:
            if ticket is not _CONNECTED:
                if ticket.released:
                    return
                ticket.released = True
            if not ticket.granted:
                self._withdraw_locked(ticket)
                return
            if self._connected > 0:
                self._connected -= 1
            if not self._waiting:
                return
            granted = self._grant_waiting()
        for waiter in granted:
            waiter._wake()

    def _grant_waiting(self) -> list[Ticket]:
        """Connect waiting requests while there is room (lock held); the ones to wake."""
        granted = []
        waiting = self._waiting
        limit = min(self._thresholds.max_connections, self._thresholds.max_requests)
        while waiting and self._connected < limit:
            ticket = waiting.popleft()
            ticket.granted = True
            self._connected += 1
            granted.append(ticket)
        return granted

    def _withdraw(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out of the queue; False if it was granted meanwhile."""
        with self._lock:
            if ticket.granted:
                return False
            self._withdraw_locked(ticket)
            return True

    def _withdraw_locked(self, ticket: Ticket) -> None:
        with contextlib.suppress(ValueError):  # already out of the queue
            self._waiting.remove(ticket)

    # -- retries ------------------------------------------------------------------------------

    def try_acquire_retry(self, still_active: int = 0) -> tuple[bool, str | None]:
        """Take a retry slot: (True, None), or (False, "budget" | "max_retries").

        `still_active`: requests released here that Envoy still counts as active for the
        budget — the failed try whose response body was still to come: Envoy decides the
        retry on the response headers and resets that stream only afterwards."""
        with self._lock:
            refused = self._retry_refused(still_active)
            if refused is not None:
                self._retry_overflows += 1
                return False, refused
            self._retries += 1
            return True, None

    def retry_available(self, still_active: int = 0) -> bool:
        """Whether `try_acquire_retry` would admit a retry now (nothing taken)."""
        return self._retry_refused(still_active) is None

    def _retry_refused(self, still_active: int) -> str | None:
        """Why a retry would be refused now ("budget", "max_retries"), or None."""
        t = self._thresholds
        if t.budget_percent is not None:
            active = self._connected + len(self._waiting) + still_active
            allowed = max(t.min_retry_concurrency, int(t.budget_percent / 100.0 * active))
            return "budget" if self._retries >= allowed else None
        return "max_retries" if self._retries >= t.max_retries else None

    def release_retry(self) -> None:
        """Give back a retry slot (extra releases are ignored)."""
        with self._lock:
            if self._retries > 0:
                self._retries -= 1

    # -- state for the transport and for metrics ----------------------------------------------

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    @property
    def max_requests_per_connection(self) -> int | None:
        """Requests a connection may carry before the transport closes it; None = unlimited."""
        return self._thresholds.max_requests_per_connection

    @property
    def active_requests(self) -> int:
        """Admitted requests not yet released: connected or waiting."""
        return self._connected + len(self._waiting)

    @property
    def pending_requests(self) -> int:
        """Admitted requests waiting for a connection (`maxConnections` in use)."""
        return len(self._waiting)

    @property
    def active_retries(self) -> int:
        return self._retries

    @property
    def overflows(self) -> int:
        """Requests refused by the pool limits (Envoy's `upstream_rq_pending_overflow`)."""
        return self._overflows

    @property
    def retry_overflows(self) -> int:
        """Retries refused by maxRetries or the budget (Envoy's `upstream_rq_retry_overflow`)."""
        return self._retry_overflows
