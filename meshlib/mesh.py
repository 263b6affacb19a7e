"""Mesh: this workload's view of the mesh — config, current policy, runtime state.

The one-line APIs (`meshlib.Client()`, `meshlib.instrument()`, the middleware) use the
process-wide default Mesh, set with `meshlib.configure(...)` or built from `MESHLIB_*`
variables on first use. Tests and processes that need two meshes create `Mesh(...)` objects
and pass them explicitly.

    mesh = meshlib.configure(policy="mesh.yaml", service="productpage", version="v1")
    client = meshlib.Client()              # uses that mesh
    other = Mesh(MeshConfig(service="x"), policy=snapshot)   # a second, explicit one
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from meshlib._fork import ForkSafeLock
from meshlib.config import MeshConfig
from meshlib.dataplane.cluster import Clusters, ClusterState
from meshlib.dataplane.deadline import Deadline
from meshlib.dataplane.exchange import Exchange
from meshlib.dataplane.routing import ClusterKey, RoutePlan, plan_route
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot
from meshlib.sources.base import PolicySource, SnapshotPublisher
from meshlib.sources.file import FileSource
from meshlib.telemetry import peer
from meshlib.telemetry.access_log import AccessLog
from meshlib.telemetry.metrics import (
    IstioMetrics,
    MetricsServer,
    OperationalMetrics,
    cluster_name,
    serve_metrics,
)
from meshlib.telemetry.propagation import Propagator
from meshlib.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

PolicyArg = (
    str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Snapshot | PolicySource | None
)


class _StaticSource(SnapshotPublisher):
    """A fixed Snapshot (for tests and for code that builds policy itself)."""

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class Mesh:
    """Holds the MeshConfig, the current Snapshot (from its source) and the runtime state."""

    def __init__(
        self,
        config: MeshConfig | None = None,
        *,
        policy: PolicyArg = None,
        rng: random.Random | None = None,
        watch: bool = True,
        tracer_provider: TracerProvider | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config if config is not None else MeshConfig.from_env()
        self.rng = rng if rng is not None else random.Random()
        self.source = self._source(policy if policy is not None else self.config.policy)
        # Metrics live in a registry of this Mesh's own (the default Mesh's is served on
        # MeshConfig.metrics_port); pass prometheus_client.REGISTRY to share the global one.
        self.registry = registry if registry is not None else CollectorRegistry()
        self._leave_registry: Callable[[], None] | None = None
        if registry is None:
            self.metrics = IstioMetrics(self.registry, self.config)
            self.operations = OperationalMetrics(self.registry)
        else:
            self.metrics, self.operations, self._leave_registry = _show_in(registry, self.config)
        try:
            self.identity = peer.encode(self.config)  # sent to peers: Istio's metadata exchange
            self.identity_headers = ((peer.HEADER, self.identity), *peer.istio_headers(self.config))
            """Sent on every meshed call: this workload in meshlib's form and in Istio's, for
            meshlib peers and for Envoy-sidecar ones."""
            self.source_ip = self.config.instance_ip or socket.gethostname()
            """What `consistentHash.useSourceIp` hashes: a sidecar sees its app's connections
            come from the pod's IP, so every call from this instance goes to one endpoint."""
            self.metrics_server: MetricsServer | None = None
            self.clusters = Clusters(self.rng, self._watch_cluster)
            self.propagator = Propagator(
                self.config.propagate_headers, always=self.config.propagators
            )
            self.access_log = AccessLog()
            self.tracing = Tracing(self.config, tracer_provider=tracer_provider)
            self._applied = 0  # the generation of the Snapshot the telemetry follows
            # A fork while a thread of the parent applies a Snapshot applies it again in the child.
            self._applying = ForkSafeLock(self._apply_current)
            # Subscribed first, then the current Snapshot applied: a source already watching may
            # swap in between, and the newer Snapshot must win whichever call comes last.
            self.source.subscribe(self._apply)
            self._apply(self.source.snapshot)
            self.source.on_error(self.operations.policy_rejected)
            if watch:
                self.source.start()
        except BaseException:
            if self._leave_registry is not None:
                self._leave_registry()  # the Mesh shown before shows again
            raise

    def _apply(self, snapshot: Snapshot) -> None:
        """Telemetry follows the policy: access logging, sampling, metric overrides. Each
        part is applied on its own: one that fails (a bug: the policy was validated) keeps its
        earlier setting, the others follow, and the failure is reported as a rejected reload;
        at start-up it is raised."""
        with self._applying:
            if snapshot.generation < self._applied:
                return  # an older Snapshot, applied late
            first = self._applied == 0
            self._applied = snapshot.generation
            failures: list[Exception] = []
            parts: tuple[tuple[str, Callable[[], None]], ...] = (
                ("access logging", functools.partial(self.access_log.apply, snapshot, self.config)),
                ("tracing", functools.partial(self.tracing.apply, snapshot)),
                ("metrics", functools.partial(self.metrics.apply, snapshot)),
            )
            for part, apply in parts:
                try:
                    apply()
                except Exception as exc:
                    if first:
                        raise
                    logger.exception(
                        "policy generation %d: applying its %s failed; it keeps its earlier"
                        " setting",
                        snapshot.generation,
                        part,
                    )
                    failures.append(exc)
            self.operations.policy_loaded(snapshot.generation)
            if failures:
                self.operations.policy_rejected(failures[0])

    def _apply_current(self) -> None:
        self._apply(self.source.snapshot)

    def _source(self, policy: PolicyArg) -> PolicySource:
        if policy is None:
            return _StaticSource(Snapshot.empty(self.config))
        if isinstance(policy, Snapshot):
            return _StaticSource(policy)
        if isinstance(policy, (str, os.PathLike, Sequence)):
            return FileSource(policy, self.config)
        return policy

    def _watch_cluster(self, state: ClusterState) -> None:
        name = cluster_name(*state.key)
        operations = self.operations
        state.outlier.listen(functools.partial(operations.ejection, name))
        state.on_overflow = functools.partial(operations.upstream_overflow, name)
        state.on_retry_overflow = functools.partial(operations.retry_budget_exhausted, name)
        state.on_endpoints = functools.partial(operations.endpoints_retained, name)

    def serve_metrics(self, port: int | None = None, *, host: str | None = None) -> MetricsServer:
        """Serve this Mesh's metrics on `/metrics` and `/stats/prometheus` (like Istio's 15020),
        on MeshConfig's `metrics_port` and `metrics_host` unless given."""
        if self.metrics_server is None:
            chosen = self.config.metrics_port if port is None else port
            address = self.config.metrics_host if host is None else host
            self.metrics_server = serve_metrics(chosen or 0, self.registry, host=address)
            self.metrics.render_multiprocess_with_these()  # its Telemetry overrides
        return self.metrics_server

    @property
    def snapshot(self) -> Snapshot:
        return self.source.snapshot

    def plan(self, request: RequestAttributes) -> RoutePlan:
        """Route `request` with the current policy."""
        return plan_route(self.source.snapshot, request, self.rng)

    def cluster(self, key: ClusterKey, snapshot: Snapshot | None = None) -> ClusterState:
        return self.clusters.get(key, snapshot or self.source.snapshot)

    def exchange(
        self, plan: RoutePlan, *, replayable: bool, snapshot: Snapshot | None = None
    ) -> Exchange:
        """The per-request state for carrying out `plan`: made where Envoy's router has the
        request (after a fault's delay), the start of its upstream service time, which is
        measured only for the access log."""
        assert plan.cluster is not None
        cluster = self.cluster(plan.cluster, snapshot)
        exchange = Exchange(
            plan, cluster, self.rng, replayable=replayable, deadline=Deadline.after(plan.timeout)
        )
        if self.access_log.enabled("outbound"):
            exchange.began = time.perf_counter()
        return exchange

    def close(self) -> None:
        self.metrics.stop_rendering_multiprocess()
        if self._leave_registry is not None:
            self._leave_registry()  # a registry given to it: the Mesh shown before shows again
        self.source.close()
        self.tracing.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_default: Mesh | None = None
_default_lock = threading.Lock()


class _Shown:
    """One Mesh's metrics in a registry given to it (see `_given`)."""

    __slots__ = ("metrics", "operations")

    def __init__(self, metrics: IstioMetrics, operations: OperationalMetrics) -> None:
        self.metrics = metrics
        self.operations = operations

    def show(self, shown: bool) -> None:
        """Put these metrics in their registry, or take them out."""
        for metrics in (self.metrics, self.operations):
            (metrics.register if shown else metrics.unregister)()


# The metrics of the Meshes given each registry, oldest first. A registry shows one Mesh's
# metrics (the names would clash), the newest open one's: a Mesh built on a registry another
# one shows is shown in its place, as when `configure(mesh=Mesh(..., registry=REGISTRY))`
# replaces the default Mesh, and when it is closed (or fails to build) the one before is
# shown again. Only the metrics are kept here, not the Meshes.
_given: dict[CollectorRegistry, list[_Shown]] = {}
_given_lock = threading.Lock()


def _show_in(
    registry: CollectorRegistry, config: MeshConfig
) -> tuple[IstioMetrics, OperationalMetrics, Callable[[], None]]:
    """A Mesh's metrics, made in `registry` in place of those shown there, and what gives
    the registry back to the ones before (once)."""
    with _given_lock:
        given = _given.setdefault(registry, [])
        if given:
            given[-1].show(False)
        try:
            shown = _Shown(IstioMetrics(registry, config), OperationalMetrics(registry))
        except BaseException:
            if given:
                given[-1].show(True)
            raise
        given.append(shown)

    def leave() -> None:
        with _given_lock:
            if shown not in given:
                return  # left already
            on_top = given[-1] is shown
            if on_top:
                shown.show(False)
            given.remove(shown)
            if on_top and given:
                given[-1].show(True)
            if not given:
                _given.pop(registry, None)

    return shown.metrics, shown.operations, leave


def configure(policy: PolicyArg = None, *, mesh: Mesh | None = None, **config: Any) -> Mesh:
    """Set the process-wide default Mesh from keyword arguments (and `MESHLIB_*` variables).

    `meshlib.configure(policy="mesh.yaml", service="reviews", version="v2")`
    """
    global _default
    given = given_mesh(mesh, "meshlib.configure")
    if given is not None and (policy is not None or config):
        raise TypeError(
            "meshlib.configure: mesh= is a Mesh already built; give it its policy and"
            " settings when you build it, or give configure() those instead of mesh="
        )
    new = given if given is not None else Mesh(MeshConfig.from_env(**config), policy=policy)
    with _default_lock:
        old, _default = _default, new
    if old is not None and old is not new:
        old.close()  # first: it holds the metrics port the new one serves on
    _start_default(new)
    return new


def given_mesh(mesh: object, where: str) -> Mesh | None:
    """`mesh=` as a client, an adapter or `instrument()` is given it: None or a Mesh. Anything
    else (a policy path, `mesh="mesh.yaml"`) is refused here, where the mistake is, rather
    than on the first call."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    hint = ""
    if isinstance(mesh, (str, os.PathLike)):
        hint = "; a policy path goes to meshlib.configure(policy=...) or Mesh(config, policy=...)"
    raise TypeError(
        f"{where}: mesh= takes a meshlib.Mesh, not {type(mesh).__name__} {mesh!r}{hint}"
    )


def default_mesh() -> Mesh:
    """The process-wide Mesh, built from the environment on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Mesh(MeshConfig.from_env())
                _start_default(_default)
    return _default


def made_default_mesh() -> Mesh | None:
    """The process-wide Mesh if one was made (by `configure()` or `default_mesh()`), else
    None: for what must not make one (a server's shutdown)."""
    return _default


def _start_default(mesh: Mesh) -> None:
    """A new default Mesh serves its metrics, and says when it has no name: nothing fails
    without one, so the log is where a forgotten MESHLIB_SERVICE shows before the dashboards
    fill with "unknown"."""
    config = mesh.config
    if config.service is None and config.workload is None:
        logger.warning(
            "meshlib: the default Mesh names no workload (set MESHLIB_SERVICE, or"
            " meshlib.configure(service=...)): its metrics, spans and access logs call this"
            ' workload "unknown"'
        )
    _serve_default_metrics(mesh)


def _serve_default_metrics(mesh: Mesh) -> None:
    """The process-wide Mesh serves its metrics on MeshConfig.metrics_port (15020), as a
    sidecar does. Under a multi-worker server only the first worker gets the port; every
    worker's Telemetry overrides apply to what it renders."""
    mesh.metrics.render_multiprocess_with_these()
    if mesh.config.metrics_port is None:
        return
    try:
        mesh.serve_metrics()
    except OSError as exc:
        logger.warning(
            "%s; the app serves on without it (under several workers one process serves the"
            " metrics of all, with PROMETHEUS_MULTIPROC_DIR: docs/observability.md, section 4)",
            exc.strerror or exc,
        )


logger = logging.getLogger("meshlib")


def reset() -> None:
    """Forget the default Mesh (tests use this between cases)."""
    global _default
    with _default_lock:
        old, _default = _default, None
    if old is not None:
        old.close()
