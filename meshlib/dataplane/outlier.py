"""Passive health (outlier detection) for the endpoints of one cluster, as Envoy does it for Istio.

Each endpoint has a `pybreaker.CircuitBreaker` that holds its state: closed = in the pool,
open = ejected. pybreaker's half-open state is never entered: Envoy gives an ejected host no
trial request, it returns it to the pool whole at an `interval` sweep. The breakers are driven
only through `open()` and `close()`; `call()` is never used because it holds the breaker's lock
for the whole request. meshlib keeps its own counters and clock, so no lock is held while a
request is in flight: `admit()` and `record()` take one small lock for bookkeeping only.

Rules (ISTIO.md §2.5, §3.4; Envoy `outlier_detection_impl.cc`; pilot's translation):

- No `outlierDetection` -> no ejection at all.
- `consecutive5xxErrors`: unset -> 5, 0 disables. With `outlierDetectionHttpErrorCodes`, only
  those codes count for it instead of 500-599.
- `consecutiveGatewayErrors` (502/503/504): unset or 0 -> disabled. The deprecated
  `consecutiveErrors` is ignored (loading it warns): pilot's applyOutlierDetection no longer
  reads it, so Envoy's defaults apply, as above.
- A 5xx that is not a gateway error resets the gateway counter, a gateway error outside the
  configured error codes resets the 5xx counter, any other status resets both (Envoy).
- Local-origin failures (connect failure, reset, timeout): not split -> count as a 5xx and as a
  gateway error; split -> only `consecutiveLocalOriginFailures` (unset or 0 -> 5), and any
  response resets that counter. `status=None` without the local-origin flag counts as a 503
  (5xx and gateway error, whatever the error codes).
- Ejection time = base (30 s) x k, capped at max(300 s, base); k grows on each ejection while
  k x base < cap + base (Envoy's rule, so k stops at cap/base + 1).
- Sweeps run every `interval` (10 s) from the detector's start (or the last change of
  `interval`), as Envoy's interval timer (`DetectorImpl::onIntervalTimer`). Each sweep first
  returns every open endpoint whose ejection time has passed since it was ejected: it is closed,
  its counters reset, and its return time is the sweep's. So an endpoint comes back at the first
  sweep at or after ejected_at + ejection time, never between sweeps. There is no trial: it
  takes full traffic and is ejected again only when a rule counts a new run of errors. Then
  every closed endpoint back since at least one interval before the sweep has k lowered by one
  (not below 0); k never decays while ejected.
  The sweeps run lazily on calls, from the injected clock; many due at once are applied
  arithmetically, not one by one.
- `maxEjectionPercent` (unset or 0 -> 10): an ejection happens only when
  100 x (ejected + 1) / total_endpoints <= max%, the first one too (Envoy >= 1.28;
  `always_eject_one_host` is off and Istio never sets it): with the default 10% and fewer than
  10 endpoints nothing is ejected.
- Results reported for an open endpoint (requests that started before the ejection, or sent
  to it in panic) are ignored.
- Once `retain()` has named the cluster's endpoints, results for any other endpoint (requests
  still in flight to one a policy swap removed) are ignored, as Envoy's
  `onConsecutiveErrorWorker` ignores a host no longer in the cluster: a departed endpoint is
  never ejected, so it never takes a share of `maxEjectionPercent` or of the panic count.
- `minHealthPercent` (Istio default 0 = panic off): when > 0 and the healthy share
  (100 x (total - ejected) / total) is below it, `admit()` says yes to every endpoint; but,
  as Envoy's `recalculatePerPriorityPanic`, never while the availability scaled by the
  overprovisioning factor 1.4 (min(100, 1.4 x healthy share)) is 100, i.e. while at least
  5 of 7 endpoints are healthy: any minHealthPercent above 100 / 1.4 = 71.4 acts as 71.4.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pybreaker

from meshlib.policy.common import Duration
from meshlib.policy.destination_rule import OutlierDetection

__all__ = ["CLOSED", "OPEN", "OutlierDetector"]

CLOSED: str = pybreaker.STATE_CLOSED  # "closed": in the pool
OPEN: str = pybreaker.STATE_OPEN  # "open": ejected

_GATEWAY_CODES = frozenset((502, 503, 504))
_DEFAULT_5XX = 5
_DEFAULT_LOCAL_ORIGIN = 5
_DEFAULT_INTERVAL = 10.0
_DEFAULT_BASE_EJECTION = 30.0
_DEFAULT_MAX_EJECTION_TIME = 300.0
_DEFAULT_MAX_EJECTION_PERCENT = 10
_OVERPROVISIONING_PERCENT = 140  # Envoy's default overprovisioning factor; Istio keeps it

_log = logging.getLogger(__name__)

StateListener = Callable[[str, str, str], None]


@dataclass(frozen=True, slots=True)
class _Config:
    """The effective thresholds, with Istio's and Envoy's defaults applied."""

    consecutive_5xx: int
    consecutive_gateway: int
    consecutive_local_origin: int  # 0 unless split
    split: bool
    error_codes: frozenset[int]
    interval: float
    base_ejection: float
    max_ejection: float
    max_ejection_percent: int
    min_health_percent: int

    @classmethod
    def of(cls, s: OutlierDetection) -> _Config:
        c5xx = _DEFAULT_5XX if s.consecutive_5xx_errors is None else s.consecutive_5xx_errors
        gateway = s.consecutive_gateway_errors or 0
        split = bool(s.split_external_local_origin_errors)
        local = (s.consecutive_local_origin_failures or _DEFAULT_LOCAL_ORIGIN) if split else 0
        interval = _seconds(s.interval, _DEFAULT_INTERVAL)
        base = _seconds(s.base_ejection_time, _DEFAULT_BASE_EJECTION)
        return cls(
            consecutive_5xx=c5xx,
            consecutive_gateway=gateway,
            consecutive_local_origin=local,
            split=split,
            error_codes=frozenset(s.outlier_detection_http_error_codes),
            interval=interval,
            base_ejection=base,
            max_ejection=max(_DEFAULT_MAX_EJECTION_TIME, base),
            max_ejection_percent=s.max_ejection_percent or _DEFAULT_MAX_EJECTION_PERCENT,
            min_health_percent=s.min_health_percent or 0,
        )

    def ejection_time(self, k: int) -> float:
        return min(self.base_ejection * max(k, 1), self.max_ejection)


def _seconds(duration: Duration | None, default: float) -> float:
    if duration is None:
        return default
    seconds = float(duration.seconds)
    return seconds if seconds > 0 else default


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one result feeds the counters."""

    is_5xx: bool  # counts for consecutive5xxErrors
    is_gateway: bool  # counts for consecutiveGatewayErrors
    is_local: bool  # counts for consecutiveLocalOriginFailures (split only)
    connected: bool  # the connection was made: resets the local-origin counter first

    def is_failure(self, cfg: _Config) -> bool:
        """Would an enabled rule count this result as an error?"""
        return (
            (cfg.consecutive_5xx > 0 and self.is_5xx)
            or (cfg.consecutive_gateway > 0 and self.is_gateway)
            or (cfg.consecutive_local_origin > 0 and self.is_local)
        )


def _classify(
    cfg: _Config, status: int | None, local_origin_failure: bool, connected: bool
) -> _Outcome:
    if local_origin_failure:
        if cfg.split:
            # Envoy reports a connection made (LocalOriginConnectSuccess, in onPoolReady)
            # before a reset or timeout after it: such a failure counts one, after a reset,
            # so only failures to connect build up to consecutiveLocalOriginFailures.
            return _Outcome(False, False, True, connected)
        return _Outcome(True, True, False, False)
    if status is None:  # no response, not a local-origin failure: what Envoy answers, a 503
        return _Outcome(True, True, False, False)
    is_5xx = status in cfg.error_codes if cfg.error_codes else 500 <= status <= 599
    return _Outcome(is_5xx, status in _GATEWAY_CODES, False, True)


class _Endpoint:
    __slots__ = (
        "breaker",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected_at",
        "k",
        "unejected_at",
    )

    def __init__(self, breaker: pybreaker.CircuitBreaker) -> None:
        self.breaker = breaker
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.k = 0
        self.ejected_at = 0.0
        self.unejected_at: float | None = None  # the sweep that last returned it

    @property
    def state(self) -> str:
        return self.breaker.current_state

    def reset_counters(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0


class _Relay(pybreaker.CircuitBreakerListener):
    """Queues the breakers' state changes, to be delivered once the detector's lock is released.

    Only `state_change` is used: the other hooks fire from `call()`, which meshlib never uses.
    """

    def __init__(self, sink: Callable[[str, str, str], None]) -> None:
        self._sink = sink

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = CLOSED if old_state is None else old_state.name
        if old != new_state.name:
            self._sink(cb.name or "", old, new_state.name)


class OutlierDetector:
    """Outlier detection for one cluster (destination host/subset/port) of one client."""

    def __init__(
        self,
        settings: OutlierDetection | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._config = None if settings is None else _Config.of(settings)
        self._endpoints: dict[str, _Endpoint] = {}
        self._ejected: set[str] = set()
        self._members: frozenset[str] | None = None  # the cluster's endpoints, once retained
        self._listeners: list[StateListener] = []
        self._events: list[tuple[str, str, str]] = []  # state changes not yet delivered
        self._delivering = False  # a thread is delivering them
        self._relay = _Relay(self._queue_event)
        self._sweep_origin = clock()
        self._sweeps_done = 0
        self._ejections_overflow = 0

    # -- policy -------------------------------------------------------------------------------

    def update(self, settings: OutlierDetection | None) -> None:
        """Apply new settings; endpoint state (ejections, k, counters) is kept. Without
        settings nothing stays ejected: every ejected endpoint returns now."""
        config = None if settings is None else _Config.of(settings)
        with self._lock:
            now = self._clock()
            old = self._config
            if old is not None:
                self._sweep(now, old)
            if config is None or old is None or config.interval != old.interval:
                self._sweep_origin = now
                self._sweeps_done = 0
            if config is None:  # no outlier detection any more: nothing stays ejected
                for key, endpoint in self._endpoints.items():
                    if endpoint.state == OPEN:
                        self._restore(key, endpoint, now)
            self._config = config
        if self._events:
            self._deliver()

    # -- the request path ---------------------------------------------------------------------

    def admit(self, key: str, total_endpoints: int) -> bool:
        """May a request go to endpoint `key` now? Yes unless it is ejected (and no panic).
        State changes a due sweep made (an endpoint returned) go to the listeners."""
        allowed = self.available(key, total_endpoints)
        self.deliver()
        return allowed

    def available(self, key: str, total_endpoints: int) -> bool:
        """`admit()`'s answer, for a balancer's filter: the state changes a due sweep made are
        only queued, since the balancer may hold its lock (`deliver()` once it returned)."""
        if self._config is None:
            return True
        endpoint = self._endpoints.get(key)
        if endpoint is None or endpoint.state == CLOSED:
            return True  # lock-free fast path for healthy endpoints
        with self._lock:
            cfg = self._config
            if cfg is None:
                return True
            self._sweep(self._clock(), cfg)  # a sweep due by now may have returned it
            return endpoint.state == CLOSED or self._panic(cfg, total_endpoints)

    def deliver(self) -> None:
        """Hand queued state changes to the listeners (outside every lock)."""
        if self._events:
            self._deliver()

    def record(
        self,
        key: str,
        *,
        status: int | None,
        local_origin_failure: bool = False,
        connected: bool = False,
        total_endpoints: int,
    ) -> None:
        """Report the result of a request to `key`: a status, or None when no response came;
        for a local-origin failure, whether it came after the connection was made."""
        if self._config is None:
            return
        with self._lock:
            cfg = self._config
            members = self._members
            if cfg is None or (members is not None and key not in members):
                return  # an endpoint that left the cluster: Envoy ignores its results too
            now = self._clock()
            self._sweep(now, cfg)
            outcome = _classify(cfg, status, local_origin_failure, connected)
            endpoint = self._endpoints.get(key)
            if endpoint is None and outcome.is_failure(cfg):
                endpoint = self._new_endpoint(key)
            # No state and no failure: nothing to reset. OPEN: a request that started before
            # the ejection (or was sent in panic); ignored.
            if endpoint is not None and endpoint.state == CLOSED:
                self._count(key, endpoint, outcome, now, cfg, total_endpoints)
        if self._events:
            self._deliver()

    # -- inspection ---------------------------------------------------------------------------

    def ejected(self) -> frozenset[str]:
        """Endpoints out of the pool (open), after the sweeps due by now."""
        with self._lock:
            cfg = self._config
            if cfg is not None:
                self._sweep(self._clock(), cfg)
            ejected = frozenset(self._ejected)
        if self._events:
            self._deliver()
        return ejected

    def state(self, key: str) -> str:
        """The breaker's state after the sweeps due by now: closed or open (ejected); unknown
        endpoints are closed."""
        endpoint = self._endpoints.get(key)
        if endpoint is None or endpoint.state == CLOSED:
            return CLOSED
        with self._lock:
            cfg = self._config
            if cfg is not None:
                self._sweep(self._clock(), cfg)
            state = endpoint.state
        if self._events:
            self._deliver()
        return state

    def ejection_count(self, key: str) -> int:
        """k: the ejection multiplier (times ejected in a row, decayed by sweeps while back)."""
        with self._lock:
            cfg = self._config
            if cfg is not None:
                self._sweep(self._clock(), cfg)
            endpoint = self._endpoints.get(key)
            k = 0 if endpoint is None else endpoint.k
        if self._events:
            self._deliver()
        return k

    @property
    def ejections_overflow(self) -> int:
        """Ejections refused by maxEjectionPercent (Envoy's `ejections_overflow`)."""
        return self._ejections_overflow

    def listen(self, callback: StateListener) -> None:
        """Call `callback(key, old_state, new_state)` on every state change (outside the lock)."""
        with self._lock:
            self._listeners.append(callback)

    def retain(self, keys: Iterable[str]) -> None:
        """The cluster's endpoints are now `keys`: forget those that left (so they stop counting
        as ejected) and ignore results reported for them later (requests still in flight)."""
        keep = frozenset(keys)
        with self._lock:
            self._members = keep
            for key in [k for k in self._endpoints if k not in keep]:
                del self._endpoints[key]
                self._ejected.discard(key)

    # -- internals (called with the lock held) ------------------------------------------------

    def _panic(self, cfg: _Config, total: int) -> bool:
        if cfg.min_health_percent <= 0 or total <= 0:
            return False
        healthy = max(total - len(self._ejected), 0)
        if _OVERPROVISIONING_PERCENT * healthy >= 100 * total:
            return False  # Envoy: enough capacity left (normalized availability 100%)
        return 100 * healthy < cfg.min_health_percent * total

    def _count(
        self, key: str, ep: _Endpoint, outcome: _Outcome, now: float, cfg: _Config, total: int
    ) -> None:
        if outcome.connected:
            ep.consecutive_local = 0
        if outcome.is_5xx or outcome.is_gateway:
            ep.consecutive_gateway = ep.consecutive_gateway + 1 if outcome.is_gateway else 0
            ep.consecutive_5xx = ep.consecutive_5xx + 1 if outcome.is_5xx else 0
        elif outcome.is_local:
            ep.consecutive_local += 1
        else:
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0
        hit_5xx = 0 < cfg.consecutive_5xx <= ep.consecutive_5xx
        hit_gateway = 0 < cfg.consecutive_gateway <= ep.consecutive_gateway
        hit_local = 0 < cfg.consecutive_local_origin <= ep.consecutive_local
        if not (hit_5xx or hit_gateway or hit_local):
            return
        if self._may_eject(cfg, total):
            self._eject(key, ep, now, cfg)
            return
        self._ejections_overflow += 1
        # Envoy resets the counter that fired, so it takes a full run of errors to try again.
        if hit_5xx:
            ep.consecutive_5xx = 0
        if hit_gateway:
            ep.consecutive_gateway = 0
        if hit_local:
            ep.consecutive_local = 0

    def _may_eject(self, cfg: _Config, total: int) -> bool:
        # Envoy's ejectHost checks the first ejection too; integers, so 100% is never missed.
        return 100 * (len(self._ejected) + 1) <= cfg.max_ejection_percent * max(total, 1)

    def _eject(self, key: str, ep: _Endpoint, now: float, cfg: _Config) -> None:
        if ep.k * cfg.base_ejection < cfg.max_ejection + cfg.base_ejection:
            ep.k += 1
        ep.ejected_at = now
        ep.reset_counters()
        self._ejected.add(key)
        ep.breaker.open()

    def _restore(self, key: str, ep: _Endpoint, at: float) -> None:
        ep.reset_counters()  # Envoy's unejectHost: a new run of errors is needed to eject again
        ep.unejected_at = at
        self._ejected.discard(key)
        ep.breaker.close()

    def _sweep(self, now: float, cfg: _Config) -> None:
        """Run the interval sweeps due by `now`, all at once. Sweep j runs at
        origin + j x interval; each, as Envoy's interval timer, first returns the open endpoints
        whose ejection time has passed, then lowers k by one for closed endpoints back since at
        least one interval (an endpoint returned by a sweep is not lowered by that sweep)."""
        interval = cfg.interval
        origin = self._sweep_origin
        due = int((now - origin) // interval)
        done = self._sweeps_done
        if due <= done:
            return
        self._sweeps_done = due
        for key, ep in self._endpoints.items():
            if ep.state == OPEN:
                # k does not change while ejected, so the sweep that returns it is known.
                over = ep.ejected_at + cfg.ejection_time(ep.k)
                back = max(done + 1, math.ceil((over - origin) / interval - 1e-9))
                if back > due:
                    continue
                self._restore(key, ep, origin + back * interval)
            if ep.k == 0 or ep.unejected_at is None:
                continue
            first = math.ceil((ep.unejected_at + interval - origin) / interval - 1e-9)
            sweeps = due - max(done + 1, first) + 1
            if sweeps > 0:
                ep.k = max(ep.k - sweeps, 0)

    def _new_endpoint(self, key: str) -> _Endpoint:
        breaker = pybreaker.CircuitBreaker(name=key, listeners=[self._relay])
        endpoint = _Endpoint(breaker)
        self._endpoints[key] = endpoint
        return endpoint

    def _queue_event(self, key: str, old: str, new: str) -> None:
        self._events.append((key, old, new))

    def _deliver(self) -> None:
        """Hand the queued state changes to the listeners, in the order they happened, with
        the lock released (a listener may call back into the detector). One thread delivers
        at a time: changes queued meanwhile by others are delivered by it, after its own."""
        with self._lock:
            if self._delivering:
                return
            self._delivering = True
        try:
            while True:
                with self._lock:
                    events, self._events = self._events, []
                    if not events:
                        self._delivering = False
                        return
                listeners = tuple(self._listeners)
                for key, old, new in events:
                    for callback in listeners:
                        try:
                            callback(key, old, new)
                        except Exception:
                            _log.exception("outlier state listener failed for %s", key)
        except BaseException:
            with self._lock:
                self._delivering = False
            raise
