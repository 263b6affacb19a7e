"""Policy from files and folders, watched for changes.

    source = FileSource("mesh.yaml", MeshConfig.from_env())   # raises PolicyError if invalid
    source.start()                                            # watch in a background thread
    source.snapshot                                           # the current Snapshot

The watcher polls file metadata (inode, size, mtime) rather than relying on inotify, which
makes it portable and handles the way Kubernetes updates a mounted ConfigMap: the files are
symlinks through `..data`, and an update swaps that one symlink atomically. Polling every
half second keeps an edit live well within two seconds at the cost of a few `stat` calls.

Metadata alone misses an edit that keeps a file's size and lands in the same clock tick as
the previous one (file timestamps tick every 1-10 ms on most kernels): as git does for its
index, files modified within the last `_RECENT_NS` are also compared by content.

A file written in place (`cat > mesh.yaml`, most editors' plain save) is first truncated,
then written: a poll landing in between would see an empty or cut-off file, which may well
be valid policy. So the watcher loads a change only once the files have held still for one
poll interval; an edit is live within two polls. A slow writer (`kubectl get ... -o yaml >
mesh.yaml`) can leave the file empty for longer than that, so a policy file that had content
and is now empty (0 bytes), truncated in place, is taken for a write in progress: nothing is
loaded, with a warning, until it has content again. (To remove all of a file's policy, leave
a comment in it; a file that was empty already, or is new, or was replaced by an empty one —
a rename, a ConfigMap update — is read as it is.)

A change that leaves the policy files' bytes as they were (a touch, a save of the same text,
a ConfigMap update of another key) keeps the served Snapshot and its generation. Files are
compared by a digest of their bytes, not by the resources read from them, whose maps compare
without their order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from meshlib._fork import ForkSafeLock
from meshlib.config import MeshConfig
from meshlib.errors import PolicyError, PolicyPathError
from meshlib.policy.loader import LoadResult, load_paths, policy_files
from meshlib.policy.snapshot import Snapshot
from meshlib.sources.base import SnapshotPublisher

logger = logging.getLogger("meshlib.policy")

_MAX_REREADS = 5
_watching: weakref.WeakSet[FileSource] = weakref.WeakSet()  # sources whose watcher runs
_RECENT_NS = 2_000_000_000  # files modified this recently are compared by content too


class Fingerprint:
    """What the watcher compares between polls: every file's (path, inode, size, mtime,
    ctime; -1s for a listed file stat cannot reach) — ctime moves when only permissions
    change, so a file made readable is read — the folders that could not be listed, and a
    digest of the files modified recently enough that their mtime may not have moved."""

    __slots__ = ("digests", "meta", "unreadable")

    def __init__(
        self,
        meta: tuple[tuple[str, int, int, int, int], ...],
        digests: dict[str, bytes],
        unreadable: tuple[tuple[str, str], ...] = (),
    ):
        self.meta = meta
        self.digests = digests
        self.unreadable = unreadable

    def emptied(self, before: Fingerprint) -> list[str]:
        """The files that had content in `before` and are empty now, truncated in place: the
        same file (inode) as before. One put in its place empty (a rename, a ConfigMap's
        `..data` swap) was written whole, and is read as it is."""
        had = {path: (inode, size) for path, inode, size, _, _ in before.meta}
        emptied = []
        for path, inode, size, _, _ in self.meta:
            if size != 0 or path not in had:
                continue
            old_inode, old_size = had[path]
            if old_size > 0 and old_inode == inode:
                emptied.append(path)
        return emptied

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fingerprint):
            return NotImplemented
        if self.meta != other.meta or self.unreadable != other.unreadable:
            return False
        both = self.digests.keys() & other.digests.keys()
        return all(self.digests[name] == other.digests[name] for name in both)

    __hash__ = None  # type: ignore[assignment]


def _one_path_only(path: Path) -> str:
    """A hint for a missing path that is several existing ones run together
    (`MESHLIB_POLICY=a.yaml,b.yaml`), else ""."""
    for separator in (",", os.pathsep, " "):
        parts = [part for part in str(path).split(separator) if part]
        if len(parts) > 1 and not any(_missing(Path(part)) for part in parts):
            return (
                f"; it names {len(parts)} paths that do exist, but a policy path is one file"
                " or folder: put the files in one folder, or give configure(policy=[...]) a list"
            )
    return ""


class FileSource(SnapshotPublisher):
    """A Snapshot built from policy files, rebuilt whenever they change."""

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        config: MeshConfig,
        *,
        poll_interval: float = 0.5,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = tuple(Path(p) for p in paths)
        self.config = config
        self.poll_interval = poll_interval
        for path in self.paths:
            if _missing(path):
                raise PolicyPathError(
                    f"policy path {str(path)!r} does not exist (set by MeshConfig.policy or"
                    f" MESHLIB_POLICY, or given to the Mesh){_one_path_only(path)}"
                )
        self._digest: bytes | None = None  # the bytes of the files served: see _unchanged
        super().__init__(self._first_build())  # invalid policy at start-up raises PolicyError
        # reload() is public: the watcher may run it too. A fork that interrupts a reload in
        # another thread may leave the child with the new files' fingerprint or digest but
        # not their Snapshot: the child then reads the files again, and builds anew.
        self._reloading = ForkSafeLock(self._forget_files)
        self._changed: Fingerprint | None = None  # the change the watcher saw at its last poll
        self._held: Fingerprint | None = None  # files left empty, taken for a write in progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stat(self) -> Fingerprint:
        entries = []
        digests: dict[str, bytes] = {}
        recent = time.time_ns() - _RECENT_NS
        unreadable: list[tuple[str, str]] = []
        for root in self.paths:
            tree = policy_files(root)
            unreadable.extend(tree.unreadable)
            for file in tree.files:
                try:
                    st = file.stat()
                except OSError:
                    # Listed but out of reach (a dangling symlink, or gone since listing):
                    # loading reports it, and it is in the fingerprint so that its going
                    # away is a change, which loads the files as they are then.
                    entries.append((str(file), -1, -1, -1, -1))
                    continue
                if st.st_mtime_ns >= recent:
                    try:
                        digests[str(file)] = hashlib.blake2b(file.read_bytes()).digest()
                    except OSError:  # unreadable: loading reports it; ctime shows a fix
                        digests[str(file)] = b""
                entries.append((str(file), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return Fingerprint(tuple(entries), digests, tuple(unreadable))

    def _first_build(self) -> Snapshot:
        """The first Snapshot, read as `reload` reads (a ConfigMap update landing as the
        process starts must not mix two versions, or fail it for a state the files were in
        only for a moment); files that never hold still are read once more, as they are."""
        fingerprint = self._stat()
        outcome, self._fingerprint = self._read(fingerprint) or (self._load(), fingerprint)
        if isinstance(outcome, PolicyError):
            raise outcome
        self._digest = outcome.digest
        return self._compile(outcome)

    def _read(
        self, fingerprint: Fingerprint
    ) -> tuple[LoadResult | PolicyError, Fingerprint] | None:
        """Load the files `fingerprint` describes; if they changed while being read (an
        update landing between two files of a folder, say), throw the read away and read
        again. The policy or the error, with the files it was read from; None when they kept
        changing."""
        for _ in range(_MAX_REREADS):
            outcome: LoadResult | PolicyError
            try:
                outcome = self._load()
            except PolicyError as exc:
                outcome = exc
            after = self._stat()
            if after == fingerprint:
                return outcome, fingerprint
            fingerprint = after  # changed under us: read again
        return None

    def _load(self) -> LoadResult:
        result = load_paths(self.paths, default_namespace=self.config.namespace)
        result.raise_for_errors()
        return result

    def _compile(self, result: LoadResult) -> Snapshot:
        for warning in result.warnings:
            logger.warning("%s", warning)
        return Snapshot.build(result.resources, self.config)

    def reload(self) -> bool:
        """Rebuild if the files changed; True if a Snapshot was published.

        The files are stat-ed before and after reading. If they changed while being read
        (an update landing between two files of a folder, say), the read is thrown away and
        done again, so a Snapshot never mixes two versions of the files.

        Files that changed on disk but hold the bytes the served Snapshot was read from
        (touched, saved unchanged, left alone by a ConfigMap update of another key) publish
        nothing: False, no new generation. After a rejected reload, files back to those bytes
        clear the error: the served Snapshot is published again (True), still the same
        generation, so that listeners hear the policy is good again.
        """
        with self._reloading:  # else an older read could be published after a newer one
            return self._reload()

    def _forget_files(self) -> None:
        self._fingerprint = Fingerprint((), {})
        self._digest = None

    def _reload(self) -> bool:
        fingerprint = self._stat()
        if fingerprint == self._fingerprint or self._writing(fingerprint):
            return False
        read = self._read(fingerprint)
        if read is None:
            return False  # still changing; the next poll tries again
        outcome, self._fingerprint = read
        if isinstance(outcome, PolicyError):
            self.reject(outcome, self._origin)
            return False
        if outcome.digest == self._digest:
            return self._unchanged()
        snapshot = self._compile(outcome)
        before = len(self.snapshot.resources)
        self.publish(snapshot)
        self._digest = outcome.digest
        if before and not snapshot.resources:
            logger.warning(
                "policy generation %d loaded from %s has no resources: every rule is gone",
                snapshot.generation,
                self._origin,
            )
        else:
            logger.info("policy generation %d loaded from %s", snapshot.generation, self._origin)
        return True

    def _unchanged(self) -> bool:
        """The files hold the bytes the served Snapshot was read from: nothing to publish,
        unless a rejected change is now undone, which the served Snapshot, published again,
        tells listeners (the Mesh's meshlib_policy_last_reload_successful returns to 1)."""
        generation = self.snapshot.generation
        if self.last_error is None:
            logger.debug("policy from %s unchanged: still generation %d", self._origin, generation)
            return False
        self.publish(self.snapshot)
        logger.info(
            "policy from %s is again what generation %d was read from: the error is cleared",
            self._origin,
            generation,
        )
        return True

    def _writing(self, fingerprint: Fingerprint) -> bool:
        """Whether a file that had content is empty now: a write in progress (see the
        module's doc), warned about once."""
        emptied = fingerprint.emptied(self._fingerprint)
        if not emptied:
            return False
        if fingerprint != self._held:
            self._held = fingerprint
            logger.warning(
                "%s is empty, taken for a write in progress: still serving generation %d."
                " To remove all of its policy, leave a comment in it (# no policy).",
                ", ".join(emptied),
                self.snapshot.generation,
            )
        return True

    @property
    def _origin(self) -> str:
        return ", ".join(map(str, self.paths))

    def start(self) -> None:
        """Watch the files in a daemon thread until `close()`."""
        if self._thread is not None:
            return
        # The thread holds the source weakly: one dropped without close() (a Mesh never
        # closed) is collected, and its watcher ends, instead of polling for the process's life.
        self._thread = threading.Thread(
            target=_watch,
            args=(weakref.ref(self), self._stop, self.poll_interval),
            name="meshlib-policy-watch",
            daemon=True,
        )
        self._thread.start()
        _watching.add(self)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn --preload forks workers from a master that built the
        Mesh): only the forking thread survives a fork, so the watcher starts again (the
        locks a thread of the parent may have held are ForkSafeLocks)."""
        self._changed = None
        # The parent's watcher takes the Event's internal lock at each wait: a fork at that
        # moment leaves it held in the child, where the new watcher and close() would wait on
        # it forever.
        stop, self._stop = self._stop, threading.Event()
        if self._thread is not None:
            self._thread = None
            if stop.is_set():  # close() was under way in the parent
                self._stop.set()
            else:
                self.start()

    def _poll(self) -> None:
        """Reload once a change has held still since the last poll (see the module's doc)."""
        fingerprint = self._stat()
        if fingerprint == self._fingerprint:
            self._changed = None
        elif self._changed is not None and fingerprint == self._changed:
            self._changed = None
            self.reload()
        else:
            self._changed = fingerprint  # new, or still changing: look again next time

    def close(self) -> None:
        self._stop.set()
        _watching.discard(self)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FileSource:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _missing(path: Path) -> bool:
    """Whether `path` does not exist. One out of reach (a folder above it this process may
    not enter) may well exist: loading it says why it cannot be read, and what to fix."""
    try:
        return not path.exists()
    except PermissionError:
        return False


def _watch(ref: weakref.ref[FileSource], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        source = ref()
        if source is None:
            return  # collected without close()
        try:
            source._poll()
        except Exception:  # never let the watcher die: the next poll tries again
            logger.exception("policy reload from %s failed", source._origin)
        del source  # not held while waiting


def _restart_watchers() -> None:
    for source in list(_watching):
        source._after_fork()


os.register_at_fork(after_in_child=_restart_watchers)
