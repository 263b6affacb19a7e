"""meshlib's exceptions.

    MeshError
     ├── ConfigError(ValueError)   a MeshConfig argument or MESHLIB_* variable is bad
     │    └── PolicyPathError(FileNotFoundError)   the policy path does not exist
     └── PolicyError(ValueError)   Istio policy failed to load; carries every Diagnostic

A `Diagnostic` is one finding about policy, error or warning, printed in the one-line form
compilers use so editors and CI annotate it:

    mesh.yaml:14: error: VirtualService default/reviews: spec.http[0].route[1].weight: must be >= 0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


class MeshError(Exception):
    """The root of every exception meshlib raises on purpose."""


class ConfigError(MeshError, ValueError):
    """A bad MeshConfig value; the message names the argument or environment variable."""


class PolicyPathError(ConfigError, FileNotFoundError):
    """A policy path (`MeshConfig.policy`, `MESHLIB_POLICY`) that does not exist."""


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding about policy: where it is, which resource and field, what is wrong."""

    severity: Severity
    message: str
    file: str | None = None
    line: int | None = None
    resource: str | None = None  # "VirtualService default/reviews"
    field: str | None = None  # "spec.http[0].route[1].weight"

    def __str__(self) -> str:
        where = f"{self.file or '<input>'}:{self.line}" if self.line else (self.file or "<input>")
        parts = [where, f" {self.severity}"]
        if self.resource:
            parts.append(f" {self.resource}")
        if self.field:
            parts.append(f" {self.field}")
        return ":".join(parts) + f": {self.message}"


class PolicyError(MeshError, ValueError):
    """Policy that cannot be served. `diagnostics` holds every error found, not just the first.

    The attributes `file`, `line`, `resource` and `field` describe the first error, for code
    that handles one at a time.
    """

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = tuple(d for d in diagnostics if d.severity == "error")
        if not self.diagnostics:
            raise ValueError("PolicyError needs at least one error diagnostic")
        first = self.diagnostics[0]
        self.file = first.file
        self.line = first.line
        self.resource = first.resource
        self.field = first.field
        super().__init__("\n".join(str(d) for d in self.diagnostics))

    def __reduce__(self) -> tuple[type[PolicyError], tuple[tuple[Diagnostic, ...]]]:
        # pickle and copy rebuild it from its diagnostics (its args are the message alone)
        return (PolicyError, (self.diagnostics,))
