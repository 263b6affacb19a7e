"""Cross-resource analysis, in the spirit of `istioctl analyze`.

Each resource can be valid on its own and still not fit the others: a route naming a subset
no DestinationRule defines, a delegate that does not exist, two resources with one name. These
findings never block serving — resources arrive in any order, and at run time such a route
answers as Envoy would — but `meshlib check` reports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from meshlib.errors import Diagnostic, Severity
from meshlib.policy._gc import collector_paused
from meshlib.policy.cel import MalformedExpression, UnsupportedExpression, parse_filter
from meshlib.policy.common import selects
from meshlib.policy.destination_rule import DestinationRule
from meshlib.policy.hosts import to_fqdn, wildcard_matches
from meshlib.policy.lines import FieldLines
from meshlib.policy.reachability import unreachable_routes
from meshlib.policy.resources import Origin, Resource
from meshlib.policy.service_entry import ServiceEntry, WorkloadEntry
from meshlib.policy.snapshot import (
    MostSpecific,
    latest_definitions,
    oldest_first,
    service_workloads,
    visible_to,
)
from meshlib.policy.telemetry import (
    DEFAULT_ACCESS_LOG_PROVIDERS,
    Telemetry,
    cel_string_literal,
    header_name,
    settable_label,
)
from meshlib.policy.telemetry_scope import for_sidecars, namespace_wide
from meshlib.policy.virtual_service import Destination, VirtualService


def analyze(
    resources: Iterable[Resource[Any]],
    *,
    cluster_domain: str = "cluster.local",
    root_namespace: str = "istio-system",
    lines: Mapping[Origin, FieldLines] | None = None,
) -> list[Diagnostic]:
    """Findings about how the resources fit together, errors and warnings.

    Each finding is at its resource's line, or, given the `lines` of a load with
    `keep_lines=True`, at the line of the field it names.
    """
    resources = tuple(resources)  # a lazy input is consumed before the pause
    with collector_paused():  # as loading: many live objects, no garbage to find
        findings = _Analyzer(resources, cluster_domain, root_namespace).run()
        if not lines:
            return list(findings)
        return [_at_field(finding, lines) for finding in findings]


def _at_field(finding: Diagnostic, lines: Mapping[Origin, FieldLines]) -> Diagnostic:
    """`finding`, moved from its resource's line to its field's."""
    where = lines.get(Origin(finding.file, finding.line))
    if where is None or finding.field is None:
        return finding
    return replace(finding, line=where.line(finding.field))


class _Analyzer:
    def __init__(self, resources: tuple[Resource[Any], ...], domain: str, root: str) -> None:
        self.root_namespace = root
        self.all_definitions = resources
        resources = latest_definitions(resources)
        self.resources = resources
        self.domain = domain
        self.virtual_services: list[Resource[VirtualService]] = [
            r for r in resources if r.kind == "VirtualService"
        ]
        self.rules: list[Resource[DestinationRule]] = [
            r for r in resources if r.kind == "DestinationRule"
        ]
        self.entries: list[Resource[ServiceEntry]] = oldest_first(
            r for r in resources if r.kind == "ServiceEntry"
        )
        by_host: dict[str, list[Resource[ServiceEntry]]] = {}
        for entry in self.entries:
            for pattern in entry.spec.hosts:
                by_host.setdefault(pattern.lower(), []).append(entry)
        self.entries_by_host = MostSpecific(by_host)
        self.workload_entries: list[Resource[WorkloadEntry]] = [
            r for r in resources if r.kind == "WorkloadEntry"
        ]
        self.telemetries = for_sidecars(r for r in resources if r.kind == "Telemetry")
        subsets: dict[str, set[str]] = {}
        for rule in self.rules:
            host = self.fqdn(rule.spec.host, rule.namespace)
            subsets.setdefault(host, set()).update(s.name for s in rule.spec.subsets)
        self.subsets = MostSpecific(subsets)  # as the Snapshot finds rules, not in file order

    def fqdn(self, host: str, namespace: str) -> str:
        return to_fqdn(host, namespace, self.domain)

    def service(self, host: str, namespace: str | None) -> Resource[ServiceEntry] | None:
        """The ServiceEntry that makes `host` a known service, as pilot finds it: one naming
        it exactly, else the most specific wildcard covering it, oldest first; only those
        visible in `namespace` (None: in any)."""
        for entries in self.entries_by_host.candidates(host):
            for entry in entries:  # oldest first
                if namespace is None or visible_to(entry, namespace, entry.spec.export_to):
                    return entry
        return None

    def run(self) -> Iterator[Diagnostic]:
        yield from self.duplicates()
        yield from self.virtual_service_findings()
        yield from self.conflicting_rules()
        yield from self.destination_rule_findings()
        yield from self.telemetry_findings()
        yield from self.conflicting_telemetry()
        yield from self.access_logs_without_provider()

    def conflicting_telemetry(self) -> Iterator[Diagnostic]:
        """Istio's MultipleTelemetriesWithoutWorkloadSelectors and
        ConflictingTelemetryWorkloadSelectors: one namespace-wide Telemetry per namespace
        (the root namespace's is the mesh's), one Telemetry per workload; with more, which one
        applies is undefined in Istio (meshlib takes the oldest)."""
        wide: dict[str, list[Resource[Telemetry]]] = {}
        selecting: dict[str, list[tuple[Resource[Telemetry], Mapping[str, str]]]] = {}
        for resource in self.telemetries:
            labels = resource.spec.match_labels
            if not labels:
                wide.setdefault(resource.namespace, []).append(resource)
            else:
                selecting.setdefault(resource.namespace, []).append((resource, labels))
        for namespace, resources in wide.items():
            if len(resources) < 2:
                continue
            for resource in resources:
                others = ", ".join(
                    f"{r.namespace}/{r.name}" for r in resources if r is not resource
                )
                yield _finding(
                    "error",
                    resource,
                    "spec.selector",
                    f"namespace {namespace} has other Telemetry without a workload selector"
                    f" ({others}): only one may apply to the whole namespace (meshlib takes"
                    " the oldest)",
                )
        for namespace, pairs in selecting.items():
            workloads = self.namespace_workloads(namespace)
            for resource, mine in pairs:
                for other, theirs in pairs:
                    if other is resource:
                        continue
                    both = next(
                        (w for w in workloads if selects(mine, w) and selects(theirs, w)), None
                    )
                    if both is None and not (selects(mine, theirs) or selects(theirs, mine)):
                        continue
                    shown = ", ".join(f"{k}={v}" for k, v in (both or {**mine, **theirs}).items())
                    yield _finding(
                        "error",
                        resource,
                        "spec.selector.matchLabels",
                        f"selects the same workloads as Telemetry {other.namespace}/{other.name}"
                        f" (a workload labelled {shown}): only one Telemetry may select a"
                        " workload",
                    )

    def access_logs_without_provider(self) -> Iterator[Diagnostic]:
        """Istio's InvalidTelemetryProvider: an `accessLogging` entry that names no provider and
        inherits none (from an earlier entry, or from the namespace's or the mesh's Telemetry
        above it) falls to MeshConfig's default providers. Istio's default MeshConfig has
        none, so Istio logs nothing for it, where meshlib logs it as `envoy`."""
        wide = namespace_wide(self.telemetries)
        defaults = ", ".join(DEFAULT_ACCESS_LOG_PROVIDERS)
        for resource in self.telemetries:
            spec: Telemetry = resource.spec
            parents = (wide.get(self.root_namespace), wide.get(resource.namespace))
            inherited = any(
                parent is not None and parent is not resource and _names_log_provider(parent)
                for parent in parents
            )
            for index, entry in enumerate(spec.access_logging):
                if entry.providers:
                    inherited = True
                elif not inherited and not entry.disabled:
                    yield _finding(
                        "warning",
                        resource,
                        f"spec.accessLogging[{index}].providers",
                        "names no provider and inherits none: Istio, whose default MeshConfig"
                        " has no defaultProviders.accessLogging, logs nothing for this entry,"
                        f" where meshlib logs it as {defaults!r}; name the provider"
                        f" (providers: [{{name: {defaults}}}])",
                    )

    def namespace_workloads(self, namespace: str) -> list[Mapping[str, str]]:
        """The labels of the workloads meshlib knows in `namespace`: WorkloadEntries and the
        endpoints of its ServiceEntries."""
        labels = [w.spec.labels for w in self.workload_entries if w.namespace == namespace]
        for entry in self.entries:
            if entry.namespace == namespace:
                labels.extend(w.labels for w in entry.spec.endpoints)
        return labels

    def telemetry_findings(self) -> Iterator[Diagnostic]:
        """Telemetry that is valid for Istio but that meshlib leaves out, said up front."""
        for resource in (r for r in self.resources if r.kind == "Telemetry"):
            spec: Telemetry = resource.spec
            for i, tracing in enumerate(spec.tracing):
                for tag, custom in tracing.custom_tags.items():
                    where = f"spec.tracing[{i}].customTags.{tag}"
                    if custom.formatter is not None:
                        yield _finding(
                            "warning", resource, f"{where}.formatter", _LEFT_OUT_FORMATTER
                        )
                    elif custom.header is not None and not header_name(custom.header.name):
                        yield _finding(
                            "warning",
                            resource,
                            f"{where}.header.name",
                            f"{custom.header.name!r} is not an HTTP header name;"
                            " the tag is left out",
                        )
            for i, metrics in enumerate(spec.metrics):
                for j, override in enumerate(metrics.overrides):
                    where = f"spec.metrics[{i}].overrides[{j}]"
                    if override.match is not None and override.match.custom_metric is not None:
                        yield _finding(
                            "warning", resource, f"{where}.match.customMetric", _NO_CUSTOM_METRICS
                        )
                    for tag, change in override.tag_overrides.items():
                        if not settable_label(tag):
                            yield _finding(
                                "warning",
                                resource,
                                f"{where}.tagOverrides.{tag}",
                                "not a label meshlib can set (reserved, `le`, or not a"
                                " Prometheus label name); left out",
                            )
                        elif (change.operation or "UPSERT") == "UPSERT" and (
                            cel_string_literal(change.value) is None
                        ):
                            yield _finding(
                                "warning",
                                resource,
                                f"{where}.tagOverrides.{tag}.value",
                                f"{change.value!r}: meshlib applies only CEL string literals"
                                " ('text'); this override is left out",
                            )
            yield from _filter_findings(resource, spec)

    def duplicates(self) -> Iterator[Diagnostic]:
        seen: dict[tuple[str, str, str], Resource[Any]] = {}
        for resource in self.all_definitions:
            first = seen.get(resource.key)
            if first is not None:
                yield _finding(
                    "warning",
                    resource,
                    None,
                    f"duplicate resource: also defined at {first.origin}; this later definition"
                    " replaces it, as with kubectl apply",
                )
            seen[resource.key] = resource

    def virtual_service_findings(self) -> Iterator[Diagnostic]:
        delegates = {(r.namespace, r.name): r for r in self.virtual_services if not r.spec.hosts}
        ordered = oldest_first(self.virtual_services)  # then those with a delegate route last
        ordered.sort(key=lambda r: any(http.delegate is not None for http in r.spec.http))
        yield from self.conflicting_hosts([r for r in ordered if r.spec.applies_to_mesh])
        for resource in ordered:
            spec = resource.spec
            if spec.hosts and not spec.applies_to_mesh:
                yield _finding(
                    "warning",
                    resource,
                    "spec.gateways",
                    "applies only to gateways (not 'mesh'); meshlib, like a sidecar, ignores it",
                )
                continue
            for unreachable in unreachable_routes(spec.http):
                yield _finding("warning", resource, unreachable.field, unreachable.message)
            for index, http in enumerate(spec.http):
                where = f"spec.http[{index}]"
                if http.delegate is not None:
                    key = (http.delegate.namespace or resource.namespace, http.delegate.name)
                    child = delegates.get(key)
                    if child is None:
                        yield _finding(
                            "error",
                            resource,
                            f"{where}.delegate",
                            f"delegate VirtualService {key[0]}/{key[1]} not found"
                            " (or it has hosts)",
                        )
                    elif not visible_to(child, resource.namespace, child.spec.export_to):
                        yield _finding(
                            "error",
                            resource,
                            f"{where}.delegate",
                            f"delegate VirtualService {key[0]}/{key[1]} is not exported to"
                            f" namespace {resource.namespace} (its exportTo); this route is"
                            " ignored, as Istio ignores it",
                        )
                for d_index, dest in enumerate(http.route):
                    yield from self.destination(
                        resource, f"{where}.route[{d_index}].destination", dest.destination
                    )
                if http.mirror is not None:
                    yield from self.destination(
                        resource, f"{where}.mirror", http.mirror, "mirror host"
                    )
                for m_index, mirror in enumerate(http.mirrors):
                    yield from self.destination(
                        resource,
                        f"{where}.mirrors[{m_index}].destination",
                        mirror.destination,
                        "mirror host",
                    )

    def conflicting_hosts(self, ordered: list[Resource[VirtualService]]) -> Iterator[Diagnostic]:
        """Istio's ConflictingMeshGatewayVirtualServiceHosts (IST0109): VirtualServices for the
        mesh gateway that claim one host where a namespace sees both. Unlike gateways, a
        sidecar does not merge them: it takes the first and drops the rest of the host."""
        claims: dict[str, list[tuple[Resource[VirtualService], int]]] = {}
        for resource in ordered:
            for index, host in enumerate(resource.spec.hosts):
                claim = claims.setdefault(self.fqdn(host, resource.namespace), [])
                if all(other is not resource for other, _ in claim):
                    claim.append((resource, index))
        for fqdn, claim in claims.items():
            for resource, index in claim:
                rivals = [o for o, _ in claim if o is not resource and _seen_together(o, resource)]
                if not rivals:
                    continue
                first = next(o for o, _ in claim if o is resource or o in rivals)
                names = ", ".join(f"{o.namespace}/{o.name}" for o in rivals)
                other = rivals[0] if first is resource else resource
                why = _why_first(first, other)
                yield _finding(
                    "error",
                    resource,
                    f"spec.hosts[{index}]",
                    f"host {fqdn} is also claimed by VirtualService {names} for the mesh"
                    " gateway: a sidecar takes one VirtualService per host and ignores the"
                    f" others' routes for it (here {first.namespace}/{first.name}: {why});"
                    " merge them, or keep them apart with exportTo",
                )

    def destination(
        self, resource: Resource[Any], where: str, dest: Destination, what: str = "host"
    ) -> Iterator[Diagnostic]:
        host = self.fqdn(dest.host, resource.namespace)
        if dest.subset is not None:
            subsets = self.subsets.find(host)
            if not subsets or dest.subset not in subsets:
                yield _finding(
                    "error",
                    resource,
                    f"{where}.subset",
                    f"subset {dest.subset!r} of host {host} is not defined by any DestinationRule;"
                    " requests routed here get 503 (no cluster)",
                )
        entry = self.service(host, resource.namespace)
        if entry is None:
            yield _finding(
                "error",
                resource,
                f"{where}.host",
                f"{what} {host} is not in the registry: no ServiceEntry visible in namespace"
                f" {resource.namespace} names it; a sidecar has no cluster for it and answers"
                " 503",
            )
            return
        ports = entry.spec.ports
        numbers = ", ".join(str(p.number) for p in ports)
        if dest.port is None:
            if len(ports) > 1:
                yield _finding(
                    "error",
                    resource,
                    f"{where}.port",
                    f"required: {host} has several ports ({numbers}, {entry}); without"
                    " port.number the port traffic goes to is undefined",
                )
        elif ports and all(p.number != dest.port.number for p in ports):
            yield _finding(
                "error",
                resource,
                f"{where}.port.number",
                f"{host} has no port {dest.port.number} (ports of {entry}: {numbers});"
                " a sidecar has no cluster for it and answers 503",
            )

    def destination_rule_findings(self) -> Iterator[Diagnostic]:
        """A rule for a host no service has applies to nothing; a subset whose labels select
        none of its service's workloads leaves the requests routed to it no endpoint."""
        for rule in self.rules:
            host = self.fqdn(rule.spec.host, rule.namespace)
            if host.startswith("*"):
                if not any(
                    wildcard_matches(host, h.lower()) or h.lower() == host
                    for entry in self.entries
                    for h in entry.spec.hosts
                ):
                    yield _finding(
                        "warning",
                        rule,
                        "spec.host",
                        f"no ServiceEntry has a host under {host}: this rule applies to nothing",
                    )
                continue
            entry = self.service(host, None)
            if entry is None:
                yield _finding(
                    "warning",
                    rule,
                    "spec.host",
                    f"host {host} is not in the registry (no ServiceEntry names it): this rule"
                    " applies to nothing",
                )
                continue
            workloads = service_workloads(entry, self.workload_entries)
            if not workloads:
                continue  # endpoints from DNS or the original destination: labels unknown
            for index, subset in enumerate(rule.spec.subsets):
                if subset.labels and not any(selects(subset.labels, w.labels) for w in workloads):
                    labels = ", ".join(f"{k}={v}" for k, v in subset.labels.items())
                    yield _finding(
                        "error",
                        rule,
                        f"spec.subsets[{index}].labels",
                        f"subset {subset.name!r} selects no endpoint of {host}: none of the"
                        f" {len(workloads)} workload(s) of {entry} has the labels {labels};"
                        " requests routed to it get 503 (no healthy upstream)",
                    )

    def conflicting_rules(self) -> Iterator[Diagnostic]:
        by_scope: dict[tuple[str, str], list[Resource[DestinationRule]]] = {}
        for rule in oldest_first(self.rules):
            if rule.spec.workload_selector is not None:
                continue
            by_scope.setdefault(
                (rule.namespace, self.fqdn(rule.spec.host, rule.namespace)), []
            ).append(rule)
        for (_, host), rules in by_scope.items():
            names = {(r.namespace, r.name) for r in rules}
            if len(names) < 2:
                continue
            first = next((r for r in rules if r.spec.traffic_policy is not None), None)
            subset_owner: dict[str, Resource[DestinationRule]] = {}
            for rule in rules:
                for subset in rule.spec.subsets:
                    other = subset_owner.setdefault(subset.name, rule)
                    if other.name != rule.name:
                        yield _finding(
                            "warning",
                            rule,
                            "spec.subsets",
                            f"subset {subset.name!r} of {host} is also defined by DestinationRule"
                            f" {other.namespace}/{other.name}; the older definition wins",
                        )
                if first is not None and rule is not first and rule.spec.traffic_policy is not None:
                    yield _finding(
                        "warning",
                        rule,
                        "spec.trafficPolicy",
                        f"conflicts with DestinationRule {first.namespace}/{first.name} for {host}:"
                        " rules for one host merge and only the oldest trafficPolicy applies",
                    )


def _names_log_provider(resource: Resource[Telemetry]) -> bool:
    return any(entry.providers for entry in resource.spec.access_logging)


def _filter_findings(resource: Resource[Any], spec: Telemetry) -> Iterator[Diagnostic]:
    """Access-log filters that are CEL but outside the subset meshlib evaluates."""
    for i, entry in enumerate(spec.access_logging):
        if entry.filter is None:
            continue
        try:
            parse_filter(entry.filter.expression or "")
        except MalformedExpression:
            pass  # an error already, from validation
        except UnsupportedExpression as error:
            yield _finding(
                "warning",
                resource,
                f"spec.accessLogging[{i}].filter.expression",
                f"meshlib logs every request for this entry: it does not evaluate {error}"
                " (only comparisons of response.code and response.flags, joined by &&, ||, !"
                " and parentheses)",
            )


def _seen_together(a: Resource[VirtualService], b: Resource[VirtualService]) -> bool:
    """Whether some namespace sees both VirtualServices (as Istio's analyzer scopes them: a
    public one is seen everywhere, another in the namespaces its exportTo names)."""
    scope_a, scope_b = _scope(a), _scope(b)
    return scope_a is None or scope_b is None or bool(scope_a & scope_b)


def _scope(resource: Resource[VirtualService]) -> frozenset[str] | None:
    export_to = resource.spec.export_to
    if not export_to or "*" in export_to:
        return None
    return frozenset(resource.namespace if e == "." else e for e in export_to)


def _why_first(owner: Resource[VirtualService], other: Resource[VirtualService]) -> str:
    if any(http.delegate is not None for http in other.spec.http) and not any(
        http.delegate is not None for http in owner.spec.http
    ):
        return "one without a delegate route comes before one with"
    return "it is older"


_LEFT_OUT_FORMATTER = "formatter tags (Envoy command operators) are not applied by meshlib"
_NO_CUSTOM_METRICS = "meshlib has no custom metrics; this override is left out"


def _finding(
    severity: Severity, resource: Resource[Any], field: str | None, message: str
) -> Diagnostic:
    return Diagnostic(
        severity,
        message,
        resource.origin.file,
        resource.origin.line,
        str(resource),
        field,
    )
