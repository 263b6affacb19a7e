"""Which Telemetry resources apply to which workload, in Istio's precedence order.

A sidecar takes up to three levels, weakest first: the mesh's (the root namespace's
namespace-wide Telemetry), its namespace's, and the workload's own (those whose selector picks
its labels). The data plane merges the levels (`meshlib.telemetry`); `meshlib check` reports
where Istio's choice among them is undefined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshlib.policy.common import selects
from meshlib.policy.resources import Resource
from meshlib.policy.snapshot import oldest_first
from meshlib.policy.telemetry import Telemetry

__all__ = ["for_sidecars", "namespace_wide", "telemetry_levels"]


def for_sidecars(telemetries: Iterable[Resource[Telemetry]]) -> list[Resource[Telemetry]]:
    """The Telemetry a sidecar can take, oldest first (Istio's precedence): those without
    `targetRef(s)`, which name gateways and waypoints."""
    return oldest_first(r for r in telemetries if not r.spec.targeted)


def namespace_wide(ordered: Iterable[Resource[Telemetry]]) -> dict[str, Resource[Telemetry]]:
    """By namespace, the Telemetry that applies to all of it: the first of `ordered` without a
    workload selector (a selector with empty `matchLabels` counts as none)."""
    wide: dict[str, Resource[Telemetry]] = {}
    for resource in ordered:
        if not resource.spec.match_labels:
            wide.setdefault(resource.namespace, resource)
    return wide


def telemetry_levels(
    telemetries: Iterable[Resource[Telemetry]],
    namespace: str,
    root_namespace: str,
    labels: Mapping[str, str],
) -> list[Resource[Telemetry]]:
    """The Telemetry that applies to a workload in `namespace` with `labels`, weakest first:
    the mesh's (root namespace), the namespace's (none when that is the root namespace), then
    every one in `namespace` whose selector picks `labels`, oldest first."""
    ordered = for_sidecars(telemetries)
    wide = namespace_wide(ordered)
    levels = [wide[ns] for ns in dict.fromkeys((root_namespace, namespace)) if ns in wide]
    levels.extend(
        r
        for r in ordered
        if r.namespace == namespace and r.spec.match_labels and selects(r.spec.match_labels, labels)
    )
    return levels
