"""Start the demo's service processes and make sure none outlives the demo.

Each service runs in a process group (a session) of its own, with its stdout and stderr in a
log file. Stopping sends SIGTERM to every group, waits, then SIGKILLs what is left; it runs
at exit too (atexit), and on Linux each service also gets SIGTERM if the demo dies without
cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class Ports:
    """Ports the OS picks on 127.0.0.1, held for the services that will bind them.

    Picking a free port and closing it leaves a window in which anything else may take it,
    and on a busy machine an outgoing connection's ephemeral port often does. So each port
    stays bound here, with SO_REUSEADDR and not listening, until `release()`: no other socket
    can take it meanwhile, while a server that sets SO_REUSEADDR (uvicorn, gunicorn, meshlib's
    metrics server all do) can still bind and listen on it.
    """

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def take(self) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Process:
    """One service process: what to run and, once started, its Popen."""

    name: str  # "reviews-v2"
    command: Sequence[str]
    env: Mapping[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Supervisor:
    """Starts processes in their own process groups; `stop()` ends every one of them."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.processes: list[Process] = []
        atexit.register(self.stop)

    def start(self, process: Process) -> Process:
        process.log.parent.mkdir(parents=True, exist_ok=True)
        with process.log.open("ab") as log:
            process.popen = subprocess.Popen(
                list(process.command),
                cwd=self.cwd,
                env=dict(process.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C reaches only the demo
                preexec_fn=_die_with_parent,  # the demo starts its services before any thread
            )
        self.processes.append(process)
        return process

    def failed(self) -> list[Process]:
        """Processes that have exited (a service should never exit while the demo runs)."""
        return [p for p in self.processes if p.exit_code is not None]

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every process group, wait up to `timeout`, then SIGKILL what is left."""
        running = [p.popen for p in self.processes if p.popen is not None]
        for popen in running:
            _signal_group(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for popen in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(max(0.0, deadline - time.monotonic()))
        for popen in running:  # the leader may be gone while its workers linger: kill the group
            _signal_group(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(1.0)
        self.processes.clear()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
