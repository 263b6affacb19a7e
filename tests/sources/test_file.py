"""FileSource: policy from files, reloaded on change, never partial, last good kept on error."""

from __future__ import annotations

import codecs
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlib.config import MeshConfig
from meshlib.errors import PolicyError
from meshlib.policy.loader import LoadResult, load_paths
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Snapshot
from meshlib.sources.file import FileSource

# Tests that make a Mesh's Telemetry fail by patching `Tracing.apply`: the compiled build's
# classes take no patch (`make unit-compiled COMPILED_TESTS=tests` runs the rest there).
patches_tracing = pytest.mark.skipif(
    os.environ.get("MESHLIB_COMPILED") == "1", reason="patches a method of a compiled class"
)


def vs_text(host: str, subset: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: {host}}}
        spec:
          hosts: [{host}]
          http:
          - route:
            - destination: {{host: {host}, subset: {subset}}}
        """
    )


def subset_for(snapshot: Snapshot, host: str) -> str | None:
    route = snapshot.route(RequestAttributes("GET", host)).route
    return route.destinations[0].subset if route and route.destinations else None


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll `predicate` until true; return the seconds it took (fails the test on timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
def source_factory() -> Iterator[Callable[..., FileSource]]:
    sources: list[FileSource] = []

    def make(path: Path, **kwargs: object) -> FileSource:
        source = FileSource(path, MeshConfig(), **kwargs)  # type: ignore[arg-type]
        sources.append(source)
        source.start()
        return source

    yield make
    for source in sources:
        source.close()


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_invalid_policy_at_startup_raises(tmp_path: Path) -> None:
    """At start-up, invalid policy is a PolicyError naming file, line and field."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1") + "      weight: -1\n")
    with pytest.raises(PolicyError) as info:
        FileSource(policy, MeshConfig())
    assert info.value.file == str(policy)
    assert info.value.line == 9
    assert info.value.field == "spec.http[0].route[0].weight"


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    """A policy path that does not exist says so."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FileSource(tmp_path / "nope.yaml", MeshConfig())


def test_edit_is_live_within_two_seconds(
    tmp_path: Path, source_factory: Callable[..., FileSource]
) -> None:
    """Editing a watched file publishes a new Snapshot within 2 s and tells subscribers."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = source_factory(policy)
    seen: list[int] = []
    source.subscribe(lambda snapshot: seen.append(snapshot.generation))
    assert subset_for(source.snapshot, "reviews") == "v1"
    policy.write_text(vs_text("reviews", "v2"))
    elapsed = wait_for(lambda: subset_for(source.snapshot, "reviews") == "v2")
    assert elapsed < 2.0
    assert seen == [source.snapshot.generation]


def test_invalid_edit_keeps_last_good_policy_and_reports(
    tmp_path: Path, source_factory: Callable[..., FileSource], caplog: pytest.LogCaptureFixture
) -> None:
    """An invalid edit is reported (hook and log) while the previous policy keeps serving."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = source_factory(policy)
    errors: list[PolicyError] = []
    source.on_error(errors.append)
    generation = source.snapshot.generation
    policy.write_text(vs_text("reviews", "v2").replace("hosts:", "hostz:"))
    wait_for(lambda: bool(errors))
    assert "spec.hostz: unknown field" in str(errors[0])
    assert errors[0].file == str(policy) and errors[0].line == 5
    assert source.snapshot.generation == generation
    assert subset_for(source.snapshot, "reviews") == "v1"
    assert source.last_error is errors[0]
    assert any("still serving generation" in r.message for r in caplog.records)
    policy.write_text(vs_text("reviews", "v3"))  # a fix is picked up again
    wait_for(lambda: subset_for(source.snapshot, "reviews") == "v3")
    assert source.last_error is None


def make_configmap_mount(root: Path, files: dict[str, str], version: int) -> None:
    """Lay out files the way the kubelet mounts a ConfigMap, swapping `..data` atomically."""
    data_dir = root / f"..2026_11_25_{version:04d}"
    data_dir.mkdir()
    for name, text in files.items():
        (data_dir / name).write_text(text)
    link = root / "..data_tmp"
    link.symlink_to(data_dir.name)
    os.replace(link, root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")


def test_configmap_symlink_swap(tmp_path: Path, source_factory: Callable[..., FileSource]) -> None:
    """A ConfigMap update (the ..data symlink swap) is picked up; hidden entries are not read twice."""
    make_configmap_mount(tmp_path, {"reviews.yaml": vs_text("reviews", "v1")}, 1)
    source = source_factory(tmp_path)
    assert subset_for(source.snapshot, "reviews") == "v1"
    assert len(source.snapshot.resources) == 1
    make_configmap_mount(tmp_path, {"reviews.yaml": vs_text("reviews", "v2")}, 2)
    assert wait_for(lambda: subset_for(source.snapshot, "reviews") == "v2") < 2.0


def test_no_partial_policy_is_ever_visible(
    tmp_path: Path, source_factory: Callable[..., FileSource]
) -> None:
    """Across 40 two-file ConfigMap updates, every Snapshot a reader sees is one whole version."""

    def files(version: int) -> dict[str, str]:
        subset = f"v{version}"
        return {
            "a-reviews.yaml": vs_text("reviews", subset),
            "b-ratings.yaml": vs_text("ratings", subset),
        }

    make_configmap_mount(tmp_path, files(0), 0)
    source = source_factory(tmp_path, poll_interval=0.005)
    stop = threading.Event()
    seen: set[tuple[str | None, str | None]] = set()

    def reader() -> None:
        while not stop.is_set():
            snapshot = source.snapshot
            seen.add((subset_for(snapshot, "reviews"), subset_for(snapshot, "ratings")))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 41):
            make_configmap_mount(tmp_path, files(version), version)
            # each version published before the next is written (a fixed 20 ms pause was not
            # enough on a loaded machine: the reader saw only the first and the last)
            wait_for(lambda v=version: subset_for(source.snapshot, "reviews") == f"v{v}")
    finally:
        stop.set()
        thread.join()
    mixed = {pair for pair in seen if pair[0] != pair[1]}
    assert not mixed, f"a Snapshot mixed two versions: {sorted(mixed)}"
    assert len(seen) > 2  # the reader did observe several versions


def test_atomic_replace_of_a_file(
    tmp_path: Path, source_factory: Callable[..., FileSource]
) -> None:
    """An editor's write-to-temp-and-rename is picked up."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = source_factory(policy)
    replace_atomically(policy, vs_text("reviews", "v2"))
    wait_for(lambda: subset_for(source.snapshot, "reviews") == "v2")


def test_new_file_in_folder_is_picked_up(
    tmp_path: Path, source_factory: Callable[..., FileSource]
) -> None:
    """Adding a file to a watched folder loads it."""
    (tmp_path / "reviews.yaml").write_text(vs_text("reviews", "v1"))
    source = source_factory(tmp_path)
    (tmp_path / "ratings.yaml").write_text(vs_text("ratings", "v2"))
    wait_for(lambda: subset_for(source.snapshot, "ratings") == "v2")


WATCHER = """
import sys, time
from meshlib.config import MeshConfig
from meshlib.policy.matching import RequestAttributes
from meshlib.sources.file import FileSource

source = FileSource(sys.argv[1], MeshConfig())
source.subscribe(lambda s: print("subset", s.route(RequestAttributes("GET", "reviews")).route.destinations[0].subset, flush=True))
source.start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_running_process_sees_edit_within_two_seconds(tmp_path: Path) -> None:
    """A separate Python process watching the file reports the edit within 2 s."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    with subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(policy)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            start = time.monotonic()
            policy.write_text(vs_text("reviews", "v2"))
            line = proc.stdout.readline().strip()
            elapsed = time.monotonic() - start
        finally:
            proc.kill()
    assert line == "subset v2"
    assert elapsed < 2.0


def test_a_same_size_edit_in_the_same_clock_tick_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """File timestamps tick every 1-10 ms on many kernels: an edit that keeps the size and
    lands in the tick of the previous write leaves (inode, size, mtime) unchanged. Recently
    modified files are compared by content too, so it is still seen — and only once."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    tick = time.time_ns()
    os.utime(policy, ns=(tick, tick))
    source = FileSource(policy, MeshConfig())
    policy.write_text(vs_text("reviews", "v2"))  # same size, in place: same inode
    os.utime(policy, ns=(tick, tick))  # and the same tick
    assert source.reload()
    assert subset_for(source.snapshot, "reviews") == "v2"
    assert not source.reload()  # unchanged since: nothing to do
    reads: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> LoadResult:
        reads.append(1)
        return load_paths(*args, **kwargs)

    monkeypatch.setattr("meshlib.sources.file.load_paths", counted)
    generation = source.snapshot.generation
    old = tick - 10_000_000_000
    os.utime(policy, ns=(old, old))  # metadata changed: read again (the same bytes: kept)
    assert not source.reload() and len(reads) == 1
    assert not source.reload()  # no longer recent: compared by metadata alone, unchanged
    assert len(reads) == 1
    assert (
        subset_for(source.snapshot, "reviews") == "v2" and generation == source.snapshot.generation
    )


def test_a_file_written_in_place_is_loaded_once_it_holds_still(tmp_path: Path) -> None:
    """Written in place, a file is first truncated, then written. A poll that lands in between
    sees an empty file — valid policy with no routes — so the watcher loads a change only when
    the next poll finds the files as it left them: the empty file is never served. (The polls
    are driven here one by one, on real files, where the watcher thread would run them.)"""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1") + "---\n" + vs_text("ratings", "v1"))
    source = FileSource(policy, MeshConfig())
    published: list[list[str]] = []
    source.subscribe(lambda s: published.append(sorted(r.name for r in s.resources)))
    with policy.open("w") as out:  # truncated: a poll sees the empty file, and waits
        source._poll()
        assert published == [] and subset_for(source.snapshot, "reviews") == "v1"
        out.write(vs_text("reviews", "v2") + "---\n" + vs_text("ratings", "v2"))
    source._poll()  # changed again since the last poll: still waiting
    assert published == []
    source._poll()  # as the last poll left it: loaded
    assert published == [["ratings", "reviews"]]
    assert subset_for(source.snapshot, "reviews") == "v2"
    source._poll()  # nothing new
    assert len(published) == 1


def test_overlapping_reloads_never_publish_an_older_read(tmp_path: Path) -> None:
    """`reload()` is public and the watcher runs it too: one caller at a time reads, compares
    and publishes, so a slow reader cannot publish its older version after a newer one (and
    leave it served, its files' fingerprint recorded as the newer ones')."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    inside, go_on = threading.Event(), threading.Event()

    class SlowPublisher(FileSource):
        def publish(self, snapshot: Snapshot) -> None:
            if subset_for(snapshot, "reviews") == "v2":
                inside.set()  # the slow reader has read v2 and is about to publish it
                go_on.wait(5)
            super().publish(snapshot)

    source = SlowPublisher(policy, MeshConfig())
    policy.write_text(vs_text("reviews", "v2") + "# v2\n")
    slow = threading.Thread(target=source.reload)
    slow.start()
    assert inside.wait(5)
    policy.write_text(vs_text("reviews", "v3") + "# the third\n")
    fast = threading.Thread(target=source.reload)
    fast.start()
    fast.join(0.2)
    assert fast.is_alive()  # waits for the slow reader instead of racing it
    go_on.set()
    slow.join(5)
    fast.join(5)
    assert subset_for(source.snapshot, "reviews") == "v3"
    assert source.reload() is False  # and the files it serves are the ones recorded


def test_a_symlink_loop_in_a_folder_is_walked_once(tmp_path: Path) -> None:
    """Folders are walked following symlinks (ConfigMap mounts are made of them), each folder
    once: a link back up the tree does not list files again, or walk forever."""
    (tmp_path / "mesh.yaml").write_text(vs_text("reviews", "v1"))
    (tmp_path / "self").symlink_to(tmp_path)
    (tmp_path / "again").symlink_to(tmp_path)
    start = time.monotonic()
    source = FileSource(tmp_path, MeshConfig())
    assert time.monotonic() - start < 5
    assert [r.name for r in source.snapshot.resources] == ["reviews"]


@pytest.mark.parametrize("first", ["v1", "invalid"])
def test_the_first_read_is_done_again_when_the_files_change_under_it(
    tmp_path: Path, first: str
) -> None:
    """Policy updated while the source reads it at start-up (a ConfigMap update landing as
    the process starts): the read is done again, as a reload's is, so the first Snapshot is
    the files as they are — not the version being replaced, nor a start-up failure for a
    state the files were in only for a moment."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1") if first == "v1" else "kind: [unclosed\n")
    reads: list[int] = []

    class UpdatedWhileRead(FileSource):
        def _load(self) -> LoadResult:
            reads.append(1)
            try:
                return super()._load()
            finally:
                if len(reads) == 1:  # the update lands while the first read is under way
                    policy.write_text(vs_text("reviews", "v2") + "# the update\n")

    source = UpdatedWhileRead(policy, MeshConfig())
    assert subset_for(source.snapshot, "reviews") == "v2"
    assert len(reads) == 2
    assert source.reload() is False  # what it serves is what the files hold


def test_a_swap_while_the_mesh_starts_is_not_missed() -> None:
    """A source already watching may swap in a new Snapshot while a Mesh is being built on
    it: the Mesh subscribes before it reads the current Snapshot, and an older one applied
    late does not replace a newer one. Here the swap lands as the Mesh first reads."""
    from meshlib.mesh import Mesh
    from meshlib.policy.loader import load_text
    from meshlib.sources.base import SnapshotPublisher

    def with_sampling(percentage: int) -> Snapshot:
        text = textwrap.dedent(
            f"""\
            apiVersion: telemetry.istio.io/v1
            kind: Telemetry
            metadata: {{name: mesh-default, namespace: istio-system}}
            spec:
              tracing: [{{randomSamplingPercentage: {percentage}}}]
            """
        )
        return Snapshot.build(load_text(text).resources, MeshConfig())

    class SwapsAsRead(SnapshotPublisher):
        def __init__(self) -> None:
            super().__init__(with_sampling(5))
            self.newer = with_sampling(50)

        @property
        def snapshot(self) -> Snapshot:
            current = self._snapshot
            if self._listeners and current is not self.newer:  # the watcher swaps now
                self.publish(self.newer)
            return current

        def start(self) -> None:
            pass

        def close(self) -> None:
            pass

    source = SwapsAsRead()
    mesh = Mesh(MeshConfig(metrics_port=None), policy=source)
    try:
        assert mesh.tracing.sampling == 50.0
    finally:
        mesh.close()


@pytest.fixture
def make_unreadable(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Callable[[], None]]:
    """Make a folder unlistable (or a file unreadable); returns the undo. Under root, which
    permissions do not stop, the system calls fail as they would for another user."""

    def make(path: Path) -> Callable[[], None]:
        if os.geteuid() != 0:
            mode = path.stat().st_mode
            path.chmod(0)
            return lambda: path.chmod(mode)
        denied = {str(path)}

        def refuse(name: object) -> None:
            if os.fspath(name) in denied:  # type: ignore[call-overload]
                raise PermissionError(13, "Permission denied", os.fspath(name))  # type: ignore[call-overload]

        scandir, read_bytes, read_text = os.scandir, Path.read_bytes, Path.read_text
        monkeypatch.setattr(os, "scandir", lambda p=".": (refuse(p), scandir(p))[1])
        monkeypatch.setattr(Path, "read_bytes", lambda self: (refuse(self), read_bytes(self))[1])
        monkeypatch.setattr(
            Path, "read_text", lambda self, **kw: (refuse(self), read_text(self, **kw))[1]
        )
        return denied.clear

    return make


def test_an_unlistable_folder_is_an_error_not_an_empty_one(
    tmp_path: Path, make_unreadable: Callable[[Path], Callable[[], None]]
) -> None:
    """A policy folder that cannot be listed is an error, at start-up and on reload, naming
    the folder: taken for an empty one, its policy would silently disappear. Once it can be
    listed again, its policy is loaded."""
    sub = tmp_path / "routes"
    sub.mkdir()
    (sub / "reviews.yaml").write_text(vs_text("reviews", "v1"))
    (tmp_path / "ratings.yaml").write_text(vs_text("ratings", "v1"))
    undo = make_unreadable(sub)
    with pytest.raises(PolicyError, match="cannot read policy folder: Permission denied") as info:
        FileSource(tmp_path, MeshConfig())
    assert info.value.file == str(sub)
    undo()
    source = FileSource(tmp_path, MeshConfig())
    errors: list[PolicyError] = []
    source.on_error(errors.append)
    undo = make_unreadable(sub)
    assert source.reload() is False
    assert len(errors) == 1 and errors[0].file == str(sub)
    assert subset_for(source.snapshot, "reviews") == "v1"  # still served
    assert source.reload() is False and len(errors) == 1  # one rejection per change
    undo()
    assert source.reload() is True
    assert source.last_error is None and subset_for(source.snapshot, "reviews") == "v1"


Scenario = Callable[[Path], None]


@pytest.fixture
def as_a_user(tmp_path: Path) -> Iterator[Callable[[Scenario], None]]:
    """Run a scenario as a user whom file permissions bind, in an empty folder it owns (so it
    may chmod what it makes unreadable back). That is this process, unless it runs as root,
    which reads every file whatever its permissions (as these tests run here, and likely in
    CI): then a forked child that drops to `nobody`, in a folder of /tmp (pytest's tmp_path is
    in one only root may enter); an exception in the child fails the test with its traceback."""
    if os.geteuid() != 0:
        yield lambda scenario: scenario(tmp_path)
        return
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("runs as root, with no user 'nobody' to drop to: root reads every file")
    home = Path(tempfile.mkdtemp(prefix="meshlib-permissions-"))
    try:
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        if not all(p.stat().st_mode & stat.S_IXOTH for p in home.parents):
            pytest.skip(f"runs as root, and nobody may not enter {home.parent}")
        yield lambda scenario: _in_a_child_as(nobody, scenario, home)
    finally:
        shutil.rmtree(home)  # as root, whatever the scenario left unreadable


def _in_a_child_as(user: pwd.struct_passwd, scenario: Scenario, home: Path) -> None:
    report, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only what the parent imported is at hand (/root is closed)
        code = 0
        try:
            os.close(report)
            try:
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            except OSError as exc:
                os.write(write, str(exc).encode())
                code = 77
            else:
                scenario(home)
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(report, "rb") as pipe:
        text = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 77:
        pytest.skip(f"runs as root, and may not drop to nobody here: {text}")
    assert code == 0, text or f"the child exited with {code}"


def policy_tree(home: Path) -> tuple[Path, Path, Path]:
    """conf/policies/{reviews.yaml, more/ratings.yaml} under `home`: (conf, policies, more)."""
    conf, policies = home / "conf", home / "conf" / "policies"
    more = policies / "more"
    more.mkdir(parents=True)
    (policies / "reviews.yaml").write_text(vs_text("reviews", "v1"))
    (more / "ratings.yaml").write_text(vs_text("ratings", "v1"))
    return conf, policies, more


@pytest.mark.parametrize(
    "case", ["folder-above-the-file", "folder-above-the-folder", "the-file", "folder-inside"]
)
def test_a_policy_path_this_process_may_not_read_is_a_policy_error_at_start_up(
    as_a_user: Callable[[Scenario], None], case: str
) -> None:
    """Permissions that keep this process's user from the policy — a folder above the path
    it may not enter (no x), the file itself, a folder inside a policy folder — are a
    PolicyError at start-up naming the path and what to fix, never a raw PermissionError."""

    def scenario(home: Path) -> None:
        conf, policies, more = policy_tree(home)
        reviews = policies / "reviews.yaml"
        path, closed, mode, named, fix = {
            "folder-above-the-file": (reviews, conf, 0o600, reviews, f"may not enter {conf}"),
            "folder-above-the-folder": (policies, conf, 0o600, policies, f"may not enter {conf}"),
            "the-file": (reviews, reviews, 0, reviews, "may not read it (it needs r permission)"),
            "folder-inside": (policies, more, 0, more, "may not list it (it needs r and x"),
        }[case]
        closed.chmod(mode)
        try:
            with pytest.raises(PolicyError) as info:
                FileSource(path, MeshConfig())
        finally:
            closed.chmod(0o700)
        assert info.value.file == str(named)
        message = str(info.value)
        assert "Permission denied" in message and fix in message, message
        assert f"uid {os.geteuid()}" in message, message
        assert "the user this process runs as" in message and "permissions" in message, message
        assert subset_for(FileSource(path, MeshConfig()).snapshot, "reviews") == "v1"

    as_a_user(scenario)


def test_a_policy_path_made_unreadable_is_a_rejected_reload_and_the_watcher_goes_on(
    as_a_user: Callable[[Scenario], None],
) -> None:
    """A folder above the policy path that this process's user may no longer enter is a
    rejected reload, by `reload()` and by the watcher: the last good policy keeps serving,
    the watcher keeps watching, and the policy is read again once the folder opens."""

    def scenario(home: Path) -> None:
        conf, policies, _ = policy_tree(home)
        source = FileSource(policies, MeshConfig(), poll_interval=0.01)
        errors: list[PolicyError] = []
        source.on_error(errors.append)
        generation = source.snapshot.generation
        conf.chmod(0o600)
        try:
            assert source.reload() is False and len(errors) == 1
        finally:
            conf.chmod(0o700)
        assert errors[0].file == str(policies) and f"may not enter {conf}" in str(errors[0])
        assert source.snapshot.generation == generation and source.last_error is errors[0]
        assert source.reload() is True and source.last_error is None
        source.start()
        try:
            conf.chmod(0o600)
            wait_for(lambda: len(errors) == 2)  # the watcher reports it, and lives on
            conf.chmod(0o700)
            wait_for(lambda: source.last_error is None)
            (policies / "reviews.yaml").write_text(vs_text("reviews", "v2"))
            wait_for(lambda: subset_for(source.snapshot, "reviews") == "v2")
            assert subset_for(source.snapshot, "ratings") == "v1" and len(errors) == 2
        finally:
            conf.chmod(0o700)
            source.close()

    as_a_user(scenario)


def test_a_file_made_readable_again_is_read(
    tmp_path: Path,
    make_unreadable: Callable[[Path], Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file replaced by one that cannot be read is rejected once, also once it is no
    longer recent enough to be compared by content; when it is made readable (`chmod`, which
    moves only its ctime) the change is seen and loaded, with no edit."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = FileSource(policy, MeshConfig())
    errors: list[PolicyError] = []
    source.on_error(errors.append)
    replace_atomically(policy, vs_text("reviews", "v2"))
    undo = make_unreadable(policy)
    assert source.reload() is False and len(errors) == 1
    monkeypatch.setattr("meshlib.sources.file._RECENT_NS", 0)  # time passes: not recent now
    assert source.reload() is False and len(errors) == 1
    undo()
    policy.chmod(0o600)  # what fixing it takes: no change of content or mtime
    assert source.reload() is True
    assert subset_for(source.snapshot, "reviews") == "v2"


def test_an_emptied_file_is_taken_for_a_write_in_progress(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow writer (`kubectl get ... -o yaml > mesh.yaml`) leaves the file empty for longer
    than the watcher's hold-still check: a policy file that had content and is now 0 bytes is
    not loaded, with one warning, until it has content again. A file left with only a comment
    removes its policy, with a warning that every rule is gone."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = FileSource(policy, MeshConfig())
    policy.write_text("")
    assert source.reload() is False and source.reload() is False
    held = [r.message for r in caplog.records if "write in progress" in r.message]
    assert len(held) == 1 and "still serving generation" in held[0]
    assert subset_for(source.snapshot, "reviews") == "v1"
    policy.write_text(vs_text("reviews", "v2"))
    assert source.reload() is True and subset_for(source.snapshot, "reviews") == "v2"
    policy.write_text("# no policy\n")
    assert source.reload() is True and source.snapshot.resources == ()
    assert any("has no resources" in r.message for r in caplog.records)


def test_a_file_replaced_by_an_empty_one_is_read_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a file truncated in place can be a write in progress. One replaced whole by an
    empty file — a ConfigMap update that empties one key (a Helm value turned off) while it
    changes another, or a rename — is read as it is: the other key's change is served, not
    held back behind a write that is not happening."""
    root = tmp_path / "config"
    root.mkdir()
    make_configmap_mount(
        root, {"a.yaml": vs_text("ratings", "v1"), "b.yaml": vs_text("reviews", "v1")}, 1
    )
    source = FileSource(root, MeshConfig())
    make_configmap_mount(root, {"a.yaml": "", "b.yaml": vs_text("reviews", "v2")}, 2)
    assert source.reload() is True
    assert subset_for(source.snapshot, "reviews") == "v2"
    assert subset_for(source.snapshot, "ratings") is None  # a.yaml's policy is gone
    policy = tmp_path / "mesh.yaml"  # a single file, renamed over by an empty one
    policy.write_text(vs_text("ratings", "v1"))
    single = FileSource(policy, MeshConfig())
    replace_atomically(policy, "")
    assert single.reload() is True and single.snapshot.resources == ()
    assert not [r for r in caplog.records if "write in progress" in r.message]


def test_an_empty_file_is_read_at_start_up_and_when_new(tmp_path: Path) -> None:
    """Only a file that had content is held: an empty policy at start-up, or an empty file
    added to a folder, is read as it is."""
    (tmp_path / "mesh.yaml").write_text("")
    source = FileSource(tmp_path, MeshConfig())
    assert source.snapshot.resources == ()
    (tmp_path / "reviews.yaml").write_text(vs_text("reviews", "v1"))
    (tmp_path / "new.yaml").write_text("")
    assert source.reload() is True and subset_for(source.snapshot, "reviews") == "v1"


def test_a_forked_child_watches_the_files_too(
    tmp_path: Path, source_factory: Callable[..., FileSource]
) -> None:
    """A source started before a fork (gunicorn --preload builds the Mesh in the master,
    then forks its workers) watches again in the child, where only the forking thread lives:
    an edit made after the fork is served by the child."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = source_factory(policy)
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: tell the parent it runs, wait for the edit, report what it serves
        code = 1
        try:
            os.write(ready[1], b"x")
            os.read(go[0], 1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if subset_for(source.snapshot, "reviews") == "v2":
                    code = 0
                    break
                time.sleep(0.01)
        finally:
            os._exit(code)
    os.read(ready[0], 1)
    source.close()  # the parent's watcher stops: only the child's can see the edit
    policy.write_text(vs_text("reviews", "v2"))
    os.write(go[1], b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child never served the edit"
    assert subset_for(source.snapshot, "reviews") == "v1"  # the parent stopped watching


def telemetry_policy(percent: int, logging: bool) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {{name: mesh-default, namespace: istio-system}}
        spec:
          tracing: [{{randomSamplingPercentage: {percent}}}]
          accessLogging: [{{disabled: {str(not logging).lower()}}}]
        """
    )


@patches_tracing
def test_a_telemetry_part_that_fails_to_apply_is_reported_and_the_others_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Applying a new policy's Telemetry is done part by part: one part failing (a bug, the
    policy being valid) keeps its earlier setting, the other parts follow the new policy,
    and the reload counts as rejected (meshlib_policy_last_reload_successful 0). At start-up
    the failure is raised."""
    from prometheus_client import CollectorRegistry

    import meshlib

    policy = tmp_path / "mesh.yaml"
    policy.write_text(telemetry_policy(50, logging=False))
    registry = CollectorRegistry()
    config = MeshConfig(service="reviews", metrics_port=None)
    mesh = meshlib.Mesh(config, policy=policy, watch=False, registry=registry)
    assert mesh.tracing.sampling == 50.0 and not mesh.access_log.enabled("inbound")

    def broken(*args: object) -> None:
        raise RuntimeError("tracing cannot follow")

    monkeypatch.setattr(mesh.tracing, "apply", broken)
    policy.write_text(telemetry_policy(10, logging=True))
    assert mesh.source.reload() is True
    assert mesh.access_log.enabled("inbound")  # followed
    assert mesh.tracing.sampling == 50.0  # kept
    assert registry.get_sample_value("meshlib_policy_last_reload_successful") == 0.0
    assert any("applying its tracing failed" in r.message for r in caplog.records)
    with pytest.raises(RuntimeError, match="tracing cannot follow"):
        monkeypatch.setattr(meshlib.telemetry.tracing.Tracing, "apply", broken)
        meshlib.Mesh(config, policy=policy, watch=False, registry=CollectorRegistry())


@patches_tracing
def test_a_telemetry_part_that_failed_is_applied_again_by_a_change_not_by_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Applying Telemetry depends on the policy's bytes: the files saved again unchanged after
    a part failed publish nothing, and the failure stays reported (the gauge 0, the part on
    its earlier setting, the same generation), even with the cause gone; any change to the
    files loads a new generation, whose every part is applied again (the gauge back to 1)."""
    from prometheus_client import CollectorRegistry

    import meshlib

    policy = tmp_path / "mesh.yaml"
    policy.write_text(telemetry_policy(50, logging=False))
    registry = CollectorRegistry()
    config = MeshConfig(service="reviews", metrics_port=None)
    mesh = meshlib.Mesh(config, policy=policy, watch=False, registry=registry)

    def broken(*args: object) -> None:
        raise RuntimeError("tracing cannot follow")

    working = mesh.tracing.apply
    monkeypatch.setattr(mesh.tracing, "apply", broken)
    policy.write_text(telemetry_policy(10, logging=True))
    assert mesh.source.reload() is True
    generation = mesh.snapshot.generation
    assert registry.get_sample_value("meshlib_policy_last_reload_successful") == 0.0
    monkeypatch.setattr(mesh.tracing, "apply", working)  # the cause gone

    policy.write_text(telemetry_policy(10, logging=True))  # saved again, the same bytes
    assert mesh.source.reload() is False
    assert mesh.snapshot.generation == generation and mesh.tracing.sampling == 50.0
    assert registry.get_sample_value("meshlib_policy_last_reload_successful") == 0.0
    assert registry.get_sample_value("meshlib_policy_reload_errors_total") == 1.0

    policy.write_text(telemetry_policy(10, logging=True) + "# applied again\n")
    assert mesh.source.reload() is True
    assert mesh.snapshot.generation > generation and mesh.tracing.sampling == 10.0
    assert registry.get_sample_value("meshlib_policy_last_reload_successful") == 1.0
    mesh.close()


@patches_tracing
def test_a_fork_during_a_reload_leaves_the_child_serving_and_reloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn --preload may fork a worker while a thread of the master applies new policy.
    The child, where that thread does not exist, applies that policy whole and reloads later,
    instead of waiting forever on the locks the thread held."""
    from prometheus_client import CollectorRegistry

    import meshlib

    policy = tmp_path / "mesh.yaml"
    policy.write_text(telemetry_policy(50, logging=False))
    config = MeshConfig(service="reviews", metrics_port=None)
    mesh = meshlib.Mesh(config, policy=policy, watch=False, registry=CollectorRegistry())
    parent = os.getpid()
    applying, release = threading.Event(), threading.Event()
    apply_tracing = mesh.tracing.apply

    def slow_in_the_parent(snapshot: Snapshot) -> None:
        if os.getpid() == parent:
            applying.set()
            release.wait(10)
        apply_tracing(snapshot)

    monkeypatch.setattr(mesh.tracing, "apply", slow_in_the_parent)
    policy.write_text(telemetry_policy(10, logging=True))
    reloader = threading.Thread(target=mesh.source.reload)
    reloader.start()
    assert applying.wait(5)  # the reload holds the source's and the Mesh's locks now
    pid = os.fork()
    if pid == 0:  # the child: the interrupted policy is applied; a later edit is served
        code = 1
        try:
            applied = mesh.tracing.sampling == 10.0 and mesh.access_log.enabled("inbound")
            policy.write_text(telemetry_policy(5, logging=False))
            child_reload = threading.Thread(target=mesh.source.reload, daemon=True)
            child_reload.start()
            child_reload.join(5)
            reloaded = not child_reload.is_alive() and mesh.tracing.sampling == 5.0
            code = 0 if applied and reloaded else 3 if not applied else 2
        finally:
            os._exit(code)
    release.set()
    reloader.join()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 3, "the child kept the parent's half-applied policy"
    assert code == 0, "the child could not reload: a lock stayed held"
    mesh.close()


def test_a_file_that_cannot_be_stat_ed_counts_in_the_fingerprint(tmp_path: Path) -> None:
    """A listed file that `stat` cannot reach (a dangling symlink: a ConfigMap key removed,
    whose link the kubelet drops just after the `..data` swap, or one left by hand) makes the
    change it came with rejected. Removing it is a change too: the pending edit is loaded then,
    not only at the next edit."""
    (tmp_path / "reviews.yaml").write_text(vs_text("reviews", "v1"))
    source = FileSource(tmp_path, MeshConfig())
    errors: list[PolicyError] = []
    source.on_error(errors.append)
    (tmp_path / "gone.yaml").symlink_to("nowhere.yaml")
    replace_atomically(tmp_path / "reviews.yaml", vs_text("reviews", "v2"))
    assert source.reload() is False and len(errors) == 1
    assert errors[0].file == str(tmp_path / "gone.yaml")
    (tmp_path / "gone.yaml").unlink()
    assert source.reload() is True
    assert subset_for(source.snapshot, "reviews") == "v2" and source.last_error is None


def test_a_source_dropped_without_close_stops_watching(tmp_path: Path) -> None:
    """The watcher thread does not keep its source alive: a source (or a Mesh) dropped without
    `close()` is collected and its thread ends, rather than polling for the process's life."""
    import gc

    import meshlib

    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    before = set(threading.enumerate())
    source = FileSource(policy, MeshConfig(), poll_interval=0.01)
    source.start()
    mesh = meshlib.Mesh(MeshConfig(metrics_port=None), policy=policy)
    mesh.source.poll_interval = 0.01  # type: ignore[attr-defined]
    started = set(threading.enumerate()) - before
    assert {t.name for t in started} == {"meshlib-policy-watch"} and len(started) == 2
    del source, mesh

    def ended() -> bool:
        gc.collect()
        return not any(t.is_alive() for t in started)

    wait_for(ended)


def test_a_fork_while_the_watcher_waits_leaves_the_child_watching(
    tmp_path: Path, source_factory: Callable[..., FileSource]
) -> None:
    """The watcher sleeps on an Event between polls, taking the Event's internal lock for a
    moment each time. A fork landing in that moment (gunicorn forking workers, or recycling
    them with --max-requests, from a master that watches) leaves the lock held in the child:
    the child's watcher, and its `close()`, must not wait on it forever."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = source_factory(policy, poll_interval=0.01)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # as the watcher does inside Event.wait(), for as long as the fork takes
        with source._stop._cond:  # type: ignore[attr-defined]
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(ready[1], b"x")
            os.read(go[0], 1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if subset_for(source.snapshot, "reviews") == "v2":
                    closer = threading.Thread(target=source.close, daemon=True)
                    closer.start()
                    closer.join(5)
                    code = 2 if closer.is_alive() else 0
                    break
                time.sleep(0.01)
        finally:
            os._exit(code)
    release.set()
    holder.join()
    os.read(ready[0], 1)
    source.close()
    policy.write_text(vs_text("reviews", "v2"))
    os.write(go[1], b"x")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 1, "the child's watcher never served the edit"
    assert code == 0, "the child's close() hung"


def test_a_file_that_is_not_utf8_is_rejected_naming_its_line(tmp_path: Path) -> None:
    """An edit saved in another encoding (a Latin-1 comment) is rejected, naming the file and
    the line of the first byte that is not UTF-8; the last good policy keeps serving."""
    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    source = FileSource(policy, MeshConfig())
    errors: list[PolicyError] = []
    source.on_error(errors.append)
    text = vs_text("reviews", "v2").replace("spec:", "spec:  # caf\xe9", 1)
    policy.write_bytes(text.encode("latin-1"))
    assert source.reload() is False and len(errors) == 1
    assert errors[0].file == str(policy) and errors[0].line == 4
    assert "not UTF-8 text (byte 0xe9)" in str(errors[0])
    assert subset_for(source.snapshot, "reviews") == "v1"


BOM_ENCODINGS = [
    pytest.param(codecs.BOM_UTF16_LE, "utf-16-le", "\r\n", id="utf-16le-crlf"),  # PowerShell's >
    pytest.param(codecs.BOM_UTF16_BE, "utf-16-be", "\n", id="utf-16be"),
    pytest.param(codecs.BOM_UTF32_LE, "utf-32-le", "\n", id="utf-32le"),
    pytest.param(codecs.BOM_UTF32_BE, "utf-32-be", "\n", id="utf-32be"),
    pytest.param(codecs.BOM_UTF8, "utf-8", "\r\n", id="utf-8-crlf"),
]


@pytest.mark.parametrize(("bom", "codec", "newline"), BOM_ENCODINGS)
def test_a_file_with_a_byte_order_mark_is_read_in_its_encoding(
    tmp_path: Path, bom: bytes, codec: str, newline: str
) -> None:
    """YAML 1.2 allows UTF-8, UTF-16 and UTF-32 named by a byte-order mark, and kubectl reads
    UTF-16 with one (what Windows PowerShell's `>` writes, with CRLF line ends): such a file
    is read at start-up and on reload, and an error in it names the right line."""

    def encoded(text: str) -> bytes:
        return bom + text.replace("\n", newline).encode(codec)

    policy = tmp_path / "mesh.yaml"
    policy.write_bytes(encoded("# policy\n" + vs_text("reviews", "v1")))
    source = FileSource(policy, MeshConfig())
    assert subset_for(source.snapshot, "reviews") == "v1"
    assert source.snapshot.resources[0].origin.line == 2
    policy.write_bytes(encoded(vs_text("reviews", "v2") + "      weight: -1\n"))
    errors: list[PolicyError] = []
    source.on_error(errors.append)
    assert source.reload() is False and len(errors) == 1
    assert (errors[0].line, errors[0].field) == (9, "spec.http[0].route[0].weight")
    policy.write_bytes(encoded(vs_text("reviews", "v2")))
    assert source.reload() is True and subset_for(source.snapshot, "reviews") == "v2"


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        pytest.param(
            codecs.BOM_UTF16_LE + "a: 1\nb: 2\n".encode("utf-16-le") + b"\x00\xd8c\x00",
            3,
            "not UTF-16LE text, as its byte-order mark says (bytes 0x00 0xd8:"
            " illegal UTF-16 surrogate)",
            id="utf-16le-lone-surrogate",
        ),
        pytest.param(
            codecs.BOM_UTF16_BE + "a: 1\n".encode("utf-16-be") + b"\x00",
            2,
            "not UTF-16BE text, as its byte-order mark says (byte 0x00: truncated data)",
            id="utf-16be-odd-length",
        ),
        pytest.param(
            codecs.BOM_UTF32_LE + "a: 1\n".encode("utf-32-le") + b"\x00\x00\x11\x00",
            2,
            "not UTF-32LE text, as its byte-order mark says (bytes 0x00 0x00 0x11 0x00:"
            " code point not in range(0x110000))",
            id="utf-32le-beyond-unicode",
        ),
        pytest.param(
            codecs.BOM_UTF8 + "a: 1\nb: caf\xe9\n".encode("latin-1"),
            2,
            "not UTF-8 text, as its byte-order mark says (byte 0xe9: invalid continuation byte)",
            id="utf-8-bom-latin-1",
        ),
        pytest.param(
            "a: 1\n".encode("utf-16-le"),
            1,
            "NUL bytes: UTF-16 or UTF-32 text without a byte-order mark? Save it as UTF-8"
            " (or with a byte-order mark)",
            id="utf-16le-without-its-mark",
        ),
    ],
)
def test_bytes_that_are_not_text_in_the_marked_encoding_are_an_error_naming_their_line(
    tmp_path: Path, data: bytes, line: int, message: str
) -> None:
    """Bytes that are not valid in the encoding a file's byte-order mark names are an error
    naming the file, the line and the bytes, as for UTF-8 (a file without a mark); a file of
    UTF-16 or UTF-32 written without its mark says what it likely is."""
    policy = tmp_path / "mesh.yaml"
    policy.write_bytes(data)
    with pytest.raises(PolicyError) as info:
        FileSource(policy, MeshConfig())
    assert (info.value.file, info.value.line) == (str(policy), line)
    assert str(info.value) == f"{policy}:{line}: error: cannot read policy: {message}"


def _touch(path: Path) -> None:
    """Move `path`'s times well away from now: its metadata changes, not its bytes."""
    then = time.time_ns() - 10_000_000_000
    os.utime(path, ns=(then, then))


def _same_bytes_in_place(path: Path) -> None:
    path.write_bytes(path.read_bytes())
    _touch(path)  # the write may land in its clock tick: make the change certain


def _same_bytes_atomically(path: Path) -> None:  # an editor's save: a new file (inode)
    replace_atomically(path, path.read_text())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_touch, id="touch"),
        pytest.param(_same_bytes_in_place, id="saved-in-place"),
        pytest.param(_same_bytes_atomically, id="saved-atomically"),
        pytest.param(None, id="configmap-update-of-another-key"),
    ],
)
def test_files_changed_on_disk_but_holding_the_same_bytes_publish_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: Callable[[Path], None] | None
) -> None:
    """A change on disk that leaves the policy files' bytes as they were keeps the served
    Snapshot: nothing published, no new generation, no "loaded" line, a DEBUG line at most."""
    caplog.set_level("DEBUG", logger="meshlib.policy")
    if change is None:  # a ConfigMap update of a key that is no policy: every link moves
        make_configmap_mount(tmp_path, {"mesh.yaml": vs_text("reviews", "v1"), "a.txt": "1"}, 1)
        source = FileSource(tmp_path, MeshConfig())
        make_configmap_mount(tmp_path, {"mesh.yaml": vs_text("reviews", "v1"), "a.txt": "2"}, 2)
    else:
        policy = tmp_path / "mesh.yaml"
        policy.write_text(vs_text("reviews", "v1"))
        source = FileSource(policy, MeshConfig())
        change(policy)
    published: list[Snapshot] = []
    source.subscribe(published.append)
    served = source.snapshot
    caplog.clear()
    assert source.reload() is False
    assert source.snapshot is served and published == []
    assert not [r for r in caplog.records if r.levelname != "DEBUG"], caplog.text
    assert "unchanged: still generation" in caplog.text


def test_an_undone_rejected_edit_clears_the_error_without_a_new_generation(
    tmp_path: Path,
) -> None:
    """Through a Mesh and its registry: a touch publishes nothing and moves no gauge; a
    rejected edit sets meshlib_policy_last_reload_successful to 0; undoing it (the files back
    to the bytes served) sets it to 1 again, with the served Snapshot and its generation."""
    from prometheus_client import CollectorRegistry

    import meshlib

    policy = tmp_path / "mesh.yaml"
    policy.write_text(vs_text("reviews", "v1"))
    good = policy.read_bytes()
    registry = CollectorRegistry()
    config = MeshConfig(service="reviews", metrics_port=None)
    mesh = meshlib.Mesh(config, policy=policy, watch=False, registry=registry)

    def gauges() -> tuple[float | None, float | None, float | None]:
        return (
            registry.get_sample_value("meshlib_policy_generation"),
            registry.get_sample_value("meshlib_policy_last_reload_successful"),
            registry.get_sample_value("meshlib_policy_reload_errors_total"),
        )

    try:
        served = mesh.source.snapshot
        assert gauges() == (served.generation, 1.0, 0.0)
        _touch(policy)
        assert mesh.source.reload() is False and gauges() == (served.generation, 1.0, 0.0)
        policy.write_text(vs_text("reviews", "v2").replace("hosts:", "hostz:"))
        assert mesh.source.reload() is False and gauges() == (served.generation, 0.0, 1.0)
        policy.write_bytes(good)  # the edit undone
        assert mesh.source.reload() is True
        assert gauges() == (served.generation, 1.0, 1.0)
        assert mesh.source.snapshot is served and mesh.source.last_error is None
        _touch(policy)
        assert mesh.source.reload() is False and gauges() == (served.generation, 1.0, 1.0)
    finally:
        mesh.close()
