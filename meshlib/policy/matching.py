"""Compiled request matchers for VirtualService routes.

A route's `match` blocks compile once, at Snapshot build time, into `RouteMatcher` objects:
plain checks over a `RequestAttributes`, with regexes precompiled, case folding done ahead of
time and `sourceLabels` / `sourceNamespace` / `gateways` already decided for this workload.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from meshlib.policy.common import StringMatch, selects
from meshlib.policy.regex import compile_re2
from meshlib.policy.virtual_service import HTTPMatchRequest

# Keys the Istio API reserves in `headers`: they are matched as fields, not headers.
_PSEUDO_KEYS = frozenset({"uri", "scheme", "method", "authority"})


class RequestAttributes:
    """What routing looks at in a request. Header names must be lowercase.

    `headers` maps a name to its value (repeated headers joined with ","), as Envoy sees them.
    """

    __slots__ = ("_query", "authority", "headers", "method", "path", "port", "query", "scheme")

    def __init__(
        self,
        method: str,
        authority: str,
        path: str = "/",
        *,
        scheme: str = "http",
        query: str = "",
        headers: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.query = query
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.port = port
        self._query: dict[str, str] | None = None

    def query_param(self, name: str) -> str | None:
        """The first value of a query parameter (`?key` gives ""), parsed once per request.

        As Envoy's `QueryParamsMulti::parseQueryString` reads it for route matching and
        hashing: split on "&" and the first "=", nothing decoded (`a+b` stays `a+b`, not
        `a b`; `x%2Fy` stays `x%2Fy`), and a repeated key keeps its first value.
        """
        query = self._query
        if query is None:
            query = self._query = {}
            for param in self.query.split("&") if self.query else ():
                key, _, value = param.partition("=")
                query.setdefault(key, value)
        return query.get(name)


class LazyHeaders(Mapping[str, str]):
    """Request headers as routing reads them, built only if a route looks at them.

    `pairs` are (lowercase name, value), or a function giving them; repeated headers are
    joined with "," as Envoy joins them.
    """

    __slots__ = ("_headers", "_pairs")

    def __init__(
        self, pairs: Callable[[], Iterable[tuple[str, str]]] | Iterable[tuple[str, str]]
    ) -> None:
        self._pairs = pairs
        self._headers: dict[str, str] | None = None

    def _built(self) -> dict[str, str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = {}
            pairs = self._pairs
            for name, value in pairs() if callable(pairs) else pairs:
                headers[name] = f"{headers[name]},{value}" if name in headers else value
        return headers

    def __getitem__(self, name: str) -> str:
        return self._built()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


Check = Callable[[RequestAttributes], bool]
StringCheck = Callable[[str], bool]


def compile_string_match(match: StringMatch, *, ignore_case: bool = False) -> StringCheck | None:
    """A predicate for one StringMatch; None means "present" (any value)."""
    if match.exact is not None:
        exact = match.exact.lower() if ignore_case else match.exact
        if ignore_case:
            return lambda value: value.lower() == exact
        return exact.__eq__
    if match.prefix is not None:
        prefix = match.prefix.lower() if ignore_case else match.prefix
        if ignore_case:
            return lambda value: value.lower().startswith(prefix)
        return lambda value: value.startswith(prefix)
    if match.regex is not None and match.regex != "*":  # Istio reads regex "*" as "present"
        # Envoy's safe_regex matches the whole value; ignoreUriCase does not apply to regex.
        return _fullmatch(compile_re2(match.regex))
    return None


def _fullmatch(pattern: re.Pattern[str]) -> StringCheck:
    return lambda value: pattern.fullmatch(value) is not None


class RouteMatcher:
    """One compiled `match` block: every check must pass (AND)."""

    __slots__ = ("checks", "ignore_uri_case", "name", "uri")

    def __init__(
        self,
        checks: tuple[Check, ...],
        name: str | None = None,
        uri: StringMatch | None = None,
        ignore_uri_case: bool = False,
    ) -> None:
        self.checks = checks
        self.name = name
        self.uri = uri  # kept for `rewrite.uri`, which replaces what the uri match matched
        self.ignore_uri_case = ignore_uri_case  # how `uri` matched

    def __call__(self, request: RequestAttributes) -> bool:
        for check in self.checks:
            if not check(request):
                return False
        return True


def compile_match(block: HTTPMatchRequest) -> RouteMatcher:
    """Compile one HTTPMatchRequest (its source/gateway fields are decided elsewhere)."""
    checks: list[Check] = []
    if block.uri is not None:
        uri = compile_string_match(block.uri, ignore_case=block.ignore_uri_case)
        if uri is not None:
            checks.append(_on_path(uri))
    for field, attribute in (
        ("scheme", "scheme"),
        ("method", "method"),
        ("authority", "authority"),
    ):
        string_match = getattr(block, field)
        if string_match is not None:
            predicate = compile_string_match(string_match)
            if predicate is not None:
                checks.append(_on_attribute(attribute, predicate))
    for name, string_match in block.headers.items():
        if name in _PSEUDO_KEYS:
            continue
        checks.append(_header_check(name.lower(), compile_string_match(string_match)))
    for name, string_match in block.without_headers.items():
        checks.append(_without_header_check(name.lower(), string_match))
    for name, string_match in block.query_params.items():
        checks.append(_query_check(name, compile_string_match(string_match)))
    if block.port is not None:
        port = block.port
        checks.append(lambda request: request.port == port)
    return RouteMatcher(tuple(checks), block.name, block.uri, block.ignore_uri_case)


CATCH_ALL = RouteMatcher(())  # what a route without `match` matches with


def applies_to_workload(block: HTTPMatchRequest, labels: Mapping[str, str], namespace: str) -> bool:
    """Whether a block can match for this workload: its source and gateway fields."""
    if block.gateways and "mesh" not in block.gateways:
        return False
    if block.source_namespace is not None and block.source_namespace != namespace:
        return False
    return selects(block.source_labels, labels)


def _on_path(predicate: StringCheck) -> Check:
    return lambda request: predicate(request.path)


def _on_attribute(attribute: str, predicate: StringCheck) -> Check:
    def check(request: RequestAttributes) -> bool:
        value: Any = getattr(request, attribute)
        return predicate(value)

    return check


def _header_check(name: str, predicate: StringCheck | None) -> Check:
    if predicate is None:
        return lambda request: name in request.headers

    def check(request: RequestAttributes) -> bool:
        value = request.headers.get(name)
        return value is not None and predicate(value)

    return check


def _without_header_check(name: str, string_match: StringMatch) -> Check:
    # Istio inverts the match and treats a missing header as "", so requests lacking the
    # header pass unless the match accepts the empty string; `{}` inverted means "absent".
    predicate = compile_string_match(string_match)
    if predicate is None:
        return lambda request: name not in request.headers
    return lambda request: not predicate(request.headers.get(name, ""))


def _query_check(name: str, predicate: StringCheck | None) -> Check:
    def check(request: RequestAttributes) -> bool:
        value = request.query_param(name)
        return value is not None and (predicate is None or predicate(value))

    return check
