"""Connection-pool circuit breaking and the retry budget of one cluster."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable

from meshlib.dataplane.limits import UNLIMITED, ClusterLimits, Ticket
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


def acquire(limits: ClusterLimits, n: int) -> list[Ticket | None]:
    return [limits.try_acquire_request() for _ in range(n)]


def states(tickets: list[Ticket | None]) -> list[str]:
    """What each admission was: connected at once, waiting for a connection, or refused."""
    return ["overflow" if t is None else "connected" if t.granted else "waiting" for t in tickets]


def connect(limits: ClusterLimits) -> Ticket:
    ticket = limits.try_acquire_request()
    assert ticket is not None and ticket.granted
    return ticket


# -- requests -------------------------------------------------------------------------------


def test_overflow_at_exactly_http2_max_requests() -> None:
    """http2MaxRequests 3 admits three concurrent requests and refuses the fourth."""
    limits = ClusterLimits(pool(max_requests=3), None)
    assert states(acquire(limits, 3)) == ["connected"] * 3
    assert limits.try_acquire_request() is None
    assert limits.active_requests == 3
    assert limits.overflows == 1


def test_release_frees_a_slot() -> None:
    """A released request makes room for exactly one more."""
    limits = ClusterLimits(pool(max_requests=2), None)
    first, _second = acquire(limits, 2)
    assert first is not None
    limits.release_request(first)
    assert limits.try_acquire_request() is not None
    assert limits.try_acquire_request() is None


def test_unset_and_zero_mean_unlimited() -> None:
    """Istio writes 2^32-1 for unset limits, and a 0 is the same as unset."""
    for limits in (
        ClusterLimits(None, None),
        ClusterLimits(pool(max_connections=0, pending=0, max_requests=0, max_retries=0), None),
    ):
        assert states(acquire(limits, 5000)) == ["connected"] * 5000
        assert all(limits.try_acquire_retry()[0] for _ in range(5000))
        assert limits.thresholds.max_requests == UNLIMITED
        assert limits.thresholds.max_connections == UNLIMITED
        assert limits.overflows == 0


def test_pending_limit_counts_requests_waiting_for_a_connection() -> None:
    """With maxConnections 2 and http1MaxPendingRequests 1, two requests connect, one waits, the next overflows."""
    limits = ClusterLimits(pool(max_connections=2, pending=1), None)
    tickets = acquire(limits, 3)
    assert states(tickets) == ["connected", "connected", "waiting"]
    assert limits.pending_requests == 1
    assert limits.try_acquire_request() is None
    assert tickets[0] is not None and tickets[2] is not None
    limits.release_request(tickets[0])
    assert tickets[2].granted  # the released connection went to the waiting request
    assert limits.pending_requests == 0
    assert states(acquire(limits, 2)) == ["waiting", "overflow"]


def test_waiting_requests_connect_first_come_first_served() -> None:
    """Each released connection goes to the request that has waited longest."""
    limits = ClusterLimits(pool(max_connections=1), None)
    holder = connect(limits)
    waiting = [limits.try_acquire_request() for _ in range(3)]
    assert states(waiting) == ["waiting"] * 3
    order = []
    current = holder
    for _ in range(3):
        limits.release_request(current)
        granted = [t for t in waiting if t is not None and t.granted and t not in order]
        assert len(granted) == 1
        order.append(granted[0])
        current = granted[0]
    assert order == waiting
    limits.release_request(current)
    assert limits.active_requests == 0


def test_a_withdrawn_waiter_leaves_the_queue() -> None:
    """A waiting request given back (timed out, cancelled) frees its place in the queue."""
    limits = ClusterLimits(pool(max_connections=1, pending=1), None)
    holder = connect(limits)
    waiter = limits.try_acquire_request()
    assert waiter is not None and not waiter.granted
    assert limits.try_acquire_request() is None  # the one pending place is taken
    limits.release_request(waiter)
    assert limits.pending_requests == 0
    again = limits.try_acquire_request()
    assert again is not None and not again.granted
    limits.release_request(waiter)  # a second release of the same ticket changes nothing
    assert limits.pending_requests == 1
    limits.release_request(holder)
    assert again.granted and limits.active_requests == 1


def test_max_connections_alone_lets_requests_wait() -> None:
    """maxConnections without a pending limit does not refuse: the extra requests wait (unlimited queue)."""
    limits = ClusterLimits(pool(max_connections=1), None)
    assert states(acquire(limits, 100)) == ["connected"] + ["waiting"] * 99
    assert limits.pending_requests == 99


def test_pending_limit_without_max_connections_has_no_effect() -> None:
    """Without maxConnections nothing ever waits for a connection, so the pending limit never fires."""
    limits = ClusterLimits(pool(pending=1), None)
    assert states(acquire(limits, 100)) == ["connected"] * 100


def test_max_requests_and_pending_limit_together() -> None:
    """http2MaxRequests counts requests given a connection, not those waiting for one (Envoy
    checks it as a waiting request gets its connection): waiting is bounded by
    http1MaxPendingRequests alone. (This test used to expect the fourth request refused, with
    waiting requests counted against http2MaxRequests; Envoy admits it.)"""
    limits = ClusterLimits(pool(max_connections=1, pending=10, max_requests=3), None)
    tickets = acquire(limits, 4)
    assert states(tickets) == ["connected", "waiting", "waiting", "waiting"]
    limits.release_request(tickets[0])
    assert states(tickets[1:]) == ["connected", "waiting", "waiting"]
    limits = ClusterLimits(pool(max_connections=3, pending=10, max_requests=2), None)
    assert states(acquire(limits, 3)) == ["connected", "connected", "overflow"]


def test_raising_max_connections_connects_waiting_requests() -> None:
    """A policy update with room for more connections lets waiting requests go at once."""
    limits = ClusterLimits(pool(max_connections=1), None)
    tickets = acquire(limits, 4)
    limits.update(pool(max_connections=3), None)
    assert states(tickets) == ["connected"] * 3 + ["waiting"]
    limits.update(None, None)
    assert states(tickets) == ["connected"] * 4
    assert limits.pending_requests == 0


def test_max_requests_per_connection_is_exposed_not_enforced() -> None:
    """maxRequestsPerConnection is for the transport; 0 or unset means unlimited (None)."""
    assert ClusterLimits(pool(per_connection=1), None).max_requests_per_connection == 1
    assert ClusterLimits(pool(per_connection=0), None).max_requests_per_connection is None
    assert ClusterLimits(None, None).max_requests_per_connection is None
    limits = ClusterLimits(pool(per_connection=1), None)
    assert states(acquire(limits, 10)) == ["connected"] * 10


def test_update_keeps_requests_in_flight() -> None:
    """New settings apply at once to the requests already counted."""
    limits = ClusterLimits(None, None)
    tickets = acquire(limits, 2)
    limits.update(pool(max_requests=1), None)
    assert limits.try_acquire_request() is None
    for ticket in tickets:
        assert ticket is not None
        limits.release_request(ticket)
    assert limits.try_acquire_request() is not None


def test_counters_never_go_negative() -> None:
    """Extra releases are ignored."""
    limits = ClusterLimits(pool(max_requests=1, max_retries=1), None)
    ticket = connect(limits)
    limits.release_request(ticket)
    limits.release_request(ticket)
    limits.release_retry()
    assert limits.active_requests == 0
    assert limits.active_retries == 0
    assert limits.try_acquire_request() is not None
    assert limits.try_acquire_request() is None


# -- waiting ----------------------------------------------------------------------------------


def test_a_thread_waits_until_a_connection_is_released() -> None:
    """Ticket.wait blocks a thread until another thread releases a connection."""
    limits = ClusterLimits(pool(max_connections=1), None)
    holder = connect(limits)
    waiter = limits.try_acquire_request()
    assert waiter is not None
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(JOIN)), daemon=True)
    thread.start()
    thread.join(0.05)
    assert thread.is_alive() and result == []  # still waiting: nothing was released
    limits.release_request(holder)
    thread.join(JOIN)
    assert result == [True]


def test_a_wait_that_times_out_leaves_the_queue() -> None:
    """A thread's wait that runs out returns False and takes the ticket out of the queue."""
    limits = ClusterLimits(pool(max_connections=1), None)
    connect(limits)
    waiter = limits.try_acquire_request()
    assert waiter is not None
    assert waiter.wait(0.01) is False
    assert limits.pending_requests == 0
    assert limits.active_requests == 1


def test_asyncio_waiters_are_woken_in_order_from_another_thread() -> None:
    """Event-loop waiters get connections in queue order, released from a thread."""
    limits = ClusterLimits(pool(max_connections=1), None)
    holder = connect(limits)

    async def main() -> list[int]:
        order: list[int] = []
        tickets = [limits.try_acquire_request() for _ in range(3)]

        async def waiter(i: int, ticket: Ticket | None) -> None:
            assert ticket is not None
            assert await ticket.wait_async(JOIN)
            order.append(i)
            await asyncio.sleep(0)
            limits.release_request(ticket)

        tasks = [asyncio.create_task(waiter(i, t)) for i, t in enumerate(tickets)]
        await asyncio.sleep(0.01)
        assert order == []
        await asyncio.to_thread(limits.release_request, holder)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == [0, 1, 2]
    assert limits.active_requests == 0


def test_a_cancelled_asyncio_waiter_gives_its_place_back() -> None:
    """Cancelling a waiting task, then releasing its ticket, leaves nothing counted."""
    limits = ClusterLimits(pool(max_connections=1), None)
    holder = connect(limits)

    async def main() -> None:
        ticket = limits.try_acquire_request()
        assert ticket is not None
        task = asyncio.create_task(ticket.wait_async(None))
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        limits.release_request(ticket)

    asyncio.run(main())
    assert limits.pending_requests == 0
    limits.release_request(holder)
    assert limits.active_requests == 0


def test_asyncio_wait_timeout() -> None:
    """wait_async returns False after its timeout, out of the queue."""
    limits = ClusterLimits(pool(max_connections=1), None)
    connect(limits)
    ticket = limits.try_acquire_request()
    assert ticket is not None
    assert asyncio.run(ticket.wait_async(0.01)) is False
    assert limits.pending_requests == 0


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


def run_contended(worker: Callable[[], None], n: int) -> None:
    """`worker` in `n` threads at once, switching often so the locks are really contended;
    every thread must finish."""
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN)
    finally:
        sys.setswitchinterval(switch)
    assert not any(thread.is_alive() for thread in threads)


def test_threads_leave_counters_at_zero() -> None:
    """32 threads x 1,000 acquire/release pairs leave every counter at 0 and never pass the limit."""
    limits = ClusterLimits(pool(max_requests=8, max_retries=4), None)
    barrier = threading.Barrier(32)
    over_limit: list[int] = []

    def worker() -> None:
        barrier.wait(JOIN)
        for _ in range(1000):
            ticket = limits.try_acquire_request()
            if ticket is not None:
                active = limits.active_requests
                if active > 8:
                    over_limit.append(active)
                limits.release_request(ticket)
            allowed, _reason = limits.try_acquire_retry()
            if allowed:
                if limits.active_retries > 4:
                    over_limit.append(limits.active_retries)
                limits.release_retry()

    run_contended(worker, 32)
    assert over_limit == []
    assert limits.active_requests == 0
    assert limits.active_retries == 0
    assert limits.overflows >= 0


def test_threads_queueing_for_connections_never_exceed_max_connections() -> None:
    """16 threads x 200 requests through maxConnections 2: at most 2 hold a connection at any
    time, every request gets one (no pending limit), and nothing stays counted."""
    limits = ClusterLimits(pool(max_connections=2), None)
    holding = 0
    most = 0
    served = 0
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        nonlocal holding, most, served
        barrier.wait(JOIN)
        for _ in range(200):
            ticket = limits.try_acquire_request()
            assert ticket is not None
            assert ticket.wait(JOIN)
            with lock:
                holding += 1
                most = max(most, holding)
            with lock:
                holding -= 1
                served += 1
            limits.release_request(ticket)

    run_contended(worker, 16)
    assert served == 16 * 200
    assert most <= 2
    assert limits.active_requests == 0 and limits.pending_requests == 0


def test_a_waiter_whose_event_loop_closed_passes_its_connection_on() -> None:
    """A ticket waiting on an event loop that was closed (its task never cancelled) cannot
    be woken: the connection it is granted goes on to the next in line at once."""
    limits = ClusterLimits(pool(max_connections=1), None)
    holder = connect(limits)
    dead = limits.try_acquire_request()
    assert dead is not None
    loop = asyncio.new_event_loop()
    task = loop.create_task(dead.wait_async(None))  # kept referenced: never collected here
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    behind = limits.try_acquire_request()
    assert behind is not None and not behind.granted
    limits.release_request(holder)
    assert dead.granted and behind.granted
    assert limits.active_requests == 1  # only `behind` holds a connection
    limits.release_request(dead)  # its task's own release, were it ever to run, is ignored
    assert limits.active_requests == 1
    del task


def test_retry_budget_counts_requests_still_active_elsewhere() -> None:
    """A failed try released here but still open in Envoy's eyes (its body to come) counts
    towards the budget's active requests: one active + one still active at 100% is two."""
    limits = ClusterLimits(None, RetryBudget(percent=Percent(100.0), min_retry_concurrency=1))
    acquire(limits, 1)
    assert limits.try_acquire_retry() == (True, None)
    assert not limits.retry_available()
    assert limits.retry_available(still_active=1)
    assert limits.try_acquire_retry(still_active=1) == (True, None)
    assert limits.try_acquire_retry(still_active=1) == (False, "budget")
