"""`make demo`: bookinfo on 127.0.0.1, meshed with meshlib, stepping through Istio's scenarios.

    make demo                                  # until Ctrl-C
    make demo ARGS="--duration 60 --step 8"    # stop by itself after a minute
    make demo ARGS="--rounds 1 --step 8"       # once through every scenario, however long it takes
    .venv/bin/python -m examples.bookinfo --help

It starts the seven bookinfo workloads (productpage under gunicorn with two workers; details,
reviews v1/v2/v3, ratings v1 and a flaky ratings under uvicorn) on ports the OS picks, writes
mesh.yaml for them, drives traffic at productpage, and steps through the scenarios of
examples/bookinfo/scenarios/ by rewriting mesh.yaml — the services pick it up live, and each
scenario holds for `--step` seconds once every process has loaded it. The terminal shows golden
signals per service and version from meshlib's own metrics. When it stops (Ctrl-C, SIGTERM,
`--duration` or `--rounds`) it checks one trace across the services, stops every process it
started, and prints a per-scenario summary.

Files, under --workdir (default .demo/ in the repository): mesh.yaml, logs/<workload>.log
(each service's stdout and stderr, spans included), targets.json (Prometheus file_sd).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

from examples.bookinfo import summary, traces
from examples.bookinfo.deployment import Deployed, bookinfo, deploy, write_targets
from examples.bookinfo.load import LoadGenerator
from examples.bookinfo.policy import load_scenarios, render, write_atomically
from examples.bookinfo.scrape import Scraper
from examples.bookinfo.stats import signals
from examples.bookinfo.summary import ScenarioResult
from examples.bookinfo.supervisor import Ports, Supervisor
from examples.bookinfo.view import Frame, LiveView, PlainView, make_view

ROOT = Path(__file__).resolve().parents[2]
TRACE_SCENARIO = "reviews-jason-v2"  # jason -> reviews v2 -> ratings v1, nothing failing
APPLY_TIMEOUT = 5.0  # seconds for every process to load a new mesh.yaml
# gunicorn merges its workers' policy generation (the highest live one): when it has gone up,
# one worker has the new policy and the other follows within one poll of the file (0.5 s).
SECOND_WORKER = 0.6
READY_TIMEOUT = 60.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make demo ARGS=...",
        description="The bookinfo demo: meshlib's golden signals while Istio scenarios change.",
    )
    option = parser.add_argument
    option(
        "--duration", type=float, metavar="SECONDS", help="stop after this long (default: Ctrl-C)"
    )
    option(
        "--rounds",
        type=int,
        metavar="N",
        help="stop after going through every scenario N times (default: Ctrl-C)",
    )
    option(
        "--step", type=float, default=10.0, metavar="SECONDS", help="per scenario, once loaded (10)"
    )
    option("--rate", type=float, default=40.0, metavar="N", help="page requests per second (40)")
    option("--jason", type=float, default=20.0, metavar="PERCENT", help="as end-user: jason (20)")
    option("--window", type=float, default=5.0, metavar="SECONDS", help="of metrics shown (5)")
    option(
        "--flaky-rate",
        type=float,
        default=0.3,
        metavar="SHARE",
        help="ratings v2-flaky fails (0.3)",
    )
    option("--workdir", type=Path, default=ROOT / ".demo", metavar="DIR", help="files (.demo/)")
    option("--plain", action="store_true", help="plain lines even on a terminal")
    option("--print-every", type=float, default=5.0, metavar="SECONDS", help="plain tables (5)")
    args = parser.parse_args(argv)
    if args.step <= 1 or args.rate <= 0 or not 0 <= args.jason <= 100:
        parser.error("--step must be > 1, --rate > 0 and --jason within 0-100")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class StartupError(Exception):
    pass


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir: Path = args.workdir.resolve()
        self.mesh_path = self.workdir / "mesh.yaml"
        self.logs = self.workdir / "logs"
        self.scenarios = load_scenarios()
        self.ports = Ports()
        self.deployed = deploy(bookinfo(args.flaky_rate), self.ports)
        self.productpage = next(d for d in self.deployed if d.workload.service == "productpage")
        self.supervisor = Supervisor(ROOT)
        self.view: PlainView | LiveView = (
            PlainView(every=args.print_every) if args.plain else make_view(every=args.print_every)
        )
        self.scraper = Scraper([d.target for d in self.deployed])
        self.results = [ScenarioResult(s) for s in self.scenarios]
        self.load = LoadGenerator(
            f"{self.productpage.url}/productpage",
            rate=args.rate,
            jason_share=args.jason / 100,
            scenario=lambda: self.active,
        )
        self.stop = asyncio.Event()
        self.current = 0  # the scenario in mesh.yaml
        self.round = 1  # how many times through the scenarios, this one included
        self.active: int | None = None  # the scenario being counted (None while applying)
        self.applied = 0  # processes that loaded the current mesh.yaml
        self.step_end = 0.0
        self.phase = "starting"  # what happens while no scenario is counted
        self.started = self.ended = 0.0
        self.failure: str | None = None
        self.trace: traces.TraceCheck | None = None
        self.trace_error: str | None = None

    # -- start-up ---------------------------------------------------------------------------

    def write_policy(self, index: int) -> bool:
        """Put scenario `index` in mesh.yaml; False when the file already held it."""
        endpoints = [d.endpoint for d in self.deployed]
        text = render(endpoints, self.scenarios[0], self.scenarios[index])
        self.current = index
        if self.mesh_path.is_file() and self.mesh_path.read_text() == text:
            return False
        write_atomically(self.mesh_path, text)
        return True

    def start_services(self) -> None:
        """Fresh logs, mesh.yaml with the first scenario, then every service process."""
        shutil.rmtree(self.logs, ignore_errors=True)
        shutil.rmtree(self.workdir / "multiproc", ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.write_policy(0)
        for deployed in self.deployed:
            self.supervisor.start(deployed.process(self.workdir))

    async def _ready(self, session: aiohttp.ClientSession, deployed: Deployed) -> bool:
        for url in (f"{deployed.url}/health", deployed.target.url):
            try:
                async with session.get(url) as response:
                    if response.status != 200:
                        return False
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False
        return True

    async def wait_ready(self) -> None:
        """Poll each service's /health and metrics port until all answer."""
        pending = {d.name: d for d in self.deployed}
        total, begun = len(pending), time.monotonic()
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                for process in self.supervisor.failed():
                    raise StartupError(
                        f"{process.name} exited with status {process.exit_code} while starting;"
                        f" the end of {process.log}:\n{process.log_tail()}"
                    )
                ready = await asyncio.gather(*(self._ready(session, d) for d in pending.values()))
                for name, ok in list(zip(pending, ready, strict=True)):
                    if ok:
                        del pending[name]
                waiting = f" (waiting for {', '.join(pending)})" if pending else ""
                self.view.progress(
                    f"starting {total} services on 127.0.0.1: {total - len(pending)}/{total}"
                    f" ready{waiting}"
                )
                if not pending:
                    self.ports.release()  # every service has bound its ports
                    break
                if time.monotonic() - begun > READY_TIMEOUT:
                    names = ", ".join(pending)
                    raise StartupError(f"not ready after {READY_TIMEOUT:.0f} s: {names}")
                await asyncio.sleep(0.1)
        self.view.message("")
        for d in self.deployed:
            self.view.message(f"  {d.name:18} {d.url}  metrics :{d.metrics_port}/stats/prometheus")
        self.view.message(f"ready in {time.monotonic() - begun:.1f} s")

    # -- scenarios --------------------------------------------------------------------------

    async def apply(self, index: int) -> None:
        """Rewrite mesh.yaml for scenario `index`; return when every process has loaded it."""
        before = dict(self.scraper.generations)
        if not self.write_policy(index):
            # The services serve it already (the first scenario, at start): a file holding the
            # same bytes is no new policy, so no process would load it again.
            self.applied = len(self.deployed)
            return
        self.applied = 0
        self.phase = "applying mesh.yaml"
        deadline = time.monotonic() + APPLY_TIMEOUT
        while True:
            await self.scraper.scrape()
            now = self.scraper.generations
            self.applied = sum(now.get(n, 0) > before.get(n, 0) for n in now)
            if self.applied == len(self.deployed):
                break
            if time.monotonic() > deadline:
                self.view.message(
                    f"warning: after {APPLY_TIMEOUT:.0f} s only {self.applied} of"
                    f" {len(self.deployed)} processes had loaded scenario"
                    f" {self.scenarios[index].name}"
                )
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(SECOND_WORKER)

    async def step_through(self) -> None:
        """Each scenario in turn, round and round until stopped.

        A scenario is counted for `--step` seconds from when every process has loaded it and
        the previous scenario's delayed calls have ended: how long that takes varies (more on
        a slow machine), so it is added to the step rather than taken from it, and `--rounds`
        counts whole scenarios where `--duration` may cut the last one short.
        """
        run = 0
        runs = self.args.rounds * len(self.scenarios) if self.args.rounds else None
        while not self.stop.is_set():
            index = run % len(self.scenarios)
            self.round = run // len(self.scenarios) + 1
            scenario = self.scenarios[index]
            self.view.message(
                f"=== {clock(time.monotonic() - self.started)} scenario {index + 1}/"
                f"{len(self.scenarios)} {scenario.name}: {scenario.title}\n"
                f"    look for: {scenario.hint}"
            )
            await self.apply(index)
            # A call the previous scenario delayed (a fault delay) may have started just before
            # its process loaded this scenario, and ends that much later: counting starts when
            # such calls are over, so they are not taken for this scenario's.
            previous = self.scenarios[(run - 1) % len(self.scenarios)] if run else None
            if previous is not None and previous.longest_delay:
                self.phase = "letting calls the previous scenario delayed end"
                await self._sleep(previous.longest_delay)
            begin, since = await self.scraper.scrape(), time.monotonic()
            self.step_end = since + self.args.step
            self.active = index
            await self._sleep(self.step_end - time.monotonic())
            self.active = None
            end = await self.scraper.scrape()
            result = self.results[index]
            result.runs += 1
            result.seconds += time.monotonic() - since
            result.metrics = result.metrics + end.since(begin)
            run += 1
            if run == runs:
                self.stop.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, seconds))

    # -- the live view ----------------------------------------------------------------------

    def frame(self) -> Frame:
        scenario = self.scenarios[self.current]
        elapsed = time.monotonic() - self.started
        of = f" of {clock(self.args.duration)}" if self.args.duration else ""
        if self.args.rounds:
            of += f" · round {self.round} of {self.args.rounds}"
        state = (
            f"next in {max(0.0, self.step_end - time.monotonic()):.0f} s"
            if self.active is not None
            else self.phase
        )
        window, seconds = self.scraper.window(self.args.window)
        rows = [(d.workload.service, d.workload.version) for d in self.deployed]
        last = self.load.last
        return Frame(
            heading=(
                f"scenario {self.current + 1}/{len(self.scenarios)} {scenario.name} · {state}"
                f" · {clock(elapsed)}{of}"
            ),
            title=scenario.title,
            hint=scenario.hint,
            signals=signals(window, seconds, rows, self.scraper.current),
            notes=[
                f"load: {self.args.rate:g} req/s to productpage, {self.args.jason:g}% as"
                f" end-user: jason, {self.load.in_flight} in flight",
                f"last page for jason: {last.jason} · for others: {last.others}",
                f"policy: {self.mesh_path} loaded by {self.applied}/{len(self.deployed)}"
                f" processes · metrics: last {seconds:.0f} s, scraped every second",
            ],
        )

    async def refresh(self) -> None:
        """Scrape every second, watch the processes, redraw."""
        while not self.stop.is_set():
            await self.scraper.scrape()
            failed = self.supervisor.failed()
            if failed:
                process = failed[0]
                self.failure = (
                    f"{process.name} exited with status {process.exit_code}; the end of"
                    f" {process.log}:\n{process.log_tail()}"
                )
                self.stop.set()
                break
            self.view.show(self.frame())
            await self._sleep(1.0)

    # -- the whole run ----------------------------------------------------------------------

    def _on_signal(self) -> None:
        self.stop.set()
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second one interrupts at once
            asyncio.get_running_loop().remove_signal_handler(signum)
            signal.signal(signum, _interrupt)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)
        await self.wait_ready()
        async with self.scraper:
            await self.scraper.scrape()
            self.started = time.monotonic()
            if self.args.duration:
                loop.call_later(self.args.duration, self.stop.set)
            tasks = [
                asyncio.create_task(self.load.run(self.stop)),
                asyncio.create_task(self.step_through()),
                asyncio.create_task(self.refresh()),
            ]
            await self.stop.wait()
            self.ended = time.monotonic()
            await asyncio.gather(*tasks)
            self.view.show(self.frame(), force=True)
            if self.failure is None:
                await self.check_trace()

    async def check_trace(self) -> None:
        """With traffic stopped: the jason -> reviews v2 scenario, and one traced request."""
        index = next(
            (i for i, s in enumerate(self.scenarios) if s.name == TRACE_SCENARIO), self.current
        )
        try:
            await self.apply(index)
            url = f"{self.productpage.url}/productpage"
            self.trace = await traces.check(url, self.logs)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.trace_error = f"trace check failed: {exc!r}"

    def report(self) -> list[str]:
        cumulative = self.scraper.current
        pages = sum(t.pages for t in self.load.tallies.values())
        lines = [
            "",
            f"Summary: {clock(self.ended - self.started)} of traffic, {self.load.sent}"
            f" requests sent, {pages} counted in scenarios (pages, ok, reviews, jason: the"
            " answers the load generator got; mesh-reviews, ratings: meshlib's metrics, as the"
            " callers saw them)",
            *summary.lines(self.results, self.load.tallies, cumulative),
            self.trace.line() if self.trace else (self.trace_error or "trace check not run"),
            f"logs: {self.logs}/ · policy: {self.mesh_path} · Prometheus targets:"
            f" {self.workdir / 'targets.json'}",
        ]
        return lines


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):  # until the event loop takes over
        signal.signal(signum, _interrupt)
    args = parse_args(argv)
    demo = Demo(args)
    targets = demo.workdir / "targets.json"
    status = 0
    try:
        demo.start_services()
        write_targets(targets, demo.deployed)
        asyncio.run(demo.run())
    except StartupError as exc:
        demo.failure, status = str(exc), 1
    except KeyboardInterrupt:
        status = 130
    finally:
        demo.view.close()
        demo.ports.release()
        print(f"stopping {len(demo.supervisor.processes)} service processes", flush=True)
        demo.supervisor.stop()
        write_atomically(targets, "[]\n")  # Prometheus drops the demo's targets
    if demo.failure:
        print(f"demo failed: {demo.failure}", file=sys.stderr)
        return 1
    if status == 0:
        print("\n".join(demo.report()))
    return status


if __name__ == "__main__":
    sys.exit(main())
