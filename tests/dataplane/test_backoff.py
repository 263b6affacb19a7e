"""The wait before each retry: Envoy's JitteredBackOffStrategy (router/retry_state_impl.cc)."""

from __future__ import annotations

import random
import statistics

import pytest
import tenacity

from meshlib.dataplane.retry import EnvoyBackoff


class _Highest(random.Random):
    """Draws the highest value: each wait shows its interval's upper bound."""

    def random(self) -> float:
        return 1.0


def _waits(base: float, retries: int, rng: random.Random) -> list[float]:
    backoff = EnvoyBackoff(base, rng, lambda wait: wait)
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    waits = []
    for retry in range(1, retries + 1):
        state.attempt_number = retry
        waits.append(round(backoff(state) * 1000, 6))
    return waits


@pytest.mark.parametrize(
    ("base", "ceilings_ms"),
    [
        # Envoy: the interval doubles while below half the cap (10 x base), then is the cap.
        (0.025, [25, 50, 100, 200, 250, 250, 250]),
        (0.1, [100, 200, 400, 800, 1000, 1000, 1000]),  # Envoy's CustomBackOffIntervalDefaultMax
        (0.03, [30, 60, 120, 240, 300, 300, 300]),
    ],
)
def test_each_retry_waits_below_envoys_interval(base: float, ceilings_ms: list[int]) -> None:
    assert _waits(base, len(ceilings_ms), _Highest()) == ceilings_ms


def test_waits_are_spread_uniformly_below_the_interval() -> None:
    """Full jitter: 4,000 waits of retry 2 (interval 50 ms) average 25 ms within 1 ms (the
    mean's standard error is 0.23 ms) and stay below 50 ms."""
    rng = random.Random(7)
    waits = [_waits(0.025, 2, rng)[1] for _ in range(4000)]
    assert max(waits) < 50
    assert min(waits) >= 0
    assert statistics.fmean(waits) == pytest.approx(25, abs=1)


def test_a_wait_never_runs_past_the_route_deadline() -> None:
    backoff = EnvoyBackoff(0.025, _Highest(), lambda wait: min(wait, 0.004))
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = 3
    assert backoff(state) == 0.004
