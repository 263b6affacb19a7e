"""Delegate VirtualServices: how a root route and a delegate's routes merge, as pilot merges them.

A root route with `delegate` is replaced by the delegate's routes, each merged with the root
route (istio/istio `pilot/pkg/model/virtualservice.go`, `mergeHTTPRoute`):

- every match block of the delegate route must lie within some block of the root route
  (`hasConflict` / `stringMatchConflict`); if one does not, the delegate route is dropped and
  requests fall through to the root's next routes;
- a merged block is the delegate's block with the root block's fields it leaves unset;
- the root route's policies pass down to delegate routes that do not set their own.

All of it happens once, at Snapshot build time, on the spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from meshlib.policy.common import StringMatch
from meshlib.policy.virtual_service import HTTPMatchRequest, HTTPRoute

# Passed down one field at a time to a delegate route that leaves it unset, as pilot's
# mergeHTTPRoute does (the mirror fields too: a child's own `mirror` keeps the root's
# `mirrorPercentage`).
_INHERITED = (
    "timeout",
    "retries",
    "fault",
    "cors_policy",
    "headers",
    "rewrite",
    "mirror",
    "mirror_percentage",
    "mirror_percent",
)


def merge_delegate_route(root: HTTPRoute, child: HTTPRoute) -> HTTPRoute | None:
    """A delegate's route merged with the root route, or None when their matches conflict."""
    match = merge_matches(root.match, child.match)
    if match is None:
        return None
    changes: dict[str, Any] = {
        name: getattr(root, name)
        for name in _INHERITED
        if getattr(child, name) is None and getattr(root, name) is not None
    }
    if not child.mirrors and root.mirrors:
        changes["mirrors"] = root.mirrors
    return replace(child, match=match, name=_joined(root.name, child.name), **changes)


def merge_matches(
    root: tuple[HTTPMatchRequest, ...], child: tuple[HTTPMatchRequest, ...]
) -> tuple[HTTPMatchRequest, ...] | None:
    """Pilot's `mergeHTTPMatchRequests`: None when a child block fits in no root block.

    A child block is merged with every root block it does not conflict with, so a request
    matches the merged route where it matches both.
    """
    if not root:
        return child
    if not child:
        return root
    merged: list[HTTPMatchRequest] = []
    for block in child:
        fits = [outer for outer in root if not _conflict(outer, block)]
        if not fits:
            return None
        merged.extend(_merge_block(outer, block) for outer in fits)
    return tuple(merged)


def _merge_block(root: HTTPMatchRequest, child: HTTPMatchRequest) -> HTTPMatchRequest:
    """Pilot's `mergeHTTPMatchRequest`: the child's fields, the root's where the child has none."""
    return replace(
        child,
        name=_joined(root.name, child.name),
        uri=child.uri if child.uri is not None else root.uri,
        scheme=child.scheme if child.scheme is not None else root.scheme,
        method=child.method if child.method is not None else root.method,
        authority=child.authority if child.authority is not None else root.authority,
        headers=_union(root.headers, child.headers),
        without_headers=_union(root.without_headers, child.without_headers),
        query_params=_union(root.query_params, child.query_params),
        port=child.port if child.port is not None else root.port,
        source_labels=_union(root.source_labels, child.source_labels),
        source_namespace=(
            child.source_namespace if child.source_namespace is not None else root.source_namespace
        ),
        gateways=child.gateways or root.gateways,
    )


def _conflict(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> bool:
    """Pilot's `hasConflict`: whether `leaf` can match outside `root`."""
    for field in ("uri", "scheme", "method", "authority"):
        if _string_conflict(getattr(root, field), getattr(leaf, field)):
            return True
    for root_map, leaf_map in (
        (root.headers, leaf.headers),
        (root.without_headers, leaf.without_headers),
        (root.query_params, leaf.query_params),
    ):
        for key, value in leaf_map.items():
            if _string_conflict(root_map.get(key), value):
                return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port is not None and leaf.port is not None and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return True
    for label, wanted in leaf.source_labels.items():
        if label in root.source_labels and root.source_labels[label] != wanted:
            return True
    if root.gateways and leaf.gateways:
        return len(root.gateways) < len(leaf.gateways) or not set(leaf.gateways) <= set(
            root.gateways
        )
    return False


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    """Pilot's `stringMatchConflict`: only an equal exact or a longer prefix fits.

    An empty value counts as unset, as in Go; a regex on either side, or a root that is
    only "present" (`{}`), always conflicts.
    """
    if root is None or leaf is None:
        return False
    if root.regex or leaf.regex:
        return True
    if root.exact:
        return bool(leaf.prefix) or leaf.exact != root.exact
    if root.prefix:
        if leaf.prefix:
            return not leaf.prefix.startswith(root.prefix)
        if leaf.exact:
            return not leaf.exact.startswith(root.prefix)
    return True


def _union(root: Mapping[str, Any], child: Mapping[str, Any]) -> Mapping[str, Any]:
    if not root:
        return child
    if not child:
        return root
    return MappingProxyType({**root, **child})


def _joined(root: str | None, child: str | None) -> str | None:
    """Names as pilot joins them: `root-child`, or whichever is set."""
    if not child:
        return root
    return f"{root}-{child}" if root else child
