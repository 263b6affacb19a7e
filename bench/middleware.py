"""Inbound middleware cost: a Starlette app served meshed, bare, behind two proxies, under OTel.

One run, all ratios measured against the bare app in the same run. Load comes from `wrk`
(2 threads, 32 connections, a Lua script), a separate process from the servers. Every server
is uvicorn in its own subprocess (1 worker, httptools, asyncio loop), on an OS-assigned port,
polled until it answers:

(a) bare: a Starlette app with one route returning a small JSON body.
(b) meshed: the same app with `meshlib.MeshMiddleware` (Starlette `middleware=[...]`) over a
    Mesh with Istio metrics (always on: reporter="destination", 25 labels), tracing at 1%
    (meshlib's own SDK provider, `build_tracer_provider` with its MeshSampler, and a
    BatchSpanProcessor into an exporter that encodes each batch as OTLP protobuf and drops it:
    each sampled span is queued, batched and serialised as the OTLP exporter would, with no
    collector needed; the console exporter into /dev/null without the `bench` extra) and
    propagation (the caller's `traceparent` and `x-request-id` extracted and made current).
(c) sidecar stand-in: the bare app behind two nginx reverse-proxy hops on loopback (two nginx
    instances, 1 worker each, HTTP/1.1 keepalive upstreams), wrk -> nginx -> nginx -> app.
(d) stock OpenTelemetry: the bare app with `opentelemetry-instrumentation-asgi`'s
    OpenTelemetryMiddleware, an SDK TracerProvider sampling ParentBased(TraceIdRatioBased
    0.01) with the same BatchSpanProcessor and exporter, and no
    MeterProvider (its metrics go to the API's no-op meter: it does less than (b)).
(e) a floor: the bare app under a hand-written middleware doing only what propagation and
    metrics cannot do without (`floor_app`): a lower bound for (b)'s cost in pure Python.
(f) (b) again, served from the compiled build `make compiled` leaves in build/compiled (the
    request-path modules compiled with mypyc); skipped when there is none.
(g) (b)'s server again, called as a meshed caller calls it: wrk also sends a workload
    identity (`x-meshlib-peer-metadata`), so the caller's series is labelled with it and the
    middleware answers with its own identity (it answers none to callers that send none, as
    Istio's sidecars do, so (a)-(f) are callers from outside the mesh, like a gateway's).

wrk sends every request with a `traceparent` (a pool of 1,000 distinct trace ids, 1 in 100
flagged sampled, as from a caller sampling at 1%) and an `x-request-id`; (b) and (d) both
follow the parent's decision, so both trace exactly 1% of requests. The configurations are
warmed up, then measured in WINDOW_S windows over ROUNDS rounds, the order reversed every
other round so drift hits all alike. wrk, the proxies and the servers share this machine's
cores: the absolute figures are low and only the ratios mean anything. A configuration's
ratio is the median of its per-round ratios, each against the bare app's window of the same
round: one window a noisy neighbour slowed (seen here: a bare window 25% down while the rest
held) moves one round's ratio, not the figure. Beside req/s, the
server processes' CPU time per request served (user + system, from Linux's /proc) shows what
each configuration costs in CPU: a single-worker app is bound by it, while nginx runs in
processes of its own.

A last section calls each app in-process (ASGI messages, no socket, no server) to show the
microseconds each middleware adds per request. Goal: (b) >= 0.85 of (a)'s throughput.
`python -m bench.middleware --profile` profiles the meshed app in-process (cProfile) and
prints where the time goes; `--parts` serves (b)'s parts one at a time (PARTS: a pass-through
layer, + the series, + propagation, meshlib without tracing, meshlib; and a calibration, a
layer that only spins 5 µs) and prints the server CPU each adds.

wrk and nginx are Debian packages, installed with apt-get when missing (root only); without
them this benchmark prints what is missing and skips. (d) needs
the `bench` extra (`make bench` installs it: opentelemetry-instrumentation-asgi); without it (d) is
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import pstats
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2
CONNECTIONS = 32
WARMUP_S = 1  # per configuration, before the first round
WINDOW_S = 2  # per configuration per round: ~8 s each in all
ROUNDS = 4
GOAL = 0.85
TRACE_POOL = 1000  # distinct traceparents wrk cycles through
SAMPLED_EVERY = 100  # 1 in 100 flagged sampled: a caller tracing 1%
INPROCESS_N = 3000  # requests per app per round, in-process section
INPROCESS_ROUNDS = 5
PAYLOAD = {"message": "hello from the mesh", "ok": True, "items": [1, 2, 3]}

CONFIGS = {
    "a": "(a) bare Starlette",
    "b": "(b) + meshlib.MeshMiddleware (metrics, 1% traces, propagation)",
    "c": "(c) bare behind two nginx hops (sidecar pair stand-in)",
    "d": "(d) + stock OpenTelemetry ASGI middleware (1% traces)",
    "e": "(e) + hand-written floor: propagation + metrics only",
    "f": "(f) = (b), meshlib's compiled build (make compiled)",
    "g": "(g) = (b), called by a meshed caller (identity exchanged)",
}
# `--parts`: (b)'s cost taken apart, each part served on its own and added to the one before.
PARTS = {
    "a": "(a) bare Starlette",
    "p": "(p) + a pass-through layer that reads status and counts bytes",
    "q": "(q) = (p) + counting the request in its Istio series",
    "e": "(e) = (q) + propagation: the hand-written floor",
    "u": "(u) meshlib.MeshMiddleware, tracing off",
    "b": "(b) meshlib.MeshMiddleware, 1% traces",
    "s": "(s) a calibration: a layer that only spins 5 µs per request",
}
SPIN_US = 5  # (s): a known, cache-light cost, to show what the goal allows in the server
PARTS_ROUNDS = 6
FACTORIES = {
    "a": "bare_app",
    "b": "meshed_app",
    "d": "otel_app",
    "e": "floor_app",
    "f": "compiled_meshed_app",
    "p": "layer_app",
    "q": "counting_layer_app",
    "u": "untraced_meshed_app",
    "s": "spinning_layer_app",
}
COMPILED_ROOT = ROOT / "build" / "compiled"  # where `make compiled` leaves the compiled package
SERVED_BY = {"g": "b"}  # configurations measured on another one's server
CALLER_IDENTITY = "w=reviews-v2;n=bench;a=reviews;v=v2;cs=reviews;cr=v2;c=Kubernetes"


# -- the apps (uvicorn --factory bench.middleware:<name>) -----------------------------------


def _starlette(middleware: list[Any] | None = None) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request: Any) -> JSONResponse:
        return JSONResponse(PAYLOAD)

    return Starlette(routes=[Route("/", hello)], middleware=middleware)


def _exporter() -> Any:
    """Serialises each batch of spans as a real exporter does, then drops it: no collector.

    With `opentelemetry-exporter-otlp-proto-common` (the `bench` extra) that is OTLP's own
    protobuf encoding — what the OTLP/HTTP exporter does before it POSTs; without it, the
    console exporter's JSON into /dev/null (whose indented JSON makes cyclic garbage the
    OTLP path does not).
    """
    from opentelemetry.sdk.trace.export import (
        ConsoleSpanExporter,
        SpanExporter,
        SpanExportResult,
    )

    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    except ImportError:
        return ConsoleSpanExporter(out=open(os.devnull, "w"))  # lives as long as the app

    class OtlpEncodingExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    return OtlpEncodingExporter()


def exporter_name() -> str:
    return "OTLP protobuf encoding" if "Otlp" in type(_exporter()).__name__ else "console JSON"


def bare_app() -> Any:
    return _starlette()


def make_mesh(traced: bool = True) -> Any:
    """Metrics on, tracing at 1% through meshlib's own provider (batched), no policy file;
    `traced=False`: no tracing at all."""
    from meshlib.config import MeshConfig
    from meshlib.mesh import Mesh
    from meshlib.telemetry.tracing import MeshSampler, build_tracer_provider

    config = MeshConfig(service="productpage", version="v1", namespace="bench", metrics_port=None)
    if not traced:
        mesh = Mesh(config, watch=False)
        assert not mesh.tracing.enabled
        return mesh
    provider = build_tracer_provider(config, _exporter(), sampler=MeshSampler(1.0), batch=True)
    mesh = Mesh(config, tracer_provider=provider, watch=False)
    assert mesh.tracing.enabled and mesh.tracing.sampling == 1.0
    return mesh


def meshed_app(mesh: Any = None) -> Any:
    from starlette.middleware import Middleware

    from meshlib.asgi import MeshMiddleware

    return _starlette([Middleware(MeshMiddleware, mesh=mesh or make_mesh())])


def untraced_meshed_app() -> Any:
    return meshed_app(make_mesh(traced=False))


def compiled_meshed_app() -> Any:
    """(b) served by the compiled build: this process runs from COMPILED_ROOT."""
    import meshlib.asgi

    if not _is_compiled(meshlib.asgi.__file__):
        raise RuntimeError(f"expected meshlib's compiled build, got {meshlib.asgi.__file__}")
    return meshed_app()


def _is_compiled(path: str | None) -> bool:
    return (path or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_unavailable() -> str | None:
    """Why (f) cannot run: no compiled build in COMPILED_ROOT, or one built from other
    sources than this tree's (it would measure old code); None when it can."""
    built, ours = COMPILED_ROOT / "meshlib", ROOT / "meshlib"
    if not any(_is_compiled(str(path)) for path in built.glob("asgi.*")):
        return f"no compiled build in {COMPILED_ROOT} (make compiled; make bench does)"
    sources = {path.relative_to(built) for path in built.rglob("*.py")}
    if sources != {path.relative_to(ours) for path in ours.rglob("*.py")} or any(
        (built / name).read_bytes() != (ours / name).read_bytes() for name in sources
    ):
        return f"{COMPILED_ROOT} was built from other sources than {ours} (make compiled)"
    return None


def floor_app() -> Any:
    """The least an inbound middleware can do and still propagate and count: (b) minus its
    generality, written out in one function — read `traceparent` and `x-request-id` (the
    headers wrk sends, nothing else looked at or checked), make them current (meshlib's and
    OpenTelemetry's context variables), count the request in its Istio series. No tracing,
    deadline, peer identity, identity answer, access-log check or error handling:
    a lower bound for what (b) does, to show what the goal leaves room for."""
    return _layer(count=True, propagate=True)


def layer_app() -> Any:
    """(p): the floor's layer doing nothing but read the status and count the body's bytes."""
    return _layer(count=False, propagate=False)


def counting_layer_app() -> Any:
    """(q): (p), and the request counted in its Istio series (meshlib's recorder)."""
    return _layer(count=True, propagate=False)


def spinning_layer_app() -> Any:
    """(s): a pass-through layer that spins SPIN_US µs per request and does nothing else: a
    cost known in-process (a loop on the clock, little memory touched), to compare with what
    the server's figures give it."""
    from time import perf_counter

    from starlette.middleware import Middleware

    class Spin:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                until = perf_counter() + SPIN_US * 1e-6
                while perf_counter() < until:
                    pass
            await self.app(scope, receive, send)

    return _starlette([Middleware(Spin)])


def _layer(count: bool, propagate: bool) -> Any:
    from time import perf_counter

    from opentelemetry.context import Context
    from starlette.middleware import Middleware

    from meshlib._inbound import InboundSide
    from meshlib.telemetry import _caller_trace, _request_context, propagation

    record = InboundSide(make_mesh(traced=False)).recorder.record if count else None
    current, otel_var = _request_context.current, _request_context._OTEL_VAR
    assert otel_var is not None, "OpenTelemetry's context variable was not found"
    caller_span, span_key = _caller_trace._caller_span, _caller_trace.SPAN_KEY
    formats = frozenset((propagation.TRACECONTEXT,))

    class Layer:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            started = perf_counter()
            status, sent = 500, 0

            async def counting_send(message: Any) -> None:
                nonlocal status, sent
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body":
                    sent += len(message.get("body", b""))
                await send(message)

            if propagate:
                parent = request_id = None
                for name, value in scope["headers"]:
                    if name == b"traceparent":
                        parent = value.decode("latin-1")
                    elif name == b"x-request-id":
                        request_id = value.decode("latin-1")
                span = caller_span(parent, None) if parent else None
                context = Context({span_key: span}) if span is not None else Context()
                inbound = _request_context.InboundContext(
                    request_id or "", (), context, None, span.sampled if span else None, formats
                )
                token, otel_token = current.set(inbound), otel_var.set(context)
                try:
                    await self.app(scope, receive, counting_send)
                finally:
                    otel_var.reset(otel_token)
                    current.reset(token)
            else:
                await self.app(scope, receive, counting_send)
            if record is not None:
                record(None, status, (perf_counter() - started) * 1000.0, 0, sent)

    return _starlette([Middleware(Layer)])


def otel_app() -> Any:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from starlette.middleware import Middleware

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    return _starlette([Middleware(OpenTelemetryMiddleware, tracer_provider=provider)])


# -- the request mix ------------------------------------------------------------------------


def traceparents(n: int = TRACE_POOL, seed: int = 4) -> list[tuple[str, str]]:
    """(traceparent, x-request-id) pairs; every SAMPLED_EVERY-th is flagged sampled."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        flags = "01" if i % SAMPLED_EVERY == 0 else "00"
        tp = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64) or 1:016x}-{flags}"
        rid = f"{rng.getrandbits(128):032x}"
        out.append((tp, f"{rid[:8]}-{rid[8:12]}-4{rid[13:16]}-a{rid[17:20]}-{rid[20:]}"))
    return out


def lua_script(pairs: list[tuple[str, str]], identity: str | None = None) -> str:
    """wrk script: the requests are formatted once per thread, then cycled through; with
    `identity`, each also carries it as a meshed caller's metadata header."""
    entries = ",\n".join(f'  {{"{tp}", "{rid}"}}' for tp, rid in pairs)
    claim = f'  wrk.headers["x-meshlib-peer-metadata"] = "{identity}"\n' if identity else ""
    return f"""\
local pairs_ = {{
{entries}
}}
local reqs = {{}}
local i = 0
function init(args)
{claim}  for k, p in ipairs(pairs_) do
    wrk.headers["traceparent"] = p[1]
    wrk.headers["x-request-id"] = p[2]
    reqs[k] = wrk.format("GET", "/")
  end
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
"""


# -- servers --------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read()


def _check_identity_answered(url: str) -> None:
    """(g) measures the metadata exchange only if the server answers a meshed caller with its
    identity and no one else."""
    claim = urllib.request.Request(url, headers={"x-meshlib-peer-metadata": CALLER_IDENTITY})
    with urllib.request.urlopen(claim, timeout=2) as meshed, urllib.request.urlopen(url) as other:
        if not meshed.headers.get("x-meshlib-peer-metadata") or other.headers.get(
            "x-meshlib-peer-metadata"
        ):
            raise RuntimeError(f"{url} does not answer identities as (g) expects")


def _wait_ready(url: str, proc: Server, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.log.read_text()}")
        try:
            status, body = _get(url)
            if status == 200 and json.loads(body) == PAYLOAD:
                return
            raise RuntimeError(f"{what}: unexpected answer {status} {body[:80]!r}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # poll interval, not a fixed wait


class Server(subprocess.Popen[bytes]):
    """A server subprocess whose stderr goes to `log` (a pipe could fill up and block it)."""

    log: Path


@contextlib.contextmanager
def _process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[Server]:
    with log.open("wb") as err:
        proc = Server(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    proc.log = log
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Ports:
    """Free loopback ports, each handed out once. All are taken from the OS at once, while
    held: one asked for at a time could come back twice (it is free again once closed), and a
    server that cannot bind it would be measured as the other one answering on it."""

    def __init__(self, count: int) -> None:
        held = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        self._ports = [sock.getsockname()[1] for sock in held]
        for sock in held:
            sock.close()

    def take(self) -> int:
        return self._ports.pop()


def uvicorn(
    stack: contextlib.ExitStack, tmp: Path, factory: str, port: int, root: Path = ROOT
) -> tuple[int, Server]:
    """Start uvicorn serving `bench.middleware:<factory>()` on `port` from the tree at `root`
    (its meshlib first on sys.path); not yet waited for."""
    cmd = [sys.executable, "-m", "uvicorn", f"bench.middleware:{factory}", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--http", "httptools"]
    cmd += ["--loop", "asyncio", "--lifespan", "off", "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("MESHLIB_TRACES_EXPORTER", None)  # the apps choose their exporter themselves
    return port, stack.enter_context(_process(cmd, tmp / f"{factory}.log", env, cwd=root))


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream next {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
"""


def nginx(
    stack: contextlib.ExitStack, tmp: Path, name: str, upstream: int, port: int
) -> tuple[int, Server]:
    """One nginx reverse proxy (1 worker) on `port` to 127.0.0.1:upstream."""
    prefix = tmp / name
    prefix.mkdir()
    prefix.chmod(0o755)  # workers may run as nobody when started as root
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=prefix, upstream=upstream, listen=port))
    cmd = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return port, stack.enter_context(_process(cmd, prefix / "stderr.log"))


# -- load -----------------------------------------------------------------------------------

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


_REQUESTS = re.compile(r"(\d+) requests in")


def wrk(url: str, seconds: int, script: Path) -> tuple[float, int]:
    """(requests per second, requests) of one wrk run; an error or non-2xx answer fails it."""
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps, requests = _RPS.search(out), _REQUESTS.search(out)
    if rps is None or requests is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    bad = _NON2XX.search(out)
    socket_errors = _SOCKET.search(out)
    if bad or (socket_errors and any(int(n) for n in socket_errors.groups())):
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    return float(rps[1]), int(requests[1])


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _with_children(pids: list[int]) -> list[int]:
    """The pids and their child processes (nginx workers), where Linux's /proc tells."""
    out = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return out


def _cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds the processes used so far (None without Linux's /proc)."""
    total = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None
    return total / _TICK


@dataclasses.dataclass
class Result:
    rps: list[float] = dataclasses.field(default_factory=list)  # per round
    cpu_us: list[float] = dataclasses.field(default_factory=list)  # server CPU per request

    def measure(self, url: str, script: Path, pids: list[int]) -> None:
        before = _cpu_s(pids)
        rps, requests = wrk(url, WINDOW_S, script)
        after = _cpu_s(pids)
        self.rps.append(rps)
        if before is not None and after is not None:
            self.cpu_us.append((after - before) / requests * 1e6)


def _ensure_debian(packages: tuple[str, ...]) -> list[str]:
    """Install missing Debian packages with apt-get (root only); returns those still missing."""
    missing = [p for p in packages if shutil.which(p) is None]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return missing
    print(f"installing Debian package(s) {' '.join(missing)} (apt-get), for benchmarks only")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    for cmd in (["apt-get", "update", "-qq"], install):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            break
    if "nginx" in missing and Path("/run/systemd/system").is_dir():  # only the binary is used
        subprocess.run(["systemctl", "disable", "--now", "nginx.service"], capture_output=True)
    return [p for p in packages if shutil.which(p) is None]


def bench(configs: list[str] | None = None, rounds: int = ROUNDS) -> dict[str, Result] | None:
    """Each configuration's rounds (CONFIGS' keys by default; the first must be "a")."""
    configs = list(configs or CONFIGS)
    missing = _ensure_debian(("wrk", "nginx") if "c" in configs else ("wrk",))
    if "wrk" in missing:
        print(
            "middleware benchmark skipped: `wrk` is not installed and cannot be installed here"
            " (apt-get install wrk, as root)"
        )
        return None
    if importlib.util.find_spec("starlette") is None:
        print("middleware benchmark skipped: starlette is not installed (pip install starlette)")
        return None
    if "nginx" in missing:
        print("(c) skipped: `nginx` is not installed and cannot be installed here")
        configs.remove("c")
    if "d" in configs and importlib.util.find_spec("opentelemetry.instrumentation.asgi") is None:
        print("(d) skipped: pip install -e '.[bench]' (or run make bench) to run it")
        configs.remove("d")
    why = compiled_unavailable() if "f" in configs else None
    if why is not None:
        print(f"(f) skipped: {why}")
        configs.remove("f")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshlib-bench-")))
        tmp.chmod(0o755)
        script = tmp / "traceparent.lua"
        script.write_text(lua_script(traceparents()))
        meshed_script = tmp / "meshed-caller.lua"
        meshed_script.write_text(lua_script(traceparents(), CALLER_IDENTITY))
        scripts = {key: meshed_script if key == "g" else script for key in configs}
        started: dict[str, tuple[int, Server]] = {}
        free = _Ports(len(configs) + 2)  # the apps and two nginx
        for key in configs:
            if key != "c" and key not in SERVED_BY:
                root = COMPILED_ROOT if key == "f" else ROOT
                started[key] = uvicorn(stack, tmp, FACTORIES[key], free.take(), root)
        for key, (port, proc) in started.items():
            _wait_ready(f"http://127.0.0.1:{port}/", proc, f"uvicorn ({key})")
        ports = {key: port for key, (port, _) in started.items()}
        pids = {key: [proc.pid] for key, (_, proc) in started.items()}
        if "c" in configs:
            inner, inner_proc = nginx(stack, tmp, "inner", ports["a"], free.take())
            _wait_ready(f"http://127.0.0.1:{inner}/", inner_proc, "nginx (inner)")
            outer, outer_proc = nginx(stack, tmp, "outer", inner, free.take())
            _wait_ready(f"http://127.0.0.1:{outer}/", outer_proc, "nginx (outer)")
            ports["c"] = outer
            pids["c"] = [*pids["a"], *_with_children([inner_proc.pid, outer_proc.pid])]
        for key, server in SERVED_BY.items():
            if key in configs:
                ports[key], pids[key] = ports[server], pids[server]
        if "g" in configs:
            _check_identity_answered(f"http://127.0.0.1:{ports['g']}/")
        urls = {key: f"http://127.0.0.1:{ports[key]}/" for key in configs}
        for key in configs:
            wrk(urls[key], WARMUP_S, scripts[key])
        results = {key: Result() for key in configs}
        for r in range(rounds):
            for key in configs if r % 2 == 0 else configs[::-1]:
                results[key].measure(urls[key], scripts[key], pids[key])
        for key, (_, proc) in started.items():  # each figure came from its own server
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn ({key}) exited: {proc.log.read_text()}")
    return results


# -- in-process: what each middleware adds per request, no socket ---------------------------


def _scopes(identity: str | None = None) -> list[dict[str, Any]]:
    scopes = []
    for tp, rid in traceparents():
        headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"wrk"),
            (b"traceparent", tp.encode()),
            (b"x-request-id", rid.encode()),
        ]
        if identity is not None:
            headers.append((b"x-meshlib-peer-metadata", identity.encode()))
        scopes.append(
            {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": "/",
                "raw_path": b"/",
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
            }
        )
    return scopes


def _driver(app: Any, identity: str | None = None) -> Callable[[int], None]:
    """Calls `app` n times with the wrk request mix, in one event loop."""
    scopes = _scopes(identity)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def many(n: int) -> None:
        statuses: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        for i in range(n):
            await app(dict(scopes[i % len(scopes)]), receive, send)
        if statuses.count(200) != n:
            raise RuntimeError(f"unexpected statuses {set(statuses)}")

    return lambda n: asyncio.run(many(n))


def inprocess(configs: list[str]) -> dict[str, float]:
    """Mean µs per request per app (median over alternating rounds)."""
    factories = {"a": bare_app, "b": meshed_app, "d": otel_app, "e": floor_app, "g": meshed_app}
    drivers = {
        key: _driver(factories[key](), CALLER_IDENTITY if key == "g" else None)
        for key in configs
        if key in factories
    }
    for run in drivers.values():
        run(300)
    means: dict[str, list[float]] = {key: [] for key in drivers}
    keys = list(drivers)
    for r in range(INPROCESS_ROUNDS):
        for key in keys if r % 2 == 0 else keys[::-1]:
            start = time.perf_counter()
            drivers[key](INPROCESS_N)
            means[key].append((time.perf_counter() - start) / INPROCESS_N * 1e6)
    return {key: statistics.median(values) for key, values in means.items()}


# -- report ---------------------------------------------------------------------------------


def _per_round(result: Result, bare: Result) -> list[float]:
    """Each round's throughput over the bare app's in the same round."""
    return [v / b for v, b in zip(result.rps, bare.rps, strict=True)]


def _ratio(result: Result, bare: Result) -> float:
    """The configuration's throughput ratio to bare: the median of its per-round ratios."""
    return statistics.median(_per_round(result, bare))


def main() -> None:
    start = time.perf_counter()
    print(
        f"inbound middleware: uvicorn (1 worker, httptools) per configuration, wrk -t{THREADS}"
        f" -c{CONNECTIONS}, {ROUNDS} rounds x {WINDOW_S} s after {WARMUP_S} s warm-up; wrk,"
        f" proxies and servers share this machine's {os.cpu_count()} cores; sampled spans"
        f" batched and serialised ({exporter_name()}), then dropped"
    )
    results = bench()
    if results is None:
        return
    mean = {key: statistics.fmean(result.rps) for key, result in results.items()}
    bare = mean["a"]
    ratio_of = {key: _ratio(result, results["a"]) for key, result in results.items()}
    width = max(len(CONFIGS[key]) for key in results)
    rounds = "  ".join(f"{f'round {r + 1}':>8}" for r in range(ROUNDS))
    print(f"\n{'configuration':<{width}}  {rounds}  {'req/s':>7}  vs bare  server CPU/req")
    for key, result in results.items():
        cells = "  ".join(f"{v:>8,.0f}" for v in result.rps)
        cpu = f"{statistics.median(result.cpu_us):>9.1f} µs" if result.cpu_us else f"{'-':>12}"
        per_round = _per_round(result, results["a"])
        spread = f"  (rounds {min(per_round):.2f}-{max(per_round):.2f})" if key != "a" else ""
        print(
            f"{CONFIGS[key]:<{width}}  {cells}  {mean[key]:>7,.0f}  {ratio_of[key]:>7.2f}"
            f"  {cpu}{spread}"
        )
    print(
        "(vs bare: the median of the per-round ratios; server CPU/req: user + system CPU of"
        " the server processes per request served, median of the rounds; (c) counts the app and"
        " both nginx)"
    )
    ratio = ratio_of["b"]
    print(f"meshlib vs bare: {ratio:.2f} (goal >= {GOAL}: {'ok' if ratio >= GOAL else 'MISSED'})")
    if "f" in ratio_of:
        compiled = ratio_of["f"]
        print(f"compiled build vs bare: {compiled:.2f} ({'ok' if compiled >= GOAL else 'MISSED'})")
    print(f"the floor (e) vs bare: {ratio_of['e']:.2f}")
    if "g" in ratio_of:
        print(f"meshlib, meshed caller (g) vs bare: {ratio_of['g']:.2f}")

    us = inprocess(list(results))
    print(f"\nin-process, no socket: µs per request (median of {INPROCESS_ROUNDS} rounds)")
    for key, value in us.items():
        added = f"  +{value - us['a']:.1f} µs" if key != "a" else ""
        print(f"{CONFIGS[key]:<{width}}  {value:>6.1f} µs{added}")
    budget = (1 / GOAL - 1) / bare * 1e6
    print(
        f"budget for {GOAL} at {bare:,.0f} req/s bare: +{budget:.0f} µs of server CPU per request"
    )
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


# -- parts (python -m bench.middleware --parts) ---------------------------------------------


def parts() -> None:
    """(b)'s server cost taken apart: each part served on its own, under the same load."""
    start = time.perf_counter()
    print(
        f"inbound middleware, taken apart: uvicorn per configuration, wrk -t{THREADS}"
        f" -c{CONNECTIONS}, {PARTS_ROUNDS} rounds x {WINDOW_S} s; server CPU per request"
        " (median of the rounds) and what each row adds to the one before"
    )
    results = bench(list(PARTS), rounds=PARTS_ROUNDS)
    if results is None:
        return
    width = max(map(len, PARTS.values()))
    cpu = {key: statistics.median(result.cpu_us) for key, result in results.items()}
    previous = None
    for key, result in results.items():
        before = "a" if key == "s" else previous  # the calibration adds to bare alone
        added = f"  {cpu[key] - cpu[before]:+5.1f} µs" if before else ""
        ratio = _ratio(result, results["a"])
        print(f"{PARTS[key]:<{width}}  {cpu[key]:>6.1f} µs  {ratio:>5.2f} of bare{added}")
        previous = key
    print("((u) over (e): what meshlib does beyond the floor; (b) over (u): 1% traces exported;")
    print(f" (s) over (a): what {SPIN_US} µs of in-process work costs in the server)")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


# -- profile (python -m bench.middleware --profile) -----------------------------------------


def profile(n: int = 20_000, top: int = 20) -> None:
    """cProfile of the meshed app in-process; meshlib functions by inclusive time."""
    run = _driver(meshed_app())
    run(500)
    profiler = cProfile.Profile()
    profiler.enable()
    run(n)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in raw.values())
    package = str(ROOT / "meshlib")
    rows = []
    for (file, line, func), (_, calls, tt, ct, _) in raw.items():
        if file.startswith(package):
            rows.append((ct, tt, calls, f"{Path(file).relative_to(ROOT)}:{line}({func})"))
    rows.sort(reverse=True)
    print(
        f"meshed Starlette app in-process, {n} requests, {total / n * 1e6:.1f} µs each (profiled)"
    )
    print(f"{'incl%':>6} {'self%':>6} {'calls/req':>9}  function")
    for ct, tt, calls, name in rows[:top]:
        print(f"{ct / total:>6.1%} {tt / total:>6.1%} {calls / n:>9.1f}  {name}")
    by_package: dict[str, float] = {}
    names = ("meshlib", "starlette", "opentelemetry", "prometheus_client", "asyncio", "bench")
    for (file, _, _), (_, _, tt, _, _) in raw.items():
        parts = Path(file).parts
        name = next((p for p in names if p in parts), "other")
        by_package[name] = by_package.get(name, 0.0) + tt
    shares = sorted(by_package.items(), key=lambda item: -item[1])
    print("self time by package: " + ", ".join(f"{k} {v / total:.0%}" for k, v in shares))
    print("\nall functions by self time:")
    stats.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    if "--profile" in sys.argv[1:]:
        profile()
    elif "--parts" in sys.argv[1:]:
        parts()
    else:
        main()
