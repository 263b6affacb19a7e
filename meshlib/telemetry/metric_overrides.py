"""Telemetry `metrics[].overrides`: which Istio metrics a workload exports, with which labels.

As Istio's Prometheus provider does, an override can switch a metric off or change its
labels, per metric (`REQUEST_COUNT`, `REQUEST_DURATION`, `REQUEST_SIZE`, `RESPONSE_SIZE`, or
`ALL_METRICS`) and per side (`CLIENT`: the `reporter="source"` series, `SERVER`: the
`reporter="destination"` ones, `CLIENT_AND_SERVER`: both):

    metrics:
    - overrides:
      - match: {metric: ALL_METRICS}
        tagOverrides:
          request_protocol: {operation: REMOVE}       # a label fewer: series merge
          mesh_region: {value: "'eu-west-1'"}         # a label more (a CEL string literal)
      - match: {metric: REQUEST_SIZE, mode: CLIENT}
        disabled: true

The overrides of the mesh, namespace and workload levels apply in that order, as Istio's
`mergeMetrics` (pilot/pkg/model/telemetry.go) applies them:

- Providers: only those named by the last `metrics[]` entry that names any are in scope (by
  default `prometheus`); an entry without `providers` has its predecessor's. With no
  `prometheus` (in any case) in scope, a sidecar has no stats filter, and meshlib exports no
  Istio metric; entries for another provider (`stackdriver`) change nothing here.
- `ALL_METRICS` disabled switches a whole side off, and any later override for that side
  switches it back on; a metric's own `disabled` is set only by overrides that match it.

An UPSERT value must be a CEL string literal (`'text'` or `"text"`): meshlib evaluates no
other expression, so other values are left out with a warning. Custom metrics, TCP and gRPC
message metrics have no series in meshlib to change. meshlib applies the result when it
renders a scrape, so recording stays as cheap as ever.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from meshlib.config import MeshConfig
from meshlib.policy.snapshot import Snapshot
from meshlib.policy.telemetry import (
    Metrics,
    MetricSelector,
    MetricsOverrides,
    cel_string_literal,
    settable_label,
)
from meshlib.telemetry._resolve import telemetry_levels

__all__ = ["FAMILIES", "LabelRule", "MetricOverrides"]

log = logging.getLogger("meshlib.telemetry")

# In the order meshlib's rows hold them: the counter, then the three histograms.
FAMILIES = ("REQUEST_COUNT", "REQUEST_DURATION", "REQUEST_SIZE", "RESPONSE_SIZE")
_FAMILIES_OF: dict[str, tuple[int, ...]] = {name: (i,) for i, name in enumerate(FAMILIES)}
_FAMILIES_OF["ALL_METRICS"] = tuple(range(len(FAMILIES)))
_REPORTERS_OF = {
    "CLIENT": ("source",),
    "SERVER": ("destination",),
    "CLIENT_AND_SERVER": ("source", "destination"),
}
PROVIDER = "prometheus"  # the metrics provider meshlib is (Istio's default one)
_EVERY_SERIES = [
    (family, reporter) for family in range(len(FAMILIES)) for reporter in ("source", "destination")
]
_warned: set[str] = set()


@dataclass(frozen=True, slots=True)
class LabelRule:
    """What one metric on one side becomes: switched off, or relabelled."""

    disabled: bool = False
    removed: frozenset[str] = frozenset()
    upserts: Mapping[str, str] = field(default_factory=dict)

    @property
    def relabels(self) -> bool:
        return bool(self.removed or self.upserts)

    def relabel(
        self, names: Sequence[str], values: Sequence[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The label names and values with removals and upserts applied (new labels last)."""
        upserts = self.upserts
        pairs = [
            (name, upserts.get(name, value))
            for name, value in zip(names, values, strict=True)
            if name not in self.removed
        ]
        present = {name for name, _ in pairs}
        pairs += [(name, value) for name, value in upserts.items() if name not in present]
        return tuple(n for n, _ in pairs), tuple(v for _, v in pairs)


_KEEP = LabelRule()
_OFF = LabelRule(disabled=True)


@dataclass(frozen=True, slots=True)
class MetricOverrides:
    """The rules by (family index in FAMILIES, reporter); absent means unchanged."""

    rules: Mapping[tuple[int, str], LabelRule] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.rules

    def rule(self, family: int, reporter: str) -> LabelRule:
        return self.rules.get((family, reporter), _KEEP)

    @classmethod
    def of(cls, snapshot: Snapshot, config: MeshConfig) -> MetricOverrides:
        """The overrides this workload's Telemetry levels give, mesh first, workload last."""
        entries = [
            metrics for level in telemetry_levels(snapshot, config) for metrics in level.metrics
        ]
        provider = _prometheus_in_scope(entries)
        if provider is None:  # a sidecar then has no stats filter at all
            return cls(dict.fromkeys(_EVERY_SERIES, _OFF))
        rules: dict[tuple[int, str], LabelRule] = {}
        sides_off: set[str] = set()  # reporters switched off whole, by ALL_METRICS disabled
        for metrics in _entries_for(provider, entries):
            for override in metrics.overrides:
                _apply(rules, sides_off, override)
        rules.update((key, _OFF) for key in _EVERY_SERIES if key[1] in sides_off)
        return cls({key: rule for key, rule in rules.items() if rule != _KEEP})


def _prometheus_in_scope(entries: Sequence[Metrics]) -> str | None:
    """The name meshlib's metrics go by, None when they are out of scope.

    As Istio's mergeMetrics: the providers in scope are those of the last entry naming any
    (mesh, namespace, workload, each in list order), else the default; the Prometheus one is
    the first that spells `prometheus` in any case (fetchProvider compares with EqualFold).
    """
    in_scope: tuple[str, ...] = (PROVIDER,)
    for entry in entries:
        in_scope = _provider_names(entry) or in_scope
    return next((name for name in in_scope if name.casefold() == PROVIDER), None)


def _entries_for(provider: str, entries: Sequence[Metrics]) -> Iterator[Metrics]:
    """The entries for `provider`: those naming it, or inheriting it from the entry before
    (across levels, as Istio's mergeMetrics passes `parentProviders` on). Names match
    exactly there: an entry for `prometheus` is not one for an in-scope `Prometheus`."""
    parent: tuple[str, ...] = (PROVIDER,)
    for entry in entries:
        names = _provider_names(entry) or parent
        parent = names
        if provider in names:
            yield entry


def _provider_names(entry: Metrics) -> tuple[str, ...]:
    return tuple(provider.name for provider in entry.providers)


def _apply(
    rules: dict[tuple[int, str], LabelRule], sides_off: set[str], override: MetricsOverrides
) -> None:
    """One override on top of those before it, as Istio's mergeMetrics (model/telemetry.go)."""
    match = override.match
    mode = (match.mode if match is not None else None) or "CLIENT_AND_SERVER"
    reporters = _REPORTERS_OF.get(mode, ())
    if _all_metrics(match) and override.disabled:
        # A switch for the whole side, not a per-metric setting: its tagOverrides are moot.
        sides_off.update(reporters)
        return
    # Any other override for a side switches it back on ("root namespace disables all, but
    # then enables them by namespace scoped"), custom metrics included.
    sides_off.difference_update(reporters)
    if match is not None and match.custom_metric is not None:
        return  # no custom metrics in meshlib
    metric = (match.metric if match is not None else None) or "ALL_METRICS"
    upserts: dict[str, str] = {}
    removed: set[str] = set()
    for tag, change in override.tag_overrides.items():
        if not settable_label(tag):
            _warn(f"tagOverrides {tag!r}: not a label name meshlib can set; left out")
        elif (change.operation or "UPSERT") == "REMOVE":
            removed.add(tag)
        else:
            literal = cel_string_literal(change.value)
            if literal is None:
                _warn(
                    f"tagOverrides {tag!r}: value {change.value!r} is not a CEL string literal"
                    " ('text'); meshlib evaluates no other expression, the override is left out"
                )
            else:
                upserts[tag] = literal
    for family in _FAMILIES_OF.get(metric, ()):
        for reporter in reporters:
            key = (family, reporter)
            old = rules.get(key, _KEEP)
            merged_upserts = {k: v for k, v in old.upserts.items() if k not in removed}
            merged_upserts.update(upserts)
            rules[key] = LabelRule(
                disabled=old.disabled if override.disabled is None else override.disabled,
                removed=frozenset((old.removed - set(upserts)) | removed),
                upserts=merged_upserts,
            )


def _all_metrics(match: MetricSelector | None) -> bool:
    """Istio's isAllMetrics: no metric named (no match, or a mode alone) or ALL_METRICS."""
    if match is None:
        return True
    return match.custom_metric is None and match.metric in (None, "ALL_METRICS")


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("meshlib: Telemetry metrics %s", message)
