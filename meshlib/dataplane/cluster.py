"""Runtime state of one destination cluster (host, subset, port) for one Mesh.

Policy lives in the immutable Snapshot; what changes per request lives here: the balancer's
position, requests in flight, outlier (ejection) state, connection-pool counters. A new
Snapshot refreshes a cluster's endpoints and settings, and keeps the state of endpoints that
persist, as Envoy keeps host health across config updates.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from meshlib.dataplane.balancer import Balancer, InFlight, make_balancer
from meshlib.dataplane.limits import ClusterLimits
from meshlib.dataplane.outlier import OutlierDetector
from meshlib.dataplane.routing import ClusterKey
from meshlib.policy.destination_rule import TrafficPolicy
from meshlib.policy.snapshot import Endpoint, Snapshot


class ClusterState:
    """Endpoints, balancer, outlier detector and limits of one cluster."""

    def __init__(self, key: ClusterKey, snapshot: Snapshot, rng: random.Random) -> None:
        self.key = key
        self.rng = rng
        self.in_flight = InFlight()
        self.generation = -1
        self.endpoints: tuple[Endpoint, ...] = ()
        self.policy = TrafficPolicy()
        self.balancer: Balancer = make_balancer(None, self.in_flight, rng)
        self.outlier = OutlierDetector(None)
        self.limits = ClusterLimits(None, None)
        self._lb_settings: Any = None
        # Hooks for operational metrics (set by the Mesh); called outside any lock.
        self.on_overflow: Callable[[], None] | None = None
        self.on_retry_overflow: Callable[[], None] | None = None
        self.on_endpoints: Callable[[list[str]], None] | None = None
        self._lock = threading.Lock()
        self._sent: dict[str, int] = {}  # requests per endpoint, for maxRequestsPerConnection
        self.refresh(snapshot)

    def count_sent(self, key: str) -> int:
        """Count one more request to endpoint `key`; the count so far. (Approximate under
        threads: two racing requests may read the same count.)"""
        count = self._sent.get(key, 0) + 1
        self._sent[key] = count
        return count

    def refresh(self, snapshot: Snapshot) -> None:
        """Take endpoints and settings from `snapshot` if it is newer than the last one (a
        request that read the Snapshot before a reload must not roll the cluster back;
        generations only grow in a process)."""
        if snapshot.generation <= self.generation:
            return
        with self._lock:
            if snapshot.generation <= self.generation:
                return
            host, subset, port = self.key
            policy = snapshot.traffic_policy(host, subset, port)
            endpoints = snapshot.endpoints(host, subset, port)
            kept = {e.key for e in endpoints}
            if policy.load_balancer != self._lb_settings:
                self.balancer = make_balancer(policy.load_balancer, self.in_flight, self.rng)
                self._lb_settings = policy.load_balancer
            self.outlier.update(policy.outlier_detection)
            # Before the new endpoints can be chosen, so results for each of them count; from
            # here on those for endpoints that left (tries still in flight) are ignored.
            self.outlier.retain(kept)
            self.endpoints = endpoints
            self._sent = {key: n for key, n in self._sent.items() if key in kept}
            self.limits.update(policy.connection_pool, policy.retry_budget)
            self.policy = policy
            self.generation = snapshot.generation
        if self.on_endpoints is not None:
            self.on_endpoints([e.key for e in self.endpoints])


class Clusters:
    """ClusterState per key, created on first use and refreshed on Snapshot changes."""

    def __init__(
        self, rng: random.Random, on_new: Callable[[ClusterState], None] | None = None
    ) -> None:
        self.rng = rng
        self.on_new = on_new  # e.g. metrics watching the new cluster's outlier detector
        self._clusters: dict[ClusterKey, ClusterState] = {}
        self._lock = threading.Lock()

    def get(self, key: ClusterKey, snapshot: Snapshot) -> ClusterState:
        state = self._clusters.get(key)
        if state is None:
            with self._lock:
                state = self._clusters.get(key)
                if state is None:
                    state = self._clusters[key] = ClusterState(key, snapshot, self.rng)
                    if self.on_new is not None:
                        self.on_new(state)
        elif state.generation != snapshot.generation:
            state.refresh(snapshot)
        return state

    def __iter__(self) -> Any:
        return iter(list(self._clusters.values()))
