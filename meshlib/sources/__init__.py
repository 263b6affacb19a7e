"""Policy sources: where Snapshots come from (a file or folder today; Kubernetes later)."""

from meshlib.sources.base import PolicySource, SnapshotPublisher
from meshlib.sources.file import FileSource

__all__ = ["FileSource", "PolicySource", "SnapshotPublisher"]
