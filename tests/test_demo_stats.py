"""The demo's golden signals read the metrics as Prometheus reads them (examples/bookinfo)."""

from __future__ import annotations

import pytest

from examples.bookinfo.stats import SOURCE, Totals, parse, quantile, signals
from meshlib.telemetry.metrics import DURATION_BUCKETS

BOUNDS = (*DURATION_BUCKETS, float("inf"))


def cumulative(calls_by_bound: dict[float, float]) -> dict[tuple[str, str, str, float], float]:
    """Cumulative bucket counts of reviews v1, callers' view, from calls per bucket."""
    out, running = {}, 0.0
    for bound in BOUNDS:
        running += calls_by_bound.get(bound, 0.0)
        out[(SOURCE, "reviews", "v1", bound)] = running
    return out


def test_a_windows_quantiles_are_histogram_quantiles() -> None:
    """40 calls in the window, all between 1 s and 2.5 s: p50 and p99 interpolate from the
    bucket's lower bound, 1000 ms, as histogram_quantile() does (buckets that counted
    nothing in the window still bound the one that did)."""
    earlier = Totals({(SOURCE, "reviews", "v1", True): 10.0}, cumulative({5.0: 10.0}))
    later = Totals({(SOURCE, "reviews", "v1", True): 50.0}, cumulative({5.0: 10.0, 2500.0: 40.0}))
    window = later.since(earlier)
    (signal,) = signals(window, 4.0, [("reviews", "v1")], later)
    assert signal.requests == 40 and signal.rps == 10.0
    assert signal.p50 == pytest.approx(1750.0)
    assert signal.p99 == pytest.approx(2485.0)
    assert quantile(0.5, {}) is None


def test_a_sum_that_went_down_counts_nothing() -> None:
    """Totals are summed over processes: when one restarts, the sum goes down, and the
    window counts nothing for it, never a negative count or the other processes' totals."""
    earlier = Totals({(SOURCE, "reviews", "v1", True): 1000.0}, cumulative({5.0: 1000.0}))
    later = Totals({(SOURCE, "reviews", "v1", True): 990.0}, cumulative({5.0: 990.0}))
    window = later.since(earlier)
    assert window.requests == {}
    assert set(window.buckets.values()) == {0.0}


def test_a_call_given_up_is_no_success() -> None:
    """Response code 0 (the caller left before the answer: DC) fails, as a 5xx does."""
    text = "\n".join(
        f'istio_requests_total{{reporter="source",destination_service_name="reviews",'
        f'destination_version="{version}",response_code="{code}"}} {count}'
        for version, code, count in (("v1", "200", 3), ("unknown", "0", 2), ("v1", "503", 1))
    )
    totals = parse("# TYPE istio_requests_total counter\n" + text + "\n")
    assert totals.requests == {
        (SOURCE, "reviews", "v1", True): 3.0,
        (SOURCE, "reviews", "unknown", False): 2.0,
        (SOURCE, "reviews", "v1", False): 1.0,
    }
