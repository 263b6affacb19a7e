"""meshlib: a service mesh inside the Python process, driven by Istio YAML.

import meshlib

meshlib.configure(policy="mesh.yaml", service="productpage", version="v1")
client = meshlib.Client()           # an httpx.Client, meshed
session = meshlib.Session()         # a requests.Session, meshed
meshlib.instrument()                # or: mesh every httpx/requests client in the process
"""

from meshlib._version import __version__
from meshlib.asgi import MeshMiddleware
from meshlib.clients.httpx import AsyncClient, AsyncMeshTransport, Client, MeshTransport
from meshlib.clients.requests import MeshAdapter, Session
from meshlib.config import MeshConfig
from meshlib.dataplane.deadline import remaining as remaining_deadline
from meshlib.errors import ConfigError, Diagnostic, MeshError, PolicyError
from meshlib.instrument import instrument, uninstrument
from meshlib.mesh import Mesh, configure, default_mesh
from meshlib.wsgi import MeshWSGIMiddleware

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
    "remaining_deadline",
    "uninstrument",
]
