"""Snapshot: the compiled, immutable index of policy that the data plane reads.

Built once per policy change from valid resources and this workload's identity, then swapped
in with one reference assignment; requests in flight keep the Snapshot they started with.

    snapshot = Snapshot.build(resources, MeshConfig(service="productpage", namespace="default"))
    decision = snapshot.route(RequestAttributes("GET", "reviews:9080", "/reviews/1"))
    decision.route.destinations   # weighted, with FQDN hosts
    snapshot.endpoints("reviews.default.svc.cluster.local", "v2", 9080)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from meshlib._text import host_port
from meshlib.config import MeshConfig
from meshlib.policy._gc import collector_paused
from meshlib.policy.common import selects
from meshlib.policy.delegate import merge_delegate_route
from meshlib.policy.destination_rule import DestinationRule, Subset, TrafficPolicy
from meshlib.policy.hosts import short_forms, strip_port, to_fqdn, wildcard_matches
from meshlib.policy.matching import (
    RequestAttributes,
    RouteMatcher,
    applies_to_workload,
    compile_match,
)
from meshlib.policy.resources import Resource
from meshlib.policy.routes import CompiledRoute, Mirror, RetryPolicy, RouteDestination
from meshlib.policy.security import AuthorizationPolicy, PeerAuthentication
from meshlib.policy.service_entry import ServiceEntry, ServicePort, WorkloadEntry
from meshlib.policy.telemetry import Telemetry
from meshlib.policy.virtual_service import HTTPRoute, VirtualService

_NO_POLICY = TrafficPolicy()
_generations = itertools.count(1)
_V = TypeVar("_V")


class _Exported(Protocol):
    @property
    def export_to(self) -> tuple[str, ...]: ...


_S = TypeVar("_S", bound=_Exported)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address traffic can go to, with the labels subsets select on."""

    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    weight: int = 1
    service_account: str | None = None
    locality: str | None = None
    key: str = field(init=False, repr=False, compare=False)
    """`address:port` (`[v6]:port`): the name balancers, outlier detection and logs use."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", host_port(self.address, self.port))

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True, slots=True)
class Service:
    """A destination service as the registry knows it (from ServiceEntry and WorkloadEntry)."""

    hostname: str
    namespace: str
    ports: tuple[ServicePort, ...]
    resolution: str
    location: str
    workloads: tuple[WorkloadEntry, ...]
    source: str  # "ServiceEntry ns/name"

    def port(self, number: int | None) -> ServicePort | None:
        """The service port for `number`; with one port, None means that one."""
        if number is None:
            return self.ports[0] if len(self.ports) == 1 else None
        for port in self.ports:
            if port.number == number:
                return port
        return None

    def serving_port(self, number: int | None, *, named: bool = False) -> ServicePort | None:
        """The service port a request for port `number` reaches: the port of that number, else
        this service's only port, which answers whatever port the client used. A port the
        route `named` itself must exist: Envoy has no cluster for another."""
        found = self.port(number)
        if found is None and not named and len(self.ports) == 1:
            return self.ports[0]
        return found


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """The DestinationRule(s) that apply to one host, merged as pilot merges them."""

    host: str
    rules: tuple[str, ...]  # "ns/name" in precedence order
    traffic_policy: TrafficPolicy | None
    subsets: Mapping[str, Subset]

    def policy_for(self, subset: str | None, port: int | None) -> TrafficPolicy:
        base = self.traffic_policy or _NO_POLICY
        chosen = self.subsets.get(subset) if subset else None
        return base.overlay(chosen.traffic_policy if chosen else None, port)


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """A VirtualService as this workload sees it: compiled routes in order."""

    name: str  # "namespace/name"
    hosts: tuple[str, ...]
    routes: tuple[CompiledRoute, ...]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Which VirtualService and route a request matched.

    `route is None` with a `virtual_service` means no route matched (Envoy answers 404 NR);
    `passthrough` means the host is unknown to the mesh and the request goes out untouched.
    """

    host: str
    port: int | None
    virtual_service: str | None
    route: CompiledRoute | None
    passthrough: bool = False
    matched: RouteMatcher | None = None  # the match block that selected `route`


class Snapshot:
    """Compiled policy for one workload. Immutable once built; build a new one to change it."""

    __slots__ = (
        "_aliases",
        "_default_routes",
        "_endpoints",
        "_policies",
        "_services",
        "_virtual_hosts",
        "_wildcard_hosts",
        "_wildcard_services",
        "authorization_policies",
        "config",
        "generation",
        "peer_authentications",
        "resources",
        "telemetries",
    )

    config: MeshConfig
    resources: tuple[Resource[Any], ...]
    generation: int  # increases with every Snapshot built in this process
    peer_authentications: tuple[Resource[PeerAuthentication], ...]
    authorization_policies: tuple[Resource[AuthorizationPolicy], ...]
    telemetries: tuple[Resource[Telemetry], ...]
    _services: dict[str, Service]
    _wildcard_services: tuple[tuple[str, Service], ...]
    _virtual_hosts: dict[str, VirtualHost]
    _wildcard_hosts: tuple[tuple[str, VirtualHost], ...]
    _policies: dict[str, DestinationPolicy]
    _default_routes: dict[str, CompiledRoute]
    _aliases: dict[str, str]
    _endpoints: dict[tuple[str, str | None, int | None], tuple[Endpoint, ...]]

    def __init__(self) -> None:
        raise TypeError("use Snapshot.build(resources, config)")

    @classmethod
    def empty(cls, config: MeshConfig | None = None) -> Snapshot:
        return cls.build((), config or MeshConfig())

    @classmethod
    def build(cls, resources: Iterable[Resource[Any]], config: MeshConfig) -> Snapshot:
        """Compile valid resources (see `policy.loader`) for the workload `config` describes."""
        self = object.__new__(cls)
        resources = tuple(resources)  # a lazy input is consumed before the pause
        with collector_paused():  # hundreds of thousands of objects that all live on
            _Builder(self, latest_definitions(resources), config).build()
        return self

    # -- lookups the data plane uses per request ---------------------------------------

    def resolve(self, authority: str) -> tuple[str, int | None]:
        """A request authority -> (host as the mesh names it, port)."""
        host, port = strip_port(authority)
        return self._aliases.get(host, host), port

    def virtual_host(self, host: str) -> VirtualHost | None:
        found = self._virtual_hosts.get(host)
        if found is None:
            for pattern, vhost in self._wildcard_hosts:
                if wildcard_matches(pattern, host):
                    return vhost
        return found

    def service(self, host: str) -> Service | None:
        found = self._services.get(host)
        if found is None:
            for pattern, service in self._wildcard_services:
                if wildcard_matches(pattern, host):
                    return service
        return found

    def route(self, request: RequestAttributes) -> RouteDecision:
        """The first matching route for `request`, as a sidecar picks it."""
        host, port = self.resolve(request.authority)
        if request.port is None:
            request.port = port if port is not None else (443 if request.scheme == "https" else 80)
        vhost = self.virtual_host(host)
        if vhost is not None:
            for route in vhost.routes:
                matched = route.match(request)
                if matched is not None:
                    return RouteDecision(host, port, vhost.name, route, matched=matched)
            return RouteDecision(host, port, vhost.name, None)
        default = self._default_routes.get(host)
        if default is None and self.service(host) is not None:
            default = _default_route(host)
        if default is not None:
            return RouteDecision(host, port, None, default)
        return RouteDecision(host, port, None, None, passthrough=True)

    def destination_policy(self, host: str) -> DestinationPolicy | None:
        """The DestinationRule(s) for `host`.

        A host only a wildcard ServiceEntry covers (`api.example.com` under `*.example.com`)
        and no VirtualService names gets its service's: pilot looks rules up for the service's
        hostname, the wildcard, so a rule naming the host itself does not apply there.
        """
        if (
            self._wildcard_services
            and host not in self._services
            and self.virtual_host(host) is None
        ):
            service = self.service(host)
            if service is not None:
                return self._policies.get(service.hostname)
        return self._policies.get(host)

    def traffic_policy(self, host: str, subset: str | None, port: int | None) -> TrafficPolicy:
        """The merged traffic policy for a destination (ISTIO.md §2.2)."""
        policy = self.destination_policy(host)
        if policy is None:
            return _NO_POLICY
        return policy.policy_for(subset, port)

    def has_subset(self, host: str, subset: str) -> bool:
        policy = self.destination_policy(host)
        return policy is not None and subset in policy.subsets

    def endpoints(self, host: str, subset: str | None, port: int | None) -> tuple[Endpoint, ...]:
        """Endpoints of `host` (filtered by the subset's labels) serving service `port`."""
        key = (host, subset, port)
        cached = self._endpoints.get(key)
        if cached is not None:
            return cached
        found = self._compute_endpoints(host, subset, port)
        self._endpoints[key] = found  # a cache of derived data; policy itself never changes
        return found

    def _compute_endpoints(
        self, host: str, subset: str | None, port: int | None
    ) -> tuple[Endpoint, ...]:
        service = self.service(host)
        if service is None:
            return ()
        service_port = service.port(port)
        if service_port is None:
            return ()
        labels: Mapping[str, str] = {}
        if subset is not None:
            policy = self.destination_policy(host)
            chosen = policy.subsets.get(subset) if policy else None
            if chosen is None:
                return ()
            labels = chosen.labels
        if not service.workloads:
            if service.resolution in ("DNS", "DNS_ROUND_ROBIN") and "*" not in host:
                # No endpoints: the host itself, as Envoy's DNS cluster.
                return (Endpoint(host, service_port.target_port or service_port.number),)
            if service.resolution == "NONE" and "*" not in host:
                # Envoy's original-destination cluster: where the request was going, so the
                # port it named (a targetPort has no effect; Istio warns).
                return (Endpoint(host, service_port.number),)
            return ()
        return tuple(
            Endpoint(
                address=w.address or "",
                port=w.port_for(service_port),
                labels=w.labels,
                weight=w.weight or 1,
                service_account=w.service_account,
                locality=w.locality,
            )
            for w in service.workloads
            if selects(labels, w.labels)
        )

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host with a VirtualService or a service entry."""
        return tuple(sorted({*self._virtual_hosts, *self._services}))


def _default_route(host: str) -> CompiledRoute:
    """The route Istio generates for a service no VirtualService covers."""
    return CompiledRoute(
        virtual_service="",
        index=0,
        name="default",
        matchers=(),
        destinations=(RouteDestination(host, None, None, 100),),
        total_weight=100,
        retries=RetryPolicy.resolve(None),  # pilot keeps the previous-hosts rule here
        timeout=None,
        fault=None,
        mirrors=(),
        headers=None,
        rewrite=None,
        redirect=None,
        direct_response=None,
        cors_policy=None,
    )


def service_workloads(
    entry: Resource[ServiceEntry], workload_entries: Iterable[Resource[WorkloadEntry]]
) -> tuple[WorkloadEntry, ...]:
    """A ServiceEntry's workloads: its `endpoints`, or the WorkloadEntries of its namespace
    that its `workloadSelector` selects.

    With resolution NONE, Envoy's cluster sends each request to its original destination:
    the WorkloadEntries a selector picks play no part (Istio warns about the selector).
    """
    spec = entry.spec
    if spec.workload_selector is None:
        return spec.endpoints
    if (spec.resolution or "NONE") == "NONE":
        return ()
    selector = spec.workload_selector.labels
    return tuple(
        we.spec
        for we in workload_entries
        if we.namespace == entry.namespace and selects(selector, we.spec.labels)
    )


def latest_definitions(resources: Iterable[Resource[Any]]) -> tuple[Resource[Any], ...]:
    """One resource per kind/namespace/name: the last definition, in the first one's place.

    That is what applying the files in order with kubectl gives: a later definition
    replaces the object's spec, and the object keeps its age.
    """
    latest: dict[tuple[str, str, str], Resource[Any]] = {}
    for resource in resources:
        first = latest.get(resource.key)
        latest[resource.key] = resource if first is None else replace(resource, order=first.order)
    return tuple(latest.values())


def oldest_first(resources: Iterable[Resource[Any]]) -> list[Resource[Any]]:
    """Istio's precedence among conflicting resources: oldest creationTimestamp, then order."""
    return sorted(resources, key=lambda r: (r.creation_timestamp or "~", r.order))


def virtual_service_precedence(
    resources: Iterable[Resource[VirtualService]], namespace: str
) -> list[Resource[VirtualService]]:
    """The VirtualServices (with hosts) a workload in `namespace` sees, in Istio's order.

    As pilot lists them for a sidecar (`VirtualServicesForGateway`, after
    `mergeVirtualServicesIfNeeded`): first those private to the namespace (`exportTo` `.` or
    the namespace's own name), then those another namespace exports to it by name, then
    public ones (no `exportTo`, or `*`). Within each group, VirtualServices without a
    delegate route come before those with one, and otherwise the oldest comes first.
    `resources` must be oldest first.
    """
    ordered = [r for r in resources if r.spec.hosts and not _delegates(r.spec)]
    ordered += [r for r in resources if r.spec.hosts and _delegates(r.spec)]
    return visibility_order(ordered, namespace)


def visibility_order(resources: Iterable[Resource[_S]], namespace: str) -> list[Resource[_S]]:
    """The resources visible in `namespace`, grouped as pilot lists them for it: private to
    it (`exportTo` `.` or its name), then exported to it by name, then public (no `exportTo`,
    or `*`). Each group keeps the order of `resources`."""
    private: list[Resource[_S]] = []
    exported: list[Resource[_S]] = []
    public: list[Resource[_S]] = []
    for resource in resources:
        export_to = resource.spec.export_to
        if not export_to or "*" in export_to:
            public.append(resource)
        elif resource.namespace == namespace:
            if "." in export_to or namespace in export_to:
                private.append(resource)
        elif namespace in export_to:
            exported.append(resource)
    return private + exported + public


def _delegates(spec: VirtualService) -> bool:
    return any(http.delegate is not None for http in spec.http)


def visible_to(resource: Resource[Any], namespace: str, export_to: tuple[str, ...]) -> bool:
    """Whether a resource exported with `export_to` is visible to a workload in `namespace`."""
    if not export_to or "*" in export_to:
        return True
    if "." in export_to and resource.namespace == namespace:
        return True
    return namespace in export_to


class _Builder:
    """Fills a Snapshot's indexes from resources. Used once per build."""

    def __init__(self, target: Snapshot, resources: tuple[Resource[Any], ...], config: MeshConfig):
        self.target = target
        self.resources = resources
        self.config = config
        self.domain = config.cluster_domain
        self.by_kind: dict[str, list[Resource[Any]]] = {}
        for resource in resources:
            self.by_kind.setdefault(resource.kind, []).append(resource)

    def of_kind(self, kind: str) -> list[Resource[Any]]:
        return self.by_kind.get(kind, [])

    def build(self) -> None:
        t = self.target
        t.config = self.config
        t.resources = self.resources
        t.generation = next(_generations)
        services = self._services()
        t._services = {h: s for h, s in services.items() if not h.startswith("*")}
        t._wildcard_services = _by_specificity(
            {h: s for h, s in services.items() if h.startswith("*")}
        )
        vhosts = self._virtual_hosts()
        t._virtual_hosts = {h: v for h, v in vhosts.items() if not h.startswith("*")}
        t._wildcard_hosts = _by_specificity({h: v for h, v in vhosts.items() if h.startswith("*")})
        t._policies = self._destination_policies(set(services) | self._routed_hosts(vhosts))
        t._default_routes = {h: _default_route(h) for h in t._services if h not in vhosts}
        t._aliases = self._aliases([*vhosts, *services, *t._policies])
        t._endpoints = {}
        t.peer_authentications = tuple(self.of_kind("PeerAuthentication"))
        t.authorization_policies = tuple(self.of_kind("AuthorizationPolicy"))
        t.telemetries = tuple(self.of_kind("Telemetry"))

    # -- services ------------------------------------------------------------------------

    def _services(self) -> dict[str, Service]:
        workload_entries: list[Resource[WorkloadEntry]] = self.of_kind("WorkloadEntry")
        services: dict[str, Service] = {}
        # As pilot's servicesExportedToNamespace: the first entry for a host in this order wins.
        entries: list[Resource[ServiceEntry]] = visibility_order(
            (r for r in oldest_first(self.of_kind("ServiceEntry")) if "~" not in r.spec.export_to),
            self.config.namespace,
        )
        for resource in entries:
            spec = resource.spec
            workloads = service_workloads(resource, workload_entries)
            for host in spec.hosts:
                host = host.lower()
                if host in services:
                    continue
                services[host] = Service(
                    hostname=host,
                    namespace=resource.namespace,
                    ports=spec.ports,
                    resolution=spec.resolution or "NONE",
                    location=spec.location or "MESH_EXTERNAL",
                    workloads=workloads,
                    source=str(resource),
                )
        return services

    # -- virtual services -----------------------------------------------------------------

    def _virtual_hosts(self) -> dict[str, VirtualHost]:
        all_vs: list[Resource[VirtualService]] = oldest_first(self.of_kind("VirtualService"))
        delegates = {(r.namespace, r.name): r for r in all_vs if not r.spec.hosts}
        vhosts: dict[str, VirtualHost] = {}
        for resource in virtual_service_precedence(all_vs, self.config.namespace):
            spec = resource.spec
            if not spec.applies_to_mesh:
                continue
            routes = tuple(self._routes(resource, delegates))
            hosts = tuple(to_fqdn(h, resource.namespace, self.domain) for h in spec.hosts)
            vhost = VirtualHost(f"{resource.namespace}/{resource.name}", hosts, routes)
            for host in hosts:
                vhosts.setdefault(host, vhost)  # the first VirtualService for a host wins
        return vhosts

    def _routes(
        self,
        resource: Resource[VirtualService],
        delegates: Mapping[tuple[str, str], Resource[VirtualService]],
    ) -> Iterable[CompiledRoute]:
        for index, http in enumerate(resource.spec.http):
            if http.delegate is None:
                compiled = self._route(resource, index, http)
                if compiled is not None:
                    yield compiled
                continue
            child = delegates.get(
                (http.delegate.namespace or resource.namespace, http.delegate.name)
            )
            if child is None or not visible_to(child, resource.namespace, child.spec.export_to):
                # Reported by analysis. As pilot does, only this route is dropped: requests
                # fall through to the root's next route.
                continue
            for child_index, child_http in enumerate(child.spec.http):
                # Merged on the spec first, as pilot does, then compiled for this workload.
                merged = merge_delegate_route(http, child_http)
                inner = None if merged is None else self._route(child, child_index, merged)
                if inner is not None:
                    yield inner

    def _route(
        self, resource: Resource[VirtualService], index: int, http: HTTPRoute
    ) -> CompiledRoute | None:
        ns = resource.namespace
        if http.match:
            blocks = [
                b
                for b in http.match
                if applies_to_workload(b, self.config.labels, self.config.namespace)
            ]
            if not blocks:
                return None  # every block is for other workloads: the route is not theirs
            matchers = tuple(compile_match(b) for b in blocks)
        else:
            matchers = ()
        weighted = [d for d in http.route if len(http.route) == 1 or d.weight > 0]
        destinations = tuple(
            RouteDestination(
                host=to_fqdn(d.destination.host, ns, self.domain),
                subset=d.destination.subset,
                port=d.destination.port.number if d.destination.port else None,
                weight=100 if len(weighted) == 1 else d.weight,
                headers=d.headers,
            )
            for d in weighted
        )
        # pilot's test, the configured count: a weight-0 entry still makes it build weighted
        # clusters (header edits' order) and keeps the previous-hosts retry rule
        weighted_clusters = len(http.route) > 1
        return CompiledRoute(
            virtual_service=f"{ns}/{resource.name}",
            index=index,
            name=http.name,
            matchers=matchers,
            destinations=destinations,
            total_weight=sum(d.weight for d in destinations),
            retries=RetryPolicy.resolve(http.retries, sole_destination=not weighted_clusters),
            timeout=http.timeout if http.timeout and http.timeout.seconds > 0 else None,
            fault=http.fault,
            mirrors=self._mirrors(http, ns),
            headers=http.headers,
            rewrite=http.rewrite,
            redirect=http.redirect,
            direct_response=http.direct_response,
            cors_policy=http.cors_policy,
            uri_regex_rewrite=(
                http.rewrite.uri_regex_rewrite.compiled()
                if http.rewrite is not None and http.rewrite.uri_regex_rewrite is not None
                else None
            ),
            weighted=weighted_clusters,
        )

    def _mirrors(self, http: HTTPRoute, ns: str) -> tuple[Mirror, ...]:
        mirrors: list[Mirror] = []
        if http.mirror is not None:
            if http.mirror_percentage is not None:
                fraction = http.mirror_percentage.fraction
            elif http.mirror_percent is not None:
                fraction = http.mirror_percent / 100.0
            else:
                fraction = 1.0
            targets = [(http.mirror, fraction)]
        else:
            targets = [
                (m.destination, m.percentage.fraction if m.percentage else 1.0)
                for m in http.mirrors
            ]
        for dest, fraction in targets:
            if fraction > 0:
                mirrors.append(
                    Mirror(
                        to_fqdn(dest.host, ns, self.domain),
                        dest.subset,
                        dest.port.number if dest.port else None,
                        fraction,
                    )
                )
        return tuple(mirrors)

    @staticmethod
    def _routed_hosts(vhosts: Mapping[str, VirtualHost]) -> set[str]:
        hosts: set[str] = set()
        for vhost in vhosts.values():
            for route in vhost.routes:
                hosts.update(d.host for d in route.destinations)
                hosts.update(m.host for m in route.mirrors)
        return hosts

    # -- destination rules ---------------------------------------------------------------

    def _destination_policies(self, hosts: set[str]) -> dict[str, DestinationPolicy]:
        """The DestinationRules for each host, looked up as pilot's `destinationRule` does.

        1. this workload's namespace: its rules visible there (exportTo empty, `*`, `.` or
           the namespace), the exact host first, then the most specific wildcard; in the root
           namespace, only its rules private to it;
        2. the service's namespace: its rules exported beyond it, if exported to this one;
        3. the root namespace: the same.
        A rule in any other namespace never applies. Rules for one host found in one step
        merge (`_merge`).
        """
        client_ns, root_ns = self.config.namespace, self.config.root_namespace
        hosts = set(hosts)
        local: dict[str, dict[str, list[Resource[DestinationRule]]]] = {}
        exported: dict[str, dict[str, list[Resource[DestinationRule]]]] = {}
        root_local: dict[str, list[Resource[DestinationRule]]] = {}
        for resource in oldest_first(self.of_kind("DestinationRule")):
            spec, ns = resource.spec, resource.namespace
            export_to: tuple[str, ...] = spec.export_to
            if spec.workload_selector is not None:
                if ns != client_ns or not selects(
                    spec.workload_selector.match_labels, self.config.labels
                ):
                    continue
                export_to = (".",)  # a rule with a selector is never exported
            host = to_fqdn(spec.host, ns, self.domain)
            hosts.add(host)
            if not export_to or {"*", ".", ns} & set(export_to):
                local.setdefault(ns, {}).setdefault(host, []).append(resource)
            if len(set(export_to)) != 1 or export_to[0] not in (".", ns):
                exported.setdefault(ns, {}).setdefault(host, []).append(resource)
            elif ns == root_ns:
                root_local.setdefault(host, []).append(resource)
        first = _RulePool(root_local if client_ns == root_ns else local.get(client_ns, {}))
        exported_pools = {ns: _RulePool(by_host) for ns, by_host in exported.items()}
        policies: dict[str, DestinationPolicy] = {}
        for host in hosts:
            chosen = first.find(host)
            if not chosen:
                for owner in (self._namespace_of(host), root_ns):
                    pool = exported_pools.get(owner) if owner is not None else None
                    if pool is None:
                        continue
                    # pilot takes the most specific host first, then checks exportTo
                    chosen = [r for r in pool.find(host) if _exported_to(r, client_ns)]
                    if chosen:
                        break
            if chosen:
                policies[host] = _merge(host, chosen)
        return policies

    def _namespace_of(self, host: str) -> str | None:
        """The namespace of the service `host` names: its registry entry's, else its FQDN's."""
        service = self.target.service(host)
        if service is not None:
            return service.namespace
        suffix = f".svc.{self.domain}"
        if host.endswith(suffix):
            parts = host[: -len(suffix)].split(".")
            return parts[-1] if len(parts) == 2 else None
        return None

    def _aliases(self, hosts: Iterable[str]) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for host in hosts:
            for form in short_forms(host, self.config.namespace, self.domain):
                aliases.setdefault(form, host)
        return aliases


def _exported_to(resource: Resource[DestinationRule], namespace: str) -> bool:
    export_to = resource.spec.export_to
    return not export_to or "*" in export_to or namespace in export_to


class MostSpecific(Generic[_V]):
    """Values by host, found as pilot's `MostSpecificHostMatch` finds them: the exact host,
    else the most specific (longest) wildcard covering it. `meshlib check` finds subsets and
    services so too.
    """

    __slots__ = ("by_host", "wildcards")

    def __init__(self, by_host: Mapping[str, _V]) -> None:
        self.by_host = by_host
        self.wildcards = [(p, v) for p, v in _by_specificity(by_host) if p.startswith("*")]

    def find(self, host: str) -> _V | None:
        found = self.by_host.get(host)
        if found is None:
            found = next((v for p, v in self.wildcards if wildcard_matches(p, host)), None)
        return found

    def candidates(self, host: str) -> Iterator[_V]:
        """Every value for `host`, the one `find` gives first: the exact host's, then each
        wildcard's that covers it, the most specific first."""
        found = self.by_host.get(host)
        if found is not None:
            yield found
        for pattern, value in self.wildcards:
            if wildcard_matches(pattern, host):
                yield value


class _RulePool(MostSpecific[list[Resource[DestinationRule]]]):
    """DestinationRules by FQDN host."""

    __slots__ = ()

    def find(self, host: str) -> list[Resource[DestinationRule]]:
        return super().find(host) or []


def _merge(host: str, rules: list[Resource[DestinationRule]]) -> DestinationPolicy:
    """Several DestinationRules for one host: subsets concatenated, first policy wins."""
    subsets: dict[str, Subset] = {}
    traffic_policy = None
    for resource in rules:
        if traffic_policy is None:
            traffic_policy = resource.spec.traffic_policy
        for subset in resource.spec.subsets:
            subsets.setdefault(subset.name, subset)
    return DestinationPolicy(
        host=host,
        rules=tuple(f"{r.namespace}/{r.name}" for r in rules),
        traffic_policy=traffic_policy,
        subsets=MappingProxyType(subsets),
    )


def _by_specificity(items: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Wildcard hosts, most specific (longest) first; `*` last."""
    return tuple(sorted(items.items(), key=lambda item: -len(item[0])))
