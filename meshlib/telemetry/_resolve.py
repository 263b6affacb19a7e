"""Which Telemetry resources apply to this workload, in Istio's precedence order.

Shared by tracing (`_tracing_policy.effective_tracing`) and access logging
(`access_log.effective_access_logging`).
"""

from __future__ import annotations

from meshlib.config import MeshConfig
from meshlib.policy.snapshot import Snapshot
from meshlib.policy.telemetry import Telemetry
from meshlib.policy.telemetry_scope import telemetry_levels as _levels

__all__ = ["telemetry_levels"]


def telemetry_levels(snapshot: Snapshot, config: MeshConfig) -> list[Telemetry]:
    """The Telemetry specs that apply to this workload, weakest first: mesh, namespace, workload.

    Mesh level: the first (oldest) selector-less Telemetry in the root namespace; namespace
    level: the first selector-less one in `config.namespace` (skipped when that is the root
    namespace); workload level: every Telemetry in `config.namespace` whose
    `selector.matchLabels` (non-empty) all match `config.labels`, oldest first. A selector with
    empty `matchLabels` counts as selector-less. Telemetry with `targetRef(s)` (gateways,
    waypoints) is ignored. (`meshlib.policy.telemetry_scope` decides; `meshlib check` uses it.)
    """
    levels = _levels(snapshot.telemetries, config.namespace, config.root_namespace, config.labels)
    return [resource.spec for resource in levels]
