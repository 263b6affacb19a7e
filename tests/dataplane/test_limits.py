"""Connection-pool circuit breaking and the retry budget of one cluster."""

from __future__ import annotations

import sys
import threading

from meshlib.dataplane.limits import UNLIMITED, ClusterLimits
from meshlib.policy.common import Percent
from meshlib.policy.destination_rule import (
    ConnectionPoolSettings,
    HTTPSettings,
    RetryBudget,
    TCPSettings,
)

JOIN = 10.0


def pool(
    *,
    max_connections: int | None = None,
    pending: int | None = None,
    max_requests: int | None = None,
    max_retries: int | None = None,
    per_connection: int | None = None,
) -> ConnectionPoolSettings:
    return ConnectionPoolSettings(
        tcp=TCPSettings(max_connections=max_connections),
        http=HTTPSettings(
            http1_max_pending_requests=pending,
            http2_max_requests=max_requests,
            max_retries=max_retries,
            max_requests_per_connection=per_connection,
        ),
    )


def acquire(limits: ClusterLimits, n: int) -> list[bool]:
    return [limits.try_acquire_request() for _ in range(n)]


# -- requests -------------------------------------------------------------------------------


def test_overflow_at_exactly_http2_max_requests() -> None:
    """http2MaxRequests 3 admits three concurrent requests and refuses the fourth."""
    limits = ClusterLimits(pool(max_requests=3), None)
    assert acquire(limits, 3) == [True, True, True]
    assert not limits.try_acquire_request()
    assert limits.active_requests == 3
    assert limits.overflows == 1


def test_release_frees_a_slot() -> None:
    """A released request makes room for exactly one more."""
    limits = ClusterLimits(pool(max_requests=2), None)
    acquire(limits, 2)
    limits.release_request()
    assert limits.try_acquire_request()
    assert not limits.try_acquire_request()


def test_unset_and_zero_mean_unlimited() -> None:
    """Istio writes 2^32-1 for unset limits, and a 0 is the same as unset."""
    for limits in (
        ClusterLimits(None, None),
        ClusterLimits(pool(max_connections=0, pending=0, max_requests=0, max_retries=0), None),
    ):
        assert all(acquire(limits, 5000))
        assert all(limits.try_acquire_retry()[0] for _ in range(5000))
        assert limits.thresholds.max_requests == UNLIMITED
        assert limits.thresholds.max_connections == UNLIMITED
        assert limits.overflows == 0


def test_pending_limit_counts_requests_waiting_for_a_connection() -> None:
    """With maxConnections 2 and http1MaxPendingRequests 1, two requests connect, one waits, the next overflows."""
    limits = ClusterLimits(pool(max_connections=2, pending=1), None)
    assert acquire(limits, 3) == [True, True, True]
    assert limits.pending_requests == 1
    assert not limits.try_acquire_request()
    limits.release_request()
    assert limits.pending_requests == 0
    assert limits.try_acquire_request()


def test_max_connections_alone_lets_requests_wait() -> None:
    """maxConnections without a pending limit does not refuse: the extra requests wait (unlimited queue)."""
    limits = ClusterLimits(pool(max_connections=1), None)
    assert all(acquire(limits, 100))
    assert limits.pending_requests == 99


def test_pending_limit_without_max_connections_has_no_effect() -> None:
    """Without maxConnections nothing ever waits for a connection, so the pending limit never fires."""
    limits = ClusterLimits(pool(pending=1), None)
    assert all(acquire(limits, 100))


def test_max_requests_and_pending_limit_together() -> None:
    """The lower of the two rules decides."""
    limits = ClusterLimits(pool(max_connections=1, pending=10, max_requests=3), None)
    assert acquire(limits, 4) == [True, True, True, False]


def test_max_requests_per_connection_is_exposed_not_enforced() -> None:
    """maxRequestsPerConnection is for the transport; 0 or unset means unlimited (None)."""
    assert ClusterLimits(pool(per_connection=1), None).max_requests_per_connection == 1
    assert ClusterLimits(pool(per_connection=0), None).max_requests_per_connection is None
    assert ClusterLimits(None, None).max_requests_per_connection is None
    limits = ClusterLimits(pool(per_connection=1), None)
    assert all(acquire(limits, 10))


def test_update_keeps_requests_in_flight() -> None:
    """New settings apply at once to the requests already counted."""
    limits = ClusterLimits(None, None)
    acquire(limits, 2)
    limits.update(pool(max_requests=1), None)
    assert not limits.try_acquire_request()
    limits.release_request()
    limits.release_request()
    assert limits.try_acquire_request()


def test_counters_never_go_negative() -> None:
    """Extra releases are ignored."""
    limits = ClusterLimits(pool(max_requests=1, max_retries=1), None)
    limits.release_request()
    limits.release_retry()
    assert limits.active_requests == 0
    assert limits.active_retries == 0
    assert limits.try_acquire_request()
    assert not limits.try_acquire_request()


# -- retries --------------------------------------------------------------------------------


def test_max_retries_limits_concurrent_retries() -> None:
    """maxRetries 2 allows two retries in flight; the third is refused with reason max_retries."""
    limits = ClusterLimits(pool(max_retries=2), None)
    assert limits.try_acquire_retry() == (True, None)
    assert limits.try_acquire_retry() == (True, None)
    assert limits.try_acquire_retry() == (False, "max_retries")
    assert limits.retry_overflows == 1
    limits.release_retry()
    assert limits.try_acquire_retry() == (True, None)


def test_retry_budget_min_concurrency() -> None:
    """With few requests in flight the budget still allows minRetryConcurrency (default 3) retries."""
    limits = ClusterLimits(None, RetryBudget())
    acquire(limits, 5)  # 20% of 5 is 1, below the minimum
    assert [limits.try_acquire_retry()[0] for _ in range(3)] == [True, True, True]
    assert limits.try_acquire_retry() == (False, "budget")
    assert limits.retry_overflows == 1


def test_retry_budget_configured_min_concurrency() -> None:
    """minRetryConcurrency sets the floor of the budget."""
    limits = ClusterLimits(None, RetryBudget(min_retry_concurrency=1))
    assert limits.try_acquire_retry() == (True, None)
    assert limits.try_acquire_retry() == (False, "budget")


def test_retry_budget_percentage_of_active_requests() -> None:
    """Above the minimum, percent of the active requests (rounded down) may be retries."""
    limits = ClusterLimits(None, RetryBudget(percent=Percent(50.0), min_retry_concurrency=1))
    acquire(limits, 9)  # 4.5 -> 4
    assert [limits.try_acquire_retry()[0] for _ in range(5)] == [True] * 4 + [False]
    limits.try_acquire_request()  # 10 active: 5 allowed
    assert limits.try_acquire_retry() == (True, None)
    assert limits.try_acquire_retry() == (False, "budget")


def test_retry_budget_default_percent_is_twenty() -> None:
    """An empty retryBudget allows 20% of the active requests as retries."""
    limits = ClusterLimits(None, RetryBudget())
    acquire(limits, 100)
    assert sum(limits.try_acquire_retry()[0] for _ in range(30)) == 20
    assert limits.thresholds.budget_percent == 20.0
    assert limits.thresholds.min_retry_concurrency == 3


def test_retry_budget_zero_percent_leaves_the_minimum() -> None:
    """A budget of 0% still allows minRetryConcurrency retries."""
    limits = ClusterLimits(None, RetryBudget(percent=Percent(0.0), min_retry_concurrency=2))
    acquire(limits, 1000)
    assert [limits.try_acquire_retry()[0] for _ in range(3)] == [True, True, False]


def test_retry_budget_overrides_max_retries() -> None:
    """As in Envoy, a retry budget replaces the maxRetries circuit breaker."""
    limits = ClusterLimits(pool(max_retries=1), RetryBudget(min_retry_concurrency=3))
    assert [limits.try_acquire_retry()[0] for _ in range(4)] == [True, True, True, False]


# -- threads --------------------------------------------------------------------------------


def test_threads_leave_counters_at_zero() -> None:
    """32 threads x 1,000 acquire/release pairs leave every counter at 0 and never pass the limit."""
    limits = ClusterLimits(pool(max_requests=8, max_retries=4), None)
    barrier = threading.Barrier(32)
    over_limit: list[int] = []

    def worker() -> None:
        barrier.wait(JOIN)
        for _ in range(1000):
            if limits.try_acquire_request():
                active = limits.active_requests
                if active > 8:
                    over_limit.append(active)
                limits.release_request()
            allowed, _reason = limits.try_acquire_retry()
            if allowed:
                if limits.active_retries > 4:
                    over_limit.append(limits.active_retries)
                limits.release_retry()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(32)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so the lock is really contended
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN)
    finally:
        sys.setswitchinterval(switch)
    assert not any(thread.is_alive() for thread in threads)
    assert over_limit == []
    assert limits.active_requests == 0
    assert limits.active_retries == 0
    assert limits.overflows >= 0
