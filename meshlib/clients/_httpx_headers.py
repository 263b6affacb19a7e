"""httpx header work on the per-request path, without re-encoding what httpx already holds.

`httpx.Headers` keeps `(raw name, lowercase name, value)` byte triples in `_list`; its public
API decodes them to `str` on every lookup and encodes again on every construction (about a
microsecond per header each way). The mesh reads a request's headers once, builds the
upstream request's from the caller's, and reads a few response headers: reading and extending
the triples directly does that in a fraction of the time.

`_list` is private, so it is used only when a probe at import shows the layout this module
expects; otherwise every function falls back to the public API (slower, same result).
`tests/clients/test_httpx_headers.py` checks both paths give the same headers.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx

__all__ = ["FAST", "appended", "decoded", "encoded", "extended", "from_raw", "lowercase_raw"]


def _probe() -> bool:
    try:
        headers = httpx.Headers([("X-Probe", "1")])
        layout = getattr(headers, "_list", None) == [(b"X-Probe", b"x-probe", b"1")]
        copied = httpx.Headers(headers)
        copied._list.append((b"a", b"a", b"2"))
        return layout and copied.get("a") == "2" and "a" not in headers
    except Exception:  # any surprise: the public API it is
        return False


FAST = _probe()
"""Whether httpx.Headers has the private layout this module reads and extends."""


def lowercase_raw(headers: httpx.Headers) -> Iterable[tuple[bytes, bytes]]:
    """(lowercase name, value) as bytes, in order, duplicates kept."""
    if FAST:
        return [(lower, value) for _, lower, value in headers._list]
    return [(key.lower(), value) for key, value in headers.raw]


def decoded(headers: httpx.Headers) -> list[tuple[str, str]]:
    """`headers.multi_items()` — (lowercase name, value) as str — with the encoding looked
    up once, not twice per header."""
    if FAST:
        encoding = headers.encoding
        return [
            (lower.decode(encoding), value.decode(encoding)) for _, lower, value in headers._list
        ]
    return headers.multi_items()


def appended(headers: httpx.Headers, name: str, value: str) -> None:
    """Add a header known to be absent (no scan for an existing one). `name` lowercase,
    `value` ASCII (an `x-request-id`)."""
    if FAST:
        key = name.encode("ascii")
        headers._list.append((key, key, _encoded(headers, value)))
    else:
        headers[name] = value


def extended(
    original: httpx.Headers, drop: frozenset[bytes], extra: Iterable[tuple[str, str]]
) -> httpx.Headers:
    """A copy of `original` without the lowercase names in `drop`, then `extra` appended
    (names lowercase ASCII, values encoded as httpx would)."""
    if not FAST:
        encoding = original.encoding
        pairs = [(k, v) for k, v in original.raw if k.lower() not in drop]
        pairs.extend((name.encode("ascii"), _bytes(value, encoding)) for name, value in extra)
        return httpx.Headers(pairs)
    headers = httpx.Headers.__new__(httpx.Headers)
    headers._list = [t for t in original._list if t[1] not in drop]
    headers._encoding = original._encoding
    for name, value in extra:
        key = name.encode("ascii")
        headers._list.append((key, key, _encoded(headers, value)))
    return headers


def from_raw(raw: Iterable[tuple[bytes, bytes]]) -> httpx.Headers:
    """`httpx.Headers(raw)` for (name, value) byte pairs as received (a response's)."""
    if not FAST:
        return httpx.Headers(list(raw))
    headers = httpx.Headers.__new__(httpx.Headers)
    headers._list = [(name, name.lower(), value) for name, value in raw]
    headers._encoding = None
    return headers


def encoded(pairs: Iterable[tuple[str, str]], encoding: str) -> httpx.Headers:
    """Headers from (name, value) pairs, never raising on a value: each is encoded as the
    headers it came from were decoded (`encoding`, so their bytes are kept), else as Latin-1
    (what meshlib decodes inbound headers with), else as UTF-8."""
    return httpx.Headers(
        [(name.encode("latin-1", "replace"), _bytes(value, encoding)) for name, value in pairs]
    )


def _encoded(headers: httpx.Headers, value: str) -> bytes:
    """`value` in the headers' encoding; a value it cannot hold (e.g. a non-ASCII `end-user`
    received inbound as Latin-1) goes as Latin-1, and the encoding is guessed anew."""
    try:
        return value.encode(headers.encoding)
    except UnicodeEncodeError:
        headers._encoding = None
        return _bytes(value, "latin-1")


def _bytes(value: str, encoding: str) -> bytes:
    try:
        return value.encode(encoding)
    except UnicodeEncodeError:
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            return value.encode("utf-8")
