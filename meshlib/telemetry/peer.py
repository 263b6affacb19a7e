"""Metadata exchange: meshlib workloads tell each other who they are, as Istio's sidecars do.

Istio's proxies swap workload metadata in the `x-envoy-peer-metadata` header so that each side
can fill the other side's metric labels (ISTIO.md §7.2). meshlib does the same with
`x-meshlib-peer-metadata`: a meshed client sends its identity on every request, the
middleware answers with the server's (only to a caller that sent one, as Istio's sidecars
do), and each side records the other's as `PeerIdentity`.

The header is compact `key=value` pairs separated by `;`, for example::

    w=reviews-v2;n=bookinfo;a=reviews;v=v2;cs=reviews;cr=v2;c=Kubernetes;
    p=spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews

(one line on the wire). Keys: `w` workload, `n` namespace, `a` app, `v` version, `cs`
canonical service, `cr` canonical revision, `p` principal (SPIFFE URI), `c` cluster. Unknown
keys are ignored, so the format can grow. Every value is checked against the character set and
length Kubernetes allows for it; a value that fails, a missing key, a header over its limit
(below) or plain garbage yields Istio's "unknown" for that field (canonical revision
"latest"). `decode` never raises, and no value taken from the network can be longer than its
cap, so peers cannot create unbounded metric labels with it.

Istio's sidecars exchange the same facts in their own form, `x-envoy-peer-metadata`: a
`google.protobuf.Struct` (`NAMESPACE`, `WORKLOAD_NAME`, `CLUSTER_ID`, and `LABELS` with `app`,
`version` and the `service.istio.io/canonical-*` labels), serialized and base64-encoded, with
`x-envoy-peer-metadata-id` naming the sender. meshlib reads that form too and sends it beside
its own (`istio_headers`), so a meshlib workload and an Envoy-sidecar workload name each
other in both sides' metrics, as two sidecars do. It carries no principal: Istio takes that
from mTLS alone.

Limits. meshlib's form holds eight short values: over `MAX_HEADER_LENGTH` (2,048 characters)
it is not read. Istio's may be much longer, and is read up to `MAX_ISTIO_HEADER_LENGTH`
(16,384). Recent sidecars (the `peer_metadata` filter) send a few hundred characters, but older
ones (the `metadata_exchange` filter, Istio 1.14's among them) send every node metadata key
in EXCHANGE_KEYS — NAME, NAMESPACE, INSTANCE_IPS, OWNER, WORKLOAD_NAME, MESH_ID,
SERVICE_ACCOUNT, CLUSTER_ID, ISTIO_VERSION, APP_CONTAINERS — with the node's PLATFORM_METADATA
(a cloud's project, cluster, zone, instance) and every label of the pod: 1.6 KiB of base64 on a
GKE node with Istio's own labels, 3.2 KiB with 20 more of a usual length, 6.6 KiB with 60,
15.8 KiB with 170 (tests/telemetry/test_peer_istio.py builds them with the protobuf runtime).
Envoy accepts 60 KiB of request headers in all (`max_request_headers_kb`), so its sidecars
never trim the header; 16 KiB is also all h11 (uvicorn's pure-Python HTTP/1.1, httpx's) takes
of a whole request or response head by default, and twice what gunicorn takes of one header
line (`limit_request_field_size`, 8,190): a longer header would rarely reach meshlib at all.
Reading is bounded by the length and by `_struct.MAX_FIELDS`: the 15.8 KiB header decodes in
0.3 ms in pure Python (0.09 ms compiled), no crafted one takes more than 0.4 ms, and each
distinct value is decoded once (the result is cached). A value over its form's limit is the
unknown peer, and the first one of each form is logged (a warning in the `meshlib.telemetry`
log naming the header, its length and the limit, once per process), so an operator can see
why a peer shows as unknown.

Caching. A request's header is usually one of a few (one per calling workload; one per calling
pod from Istio's sidecars, whose metadata names the pod), so `decode` remembers what each
value decoded to: a hit is one dict lookup. The cache is bounded (two generations of
`_CACHE_SIZE` values and of 2 Mi characters, `meshlib._memo`), and a value that decodes to
nothing usable is not remembered at all. A flood of distinct values, junk or forged, cannot
push out a caller that keeps calling: one that calls at least once while `_CACHE_SIZE` new
values arrive is never decoded again.

Header claims are not proof. When the connection has an mTLS peer certificate, its SPIFFE URI
is the peer's principal and its namespace, whatever the header says: see `from_principal`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AnyStr

from meshlib._memo import Memo
from meshlib.telemetry import _struct

if TYPE_CHECKING:
    from meshlib.config import MeshConfig

__all__ = [
    "EXCHANGE_HEADERS",
    "HEADER",
    "ISTIO_HEADER",
    "ISTIO_ID_HEADER",
    "MAX_HEADER_LENGTH",
    "MAX_ISTIO_HEADER_LENGTH",
    "UNKNOWN_PEER",
    "PeerIdentity",
    "decode",
    "encode",
    "from_principal",
    "identity_of",
    "istio_headers",
    "with_identity",
]

HEADER = "x-meshlib-peer-metadata"
MAX_HEADER_LENGTH = 2048  # meshlib's form: longer values are not parsed at all
# Istio's form (Envoy's peer_metadata filter): the sender's metadata, and its node id, which
# the receiving proxy caches the decoded metadata under.
ISTIO_HEADER = "x-envoy-peer-metadata"
ISTIO_ID_HEADER = "x-envoy-peer-metadata-id"
MAX_ISTIO_HEADER_LENGTH = 16384  # Istio's form, whole node metadata included: module docstring
_FORM_PREFIX = 64  # meshlib's form has a `=` this early, base64 none: named in the log by it

UNKNOWN = "unknown"
LATEST = "latest"


EXCHANGE_HEADERS = (HEADER, ISTIO_HEADER, ISTIO_ID_HEADER)
"""Every metadata-exchange header, in either form: read, then removed from what the app sees."""
_EXCHANGE_STR = frozenset(EXCHANGE_HEADERS)
_EXCHANGE_BYTES = frozenset(name.encode() for name in EXCHANGE_HEADERS)
_EXCHANGE_LENGTHS = frozenset(len(name) for name in EXCHANGE_HEADERS)  # most names: no lower()


def with_identity(
    headers: Iterable[tuple[AnyStr, AnyStr]], identity: Sequence[tuple[AnyStr, AnyStr]]
) -> list[tuple[AnyStr, AnyStr]]:
    """Response `headers` (ASGI's bytes or WSGI's str) with the `identity` headers (names
    lowercase) as their only metadata-exchange headers, in either form: set, not added, as
    Istio's filter sets its own (an app relaying an upstream's response headers would otherwise
    name the upstream to the caller). A new list: the app may reuse its own."""
    names: frozenset[Any] = _EXCHANGE_BYTES if isinstance(identity[0][0], bytes) else _EXCHANGE_STR
    kept = [
        pair
        for pair in headers
        if len(pair[0]) not in _EXCHANGE_LENGTHS or pair[0].lower() not in names
    ]
    kept.extend(identity)
    return kept


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of a request, as metric labels name it.

    >>> PeerIdentity(workload="reviews-v2", namespace="bookinfo").canonical_revision
    'latest'
    """

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = LATEST
    principal: str = UNKNOWN
    cluster: str = UNKNOWN


UNKNOWN_PEER = PeerIdentity()

# Kubernetes' rules for each value: an object name (workload), a DNS label (namespace), a
# label value (app, version, canonical labels, cluster id). Each regex bounds the length.
_OBJECT_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?"
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_VALUE = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_SPIFFE = re.compile(
    r"spiffe://(?P<td>[a-z0-9._-]{1,253})"
    r"(?P<path>/[-A-Za-z0-9._~%!$&'()*+,;=:@/]{0,254})?"
)
# Istio's own form, spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
_SPIFFE_NAMESPACE = re.compile(rf"/ns/({_DNS_LABEL})/sa/[^/]+")
_MAX_PRINCIPAL = 512

_FIELDS: dict[str, tuple[str, re.Pattern[str] | None]] = {
    "w": ("workload", re.compile(_OBJECT_NAME)),
    "n": ("namespace", re.compile(_DNS_LABEL)),
    "a": ("app", re.compile(_LABEL_VALUE)),
    "v": ("version", re.compile(_LABEL_VALUE)),
    "cs": ("canonical_service", re.compile(_LABEL_VALUE)),
    "cr": ("canonical_revision", re.compile(_LABEL_VALUE)),
    "p": ("principal", None),  # checked by _valid_principal
    "c": ("cluster", re.compile(_LABEL_VALUE)),
}
_KEY_OF = {attr: key for key, (attr, _) in _FIELDS.items()}
# Istio's Struct: its top-level fields and its LABELS, by the key of the field each fills.
_ISTIO_FIELDS = {"WORKLOAD_NAME": "w", "NAMESPACE": "n", "CLUSTER_ID": "c"}
_ISTIO_LABELS = {
    "app": "a",
    "version": "v",
    "service.istio.io/canonical-name": "cs",
    "service.istio.io/canonical-revision": "cr",
}

# Most requests carry one of a few headers (one per calling workload; per calling pod from
# Istio's sidecars): remember what they decode to, in two generations (meshlib._memo), so that
# a flood of distinct values, junk or forged, cannot push out the real callers'. Values that
# decode to nothing usable are not remembered at all.
_CACHE_SIZE = 512  # header values per generation (and at most 2 Mi characters of them)
_memo: Memo[str, PeerIdentity] = Memo(_CACHE_SIZE)
_cache: dict[str, PeerIdentity] = _memo.recent  # a hit is one lookup in it

_log = logging.getLogger("meshlib.telemetry")
_warned: set[str] = set()  # the headers whose values went over their limit, logged once each


def _valid_principal(value: str) -> bool:
    return len(value) <= _MAX_PRINCIPAL and _SPIFFE.fullmatch(value) is not None


def _valid(key: str, value: str) -> bool:
    _, pattern = _FIELDS[key]
    if pattern is None:
        return _valid_principal(value)
    return pattern.fullmatch(value) is not None


def identity_of(config: MeshConfig) -> PeerIdentity:
    """This workload as its peers see it: what `encode(config)` tells them."""
    labels = config.labels
    return PeerIdentity(
        workload=config.workload or UNKNOWN,
        namespace=config.namespace,
        app=labels.get("app") or UNKNOWN,
        version=labels.get("version") or UNKNOWN,
        canonical_service=config.canonical_service,
        canonical_revision=config.canonical_revision,
        principal=config.principal,
        cluster=config.cluster,
    )


def encode(config: MeshConfig) -> str:
    """The `x-meshlib-peer-metadata` value announcing this workload.

    Fields that a peer would reject (unknown ones, or values outside Kubernetes' rules) are
    left out, so the peer records "unknown" for them rather than a mangled value.
    """
    identity = identity_of(config)
    parts = []
    for attr, key in _KEY_OF.items():
        value: str = getattr(identity, attr)
        if value != UNKNOWN and _valid(key, value):
            parts.append(f"{key}={value}")
    return ";".join(parts)


def istio_headers(config: MeshConfig) -> tuple[tuple[str, str], tuple[str, str]]:
    """This workload in Istio's form: the `x-envoy-peer-metadata` and
    `x-envoy-peer-metadata-id` headers an Envoy sidecar of the same workload would send.

    The id is what the receiving proxy caches the decoded metadata under, so it is derived
    from the metadata itself: a pod that reuses another's IP never inherits its entry.
    """
    identity = identity_of(config)
    fields: dict[str, _struct.StructValue] = {**_valid_fields(identity, _ISTIO_FIELDS)}
    labels = _valid_fields(identity, _ISTIO_LABELS)
    if labels:
        fields["LABELS"] = labels
    value = base64.b64encode(_struct.encode(fields)).decode("ascii")
    digest = hashlib.blake2b(value.encode("ascii"), digest_size=8).hexdigest()
    return (ISTIO_HEADER, value), (ISTIO_ID_HEADER, f"meshlib~{digest}")


def _valid_fields(identity: PeerIdentity, names: dict[str, str]) -> dict[str, str]:
    fields = {}
    for name, key in names.items():
        value: str = getattr(identity, _FIELDS[key][0])
        if value != UNKNOWN and _valid(key, value):
            fields[name] = value
    return fields


def claim(meshlib: str | None, istio: str | None) -> str | None:
    """Which of a message's two metadata headers names the peer that sent it.

    A meshlib workload sends both, naming itself twice; an Envoy sidecar sets Istio's at every
    hop, but passes meshlib's on as the app sent it, so an app that relays its request's (or
    its upstream's response's) headers — a proxy, a gateway — hands on a meshlib header naming
    another workload. So meshlib's form, which also carries the principal, is taken only when
    it names the workload Istio's does; else Istio's."""
    if not istio:
        return meshlib
    if not meshlib:
        return istio
    ours, theirs = decode(meshlib), decode(istio)
    same = ours.workload == theirs.workload and ours.namespace == theirs.namespace
    return meshlib if same else istio


def decode(value: str | None) -> PeerIdentity:
    """The peer a header value claims to be; `UNKNOWN_PEER`'s values for anything unusable.

    `value` is meshlib's form or Istio's (base64, whose only `=` are its padding, where
    meshlib's always has one inside).

    Never raises: any string (or None) gives a PeerIdentity whose every field is valid and
    bounded in length. A value over its form's limit is the unknown peer, and says so once in
    the log (see "Limits" in the module docstring).
    """
    if not value or not isinstance(value, str):
        return UNKNOWN_PEER
    found = _cache.get(value)
    if found is not None:
        return found
    found = _memo.recall(value)
    if found is None:
        found = _decoded(value)
        if found is UNKNOWN_PEER:
            return found  # nothing usable: not worth a place a real caller's header could have
    _memo.keep(value, found, len(value))
    return found


def _decoded(value: str) -> PeerIdentity:
    """What `value` claims, read afresh; UNKNOWN_PEER itself when it names no one."""
    length = len(value)
    if length > MAX_ISTIO_HEADER_LENGTH:  # over both limits: which form it is only names it
        return _too_long(HEADER if "=" in value[:_FORM_PREFIX] else ISTIO_HEADER, length)
    if "=" in value.rstrip("="):
        if length > MAX_HEADER_LENGTH:
            return _too_long(HEADER, length)
        fields = _meshlib_fields(value)
    else:
        fields = _istio_fields(value)
    return PeerIdentity(**fields) if fields else UNKNOWN_PEER


def _too_long(header: str, length: int) -> PeerIdentity:
    """The unknown peer, for a `header` value of `length` characters, over its limit; the
    first time for each header, a warning that says why the peer shows as unknown."""
    if header not in _warned:
        _warned.add(header)
        limit = MAX_HEADER_LENGTH if header == HEADER else MAX_ISTIO_HEADER_LENGTH
        _log.warning(
            "meshlib: peer metadata header %s is %d characters long, over the %d meshlib reads:"
            " its sender is counted as an unknown peer (source_workload/destination_workload"
            ' "unknown"); logged once per process',
            header,
            length,
            limit,
        )
    return UNKNOWN_PEER


def _meshlib_fields(value: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, val = item.strip().partition("=")
        if sep and key in _FIELDS and _valid(key, val):
            fields[_FIELDS[key][0]] = val
    return fields


def _istio_fields(value: str) -> dict[str, str]:
    """The PeerIdentity fields of an `x-envoy-peer-metadata` value (a base64 Struct, its
    padding optional, as Envoy reads it); none for one that does not decode."""
    try:
        data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):  # not base64, or not ASCII
        return {}
    struct = _struct.decode(data)
    if struct is None:
        return {}
    fields: dict[str, str] = {}
    for names, values in ((_ISTIO_FIELDS, struct), (_ISTIO_LABELS, struct.get("LABELS"))):
        if not isinstance(values, Mapping):
            continue
        for name, key in names.items():
            val = values.get(name)
            if isinstance(val, str) and _valid(key, val):
                fields[_FIELDS[key][0]] = val
    return fields


def from_principal(spiffe_uri: str | None, claimed: PeerIdentity = UNKNOWN_PEER) -> PeerIdentity:
    """The peer as its mTLS certificate proves it, completed by what its header `claimed`.

    The principal is the certificate's URI SAN (ISTIO.md §5.3) and the namespace comes from
    its `/ns/<namespace>/` segment, never from the header. Workload, app, version, canonical
    labels and cluster have no place in a certificate, so the claims fill them as Istio's
    metadata exchange does. A URI without Istio's `/ns/<namespace>/sa/<account>` path keeps
    the claimed namespace (Istio falls back to peer metadata); a URI that is not a usable
    SPIFFE ID at all, or none, gives principal "unknown": the header's principal is never used
    once the caller has looked at the connection.
    """
    if spiffe_uri and isinstance(spiffe_uri, str) and _valid_principal(spiffe_uri):
        path = spiffe_uri.find("/", len("spiffe://"))
        match = _SPIFFE_NAMESPACE.fullmatch(spiffe_uri, path) if path > 0 else None
        namespace = match.group(1) if match else claimed.namespace
        return dataclasses.replace(claimed, principal=spiffe_uri, namespace=namespace)
    return dataclasses.replace(claimed, principal=UNKNOWN)
