"""Marks code running inside a meshlib transport, so instrumentation never meshes twice."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_inside = ContextVar("meshlib_inside_transport", default=False)


@contextmanager
def passthrough_inside() -> Iterator[None]:
    """While active, instrumented transports send requests as they are."""
    token = _inside.set(True)
    try:
        yield
    finally:
        _inside.reset(token)


def inside_meshlib() -> bool:
    return _inside.get()
