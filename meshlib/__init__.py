"""meshlib: a service mesh inside the Python process, driven by Istio YAML.

import meshlib

meshlib.configure(policy="mesh.yaml", service="productpage", version="v1")
client = meshlib.Client()           # an httpx.Client, meshed
session = meshlib.Session()         # a requests.Session, meshed
meshlib.instrument()                # or: mesh every httpx/requests client in the process
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meshlib._version import __version__
from meshlib.asgi import MeshMiddleware
from meshlib.config import MeshConfig
from meshlib.dataplane.deadline import remaining as remaining_deadline
from meshlib.errors import ConfigError, Diagnostic, MeshError, PolicyError
from meshlib.instrument import instrument, is_instrumented, uninstrument  # stacks load on use
from meshlib.mesh import Mesh, configure, default_mesh
from meshlib.wsgi import MeshWSGIMiddleware

if TYPE_CHECKING:
    from meshlib.clients.httpx import AsyncClient, AsyncMeshTransport, Client, MeshTransport
    from meshlib.clients.requests import MeshAdapter, Session

# The client stacks load on first use: a service that only serves, or only uses httpx, does
# not import requests, urllib3 and httptools (smaller heap, cheaper garbage collections).
_LAZY = {
    "AsyncClient": "meshlib.clients.httpx",
    "AsyncMeshTransport": "meshlib.clients.httpx",
    "Client": "meshlib.clients.httpx",
    "MeshTransport": "meshlib.clients.httpx",
    "MeshAdapter": "meshlib.clients.requests",
    "Session": "meshlib.clients.requests",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "AsyncClient",
    "AsyncMeshTransport",
    "Client",
    "ConfigError",
    "Diagnostic",
    "Mesh",
    "MeshAdapter",
    "MeshConfig",
    "MeshError",
    "MeshMiddleware",
    "MeshTransport",
    "MeshWSGIMiddleware",
    "PolicyError",
    "Session",
    "__version__",
    "configure",
    "default_mesh",
    "instrument",
    "is_instrumented",
    "remaining_deadline",
    "uninstrument",
]
