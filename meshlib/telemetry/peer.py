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
length Kubernetes allows for it; a value that fails, a missing key, a header over
`MAX_HEADER_LENGTH` or plain garbage yields Istio's "unknown" for that field (canonical
revision "latest"). `decode` never raises, and no value taken from the network can be longer
than its cap, so peers cannot create unbounded metric labels with it.

Header claims are not proof. When the connection has an mTLS peer certificate, its SPIFFE URI
is the peer's principal and its namespace, whatever the header says: see `from_principal`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, AnyStr

if TYPE_CHECKING:
    from meshlib.config import MeshConfig

__all__ = [
    "HEADER",
    "MAX_HEADER_LENGTH",
    "UNKNOWN_PEER",
    "PeerIdentity",
    "decode",
    "encode",
    "from_principal",
    "identity_of",
    "with_identity",
]

HEADER = "x-meshlib-peer-metadata"
MAX_HEADER_LENGTH = 2048  # longer values are not parsed at all

UNKNOWN = "unknown"
LATEST = "latest"


def with_identity(
    headers: Iterable[tuple[AnyStr, AnyStr]], identity: tuple[AnyStr, AnyStr]
) -> list[tuple[AnyStr, AnyStr]]:
    """Response `headers` (ASGI's bytes or WSGI's str) with `identity`, its name lowercase, as
    the only metadata-exchange header: set, not added, as Istio's filter sets its own (an app
    relaying an upstream's response headers would otherwise name the upstream to the
    caller). A new list: the app may reuse its own."""
    name = identity[0]
    kept = [pair for pair in headers if len(pair[0]) != len(name) or pair[0].lower() != name]
    kept.append(identity)
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

# Most requests carry one of a few headers (one per calling workload): remember their result.
_cache: dict[str, PeerIdentity] = {}
_CACHE_SIZE = 512


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


def decode(value: str | None) -> PeerIdentity:
    """The peer a header value claims to be; `UNKNOWN_PEER`'s values for anything unusable.

    Never raises: any string (or None) gives a PeerIdentity whose every field is valid and
    bounded in length.
    """
    if not value or not isinstance(value, str):
        return UNKNOWN_PEER
    found = _cache.get(value)
    if found is not None:
        return found
    if len(value) > MAX_HEADER_LENGTH:
        return UNKNOWN_PEER
    fields: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, val = item.strip().partition("=")
        if sep and key in _FIELDS and _valid(key, val):
            fields[_FIELDS[key][0]] = val
    peer = PeerIdentity(**fields) if fields else UNKNOWN_PEER
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()  # many distinct headers: not worth remembering, and memory stays bounded
    _cache[value] = peer
    return peer


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
