"""meshlib: a service mesh inside the Python process, driven by Istio YAML."""

from meshlib._version import __version__
from meshlib.config import MeshConfig
from meshlib.errors import ConfigError, Diagnostic, MeshError, PolicyError

__all__ = ["ConfigError", "Diagnostic", "MeshConfig", "MeshError", "PolicyError", "__version__"]
