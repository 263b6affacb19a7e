"""Text that comes from the network or from policy: numbers read from it, addresses written."""

from __future__ import annotations


def ascii_int(text: str, max_digits: int) -> int | None:
    """`text` as a non-negative integer when it is 1 to `max_digits` ASCII digits, else None.

    `str.isdigit` alone lets through `²` and other digits `int` refuses, and `int` refuses
    strings of more than 4,300 digits: neither may turn a header or a policy value into a
    traceback.
    """
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def host_port(host: str, port: int | str) -> str:
    """`host:port` as Envoy writes an address: an IPv6 host in brackets (`[::1]:9080`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
