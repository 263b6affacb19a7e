"""The access log lines a test Mesh writes, read back from its logger.

Tests read what the log says, not meshlib's internals (the compiled build's classes cannot
be patched anyway): the Mesh's policy holds a mesh-wide Telemetry that switches access
logging on, and it writes to a logger of its own, whose records carry the line's fields
(`record.meshlib_access`).
"""

from __future__ import annotations

import itertools
import logging
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import meshlib
from tests.upstream import mesh_for

TELEMETRY = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
"""

_loggers = itertools.count()


class _Lines(logging.Handler):
    def __init__(self, lines: list[SimpleNamespace]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(SimpleNamespace(**record.meshlib_access))


def logging_mesh(config: meshlib.MeshConfig, **kwargs: Any) -> tuple[meshlib.Mesh, list[Any]]:
    """A Mesh (its policy that Telemetry alone) logging every request; the list fills with one namespace of
    fields per line (Istio's JSON keys: `method`, `path`, `response_code`, ...)."""
    mesh: meshlib.Mesh = mesh_for(config, TELEMETRY, **kwargs)
    lines: list[SimpleNamespace] = []
    logger = logging.getLogger(f"tests.access_lines.{next(_loggers)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(_Lines(lines))
    mesh.access_log.logger = logger
    return mesh, lines


def start_time(line: Any) -> float:
    """A line's `start_time` (ISO 8601, UTC, milliseconds) as a Unix time."""
    return datetime.fromisoformat(line.start_time.replace("Z", "+00:00")).timestamp()
