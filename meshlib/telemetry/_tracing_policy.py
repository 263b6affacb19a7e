"""This workload's Telemetry `tracing[]`: which settings apply, and its custom tags for spans.

Istio merges the `tracing` of the Telemetry resources that select a workload, mesh ->
namespace -> workload, field by field (`effective_tracing`); meshlib takes from the result
the root-trace sampling percentage (`sampling_percentage`; Istio's default 1%),
`disableSpanReporting`, and `customTags` resolved once per policy into `SpanTags`, which put
them on each span. `Tracing.apply` reads all of it on every Snapshot swap; nothing here makes
a span.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from meshlib.config import MeshConfig
from meshlib.policy.snapshot import Snapshot
from meshlib.policy.telemetry import Tracing as TracingSpec
from meshlib.policy.telemetry import header_name
from meshlib.telemetry._resolve import telemetry_levels

__all__ = [
    "DEFAULT_SAMPLING_PERCENTAGE",
    "NO_TAGS",
    "HeaderLookup",
    "SpanTags",
    "effective_tracing",
    "sampling_percentage",
]

# The tracing module's log, where these warnings have always gone.
log = logging.getLogger("meshlib.telemetry.tracing")

DEFAULT_SAMPLING_PERCENTAGE = 1.0  # Istio's PILOT_TRACE_SAMPLING default


def effective_tracing(
    snapshot: Snapshot, config: MeshConfig, mode: Literal["SERVER", "CLIENT"] | None = None
) -> TracingSpec:
    """This workload's tracing settings, merged mesh -> namespace -> workload, field by field.

    As Istio does, every entry of `tracing[]` whose `match.mode` covers `mode` (no match, or
    CLIENT_AND_SERVER, covers both sides; `mode` None takes all) applies in order, a later one
    overriding the fields it sets.

    Mesh level: the first (oldest) selector-less Telemetry in the root namespace; namespace
    level: the first selector-less one in `config.namespace`; workload level: every Telemetry in
    `config.namespace` whose `selector.matchLabels` all match `config.labels`, oldest first.
    A level without `tracing` inherits; a field left unset inherits; `customTags` replace the
    parent's map entirely. Telemetry with `targetRef(s)` (gateways, waypoints) is ignored.
    (The levels come from `meshlib.telemetry._resolve.telemetry_levels`.)
    """
    merged = TracingSpec()
    for level in telemetry_levels(snapshot, config):
        for entry in level.tracing:
            if _covers(entry, mode):
                merged = _overlay(merged, entry)
    return merged


def _covers(entry: TracingSpec, mode: Literal["SERVER", "CLIENT"] | None) -> bool:
    chosen = entry.match.mode if entry.match is not None else None
    return mode is None or chosen in (None, "CLIENT_AND_SERVER", mode)


def sampling_percentage(snapshot: Snapshot, config: MeshConfig) -> float:
    """Telemetry `randomSamplingPercentage` for this workload (0-100), default 1.0."""
    value = effective_tracing(snapshot, config).random_sampling_percentage
    return DEFAULT_SAMPLING_PERCENTAGE if value is None else float(value)


HeaderLookup = Callable[[str], "Sequence[str] | str | None"]
"""`lookup(name)`: request header `name` (lowercase) — its value or values; None if absent."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpanTags:
    """Telemetry `tracing.customTags`, ready for spans: `literal` and `environment` values
    resolved once (when the policy is applied), `header` ones read from each request."""

    static: Mapping[str, str] = dataclasses.field(default_factory=dict)
    headers: tuple[tuple[str, str, str | None], ...] = ()
    """(tag, request header in lowercase, defaultValue)."""

    @classmethod
    def of(cls, spec: TracingSpec, environ: Mapping[str, str] | None = None) -> SpanTags:
        env = os.environ if environ is None else environ
        static: dict[str, str] = {}
        headers: list[tuple[str, str, str | None]] = []
        for tag, custom in spec.custom_tags.items():
            if custom.literal is not None:
                static[tag] = custom.literal.value
            elif custom.environment is not None:
                value = env.get(custom.environment.name, custom.environment.default_value)
                if value is not None:
                    static[tag] = value
            elif custom.header is not None:
                name = custom.header.name.lower()
                if header_name(name):
                    headers.append((tag, name, custom.header.default_value))
                else:
                    log.warning(
                        "meshlib: Telemetry customTags %r: %r is not an HTTP header name; "
                        "the tag is left out",
                        tag,
                        custom.header.name,
                    )
            elif custom.formatter is not None:
                log.warning(
                    "meshlib: Telemetry customTags %r: formatter tags are not supported; "
                    "the tag is left out",
                    tag,
                )
        return cls(static, tuple(headers))

    @property
    def header_names(self) -> frozenset[str]:
        return frozenset(name for _, name, _ in self.headers)

    def add_to(self, attributes: dict[str, str | int], lookup: HeaderLookup | None) -> None:
        """Put the tags into a span's `attributes` (a header tag absent from the request
        takes its defaultValue, or is left out)."""
        if self.static:
            attributes.update(self.static)
        for tag, name, default in self.headers:
            found = lookup(name) if lookup is not None else None
            value = (found if isinstance(found, str) else ", ".join(found)) if found else default
            if value is not None:
                attributes[tag] = value


NO_TAGS = SpanTags()


def _overlay(parent: TracingSpec, child: TracingSpec) -> TracingSpec:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(child):
        value = getattr(child, f.name)
        if value is None or (isinstance(value, (tuple, Mapping)) and not value):
            continue
        changes[f.name] = value
    return dataclasses.replace(parent, **changes) if changes else parent
