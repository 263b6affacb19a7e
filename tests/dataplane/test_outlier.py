"""Outlier detection: Envoy's consecutive-error ejection and interval sweeps on pybreaker's
state machine."""

from __future__ import annotations

import threading
from typing import Any

import pybreaker
import pytest

from meshlib.dataplane.outlier import CLOSED, OPEN, OutlierDetector
from meshlib.policy.common import Duration
from meshlib.policy.destination_rule import OutlierDetection

JOIN = 5.0  # seconds a thread may take before a test calls it stuck


class FakeClock:
    """Monotonic seconds under the test's control."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def od(**fields: Any) -> OutlierDetection:
    for name in ("interval", "base_ejection_time"):
        if isinstance(fields.get(name), str):
            fields[name] = Duration.of(fields[name])
    return OutlierDetection(**fields)


def detector(settings: OutlierDetection | None = None) -> tuple[OutlierDetector, FakeClock]:
    clock = FakeClock()
    return OutlierDetector(od() if settings is None else settings, clock=clock), clock


def report(
    det: OutlierDetector,
    key: str,
    times: int,
    status: int | None = 500,
    *,
    local: bool = False,
    total: int = 10,
) -> None:
    for _ in range(times):
        det.record(key, status=status, local_origin_failure=local, total_endpoints=total)


def eject(det: OutlierDetector, key: str, total: int = 10) -> None:
    """Five 500s: enough for the default consecutive5xxErrors."""
    report(det, key, 5, total=total)


# -- which errors count ---------------------------------------------------------------------


def test_default_is_five_consecutive_5xx() -> None:
    """With outlierDetection present but consecutive5xxErrors unset, the fifth 5xx in a row ejects."""
    det, _ = detector()
    report(det, "a", 4)
    assert det.state("a") == CLOSED
    assert det.admit("a", 10)
    report(det, "a", 1)
    assert det.state("a") == OPEN
    assert det.ejected() == {"a"}
    assert not det.admit("a", 10)


@pytest.mark.parametrize("threshold", [1, 3, 7])
def test_ejection_after_exactly_n_consecutive_5xx(threshold: int) -> None:
    """consecutive5xxErrors N ejects at the Nth consecutive 5xx, not before."""
    det, _ = detector(od(consecutive_5xx_errors=threshold))
    report(det, "a", threshold - 1, status=503)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=503)
    assert det.state("a") == OPEN
    assert det.ejection_count("a") == 1


def test_success_resets_the_count() -> None:
    """A non-error status between errors starts the consecutive count again."""
    det, _ = detector()
    report(det, "a", 4)
    report(det, "a", 1, status=404)  # 4xx is a success for outlier detection
    report(det, "a", 4)
    assert det.state("a") == CLOSED
    report(det, "a", 1)
    assert det.state("a") == OPEN


def test_zero_disables_consecutive_5xx() -> None:
    """consecutive5xxErrors 0 turns the 5xx rule off."""
    det, _ = detector(od(consecutive_5xx_errors=0))
    report(det, "a", 50)
    assert det.state("a") == CLOSED
    assert det.ejected() == frozenset()


def test_gateway_errors_count_502_503_504_only() -> None:
    """consecutiveGatewayErrors counts 502/503/504; another 5xx resets its count."""
    det, _ = detector(od(consecutive_5xx_errors=0, consecutive_gateway_errors=3))
    report(det, "a", 10, status=500)
    report(det, "a", 2, status=502)
    report(det, "a", 1, status=500)  # a 5xx but not a gateway error: the run is broken
    report(det, "a", 2, status=504)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=503)
    assert det.state("a") == OPEN


def test_gateway_errors_also_count_as_5xx() -> None:
    """A gateway error feeds both counters: the lower threshold wins."""
    det, _ = detector(od(consecutive_5xx_errors=2, consecutive_gateway_errors=5))
    report(det, "a", 2, status=502)
    assert det.state("a") == OPEN


def test_deprecated_consecutive_errors_is_ignored() -> None:
    """consecutiveErrors (deprecated) changes nothing, as pilot no longer reads it: no gateway
    rule, and Envoy's default of five consecutive 5xx still ejects."""
    det, _ = detector(od(consecutive_errors=2))
    report(det, "a", 4, status=503)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=500)
    assert det.state("a") == OPEN


def test_http_error_codes_replace_5xx() -> None:
    """With outlierDetectionHttpErrorCodes only the listed codes count for consecutive5xxErrors."""
    det, _ = detector(od(consecutive_5xx_errors=3, outlier_detection_http_error_codes=(429, 500)))
    report(det, "a", 10, status=501)
    assert det.state("a") == CLOSED
    report(det, "a", 2, status=429)
    report(det, "a", 1, status=500)
    assert det.state("a") == OPEN


def test_local_origin_failures_count_as_5xx_when_not_split() -> None:
    """Not split: connect failures, resets and timeouts count as 5xx errors."""
    det, _ = detector()
    report(det, "a", 5, status=None, local=True)
    assert det.state("a") == OPEN


def test_local_origin_failures_count_as_gateway_errors_when_not_split() -> None:
    """Not split: a local-origin failure is also a gateway error."""
    det, _ = detector(od(consecutive_5xx_errors=0, consecutive_gateway_errors=2))
    report(det, "a", 2, status=None, local=True)
    assert det.state("a") == OPEN


def test_split_local_origin_failures_have_their_own_counter() -> None:
    """Split: local-origin failures feed only consecutiveLocalOriginFailures (default 5)."""
    det, _ = detector(od(split_external_local_origin_errors=True, consecutive_5xx_errors=2))
    report(det, "a", 4, status=None, local=True)
    assert det.state("a") == CLOSED  # the 5xx threshold of 2 does not see them
    report(det, "a", 1, status=None, local=True)
    assert det.state("a") == OPEN


def test_split_local_origin_threshold_and_reset_by_a_response() -> None:
    """Split: consecutiveLocalOriginFailures applies, and any response (even a 5xx) resets it."""
    det, _ = detector(
        od(split_external_local_origin_errors=True, consecutive_local_origin_failures=3)
    )
    report(det, "a", 2, status=None, local=True)
    report(det, "a", 1, status=500)  # the connection worked
    report(det, "a", 2, status=None, local=True)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=None, local=True)
    assert det.state("a") == OPEN


def test_split_only_failures_to_connect_build_up() -> None:
    """Split: a reset or timeout after the connection was made counts one, after the
    connection reset the count (Envoy's LocalOriginConnectSuccess in onPoolReady): a run of
    them never reaches consecutiveLocalOriginFailures 2; failures to connect do."""
    det, _ = detector(
        od(split_external_local_origin_errors=True, consecutive_local_origin_failures=2)
    )
    for _ in range(5):
        det.record("a", status=None, local_origin_failure=True, connected=True, total_endpoints=10)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=None, local=True)  # a failure to connect after one: two
    assert det.state("a") == OPEN


def test_split_5xx_still_counted_separately() -> None:
    """Split: external 5xx responses keep feeding consecutive5xxErrors."""
    det, _ = detector(od(split_external_local_origin_errors=True, consecutive_5xx_errors=2))
    report(det, "a", 1, status=500)
    report(det, "a", 1, status=None, local=True)  # does not break the 5xx run
    report(det, "a", 1, status=500)
    assert det.state("a") == OPEN


def test_no_response_without_local_flag_counts_as_503() -> None:
    """status None without the local-origin flag counts like a 503 (5xx and gateway error)."""
    det, _ = detector(od(consecutive_5xx_errors=0, consecutive_gateway_errors=2))
    report(det, "a", 2, status=None)
    assert det.state("a") == OPEN


# -- ejection time, return at a sweep, and k --------------------------------------------------


def test_ejection_time_grows_with_k_and_is_capped() -> None:
    """Ejection lasts base x k, capped at 300 s; k stops growing once base x k passes the cap."""
    det, clock = detector(od(base_ejection_time="30s"))  # sweeps every 10 s from t=1000
    eject(det, "a")
    for k in range(1, 14):
        assert det.ejection_count("a") == min(k, 11)
        duration = min(30.0 * k, 300.0)
        clock.advance(duration - 0.5)
        assert not det.admit("a", 10)
        clock.advance(0.5)
        assert det.admit("a", 10)  # back at the sweep that ends its time
        eject(det, "a")  # a new run of errors at once: ejected again
        assert det.state("a") == OPEN


def test_ejection_cap_is_base_when_base_exceeds_300s() -> None:
    """The cap is max(300 s, baseEjectionTime)."""
    det, clock = detector(od(base_ejection_time="400s"))
    eject(det, "a")
    clock.advance(400)
    assert det.admit("a", 10)
    eject(det, "a")  # k = 2, but the time stays 400 s
    clock.advance(399)
    assert not det.admit("a", 10)
    clock.advance(1)
    assert det.admit("a", 10)


def test_return_is_whole_at_the_sweep_without_a_trial() -> None:
    """At the sweep that ends its ejection the endpoint is back in the pool, closed, without
    anyone asking for it first and without a trial request."""
    det, clock = detector()
    eject(det, "a")
    clock.advance(30)
    assert det.state("a") == CLOSED
    assert det.ejected() == frozenset()
    assert det.ejection_count("a") == 1  # the sweep that returns it does not lower k


@pytest.mark.parametrize(
    ("ejected_after", "back_at"),
    [
        pytest.param(5.0, 40.0, id="ends-mid-interval"),
        pytest.param(0.0, 30.0, id="ends-on-a-sweep"),
        pytest.param(9.999, 40.0, id="ends-just-before-a-sweep"),
    ],
)
def test_return_at_the_first_sweep_at_or_after_the_ejection_time(
    ejected_after: float, back_at: float
) -> None:
    """Sweeps run every interval (10 s) from the detector's start: an ejection of 30 s that
    ends between two sweeps lasts until the next one, not a moment less; the return time is
    that sweep's, so k is lowered one interval after it."""
    det, clock = detector(od(interval="10s"))
    start = clock.now
    clock.advance(ejected_after)
    eject(det, "a")
    clock.now = start + ejected_after + 30.0  # the ejection time is over...
    if ejected_after + 30.0 < back_at:
        assert not det.admit("a", 10)  # ... but no sweep has run since
        assert not det.available("a", 10)
        assert det.state("a") == OPEN
    clock.now = start + back_at - 0.001
    assert not det.admit("a", 10)
    assert det.ejected() == {"a"}
    clock.now = start + back_at
    assert det.available("a", 10)
    assert det.admit("a", 10)
    assert det.ejected() == frozenset()
    clock.now = start + back_at + 9.999
    assert det.ejection_count("a") == 1
    clock.now = start + back_at + 10.0  # one interval after the return
    assert det.ejection_count("a") == 0


def test_full_traffic_after_return() -> None:
    """Back in the pool, the endpoint takes every request at once: many admitted in a row,
    concurrent ones too, their successes changing nothing."""
    det, clock = detector()
    eject(det, "a")
    clock.advance(30)
    assert all(det.admit("a", 10) for _ in range(20))
    assert all(det.available("a", 10) for _ in range(20))
    report(det, "a", 3, status=200)
    assert all(det.admit("a", 10) for _ in range(20))
    assert det.state("a") == CLOSED


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_reejection_only_after_a_new_run_of_consecutive_5xx(threshold: int) -> None:
    """A returned endpoint that still fails is ejected again only when consecutive5xxErrors new
    errors come in a row (its counters were reset), and then for base x (k + 1)."""
    det, clock = detector(od(consecutive_5xx_errors=threshold))
    report(det, "a", threshold)
    clock.advance(30)
    report(det, "a", threshold - 1)
    assert det.state("a") == CLOSED
    assert det.admit("a", 10)
    report(det, "a", 1)
    assert det.state("a") == OPEN
    assert det.ejection_count("a") == 2
    clock.advance(59)
    assert not det.admit("a", 10)
    clock.advance(1)
    assert det.admit("a", 10)


def test_errors_before_the_ejection_do_not_count_after_return() -> None:
    """Errors counted before an ejection, and late ones reported while it lasted, are not
    carried over: after the return a full run is needed."""
    det, clock = detector(od(consecutive_5xx_errors=3, consecutive_gateway_errors=5))
    report(det, "a", 2, status=503)  # gateway count 2 ...
    report(det, "a", 1, status=500)  # ... reset; the 5xx run of 3 ejects
    report(det, "a", 10, status=503)  # late results while ejected: ignored
    clock.advance(30)
    report(det, "a", 2, status=503)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=503)
    assert det.state("a") == OPEN


def test_returned_endpoint_judged_by_enabled_rules() -> None:
    """After its return, an error no enabled rule counts (500 with only gateway errors) leaves
    the endpoint in the pool; one the rule counts ejects it again."""
    det, clock = detector(od(consecutive_5xx_errors=0, consecutive_gateway_errors=1))
    report(det, "a", 1, status=502)
    clock.advance(30)
    report(det, "a", 5, status=500)
    assert det.state("a") == CLOSED
    report(det, "a", 1, status=502)
    assert det.state("a") == OPEN


def test_results_for_an_ejected_endpoint_are_ignored() -> None:
    """Late results of requests sent before the ejection do not change an open endpoint."""
    det, clock = detector()
    eject(det, "a")
    report(det, "a", 3, status=200)
    report(det, "a", 10)
    assert det.state("a") == OPEN
    assert det.ejection_count("a") == 1
    clock.advance(30)
    assert det.admit("a", 10)


def test_interval_sweep_decrements_k() -> None:
    """k drops by one at each interval sweep that finds the endpoint back for a full interval."""
    det, clock = detector(od(interval="10s"))  # sweeps at 1010, 1020, ... (created at 1000)
    eject(det, "a")  # t=1000, k=1
    clock.advance(30)
    assert det.admit("a", 10)  # back at the sweep at 1030
    eject(det, "a")  # t=1030, k=2
    clock.advance(60)
    assert det.admit("a", 10)  # back at the sweep at 1090 with k=2
    clock.advance(9.5)
    assert det.ejection_count("a") == 2  # the sweep at 1090 returned it: no decrement there
    clock.advance(0.5)
    assert det.ejection_count("a") == 1  # sweep at 1100: back for 10 s
    clock.advance(10)
    assert det.ejection_count("a") == 0
    eject(det, "a")
    assert det.ejection_count("a") == 1  # the next ejection is base x 1 again
    clock.advance(29)
    assert not det.admit("a", 10)
    clock.advance(1)
    assert det.admit("a", 10)


@pytest.mark.parametrize("sweeps_back", [0, 1, 2, 3, 4])
def test_k_decrement_per_sweep_sets_the_next_ejection_length(sweeps_back: int) -> None:
    """Back with k = 3, each sweep lowers k by one (not below 0): ejected again after n sweeps,
    the endpoint is out for base x (max(3 - n, 0) + 1)."""
    det, clock = detector(od(interval="10s", base_ejection_time="30s"))
    for k in (1, 2, 3):  # ejected at once after each return: k builds up to 3
        eject(det, "a")
        clock.advance(30.0 * k)
    assert det.state("a") == CLOSED
    assert det.ejection_count("a") == 3
    clock.advance(10.0 * sweeps_back)
    assert det.ejection_count("a") == max(3 - sweeps_back, 0)
    eject(det, "a")
    k = max(3 - sweeps_back, 0) + 1
    assert det.ejection_count("a") == k
    clock.advance(30.0 * k - 0.5)
    assert not det.admit("a", 10)
    clock.advance(0.5)
    assert det.admit("a", 10)


def test_k_does_not_decay_while_ejected() -> None:
    """Sweeps leave k alone while the endpoint is still out of the pool."""
    det, clock = detector(od(interval="1s"))
    eject(det, "a")
    clock.advance(30)
    eject(det, "a")  # back at 1030, ejected again at once: k = 2, for 60 s
    clock.advance(59)  # 59 sweeps while ejected
    assert det.ejection_count("a") == 2
    assert det.state("a") == OPEN
    clock.advance(1)
    assert det.ejection_count("a") == 2  # back; the returning sweep does not lower k
    clock.advance(1)
    assert det.ejection_count("a") == 1


def test_long_idle_period_decays_k_in_one_step() -> None:
    """An hour of sweeps is applied at once, without looping per sweep."""
    det, clock = detector(od(interval="1ms", base_ejection_time="1s"))
    clock.advance(0.0002)  # ejections fall 0.2 ms after a sweep, far from float rounding
    eject(det, "a")
    for _ in range(4):
        clock.advance(det.ejection_count("a") + 0.001)  # back at the sweep 0.2 ms ago
        assert det.admit("a", 10)
        eject(det, "a")
    clock.advance(det.ejection_count("a") + 0.001)
    assert det.admit("a", 10)
    report(det, "a", 1, status=200)
    assert det.ejection_count("a") == 5
    clock.advance(3600)
    assert det.ejection_count("a") == 0


# -- how many may be ejected ----------------------------------------------------------------


def test_max_ejection_percent_default_ten_of_ten_endpoints() -> None:
    """At the default 10% only one of ten endpoints is ejected; the others stay in."""
    det, _ = detector()
    for i in range(10):
        eject(det, f"e{i}", total=10)
    assert det.ejected() == {"e0"}
    assert det.ejections_overflow == 9
    assert all(det.admit(f"e{i}", 10) for i in range(1, 10))


def test_max_ejection_percent_fifty() -> None:
    """At 50% five of ten endpoints are ejected."""
    det, _ = detector(od(max_ejection_percent=50))
    for i in range(10):
        eject(det, f"e{i}", total=10)
    assert det.ejected() == {f"e{i}" for i in range(5)}


def test_first_ejection_is_held_to_max_ejection_percent() -> None:
    """The first ejection is checked too (Envoy >= 1.28, always_eject_one_host off): one of
    three endpoints is 33%, over the default 10%, so none is ejected; each refusal counts."""
    det, _ = detector()
    eject(det, "a", total=3)
    eject(det, "b", total=3)
    assert det.ejected() == frozenset()
    assert det.ejections_overflow == 2
    assert det.admit("a", 3) and det.admit("b", 3)


@pytest.mark.parametrize(
    ("percent", "ejected"),
    [
        pytest.param(33, set(), id="33%-none"),
        pytest.param(34, {"a"}, id="34%-one"),
        pytest.param(66, {"a"}, id="66%-one"),
        pytest.param(67, {"a", "b"}, id="67%-two"),
        pytest.param(100, {"a", "b", "c"}, id="100%-all"),
    ],
)
def test_max_ejection_percent_of_three_endpoints(percent: int, ejected: set[str]) -> None:
    """An ejection happens only while 100 x (ejected + 1) / endpoints <= maxEjectionPercent."""
    det, _ = detector(od(max_ejection_percent=percent))
    for key in ("a", "b", "c"):
        eject(det, key, total=3)
    assert det.ejected() == ejected


def test_a_lone_endpoint_is_ejected_only_at_100_percent() -> None:
    """A cluster of one endpoint: 99% keeps it in the pool, 100% ejects it."""
    kept, _ = detector(od(max_ejection_percent=99))
    eject(kept, "a", total=1)
    assert kept.ejected() == frozenset()
    gone, _ = detector(od(max_ejection_percent=100))
    eject(gone, "a", total=1)
    assert gone.ejected() == {"a"}


def test_refused_ejection_needs_a_new_run_of_errors() -> None:
    """When maxEjectionPercent refuses an ejection the counter restarts, as in Envoy."""
    det, clock = detector()
    eject(det, "a")
    eject(det, "b")
    assert det.state("b") == CLOSED
    clock.advance(30)
    assert det.admit("a", 10)
    report(det, "a", 1, status=200)  # a is back: room for one ejection
    report(det, "b", 4)
    assert det.state("b") == CLOSED
    report(det, "b", 1)
    assert det.state("b") == OPEN


def test_all_ejected_admits_nobody() -> None:
    """With panic off (Istio's default) and every endpoint ejected, admit() refuses all (503 UH)."""
    det, _ = detector(od(max_ejection_percent=100))
    for key in ("a", "b", "c"):
        eject(det, key, total=3)
    assert det.ejected() == {"a", "b", "c"}
    assert not any(det.admit(key, 3) for key in ("a", "b", "c"))
    assert not any(det.available(key, 3) for key in ("a", "b", "c"))


def test_panic_admits_everything_below_min_health() -> None:
    """minHealthPercent > 0: once the healthy share falls below it, every endpoint is admitted."""
    det, _ = detector(od(max_ejection_percent=100, min_health_percent=50))
    keys = ["a", "b", "c", "d"]
    eject(det, "a", total=4)
    eject(det, "b", total=4)
    assert not det.admit("a", 4)  # 50% healthy is not below 50%
    eject(det, "c", total=4)
    assert all(det.admit(key, 4) for key in keys)  # 25% healthy: panic
    assert det.state("a") == OPEN  # panic routes around ejection, it does not undo it


@pytest.mark.parametrize(
    ("total", "ejected", "panic"),
    [
        pytest.param(4, 1, False, id="3-of-4-healthy-x1.4-is-100"),
        pytest.param(7, 2, False, id="5-of-7-healthy-x1.4-is-100"),
        pytest.param(7, 3, True, id="4-of-7-healthy-x1.4-is-80"),
        pytest.param(10, 3, True, id="7-of-10-healthy-x1.4-is-98"),
    ],
)
def test_no_panic_while_the_overprovisioned_share_is_whole(
    total: int, ejected: int, panic: bool
) -> None:
    """minHealthPercent 80: as Envoy, panic is only considered when 1.4 x the healthy share
    (the overprovisioning factor) is below 100%, so 75% or 71% healthy is no panic."""
    det, _ = detector(od(max_ejection_percent=100, min_health_percent=80))
    for i in range(ejected):
        eject(det, f"e{i}", total=total)
    assert len(det.ejected()) == ejected
    assert det.admit("e0", total) is panic
    assert det.available("e0", total) is panic


def test_settings_none_never_ejects() -> None:
    """Without an outlierDetection block nothing is ever ejected."""
    det = OutlierDetector(None, clock=FakeClock())
    report(det, "a", 100, status=None, local=True)
    report(det, "a", 100, status=503)
    assert det.admit("a", 1)
    assert det.state("a") == CLOSED
    assert det.ejected() == frozenset()


def test_update_keeps_endpoint_state() -> None:
    """New settings keep ejections; removing the block returns every endpoint (as Envoy's
    cluster without an outlier detector); restoring it starts from there."""
    det, _clock = detector()
    eject(det, "a")
    det.update(od(consecutive_5xx_errors=2))
    assert det.state("a") == OPEN
    assert not det.admit("a", 10)
    det.update(None)
    assert det.admit("a", 10)
    report(det, "b", 10)
    det.update(od(consecutive_5xx_errors=2))
    assert det.state("b") == CLOSED
    assert det.state("a") == CLOSED
    assert det.admit("a", 10)
    report(det, "a", 2)  # the new settings' threshold
    assert det.state("a") == OPEN


def test_retain_forgets_departed_endpoints() -> None:
    """Endpoints that left the cluster no longer count as ejected."""
    det, _ = detector()
    eject(det, "a")
    det.retain(["b", "c"])
    assert det.ejected() == frozenset()
    eject(det, "b")
    assert det.ejected() == {"b"}


def test_results_for_a_departed_endpoint_are_ignored() -> None:
    """Once retain() has dropped an endpoint, failures still reported for it (tries that were
    in flight) neither eject it nor use up maxEjectionPercent: a live endpoint can still go."""
    det, _ = detector(od(max_ejection_percent=34))  # one of three endpoints
    det.retain(["a", "b", "c"])
    det.retain(["b", "c", "d"])  # a replaced by d
    eject(det, "a", total=3)
    assert det.ejected() == frozenset()
    assert det.ejection_count("a") == 0
    eject(det, "b", total=3)
    assert det.ejected() == {"b"}
    assert det.ejections_overflow == 0


def test_available_agrees_with_admit() -> None:
    """available() (the balancer's filter) and admit() give the same answer, both after the
    sweeps due by now: no while ejected, yes from the sweep that returns the endpoint."""
    det, clock = detector()
    eject(det, "a")
    assert not det.available("a", 10)
    assert not det.admit("a", 10)
    clock.advance(30)
    assert det.available("a", 10)
    assert det.available("a", 10)
    assert det.state("a") == CLOSED
    assert det.admit("a", 10)
    assert det.available("a", 10)


def test_max_ejection_percent_counts_an_endpoint_until_its_sweep() -> None:
    """An endpoint whose ejection time is over still counts as ejected for maxEjectionPercent
    until the sweep returns it; then there is room for another ejection."""
    det, clock = detector()  # 10 endpoints, 10%: one ejection at a time
    clock.advance(5)
    eject(det, "a")  # t=1005, out until the sweep at 1040
    clock.advance(32)  # t=1037: its 30 s are over, no sweep yet
    eject(det, "b")
    assert det.state("b") == CLOSED
    assert det.ejections_overflow == 1
    clock.advance(3)  # the sweep at 1040 returns a
    eject(det, "b")
    assert det.ejected() == {"b"}


def test_panic_ends_when_the_sweep_returns_endpoints() -> None:
    """minHealthPercent: panic lasts while too many endpoints are ejected and ends when a sweep
    returns enough of them; ejection is routed around, never undone, by panic."""
    det, clock = detector(od(max_ejection_percent=100, min_health_percent=50))
    eject(det, "a", total=4)  # t=1000, back at 1030
    clock.advance(10)
    eject(det, "b", total=4)  # t=1010, back at 1040
    eject(det, "c", total=4)
    assert all(det.admit(key, 4) for key in "abcd")  # 25% healthy: panic
    assert det.ejected() == {"a", "b", "c"}
    clock.advance(20)  # t=1030: a is back, 50% healthy is not below 50%
    assert det.admit("a", 4)
    assert not det.admit("b", 4)
    assert not det.available("c", 4)
    clock.advance(10)
    assert all(det.admit(key, 4) for key in "abcd")
    assert det.ejected() == frozenset()


# -- listeners and pybreaker ------------------------------------------------------------------


def test_listeners_see_every_transition() -> None:
    """listen() reports (key, old, new) for each ejection and each return (closed and open
    only: no half-open)."""
    det, clock = detector()
    seen: list[tuple[str, str, str]] = []
    det.listen(lambda key, old, new: seen.append((key, old, new)))
    eject(det, "a")
    clock.advance(30)
    det.admit("a", 10)
    eject(det, "a")
    clock.advance(60)
    report(det, "b", 1, status=200)  # any call runs the sweep that returns a
    assert seen == [
        ("a", CLOSED, OPEN),
        ("a", OPEN, CLOSED),
        ("a", CLOSED, OPEN),
        ("a", OPEN, CLOSED),
    ]


def test_listener_runs_outside_the_lock() -> None:
    """A listener may call back into the detector without deadlocking, and a failing one is contained."""
    det, _ = detector()
    snapshots: list[frozenset[str]] = []
    det.listen(lambda key, old, new: snapshots.append(det.ejected()))

    def broken(key: str, old: str, new: str) -> None:
        raise RuntimeError("metrics backend down")

    det.listen(broken)
    done = threading.Event()

    def run() -> None:
        eject(det, "a")
        done.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert done.wait(JOIN)
    assert snapshots == [frozenset({"a"})]


def test_listeners_see_transitions_in_the_order_they_happened() -> None:
    """Two threads' transitions of one endpoint reach every listener in order: a listener
    that sees "restored" before "ejected" would keep the endpoint counted as ejected."""
    det, clock = detector()
    first_seen = threading.Event()
    later_done = threading.Event()
    seen: list[tuple[str, str]] = []

    def slow(key: str, old: str, new: str) -> None:
        if new == OPEN and not first_seen.is_set():
            first_seen.set()
            later_done.wait(JOIN)  # the other thread's transitions happen meanwhile

    det.listen(slow)
    det.listen(lambda key, old, new: seen.append((old, new)))
    ejecting = threading.Thread(target=eject, args=(det, "a"), daemon=True)
    ejecting.start()
    assert first_seen.wait(JOIN)

    def comes_back() -> None:  # the ejection time passes; the sweep returns it
        clock.advance(30)
        assert det.admit("a", 10)
        later_done.set()

    returning = threading.Thread(target=comes_back, daemon=True)
    returning.start()
    returning.join(JOIN)
    ejecting.join(JOIN)
    assert not returning.is_alive() and not ejecting.is_alive()
    assert seen == [(CLOSED, OPEN), (OPEN, CLOSED)]


def test_breaker_call_and_half_open_are_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The detector drives pybreaker by open/close only: never call() (it would serialize
    requests), never half_open() (there is no trial)."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("CircuitBreaker.call/half_open must not be used")

    monkeypatch.setattr(pybreaker.CircuitBreaker, "call", forbidden)
    monkeypatch.setattr(pybreaker.CircuitBreaker, "half_open", forbidden)
    det, clock = detector()
    eject(det, "a")
    clock.advance(30)
    assert det.admit("a", 10)
    report(det, "a", 1, status=200)
    assert det.state("a") == CLOSED


# -- concurrency ----------------------------------------------------------------------------


def test_every_thread_is_admitted_once_the_sweep_returns_it() -> None:
    """16 threads calling admit() on an endpoint whose ejection is over, at the same moment:
    all are admitted (no single trial), and the return is one transition."""
    det, clock = detector()
    seen: list[tuple[str, str]] = []
    det.listen(lambda key, old, new: seen.append((old, new)))
    eject(det, "a")
    clock.advance(30)
    barrier = threading.Barrier(16)
    results: list[bool] = []
    results_lock = threading.Lock()

    def contender() -> None:
        barrier.wait(JOIN)
        allowed = det.admit("a", 10)
        with results_lock:
            results.append(allowed)

    threads = [threading.Thread(target=contender, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert results == [True] * 16
    assert det.state("a") == CLOSED
    assert seen == [(CLOSED, OPEN), (OPEN, CLOSED)]


def test_no_lock_is_held_while_a_request_is_in_flight() -> None:
    """While one thread is inside a request (between admit and record) others admit and record freely."""
    det, _ = detector(od(max_ejection_percent=100))
    eject(det, "out")
    inside = threading.Event()
    release = threading.Event()

    def slow_request() -> None:
        assert det.admit("busy", 10)
        assert det.admit("healthy", 10)
        inside.set()
        release.wait(JOIN)  # the request is "on the wire"
        det.record("busy", status=200, total_endpoints=10)
        det.record("healthy", status=200, total_endpoints=10)

    slow = threading.Thread(target=slow_request, daemon=True)
    slow.start()
    assert inside.wait(JOIN)

    barrier = threading.Barrier(8)
    finished = threading.Event()
    count = 0
    count_lock = threading.Lock()

    def other(n: int) -> None:
        nonlocal count
        barrier.wait(JOIN)
        key = f"other{n}"
        assert det.admit(key, 10)
        report(det, key, 5)  # ejects: breaker transitions and listeners run too
        assert not det.admit(key, 10)
        assert not det.admit("out", 10)  # refused at once, not blocked
        det.record("healthy", status=200, total_endpoints=10)
        with count_lock:
            count += 1
            if count == 8:
                finished.set()

    others = [threading.Thread(target=other, args=(n,), daemon=True) for n in range(8)]
    for thread in others:
        thread.start()
    assert finished.wait(JOIN), "other endpoints were blocked by the request in flight"
    assert slow.is_alive()  # the slow request was still inside the whole time
    assert det.state("busy") == CLOSED
    release.set()
    slow.join(JOIN)
    for thread in others:
        thread.join(JOIN)
    assert det.state("busy") == CLOSED
    assert det.ejected() == {"out", *(f"other{n}" for n in range(8))}


def test_removing_outlier_detection_returns_every_ejected_endpoint() -> None:
    """A DestinationRule that no longer has outlierDetection ejects nothing: the endpoint
    ejected before is back at once, and the listeners (the ejection gauges) hear it."""
    det, _clock = detector(od(interval="1s", base_ejection_time="30s"))
    changes: list[tuple[str, str, str]] = []
    det.listen(lambda *change: changes.append(change))
    eject(det, "a")
    det.update(None)
    assert det.ejected() == frozenset()
    assert det.state("a") == CLOSED
    assert changes == [("a", CLOSED, OPEN), ("a", OPEN, CLOSED)]


def test_a_balancer_filter_delivers_no_state_change_under_the_balancers_lock() -> None:
    """ROUND_ROBIN asks `available` with its own lock held: a sweep that returns an endpoint
    there only queues the change, delivered once the pick is over, so a listener that sends
    a request to the same cluster (picks again) does not deadlock."""
    import random

    from meshlib.dataplane.balancer import RoundRobinBalancer
    from meshlib.policy.snapshot import Endpoint

    det, clock = detector(od(interval="1s", base_ejection_time="1s", max_ejection_percent=100))
    endpoints = (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80))
    balancer = RoundRobinBalancer(random.Random(1))

    def usable(e: Endpoint) -> bool:
        return det.available(e.key, len(endpoints))

    picked_by_listener: list[str] = []

    def listener(key: str, old: str, new: str) -> None:
        if new == CLOSED:
            chosen = balancer.pick(endpoints, usable)
            picked_by_listener.append("" if chosen is None else chosen.key)

    det.listen(listener)
    eject(det, endpoints[0].key, total=2)
    clock.advance(2.5)  # its ejection is over; no call since
    done = threading.Event()

    def pick() -> None:
        balancer.pick(endpoints, usable)
        det.deliver()
        done.set()

    threading.Thread(target=pick, daemon=True).start()
    assert done.wait(JOIN), "deadlock: the listener ran under the balancer's lock"
    assert len(picked_by_listener) == 1
