"""prometheus-client's multiprocess mode for meshlib's metrics: each process's metric objects,
and the merged view of every worker's files that a scrape reads.

Multiprocess servers (gunicorn, uvicorn with --workers): when prometheus-client runs in
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set before it is imported), meshlib's metrics are
prometheus-client objects, one per metric name and process (`_per_process`), whose values live
in the per-process mmap files of that directory. `MultiProcessMetrics` reads them all back: it
indexes each file once and afterwards only re-reads values at known offsets, instead of
decoding every key on every scrape as prometheus-client's `MultiProcessCollector` does (about
1.2 s per worker for 2,000 series); metrics other than Istio's still go through
prometheus-client's own merge (`_merge`). `exposed_registry` is what every exposition helper
serves: the registry given, or in multiprocess mode one registry per directory holding that
merged view, rendered with the Telemetry overrides of the IstioMetrics whose Mesh serves the
metrics port (`render_with_overrides_of`). The public home of these names is
`meshlib.telemetry.metrics`.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, cast

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import values as _prometheus_values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

from meshlib.errors import ConfigError
from meshlib.telemetry._metrics_exposition import (
    _BUCKET_COUNT,
    _HISTOGRAMS,
    _ISTIO_FAMILIES,
    _REQUESTS,
    DURATION_BUCKETS,
    REQUEST_LABELS,
    _families,
    _fast_render,
    _go_float,
    _Hist,
    _label_text,
    _overridden,
    _render_rows,
    _Rendered,
    _Row,
)
from meshlib.telemetry.metric_overrides import MetricOverrides

__all__ = [
    "MultiProcessMetrics",
    "exposed_registry",
    "multiprocess_dir",
    "render_with_overrides_of",
    "stop_rendering_with_overrides_of",
]

# -- the mode and each process's metrics -----------------------------------------------------


def multiprocess_dir() -> str | None:
    """The directory of prometheus-client's multiprocess mode, or None when it is off.

    prometheus-client decides once, when it is first imported; a `PROMETHEUS_MULTIPROC_DIR`
    set later has no effect, so the decision it made is what counts here. Its deprecated
    lowercase `prometheus_multiproc_dir` counts when the uppercase one is not set, as there.
    """
    if not getattr(_prometheus_values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(_multiprocess_variable())


def _multiprocess_variable() -> str:
    """The variable prometheus-client takes its directory from: the deprecated lowercase one
    only where the uppercase one is not set."""
    upper = "PROMETHEUS_MULTIPROC_DIR"
    lower = upper.lower()
    return lower if lower in os.environ and upper not in os.environ else upper


def _check_multiprocess_dir() -> None:
    """A ConfigError naming the variable when multiprocess mode has no directory to write to,
    which prometheus-client reports only as a FileNotFoundError from deep inside its first
    metric (and, set empty, would take as the working directory)."""
    path = multiprocess_dir()
    if path is not None and not os.path.isdir(path):
        variable = _multiprocess_variable()
        raise ConfigError(
            f"{variable}={path!r}: not a directory. prometheus-client's"
            " multiprocess mode writes each process's metrics there: create it, empty, before"
            " the server starts (docs/observability.md, section 4)"
        )


_M = TypeVar("_M")
_PROCESS_METRICS: dict[str, Any] = {}
_per_process_lock = threading.Lock()


def _per_process(
    kind: Callable[..., _M],
    name: str,
    documentation: str,
    labels: Sequence[str] = (),
    *,
    registry: CollectorRegistry,
    shared: bool,
    **options: Any,
) -> _M:
    """A prometheus-client metric in `registry`; but when `shared` (multiprocess mode) one
    object per metric name and process, registered nowhere (the files are what a scrape
    reads). Each prometheus-client value keeps its own running total and writes it to the
    process's file: two objects for one series (two Meshes in one worker) would overwrite
    each other's counts."""
    if not shared:
        return kind(name, documentation, labels, registry=registry, **options)
    with _per_process_lock:
        found = _PROCESS_METRICS.get(name)
        if found is None:
            found = _PROCESS_METRICS[name] = kind(
                name, documentation, labels, registry=None, **options
            )
        return cast(_M, found)


# -- Telemetry overrides ---------------------------------------------------------------------


class _OverridesOwner(Protocol):
    """What the multiprocess view needs of an IstioMetrics: the overrides it holds now."""

    overrides: MetricOverrides


# Whose overrides the multiprocess view (one per process) renders every worker's series with.
_multiprocess_overrides: _OverridesOwner | None = None


def render_with_overrides_of(owner: _OverridesOwner) -> None:
    """Make `owner`'s overrides the ones the multiprocess view renders with."""
    global _multiprocess_overrides
    _multiprocess_overrides = owner


def stop_rendering_with_overrides_of(owner: _OverridesOwner) -> None:
    """Undo `render_with_overrides_of(owner)`, unless another owner has come since."""
    global _multiprocess_overrides
    if _multiprocess_overrides is owner:
        _multiprocess_overrides = None


# -- the merged view -------------------------------------------------------------------------

_INT = struct.Struct("i")
_DOUBLE = struct.Struct("d")
_TWO_DOUBLES = struct.Struct("dd")
# sample name -> (histogram index, or -1 for the requests counter; slot in its values)
_ISTIO_SLOT_OF = {f"{_REQUESTS}_total": (-1, 0)}
for _index, _name in enumerate(_HISTOGRAMS):
    _ISTIO_SLOT_OF[f"{_name}_sum"] = (_index, _BUCKET_COUNT)
    _ISTIO_SLOT_OF[f"{_name}_bucket"] = (_index, 0)  # bucket index from `le`
# Multiprocess files hold prometheus-client's `le` ("1.0", "1.8e+06"): the bucket each names.
_LE_INDEX = {le: i for i, le in enumerate((*(_go_float(b) for b in DURATION_BUCKETS), "+Inf"))}


_LabelSet = tuple[tuple[str, str], ...]


class _FileIndex:
    """What one mmap file holds, parsed once: entries are only ever appended to these files."""

    __slots__ = ("identity", "istio", "others", "parsed")

    def __init__(self, identity: tuple[int, int]) -> None:
        self.identity = identity
        self.parsed = 8  # offset of the first entry
        # (offset of the value, label set id, histogram index or -1 for requests, bucket slot)
        self.istio: list[tuple[int, int, int, int]] = []
        # (offset of the value, family name, sample name, labels, help)
        self.others: list[tuple[int, str, str, _LabelSet, str]] = []


class MultiProcessMetrics:
    """The merged metrics of every process writing to a multiprocess directory.

    In place of prometheus-client's `MultiProcessCollector` (the same families and values, but
    the Istio histograms' `le` as Envoy writes it, "1" where that one writes "1.0"), it parses
    each file's keys once and later only reads the values at their known offsets. Use through
    `exposed_registry()`, or register it in a registry of its own.
    """

    def __init__(self, path: str | None = None, registry: CollectorRegistry | None = None) -> None:
        path = path or multiprocess_dir() or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path or not os.path.isdir(path):
            raise ValueError("PROMETHEUS_MULTIPROC_DIR is not set or not a directory")
        self.path = path
        self._files: dict[str, _FileIndex] = {}
        # Istio label sets, numbered: the files of all workers share them.
        self._ids: dict[_LabelSet, int] = {}
        self._labels: list[tuple[str, Sequence[str], Sequence[str]]] = []
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Istio's families (as text when `render` asks), then every other merged family."""
        rows, others = self._read()
        owner = _multiprocess_overrides
        if owner is not None:
            rows = _overridden(rows, owner.overrides)
        if not rows:
            pass  # like MultiProcessCollector: no family without samples
        elif _fast_render.get():
            yield _Rendered(_render_rows(rows))
        else:
            yield from _families(rows)
        yield from _merge(others, self.path)

    def _read(self) -> tuple[list[_Row], dict[str, Metric]]:
        acc: dict[int, list[Any]] = {}
        others: dict[str, Metric] = {}
        with self._lock:
            seen = set()
            for path in sorted(glob.glob(os.path.join(self.path, "*.db"))):
                seen.add(path)
                try:
                    self._read_file(path, acc, others)
                except (OSError, ValueError):
                    continue  # removed meanwhile (live gauges of a dead process), or empty
            for gone in set(self._files) - seen:
                del self._files[gone]
            rows = [self._row(key, values) for key, values in acc.items()]
        return rows, others

    def _read_file(self, path: str, acc: dict[int, list[Any]], others: dict[str, Metric]) -> None:
        parts = os.path.basename(path)[:-3].split("_")
        typ = parts[0]
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                index = self._files.get(path)
                identity = (stat.st_dev, stat.st_ino)
                used = min(_INT.unpack_from(data, 0)[0], len(data))
                if (
                    index is None
                    or index.identity != identity
                    or used < index.parsed
                    # A live gauge's file is removed when its process dies, and one of the same
                    # name (the pid reused) may get the same inode: always read anew (small).
                    or parts[1].startswith("live")
                ):
                    index = self._files[path] = _FileIndex(identity)
                self._index(index, data, used, typ)
                unpack = _DOUBLE.unpack_from
                for offset, key, hist, slot in index.istio:
                    values = acc.get(key)
                    if values is None:
                        values = acc[key] = [None, None, None, None]
                    if hist < 0:
                        values[0] = (values[0] or 0.0) + unpack(data, offset)[0]
                    else:
                        buckets = values[hist + 1]
                        if buckets is None:
                            buckets = values[hist + 1] = [0.0] * (_BUCKET_COUNT + 1)
                        buckets[slot] += unpack(data, offset)[0]
                for offset, family, name, labels, help_text in index.others:
                    value, timestamp = _TWO_DOUBLES.unpack_from(data, offset)
                    metric = others.get(family)
                    if metric is None:
                        metric = others[family] = Metric(family, help_text, typ)
                    # The shapes prometheus-client's MultiProcessCollector merges.
                    if typ == "gauge":
                        metric._multiprocess_mode = parts[1]  # type: ignore[attr-defined]
                        labels = (*labels, ("pid", parts[2]))
                        metric.samples.append(Sample(name, labels, value, timestamp))  # type: ignore[arg-type]
                    else:
                        metric.samples.append(Sample(name, labels, value))  # type: ignore[arg-type]

    def _index(self, index: _FileIndex, data: mmap.mmap, used: int, typ: str) -> None:
        pos = index.parsed
        while pos + 4 <= used:
            length = _INT.unpack_from(data, pos)[0]
            value_at = pos + 4 + length + (8 - (length + 4) % 8)
            if length <= 0 or value_at + 16 > used:
                break  # an entry still being appended
            family, name, labels, help_text = json.loads(data[pos + 4 : pos + 4 + length])
            pos = value_at + 16
            slot = _ISTIO_SLOT_OF.get(name) if family in _ISTIO_FAMILIES else None
            if slot is not None and typ in ("counter", "histogram"):
                hist, where = slot
                if hist >= 0 and where == 0:  # a bucket: the slot is its `le`
                    where = _LE_INDEX.get(labels.pop("le", None), -1)
                if where >= 0:
                    index.istio.append((value_at, self._id(labels), hist, where))
                    continue
            index.others.append((value_at, family, name, tuple(sorted(labels.items())), help_text))
        index.parsed = pos

    def _id(self, labels: dict[str, str]) -> int:
        key = tuple(sorted(labels.items()))
        found = self._ids.get(key)
        if found is None:
            names = REQUEST_LABELS if set(labels) == set(REQUEST_LABELS) else tuple(labels)
            values = tuple(labels[n] for n in names)
            found = self._ids[key] = len(self._labels)
            self._labels.append((_label_text(names, values), names, values))
        return found

    def _row(self, key: int, values: list[Any]) -> _Row:
        hists: list[_Hist | None] = []
        for buckets in values[1:]:
            hists.append(None if buckets is None else (buckets[:_BUCKET_COUNT], buckets[-1]))
        return (*self._labels[key], values[0], tuple(hists))


def _merge(metrics: dict[str, Metric], path: str) -> Iterable[Metric]:
    """prometheus-client's own merge of the families meshlib does not read itself."""
    if not metrics:
        return []
    merge: Callable[[dict[str, Metric], bool], Iterable[Metric]] | None = getattr(
        MultiProcessCollector, "_accumulate_metrics", None
    )
    if merge is not None:
        return merge(metrics, True)
    # A prometheus-client without that helper: its public merge, minus Istio's families.
    collector: Any = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
    return [m for m in collector.collect() if m.name not in _ISTIO_FAMILIES]


_exposed: dict[str, CollectorRegistry] = {}
_exposed_lock = threading.Lock()


def exposed_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """What to scrape: `registry` (default REGISTRY), or in multiprocess mode every worker.

    In multiprocess mode the result is one registry per directory holding a
    `MultiProcessMetrics`: the values of all processes, the ones in `registry` included.
    """
    path = multiprocess_dir()
    if path is None:
        return REGISTRY if registry is None else registry
    with _exposed_lock:
        found = _exposed.get(path)
        if found is None:
            found = _exposed[path] = CollectorRegistry()
            MultiProcessMetrics(path, registry=found)
        return found
