"""Routes a VirtualService can never use, found as `meshlib check` reports them.

Routes are tried in order and the first match wins (ISTIO.md §1.3), so a route placed after one
that matches every request is dead, and so is a match block that an earlier block already
matches every request of. Istio's validation warns about the same (IST0130
VirtualServiceUnreachableRule, IST0131 VirtualServiceIneffectiveMatch); meshlib reports both as
warnings, and finds a block covered by an earlier, looser one (`prefix: /api` before
`prefix: /api/v1`), not only an identical one.

    for finding in unreachable_routes(virtual_service.http):
        print(finding.field, finding.message)     # spec.http[2]: unreachable: ...

A route that delegates is never a catch-all: its requests that no delegate route takes fall
through to the next route, as pilot builds it. Its own blocks are checked against earlier
ones, but later routes are not checked against them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from meshlib.policy.common import StringMatch, selects
from meshlib.policy.virtual_service import HTTPMatchRequest, HTTPRoute

__all__ = ["RouteFinding", "covers", "matches_everything", "unreachable_routes"]


@dataclass(frozen=True, slots=True)
class RouteFinding:
    """A route or match block no request reaches: its field under `spec`, and why."""

    field: str  # "spec.http[2]" or "spec.http[2].match[0]"
    message: str


def unreachable_routes(routes: Sequence[HTTPRoute]) -> Iterator[RouteFinding]:
    """The routes of one VirtualService (or delegate) that no request reaches, in order."""
    catch_all: int | None = None
    earlier: list[tuple[int, int, HTTPMatchRequest]] = []  # (route, block, block) that match
    for index, route in enumerate(routes):
        where = f"spec.http[{index}]"
        if catch_all is not None:
            yield RouteFinding(
                where,
                f"unreachable: the earlier route {_name(routes, catch_all)} matches every request",
            )
            continue
        if not route.match:
            if route.delegate is None:
                catch_all = index
            continue
        covered: list[RouteFinding] = []
        for block_index, block in enumerate(route.match):
            shadow = next((e for e in earlier if covers(e[2], block)), None)
            if shadow is not None:
                by = f"spec.http[{shadow[0]}].match[{shadow[1]}]"
                covered.append(
                    RouteFinding(
                        f"{where}.match[{block_index}]",
                        f"never used: every request it matches is taken first by {by}"
                        f" (route {_name(routes, shadow[0])})",
                    )
                )
        if covered and len(covered) == len(route.match):
            yield RouteFinding(
                f"{where}.match",
                "unreachable: each of its match blocks is covered by an earlier route's ("
                + ", ".join(c.message.rsplit(" taken first by ", 1)[1] for c in covered)
                + ")",
            )
        else:
            yield from covered
        if route.delegate is not None:
            continue  # what the delegate leaves falls through: it shadows nothing
        earlier.extend((index, k, block) for k, block in enumerate(route.match))
        if any(matches_everything(block) for block in route.match):
            catch_all = index


def matches_everything(block: HTTPMatchRequest) -> bool:
    """Whether a match block matches every request of every workload: nothing set but a
    URI that any path matches (`prefix: /`, `regex: .*`), as pilot's catch-all test."""
    return (
        (block.uri is None or _any_path(block.uri))
        and block.scheme is None
        and block.method is None
        and block.authority is None
        and not block.headers
        and not block.without_headers
        and not block.query_params
        and block.port is None
        and not block.source_labels
        and not block.gateways
        and not block.source_namespace
    )


def covers(first: HTTPMatchRequest, later: HTTPMatchRequest) -> bool:
    """Whether every request `later` matches is matched by `first` (for any workload that
    `later` applies to). False when unsure: only sure findings are reported."""
    if first.port is not None and first.port != later.port:
        return False
    if first.source_namespace and first.source_namespace != later.source_namespace:
        return False
    if not selects(first.source_labels, later.source_labels):
        return False
    if first.gateways and set(first.gateways) != set(later.gateways):
        return False
    if not _covers_uri(first, later):
        return False
    for name in ("scheme", "method", "authority"):
        if not _covers(getattr(first, name), getattr(later, name)):
            return False
    return (
        _covers_map(first.headers, later.headers)
        and _covers_map(first.query_params, later.query_params)
        # a header that must be absent from `first` must be just as absent from `later`
        and all(later.without_headers.get(k) == v for k, v in first.without_headers.items())
    )


def _covers_uri(first: HTTPMatchRequest, later: HTTPMatchRequest) -> bool:
    if first.uri is None or _any_path(first.uri):
        return True
    if first.ignore_uri_case != later.ignore_uri_case:
        return False
    if first.ignore_uri_case and later.uri is not None:
        return _covers(_lower(first.uri), _lower(later.uri))
    return _covers(first.uri, later.uri)


def _covers_map(first: Mapping[str, StringMatch], later: Mapping[str, StringMatch]) -> bool:
    lowered = {k.lower(): v for k, v in later.items()}
    return all(k.lower() in lowered and _covers(v, lowered[k.lower()]) for k, v in first.items())


def _covers(first: StringMatch | None, later: StringMatch | None) -> bool:
    """Whether every value `later` accepts, `first` accepts (None: no condition)."""
    if first is None or _present(first):
        # `{}` asks only that the value be there; for uri, scheme, method and authority it
        # always is, and a header `later` matches in any way is there too
        return first is None or later is not None
    if later is None or _present(later):
        return False
    if first.exact is not None:
        return later.exact == first.exact
    if first.prefix is not None:
        value = later.exact if later.exact is not None else later.prefix
        return value is not None and value.startswith(first.prefix)
    return first.regex is not None and later.regex == first.regex


def _present(match: StringMatch) -> bool:
    return (
        match.exact is None and match.prefix is None and match.regex in (None, "*")
    ) or match.prefix == ""


def _any_path(match: StringMatch) -> bool:
    return _present(match) or match.prefix == "/" or match.regex in (".*", "/.*")


def _lower(match: StringMatch) -> StringMatch:
    return StringMatch(
        exact=match.exact.lower() if match.exact is not None else None,
        prefix=match.prefix.lower() if match.prefix is not None else None,
        regex=match.regex,
    )


def _name(routes: Sequence[HTTPRoute], index: int) -> str:
    name = routes[index].name
    return f"http[{index}] {name!r}" if name else f"http[{index}]"
