"""meshlib's own metrics, beside Istio's: policy reloads, outlier ejections, connection-pool
overflows and retry budgets used up.

Envoy keeps such counts among its own stats (`upstream_rq_retry_overflow`, outlier-detection
ejections); meshlib has no Envoy to ask, so `OperationalMetrics` gives the Mesh a hook per
event (a Snapshot served or rejected, an endpoint's outlier-detection breaker changing state, a
retry or a request refused), labelled by Envoy's cluster name (`cluster_name`). In
multiprocess mode they are per process (`_per_process`), and the policy gauges are set again in
a forked child, so that a gunicorn --preload worker shows the policy it inherited as loaded.
The public home of these names is `meshlib.telemetry.metrics`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from meshlib.telemetry._metrics_multiprocess import _per_process, multiprocess_dir

__all__ = ["OperationalMetrics", "cluster_name"]

# The breaker states that keep an endpoint out of the pool. Outlier detection uses two of
# pybreaker's states, closed (in the pool) and open (ejected): as in Envoy, an ejected endpoint
# returns whole at an interval sweep, with no half-open trial.
_EJECTED_STATES = frozenset(("open",))
_MAX_CLUSTER = 512


def cluster_name(host: str, subset: str | None, port: int | None) -> str:
    """Envoy's name for an outbound cluster, the `cluster` label of meshlib's own metrics.

    >>> cluster_name("reviews.default.svc.cluster.local", "v1", 9080)
    'outbound|9080|v1|reviews.default.svc.cluster.local'
    """
    return f"outbound|{port or ''}|{subset or ''}|{host}"


# Multiprocess mode: the policy gauges' values in this process, set again in a forked child.
# prometheus-client starts a child's files (its own pid) at its first write, with every value
# it knows at 0: a gunicorn --preload worker, forked from the master that loaded the policy,
# would show `meshlib_policy_last_reload_successful` 0 (livemin: a rejected policy) for the
# policy it inherited and serves.
_inherited: dict[Gauge, float] = {}


def _publish_inherited() -> None:
    for gauge, value in list(_inherited.items()):
        gauge.set(value)


os.register_at_fork(after_in_child=_publish_inherited)


class OperationalMetrics:
    """meshlib's own health: policy reloads, ejections, overflows, retry budgets.

    The methods are hooks for the wiring, e.g.
    `source.subscribe(lambda s: ops.policy_loaded(s.generation))`,
    `source.on_error(ops.policy_rejected)` and
    `detector.listen(functools.partial(ops.ejection, cluster_name(host, subset, port)))`.
    `cluster` labels are Envoy cluster names (`cluster_name`), one per configured cluster.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.registry = registry
        self._shared = shared = multiprocess_dir() is not None  # see _per_process
        self._generation = _per_process(
            Gauge,
            "meshlib_policy_generation",
            "Generation of the policy Snapshot being served.",
            registry=registry,
            shared=shared,
            multiprocess_mode="livemax",
        )
        self._reload_errors = _per_process(
            Counter,
            "meshlib_policy_reload_errors",
            "New policy rejected; the last good Snapshot kept serving.",
            registry=registry,
            shared=shared,
        )
        self._reload_successful = _per_process(
            Gauge,
            "meshlib_policy_last_reload_successful",
            "1 when the last policy change was loaded, 0 while it is rejected (the last good "
            "Snapshot keeps serving until a change loads).",
            registry=registry,
            shared=shared,
            multiprocess_mode="livemin",  # one worker serving stale policy shows
        )
        self._ejections = _per_process(
            Counter,
            "meshlib_outlier_ejections",
            "Endpoints ejected by outlier detection (each ejection of an endpoint counts).",
            ["cluster"],
            registry=registry,
            shared=shared,
        )
        self._ejected = _per_process(
            Gauge,
            "meshlib_endpoints_ejected",
            "Endpoints currently ejected from the load-balancing pool by outlier detection.",
            ["cluster"],
            registry=registry,
            shared=shared,
            multiprocess_mode="livesum",
        )
        self._breakers = _per_process(
            Gauge,
            "meshlib_outlier_breakers",
            "Endpoints whose outlier-detection breaker is in `state`: open (ejected); the "
            "others are closed (in the pool). There is no half-open state: an ejected endpoint "
            "returns whole at an interval sweep.",
            ["cluster", "state"],
            registry=registry,
            shared=shared,
            multiprocess_mode="livesum",
        )
        self._retry_budget = _per_process(
            Counter,
            "meshlib_retry_budget_exhausted",
            "Retries not attempted: the retry budget or maxRetries was used up (Envoy's "
            "upstream_rq_retry_overflow).",
            ["cluster"],
            registry=registry,
            shared=shared,
        )
        self._overflow = _per_process(
            Counter,
            "meshlib_upstream_overflow",
            "Requests refused by connection-pool limits (response flag UO).",
            ["cluster"],
            registry=registry,
            shared=shared,
        )
        self._lock = threading.Lock()
        self._ejected_keys: dict[str, dict[str, str]] = {}  # cluster -> endpoint -> state

    def unregister(self) -> None:
        """Take these metrics out of their registry (in multiprocess mode they are in none)."""
        for metric in self._registered():
            self.registry.unregister(metric)

    def register(self) -> None:
        """Put them back in their registry after `unregister()`."""
        for metric in self._registered():
            self.registry.register(metric)

    def _registered(self) -> list[Any]:
        if self._shared:
            return []
        return [
            self._generation,
            self._reload_errors,
            self._reload_successful,
            self._ejections,
            self._ejected,
            self._breakers,
            self._retry_budget,
            self._overflow,
        ]

    def policy_loaded(self, snapshot_generation: int) -> None:
        """A new Snapshot is being served."""
        self._set_policy_gauge(self._generation, snapshot_generation)
        self._set_policy_gauge(self._reload_successful, 1)

    def policy_rejected(self, error: object = None) -> None:
        """New policy was invalid (an `on_error` listener: takes the PolicyError)."""
        self._reload_errors.inc()
        self._set_policy_gauge(self._reload_successful, 0)

    def _set_policy_gauge(self, gauge: Gauge, value: float) -> None:
        gauge.set(value)
        if self._shared:
            _inherited[gauge] = value  # what a forked child serves too

    def ejection(self, cluster: str, key: str, old: str, new: str) -> None:
        """An outlier-detection state change of endpoint `key` (pybreaker state names)."""
        cluster = cluster[:_MAX_CLUSTER]
        with self._lock:
            states = self._ejected_keys.setdefault(cluster, {})
            if new in _EJECTED_STATES:
                states[key] = new
            else:
                states.pop(key, None)
            self._publish(cluster, states)
        if new == "open" and old != "open":
            self._ejections.labels(cluster).inc()

    def endpoints_retained(self, cluster: str, keys: Iterable[str]) -> None:
        """Forget ejected endpoints of `cluster` that left it (a new Snapshot removed them)."""
        cluster = cluster[:_MAX_CLUSTER]
        with self._lock:
            states = self._ejected_keys.get(cluster)
            if states is not None:
                kept = set(keys)
                for gone in [key for key in states if key not in kept]:
                    del states[gone]
                self._publish(cluster, states)

    def _publish(self, cluster: str, states: dict[str, str]) -> None:
        """Set the cluster's gauges from its endpoints' breaker states (lock held)."""
        self._ejected.labels(cluster).set(len(states))
        for state in _EJECTED_STATES:
            count = sum(1 for value in states.values() if value == state)
            self._breakers.labels(cluster, state.replace("-", "_")).set(count)

    def retry_budget_exhausted(self, cluster: str) -> None:
        """A retry was refused by the retry budget or maxRetries."""
        self._retry_budget.labels(cluster[:_MAX_CLUSTER]).inc()

    def upstream_overflow(self, cluster: str) -> None:
        """A request was refused by the cluster's connection-pool limits (UO)."""
        self._overflow.labels(cluster[:_MAX_CLUSTER]).inc()
