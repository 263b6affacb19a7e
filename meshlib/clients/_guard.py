"""Marks code running inside a meshlib transport, so instrumentation never meshes twice."""

from __future__ import annotations

from contextvars import ContextVar, Token

_inside = ContextVar("meshlib_inside_transport", default=False)


class passthrough_inside:
    """While active, instrumented transports send requests as they are.

    A class rather than @contextmanager: it runs on every request, and a generator-based
    context manager costs several times more.
    """

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token: Token[bool] = _inside.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _inside.reset(self._token)


def inside_meshlib() -> bool:
    return _inside.get()
