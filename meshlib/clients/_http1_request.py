"""A request as meshlib's HTTP/1.1 transport (`meshlib.clients._http1`) writes it: its method,
target and headers checked (what would desynchronise the connection is refused before anything
is sent) and its body's framing decided.
"""

from __future__ import annotations

import re

import httpx

from meshlib._text import ascii_int

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token characters
_METHODS_SEEN: set[str] = set()  # methods already checked to be tokens
_LAST_CHUNK = b"0\r\n\r\n"
_CONTROLS = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # not HT, LF, CR


class _Outgoing:
    """A request as it goes on the wire: its head, checked, and how its body is framed."""

    __slots__ = ("body", "chunked", "close", "head", "length", "stream")

    def __init__(self, request: httpx.Request) -> None:
        method = request.method
        if method not in _METHODS_SEEN:
            if not (method.isascii() and _TOKEN.fullmatch(method.encode())):
                raise httpx.LocalProtocolError(f"Illegal method {method!r}", request=request)
            if len(_METHODS_SEEN) < 64:
                _METHODS_SEEN.add(method)
        raw = request.headers.raw
        names = [name for name, _ in raw]
        if raw and (b"" in names or not _TOKEN.fullmatch(b"".join(names))):
            raise httpx.LocalProtocolError("Illegal header name", request=request)
        head = b"".join(
            [
                b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), request.url.raw_path),
                *[b"%s: %s\r\n" % pair for pair in _host_first(raw)],
                b"\r\n",
            ]
        )
        # CR or LF in a value would split the message (request smuggling): a head with more
        # line breaks than it has lines is refused, and so is any other control character
        # but a tab (RFC 9110 §5.5), as h11 refuses them for httpx's own transport.
        lines = len(raw) + 2
        if (
            head.count(b"\n") != lines
            or head.count(b"\r") != lines
            or len(head.translate(None, _CONTROLS)) != len(head)
        ):
            raise httpx.LocalProtocolError(
                "Illegal character (CR, LF or another control character) in the request target"
                " or a header",
                request=request,
            )
        self.head = head
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        self.close = False  # the request says `Connection: close`
        for name, value in raw:
            if len(name) == 14 and name.lower() == b"content-length":
                lengths.add(value.strip())
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                codings += _tokens(value)
            elif len(name) == 10 and name.lower() == b"connection":
                self.close = self.close or b"close" in _tokens(value)
        # The body's framing must be unambiguous, or the server reads a different message
        # than the one sent: one Content-Length, or chunked as the last and only chunking.
        self.chunked = bool(codings)
        if codings and (codings[-1] != b"chunked" or codings.count(b"chunked") != 1):
            raise httpx.LocalProtocolError(
                f"Transfer-Encoding {b', '.join(codings).decode('latin-1')!r} does not end in"
                " chunked: the body cannot be framed",
                request=request,
            )
        length = None
        if lengths and not codings:
            if len(lengths) > 1:
                raise httpx.LocalProtocolError("Conflicting Content-Length", request=request)
            length = ascii_int(lengths.pop().decode("latin-1"), 19)
            if length is None:
                raise httpx.LocalProtocolError("Illegal Content-Length", request=request)
        elif lengths:
            raise httpx.LocalProtocolError(
                "Both Content-Length and Transfer-Encoding", request=request
            )
        self.length = length
        stream = request.stream
        self.stream = stream
        self.body: bytes | None = None
        if isinstance(stream, httpx.ByteStream):  # bytes known up front: checked, framed now
            data = b"".join(stream)
            framed = self.framed(data, request)
            self.check_complete(len(data), request)
            self.body = framed + _LAST_CHUNK if self.chunked else framed

    def framed(self, data: bytes, request: httpx.Request, sent: int = 0) -> bytes:
        """`data` as it goes on the wire after `sent` bytes of body."""
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if self.length is None:
            if data:
                raise httpx.LocalProtocolError(
                    "Request body without Content-Length or Transfer-Encoding", request=request
                )
        elif sent + len(data) > self.length:
            raise httpx.LocalProtocolError(
                "Too much data for declared Content-Length", request=request
            )
        return data

    def check_complete(self, sent: int, request: httpx.Request) -> None:
        if self.length is not None and sent != self.length:
            raise httpx.LocalProtocolError(
                "Too little data for declared Content-Length", request=request
            )


def _host_first(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers with Host first, as RFC 9112 §3.2 asks and h11 sends them (httpx puts the
    Host it adds first; one the caller or the mesh set comes where it was set)."""
    for i, (name, _) in enumerate(raw):
        if len(name) == 4 and name.lower() == b"host":
            return raw if i == 0 else [raw[i], *raw[:i], *raw[i + 1 :]]
    return raw


def _tokens(value: bytes) -> list[bytes]:
    """The comma-separated tokens of a header value (Connection, Transfer-Encoding), lowercase."""
    return [token.strip().lower() for token in value.split(b",")]
