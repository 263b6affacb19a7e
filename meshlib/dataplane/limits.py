"""Connection-pool circuit breaking and the retry budget of one cluster, as Envoy does it.

Envoy's thresholds are per cluster (every endpoint of the destination/subset/port) per client
(ISTIO.md §2.4, §3.5). Going over a limit fails at once (503 `UO`, or no retry); nothing
queues here. Istio writes 2^32-1 for every unset limit, and pilot only applies values > 0, so
unset and 0 both mean unlimited.

Exact rules:

- Requests. `active` counts admitted requests that are not yet released: those holding a
  connection and those waiting for one. A new request is admitted when
  `active < http2MaxRequests` and, if it would have to wait (`active >= maxConnections`), when
  fewer than `http1MaxPendingRequests` are already waiting (waiting = `active - maxConnections`).
  So maxConnections=1 with http1MaxPendingRequests=1 admits two concurrent requests. The model
  is HTTP/1 (one request per connection); without maxConnections nothing ever waits, so
  the pending limit has no effect (as for Envoy's HTTP/2 once connected). A pending limit of 0
  is "unset": there is no way to forbid waiting.
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

import threading
from dataclasses import dataclass

from meshlib.policy.destination_rule import ConnectionPoolSettings, RetryBudget

__all__ = ["UNLIMITED", "ClusterLimits", "Thresholds"]

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


class ClusterLimits:
    """Connection-pool limits and retry budget of one cluster; thread-safe, never queues."""

    def __init__(self, pool: ConnectionPoolSettings | None, budget: RetryBudget | None) -> None:
        self._lock = threading.Lock()
        self._thresholds = Thresholds.of(pool, budget)
        self._active = 0
        self._retries = 0
        self._overflows = 0
        self._retry_overflows = 0

    def update(self, pool: ConnectionPoolSettings | None, budget: RetryBudget | None) -> None:
        """Apply new settings; requests and retries in flight stay counted."""
        thresholds = Thresholds.of(pool, budget)
        with self._lock:
            self._thresholds = thresholds

    # -- requests -----------------------------------------------------------------------------

    def try_acquire_request(self) -> bool:
        """Take a request slot; False is an overflow (answer 503 UO), never a wait."""
        with self._lock:
            t = self._thresholds
            active = self._active
            if active >= t.max_requests or (
                active >= t.max_connections and active - t.max_connections >= t.max_pending_requests
            ):
                self._overflows += 1
                return False
            self._active = active + 1
            return True

    def release_request(self) -> None:
        """Give back a request slot (extra releases are ignored)."""
        with self._lock:
            if self._active > 0:
                self._active -= 1

    # -- retries ------------------------------------------------------------------------------

    def try_acquire_retry(self) -> tuple[bool, str | None]:
        """Take a retry slot: (True, None), or (False, "budget" | "max_retries")."""
        with self._lock:
            t = self._thresholds
            if t.budget_percent is not None:
                allowed = max(t.min_retry_concurrency, int(t.budget_percent / 100.0 * self._active))
                if self._retries >= allowed:
                    self._retry_overflows += 1
                    return False, "budget"
            elif self._retries >= t.max_retries:
                self._retry_overflows += 1
                return False, "max_retries"
            self._retries += 1
            return True, None

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
        return self._active

    @property
    def pending_requests(self) -> int:
        """Admitted requests that are waiting for a connection (active beyond maxConnections)."""
        return max(self._active - self._thresholds.max_connections, 0)

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
