"""Access lines reach stdout under a real server when the app configures no logging, as an
Envoy sidecar's reach /dev/stdout: a Telemetry `accessLogging` entry is all it takes to see
them in `kubectl logs`. uvicorn, hypercorn and gunicorn configure handlers for their own
loggers only, so with nothing more Python would drop every line. Once the app configures
logging, its handlers alone get the lines (none on stdout, none twice)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.access_lines import TELEMETRY
from tests.upstream import child_env

ASGI_APP = """
import logging, sys
import meshlib
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

LOGGING
meshlib.configure(service="productpage", policy="mesh.yaml", metrics_port=None)


async def page(request):
    return PlainTextResponse("page")


app = Starlette(routes=[Route("/productpage", page)])
app.add_middleware(meshlib.MeshMiddleware)
"""

WSGI_APP = """
import logging, sys
import meshlib

LOGGING
meshlib.configure(service="productpage", policy="mesh.yaml", metrics_port=None)


def page(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"page"]


app = meshlib.MeshWSGIMiddleware(page)
"""

CONFIGURED = 'logging.basicConfig(stream=sys.stderr, format="app-handler %(name)s %(message)s")'


def serve(tmp_path: Path, server: str, logging_line: str) -> tuple[str, str]:
    """Serve the app under `server` with `logging_line` run first, make 3 requests, stop it
    with SIGTERM: its (stdout, stderr)."""
    source = WSGI_APP if server == "gunicorn" else ASGI_APP
    (tmp_path / "served.py").write_text(source.replace("LOGGING", logging_line))
    (tmp_path / "mesh.yaml").write_text(TELEMETRY)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = str(listener.fileno())
    binary = str(Path(sys.executable).parent / server)
    argv = {
        "uvicorn": [binary, "--fd", fd, "--log-level", "warning", "served:app"],
        "hypercorn": [binary, "--bind", f"fd://{fd}", "--log-level", "warning", "served:app"],
        "gunicorn": [binary, "--bind", f"fd://{fd}", "--log-level", "warning", "served:app"],
    }[server]
    process = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=child_env(str(tmp_path)),
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()  # the server holds it now
    try:
        deadline = time.monotonic() + 30
        while True:  # ready when it answers (the listening socket queues until then)
            try:
                first = httpx.get(f"http://127.0.0.1:{port}/productpage", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None, f"{server} exited: {process.communicate()}"
                assert time.monotonic() < deadline, f"{server} did not start"
                time.sleep(0.1)
        answers = [first, *(httpx.get(f"http://127.0.0.1:{port}/productpage") for _ in "ab")]
        assert [a.text for a in answers] == ["page"] * 3
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return out, err


def access_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if '"GET /productpage HTTP/1.1" 200 ' in line]


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "gunicorn"])
def test_lines_go_to_stdout_when_the_app_configures_no_logging(tmp_path: Path, server: str) -> None:
    """Under each server, with no logging configured by the app, every request's access line
    is on stdout, once, in Istio's TEXT format, and none on stderr."""
    out, err = serve(tmp_path, server, "")
    lines = access_lines(out)
    assert len(lines) == 3, (out, err)
    assert all(line.startswith("[") and "inbound|" in line for line in lines)
    assert not access_lines(err)


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_lines_go_only_where_the_apps_logging_sends_them(tmp_path: Path, server: str) -> None:
    """Once the app configures logging (a root handler on stderr), the lines go there, each
    once, formatted by the app's formatter, and nothing goes to stdout."""
    out, err = serve(tmp_path, server, CONFIGURED)
    assert not access_lines(out)
    lines = access_lines(err)
    assert len(lines) == 3, (out, err)
    assert all(line.startswith("app-handler meshlib.access [") for line in lines)


def test_one_line_whichever_loggers_have_a_last_resort(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record that meets several last-resort handlers (installed twice by hand, or on a
    logger and on one it propagates to) is written once, by the first it meets; a handler of
    the app's anywhere on its way takes it instead."""
    import logging

    from meshlib.telemetry.last_resort import StdoutLastResort, install

    parent = logging.getLogger("tests.last_resort")
    child = logging.getLogger("tests.last_resort.child")
    parent.propagate = False  # the root's handlers (pytest's) out of the way
    parent.setLevel(logging.INFO)
    for logger in (parent, child):
        install(logger)
        install(logger)  # once each
    child.addHandler(StdoutLastResort(child))  # and one more, by hand
    try:
        assert len(child.handlers) == 2 and len(parent.handlers) == 1
        child.info("from the child")
        parent.info("from the parent")
        assert capsys.readouterr().out == "from the child\nfrom the parent\n"
        theirs = logging.StreamHandler()  # the app's, to stderr
        parent.addHandler(theirs)
        child.info("to the app's handler")
        assert capsys.readouterr() == ("", "to the app's handler\n")
    finally:
        for logger in (parent, child):
            logger.handlers.clear()
        parent.propagate = True


def test_a_line_is_written_while_logging_is_being_reconfigured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`logging.config.dictConfig` (Django's setup, a level changed at run time) holds
    logging's module lock while it takes each handler's lock; the last-resort handler decides,
    holding its own, whether another handler gets a line, so it must not take the module lock
    in turn (it did, through getLogger: the two threads could wait on each other for ever).
    Here the test holds the module lock, as dictConfig would, while another thread logs."""
    import logging
    import threading

    from meshlib.telemetry.last_resort import install

    logger = logging.getLogger("tests.last_resort.reconfigured")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    install(logger)
    logger.info("first")  # logging's own level cache filled (a miss takes the module lock)
    written = threading.Event()

    def write() -> None:
        logger.info("written")
        written.set()

    module_lock = logging._lock  # type: ignore[attr-defined]
    module_lock.acquire()
    writer = threading.Thread(target=write)
    try:
        writer.start()
        assert written.wait(5), "the handler waited for logging's module lock"
    finally:
        module_lock.release()
        writer.join(10)
        logger.handlers.clear()
    assert capsys.readouterr().out == "first\nwritten\n"
