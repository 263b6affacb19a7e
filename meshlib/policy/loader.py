"""Load Istio policy from YAML text, files and folders, reporting every problem at once.

    result = load_paths(["mesh.yaml", "policies/"])
    result.raise_for_errors()   # PolicyError listing every error, one line each
    result.resources            # the valid resources, in file order
    result.resources_read       # every resource read, valid or not

A resource with errors is left out; its neighbours still load, so `meshlib check` can list
everything wrong in one run. Serving code never uses a result that has errors
(see `sources.file`).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path as FsPath
from types import MappingProxyType
from typing import Any

import yaml

from meshlib.errors import Diagnostic, PolicyError, Severity
from meshlib.policy._gc import without_collector
from meshlib.policy._schema import INVALID, Path, convert, format_path
from meshlib.policy._yaml import Document, YAMLProblem, decode, read_documents
from meshlib.policy.lines import FieldLines
from meshlib.policy.resources import IGNORED_KINDS, KINDS, ObjectMeta, Origin, Resource

POLICY_SUFFIXES = (".yaml", ".yml", ".json")
# kubectl flattens Lists in Lists; deeper than this is garbage, not a manifest.
MAX_LIST_DEPTH = 10
_TOP_LEVEL = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Valid resources plus every diagnostic found while loading."""

    resources: tuple[Resource[Any], ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()
    lines: Mapping[Origin, FieldLines] = field(default_factory=dict)  # with keep_lines=True
    # From load_paths: a digest of the files read, each one's path and bytes. Equal digests
    # (for one namespace) are the same policy, with no doubt resources' equality leaves:
    # specs compare maps without their order, which `headers.add` keeps, say.
    digest: bytes = b""
    # Every resource read, valid or not (what `meshlib check` counts); a file or YAML
    # document that cannot be read counts as one: it holds at least one, with an error.
    resources_read: int = 0

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "warning")

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PolicyError(self.errors)


@dataclass(slots=True)
class _Collector:
    """Diagnostics for one document, with line numbers looked up on demand."""

    file: str | None
    document: Document | None
    prefix: Path = ()
    resource: str | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, path: Path, message: str) -> None:
        self._add("error", path, message)

    def warning(self, path: Path, message: str) -> None:
        self._add("warning", path, message)

    def _add(self, severity: Severity, path: Path, message: str) -> None:
        line = self.document.line_of((*self.prefix, *path)) if self.document else None
        self.diagnostics.append(
            Diagnostic(severity, message, self.file, line, self.resource, format_path(path) or None)
        )

    @property
    def failed(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)


@dataclass(frozen=True, slots=True)
class PolicyTree:
    """The policy files under a path, and the folders in it that could not be listed."""

    files: tuple[FsPath, ...]
    unreadable: tuple[tuple[str, str], ...] = ()  # (folder, why): its files are unknown


def policy_files(path: str | os.PathLike[str]) -> PolicyTree:
    """The policy files under `path`: itself if a file, else *.yaml/*.yml/*.json in the tree.

    Hidden entries are skipped, so a Kubernetes ConfigMap mount (whose `..data` and
    `..<timestamp>` entries are hidden) yields each file once. A folder that cannot be listed
    is reported, not taken for an empty one: its policy would silently disappear.
    """
    root = FsPath(path)
    try:
        is_folder = root.is_dir()
    except PermissionError:  # a folder above it may not be entered: reading it says so
        is_folder = False
    if not is_folder:
        return PolicyTree((root,))
    found: list[FsPath] = []
    unreadable: list[tuple[str, str]] = []
    visited: set[tuple[int, int]] = set()  # folders already walked: a symlink loop ends here

    def cannot_list(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):  # vanished while walking: seen next time
            folder = FsPath(exc.filename or root)
            unreadable.append((str(folder), _why(folder, exc, "list it", "r and x")))

    for folder, dirs, files in os.walk(root, onerror=cannot_list, followlinks=True):
        try:
            stat = os.stat(folder)
        except OSError:
            continue  # vanished while walking: the next poll sees the tree as it is
        if (stat.st_dev, stat.st_ino) in visited:
            dirs[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            FsPath(folder, name)
            for name in sorted(files)
            if not name.startswith(".") and name.endswith(POLICY_SUFFIXES)
        )
    return PolicyTree(tuple(found), tuple(unreadable))


def _why(path: FsPath, exc: OSError, action: str, bits: str) -> str:
    """Why `path` cannot be read; for a refusal, what to fix: a folder above it that this
    process may not enter, or its own permissions (to `action`, it needs `bits`)."""
    reason = exc.strerror or str(exc)
    if not isinstance(exc, PermissionError):
        return reason
    user = f"{_process_user()}, the user this process runs as,"
    folder = _closed_folder_above(path)
    if folder is not None:
        return (
            f"{reason}: {user} may not enter {folder} (a folder above it: it needs x"
            " permission); check that folder's permissions, or the user"
        )
    return (
        f"{reason}: {user} may not {action} (it needs {bits} permission); check its"
        " permissions, or the user"
    )


def _closed_folder_above(path: FsPath) -> FsPath | None:
    """The folder above `path` (links resolved: a ConfigMap key's file is in `..data`) that
    this process may not enter, if there is one."""
    real = FsPath(os.path.realpath(path))
    for entry in (*reversed(real.parents), real):
        try:
            os.stat(entry)
        except PermissionError:  # its folder cannot be entered
            return entry.parent
        except OSError:
            return None
    return None


def _process_user() -> str:
    """Who reads the files, as permissions see it: `uid 65534 (nobody)`."""
    if not hasattr(os, "geteuid"):  # pragma: no cover - Windows has no uids
        return "the user"
    import pwd  # built in where uids exist

    uid = os.geteuid()
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:  # a uid with no name, as OpenShift runs containers
        return f"uid {uid}"


@without_collector
def load_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    default_namespace: str = "default",
    keep_lines: bool = False,
) -> LoadResult:
    """Load every policy file in `paths` (files or folders).

    `keep_lines` keeps where each field is, for findings about them (`result.lines`).
    """
    resources: list[Resource[Any]] = []
    diagnostics: list[Diagnostic] = []
    lines: dict[Origin, FieldLines] = {}
    digest = hashlib.blake2b()
    read = 0
    for path in paths:
        tree = policy_files(path)
        diagnostics.extend(
            Diagnostic("error", f"cannot read policy folder: {why}", folder)
            for folder, why in tree.unreadable
        )
        for file in tree.files:
            try:
                data = file.read_bytes()
            except OSError as exc:
                why = _why(file, exc, "read it", "r")
                diagnostics.append(Diagnostic("error", f"cannot read policy: {why}", str(file)))
                read += 1
                continue
            name = os.fsencode(file)
            digest.update(b"%d:%s%d:" % (len(name), name, len(data)))  # lengths: unambiguous
            digest.update(data)
            try:
                text = decode(data)
            except YAMLProblem as problem:
                message = f"cannot read policy: {problem.message}"
                diagnostics.append(Diagnostic("error", message, str(file), problem.line))
                read += 1
                continue
            result = load_text(
                text,
                str(file),
                default_namespace=default_namespace,
                start=len(resources),
                keep_lines=keep_lines,
            )
            resources.extend(result.resources)
            diagnostics.extend(result.diagnostics)
            lines.update(result.lines)
            read += result.resources_read
    return LoadResult(
        tuple(resources), tuple(diagnostics), MappingProxyType(lines), digest.digest(), read
    )


@without_collector
def load_text(
    text: str,
    file: str | None = None,
    *,
    default_namespace: str = "default",
    start: int = 0,
    keep_lines: bool = False,
) -> LoadResult:
    """Load the YAML (or JSON) documents in `text`; `file` is used in messages only."""
    resources: list[Resource[Any]] = []
    diagnostics: list[Diagnostic] = []
    lines: dict[Origin, FieldLines] = {}
    read = 0
    for document in read_documents(text):
        if isinstance(document, YAMLProblem):
            diagnostics.append(Diagnostic("error", document.message, file, document.line))
            read += 1
            continue
        if document.data is None:
            continue  # an empty document, e.g. after a trailing ---
        for collector, resource in _resources_in(document, file, default_namespace):
            read += 1
            diagnostics.extend(collector.diagnostics)
            if resource is not None:
                resources.append(_with_order(resource, start + len(resources)))
                if keep_lines:
                    _keep_lines(lines, document, collector.prefix, resource.origin)
    return LoadResult(
        tuple(resources), tuple(diagnostics), MappingProxyType(lines), resources_read=read
    )


def _keep_lines(
    lines: dict[Origin, FieldLines], document: Document, at: Path, origin: Origin
) -> None:
    node = document.node
    for part in at:  # ("items", index) pairs down to a List item
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part]
    if node is not None:
        lines[origin] = FieldLines(node, origin.line or document.line)


def load_objects(
    objects: Iterable[Any], origin: str, *, default_namespace: str = "default"
) -> LoadResult:
    """Load already-decoded objects (e.g. from the Kubernetes API)."""
    # Taken in full first: a lazy source (pages from an API) must not fetch under the pause.
    return _load_objects(list(objects), origin, default_namespace)


@without_collector
def _load_objects(objects: list[Any], origin: str, default_namespace: str) -> LoadResult:
    resources: list[Resource[Any]] = []
    diagnostics: list[Diagnostic] = []
    read = 0
    for obj in objects:
        document = Document(obj, None, 0)
        for collector, resource in _resources_in(document, origin, default_namespace):
            read += 1
            diagnostics.extend(collector.diagnostics)
            if resource is not None:
                resources.append(_with_order(resource, len(resources)))
    return LoadResult(tuple(resources), tuple(diagnostics), resources_read=read)


def _with_order(resource: Resource[Any], order: int) -> Resource[Any]:
    return Resource(
        resource.kind,
        resource.api_version,
        resource.name,
        resource.namespace,
        resource.spec,
        resource.labels,
        resource.creation_timestamp,
        resource.origin,
        order,
    )


def _resources_in(
    document: Document, file: str | None, default_namespace: str
) -> Iterator[tuple[_Collector, Resource[Any] | None]]:
    return _flattened(document, document.data, (), file, default_namespace)


def _flattened(
    document: Document, data: Any, prefix: Path, file: str | None, default_namespace: str
) -> Iterator[tuple[_Collector, Resource[Any] | None]]:
    """The resources in `data`, the part of `document` at `prefix`: a `kind: List` gives its
    items, and so does a List among them, as kubectl flattens Lists; so does a typed list
    (`kind: VirtualServiceList`), as the API server returns one."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if isinstance(kind, str) and kind.endswith("List") and "items" in data:
        items = data["items"]
        problem = None
        if not isinstance(items, list):
            problem = "must be a list of resources"
        elif len(prefix) >= 2 * MAX_LIST_DEPTH:  # each level adds ("items", index)
            problem = f"Lists nested more than {MAX_LIST_DEPTH} deep"
        if problem is not None:
            collector = _Collector(file, document)
            collector.error((*prefix, "items"), problem)
            yield collector, None
            return
        item_kind = kind.removesuffix("List")
        for index, item in enumerate(items):
            if (
                item_kind
                and isinstance(item, dict)
                and "kind" not in item
                and "apiVersion" not in item
            ):
                # as kubectl's decoder fills in a typed list's items, which the API server
                # writes without them
                item = {**item, "apiVersion": data.get("apiVersion"), "kind": item_kind}
            yield from _flattened(
                document, item, (*prefix, "items", index), file, default_namespace
            )
        return
    collector = _Collector(file, document, prefix=prefix)
    yield collector, _resource(data, collector, default_namespace)


def _resource(data: Any, sink: _Collector, default_namespace: str) -> Resource[Any] | None:
    if not isinstance(data, dict):
        sink.error((), "expected a Kubernetes object with apiVersion, kind, metadata and spec")
        return None
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        sink.error((), "apiVersion and kind are required strings")
        return None
    group, _, version = api_version.rpartition("/")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    namespace = (meta.get("namespace") if isinstance(meta, dict) else None) or default_namespace
    sink.resource = f"{kind} {namespace}/{name}" if name else kind
    spec_type = KINDS.get(kind)
    if spec_type is not None and group != spec_type.group:
        if "." in group and not _istio_group_meant(group, spec_type.group):
            spec_type = None  # another project's CRD kind of that name (Linkerd's, say)
        else:  # another Istio group, a misspelt one, or the core group (none has it): a slip
            sink.error(
                ("apiVersion",),
                f"{kind} belongs to {spec_type.group}, not {group or 'the core group'}"
                f" (use {spec_type.group}/{spec_type.versions[0]})",
            )
            return None
    if spec_type is None:
        if kind in IGNORED_KINDS and group.endswith(".istio.io"):
            sink.warning((), f"ignored: {IGNORED_KINDS[kind]}")
        elif group.endswith(".istio.io"):
            typo = _kind_meant(kind)
            if typo is not None:  # skipping it would silently drop the resource
                sink.error(("kind",), f'{kind} is not an Istio kind (did you mean "{typo}"?)')
            else:  # a kind of a newer Istio, say
                sink.warning(
                    (), f"ignored: meshlib does not know the Istio kind {api_version} {kind}"
                )
        elif api_version == "v1" and kind == "Service":
            # Routes to it still need it in the registry: say how, before `check` says it is
            # missing (a file with the Service in it otherwise reads as a contradiction).
            host = f"{name}.{namespace}.svc.<cluster domain>" if name else "its name"
            sink.warning(
                (),
                "ignored: meshlib does not read Kubernetes Services; for routes to it to have"
                f" endpoints, describe it with a ServiceEntry (hosts: [{host}], with its"
                " ports and endpoints)",
            )
        else:
            sink.warning((), f"ignored: not an Istio resource ({api_version} {kind})")
        return None
    if version not in spec_type.versions:
        served = ", ".join(f"{group}/{v}" for v in spec_type.versions)
        sink.error(("apiVersion",), f"{api_version} is not served (served: {served})")
    unknown = [key for key in data if key not in _TOP_LEVEL]
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(_TOP_LEVEL), n=1)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        sink.error((str(key),), f"unknown field ({hint}allowed: apiVersion, kind, metadata, spec)")
    metadata = convert(ObjectMeta, meta if meta is not None else {}, ("metadata",), sink)
    raw_spec = data.get("spec")
    if raw_spec is None and unknown:
        return None  # a misspelt spec: checking an empty one would only add noise
    spec = convert(spec_type.spec_type, {} if raw_spec is None else raw_spec, ("spec",), sink)
    # Checks a spec cannot make alone: exportTo's `.` stands for the resource's namespace.
    in_namespace = getattr(spec_type.spec_type, "validate_in_namespace", None)
    if in_namespace is not None and spec is not INVALID:
        in_namespace(spec, namespace, ("spec",), sink)
    if sink.failed or metadata is INVALID or spec is INVALID:
        return None
    created = _timestamp(metadata.creation_timestamp, sink)
    if sink.failed:
        return None
    return Resource(
        kind=kind,
        api_version=api_version,
        name=metadata.name,
        namespace=namespace,
        spec=spec,
        labels=metadata.labels,
        creation_timestamp=created,
        origin=Origin(sink.file, sink.document.line_of(sink.prefix) if sink.document else None),
    )


def _istio_group_meant(group: str, istio_group: str) -> bool:
    """Whether `group` is an Istio API group, or a misspelling of `istio_group` (as
    `networking.isito.io`): dropping that resource as another project's would lose it. Other
    projects' groups are far from Istio's (`policy.linkerd.io`, `gateway.networking.k8s.io`)."""
    if group.endswith(".istio.io") or "istio" in group:
        return True
    return difflib.SequenceMatcher(None, group, istio_group).ratio() >= 0.9


def _kind_meant(kind: str) -> str | None:
    """The Istio kind `kind` is most likely a misspelling of, if it is close to one."""
    known = [*KINDS, *IGNORED_KINDS]
    for name in known:
        if name.lower() == kind.lower():
            return name
    close = difflib.get_close_matches(kind, known, n=1, cutoff=0.8)
    return close[0] if close else None


def _timestamp(value: Any, sink: _Collector) -> str | None:
    """`metadata.creationTimestamp` in one form, so that text order is time order (Istio's
    oldest-first precedence): RFC 3339 as the API server writes it, in UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.upper()) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in value.upper():
        sink.error(
            ("metadata", "creationTimestamp"),
            "must be an RFC 3339 time with its offset, e.g. 2024-01-01T09:00:00Z",
        )
        return None
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load(
    paths: Sequence[str | os.PathLike[str]] | str, *, default_namespace: str = "default"
) -> tuple[Resource[Any], ...]:
    """Load policy and raise PolicyError listing every error; return the resources."""
    result = load_paths(
        [paths] if isinstance(paths, str) else paths, default_namespace=default_namespace
    )
    result.raise_for_errors()
    return result.resources
