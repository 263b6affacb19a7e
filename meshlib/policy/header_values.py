"""Header values as Envoy reads them in `headers.request/response.set|add`.

Envoy's header formatter treats `%` as special: `%%` is a literal `%`, and `%NAME%` or
`%NAME(args)%` is a variable (`%HOSTNAME%`, `%REQ(x-user)%`, `%START_TIME%`...) replaced when
the header is written. Istio's webhook runs the same parser over every value, so an
unterminated `%` (`100%`) is refused. meshlib sends `%%` as `%`, expands the few variables it
can (`%HOSTNAME%`, `%ENVIRONMENT(NAME)%`), and leaves out the others, which validation reports
as a warning.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from meshlib.policy._schema import Path, Sink

# Variables meshlib expands; any other is left out of the value (a warning when it loads).
_ENVIRONMENT = re.compile(r"ENVIRONMENT\(([^)]*)\)")


class HeaderValueError(ValueError):
    """A value Envoy's parser (and so Istio's validation) refuses."""


@dataclass(frozen=True, slots=True)
class _Part:
    text: str
    variable: bool  # `text` is a variable's inside, between its `%`s


def _parse(value: str) -> tuple[_Part, ...]:
    """Split `value` into literal text and variables, as Envoy's HeaderParser scans it."""
    parts: list[_Part] = []
    literal: list[str] = []
    pos = 0
    n = len(value)
    while pos < n:
        ch = value[pos]
        if ch != "%":
            literal.append(ch)
            pos += 1
            continue
        if pos + 1 == n:
            raise HeaderValueError("an unescaped '%' at the end (write '%%' for a literal %)")
        if value[pos + 1] == "%":
            literal.append("%")
            pos += 2
            continue
        end = _variable_end(value, pos + 1)
        if literal:
            parts.append(_Part("".join(literal), variable=False))
            literal = []
        parts.append(_Part(value[pos + 1 : end], variable=True))
        pos = end + 1
    if literal:
        parts.append(_Part("".join(literal), variable=False))
    return tuple(parts)


def _variable_end(value: str, pos: int) -> int:
    """The index of the `%` closing the variable that starts at `pos`.

    Envoy's states: a name up to `%` or `(`; after `(`, an optional JSON-style array of
    strings (`["a", "b"]`) or bare text up to `)`; then only spaces before the closing `%`.
    """
    n = len(value)
    state = "name"
    while pos < n:
        ch = value[pos]
        if state == "name":
            if ch == "%":
                return pos
            if ch == "(":
                state = "array"
        elif state == "array":
            if ch == "[":
                state = "string-start"
            elif ch != " ":
                state = "string"
        elif state == "string-start":
            if ch == '"':
                state = "string"
            elif ch != " ":
                raise HeaderValueError("expected '\"' to start an argument")
        elif state == "string":
            if ch == "\\":
                if pos + 1 == n:
                    raise HeaderValueError("an unterminated backslash in an argument")
                pos += 1
            elif ch == ")":
                state = "close"
            elif ch == '"':
                state = "delimiter"
        elif state == "delimiter":
            if ch == ",":
                state = "string-start"
            elif ch == "]":
                state = "args-end"
            elif ch != " ":
                raise HeaderValueError("expected ',', ']' or a space in the arguments")
        elif state == "args-end":
            if ch == ")":
                state = "close"
            elif ch != " ":
                raise HeaderValueError("expected ')' after the arguments")
        elif ch == "%":  # state "close"
            return pos
        elif ch != " ":
            raise HeaderValueError("expected '%' to close the variable")
        pos += 1
    raise HeaderValueError(f"an unterminated variable in {value!r} (write '%%' for a literal %)")


def _expand(variable: str) -> str | None:
    """The value of a variable meshlib knows, or None."""
    if variable == "HOSTNAME":
        return socket.gethostname()
    match = _ENVIRONMENT.fullmatch(variable)
    if match is not None:
        return os.environ.get(match[1], "")
    return None


def check_header_value(value: str, path: Path, sink: Sink) -> None:
    """Report a value Istio refuses (an error) or one with variables meshlib leaves out."""
    if "%" not in value:
        return  # plain text: nothing to parse (most values, on the load path)
    try:
        parts = _parse(value)
    except HeaderValueError as exc:
        sink.error(path, f"invalid header value {value!r}: {exc}")
        return
    for part in parts:
        if part.variable and _expand(part.text) is None:
            sink.warning(
                path,
                f"meshlib cannot expand %{part.text}% (Envoy replaces it when it writes the"
                " header): it is left out of the value",
            )


def render(value: str) -> str:
    """The value meshlib sends: `%%` as `%`, known variables expanded, others left out.

    `value` has passed validation; should it not parse, it is sent as written.
    """
    if "%" not in value:
        return value
    try:
        parts = _parse(value)
    except HeaderValueError:
        return value
    out: list[str] = []
    for part in parts:
        if part.variable:
            out.append(_expand(part.text) or "")
        else:
            out.append(part.text)
    return "".join(out)
