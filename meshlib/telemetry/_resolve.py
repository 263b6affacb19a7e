"""Which Telemetry resources apply to this workload, in Istio's precedence order.

Shared by tracing (`effective_tracing`) and access logging (`access_log.effective_access_logging`).
"""

from __future__ import annotations

from meshlib.config import MeshConfig
from meshlib.policy.resources import Resource
from meshlib.policy.snapshot import Snapshot, oldest_first
from meshlib.policy.telemetry import Telemetry

__all__ = ["telemetry_levels"]


def telemetry_levels(snapshot: Snapshot, config: MeshConfig) -> list[Telemetry]:
    """The Telemetry specs that apply to this workload, weakest first: mesh, namespace, workload.

    Mesh level: the first (oldest) selector-less Telemetry in the root namespace; namespace
    level: the first selector-less one in `config.namespace` (skipped when that is the root
    namespace); workload level: every Telemetry in `config.namespace` whose
    `selector.matchLabels` (non-empty) all match `config.labels`, oldest first. A selector with
    empty `matchLabels` counts as selector-less. Telemetry with `targetRef(s)` (gateways,
    waypoints) is ignored.
    """
    namespace, root = config.namespace, config.root_namespace
    ordered: list[Resource[Telemetry]] = oldest_first(snapshot.telemetries)
    levels: list[Telemetry] = []
    mesh = _namespace_wide(ordered, root)
    if mesh is not None:
        levels.append(mesh)
    if namespace != root:
        local = _namespace_wide(ordered, namespace)
        if local is not None:
            levels.append(local)
    for resource in ordered:
        spec = resource.spec
        if resource.namespace != namespace or _targeted(spec) or spec.selector is None:
            continue
        wanted = spec.selector.match_labels
        if wanted and all(config.labels.get(k) == v for k, v in wanted.items()):
            levels.append(spec)
    return levels


def _targeted(spec: Telemetry) -> bool:
    return spec.target_ref is not None or bool(spec.target_refs)


def _namespace_wide(ordered: list[Resource[Telemetry]], namespace: str) -> Telemetry | None:
    for resource in ordered:
        spec = resource.spec
        wide = spec.selector is None or not spec.selector.match_labels
        if resource.namespace == namespace and wide and not _targeted(spec):
            return spec
    return None
