"""`make demo` headless: the bookinfo demo runs once through every scenario and its numbers hold.

The test runs `make demo ARGS="--rounds 1 --step 7 --rate 50 --workdir <tmp>"` with stdout
a pipe (so the demo prints plain lines, no ANSI), then reads the summary it printed:

    summary reviews-90-10: seconds=7.2 pages=351 ok=100.0% reviews=v1:316,v2:35 ...
    trace 1c57dbdd...: productpage v1 -> reviews v2 -> ratings v1 (7 spans, parent links ok)

and checks the 90/10 canary split, jason's requests on reviews v2, the ratings faults in the
success rate, one trace id across productpage -> reviews -> ratings, and that no process the
demo started is left behind. About 80 s: 8 scenarios of 7 s once loaded, plus loading each,
start-up and the trace check.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent
SCENARIOS = sorted((ROOT / "examples" / "bookinfo" / "scenarios").glob("*.yaml"))
STEP = 7.0  # seconds per scenario
# Once through every scenario (--rounds 1, not a duration: loading each policy and letting the
# previous scenario's delayed calls end take extra time, more on a slow machine); the limit
# leaves room for that, for start-up and for the trace check.
DURATION = STEP * len(SCENARIOS)
LIMIT = 2 * DURATION + 60
RATE = 50  # pages per second: ~350 counted pages per 7 s scenario
# The canary's reviews v2 share must be 10% ± 9 points. The split is drawn afresh every run;
# with >= 200 counted pages the standard deviation of the share is at most 2.1 points, and
# the exact binomial tail outside the bound is 4e-5 (1.3e-6 at ~290 pages; ±6
# points failed 1 run in 300-1,400). Every jason page on v2 and no other is the sharp check.
CANARY_SHARE, CANARY_TOLERANCE, CANARY_MIN_PAGES = 0.10, 0.09, 200
MARKER = "MESHLIB_DEMO_TEST_RUN"  # in every demo process's environment, to find leftovers

pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
    pytest.mark.timeout(LIMIT + 60),  # the fixture's own limit comes first
]


@dataclass
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    workdir: Path
    marker: str
    summary: dict[str, dict[str, str]]


def processes_with(marker: str) -> list[int]:
    """Processes whose environment holds MARKER=marker (zombies have no environment)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def parse_summary(stdout: str) -> dict[str, dict[str, str]]:
    """{scenario: {key: value}} from the `summary <scenario>: k=v k=v ...` lines."""
    summary = {}
    for match in re.finditer(r"^summary (\S+): (.*)$", stdout, re.MULTILINE):
        summary[match[1]] = dict(re.findall(r"(\S+?)=(\S+)", match[2]))
    return summary


def counts(value: str) -> dict[str, int]:
    """'v1:262,v2:31' -> {'v1': 262, 'v2': 31}; '-' -> {}."""
    if value == "-":
        return {}
    return {k: int(v) for k, v in (item.split(":") for item in value.split(","))}


def pct(value: str) -> float:
    return float(value.rstrip("%"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    workdir = tmp_path_factory.mktemp("demo")
    marker = uuid.uuid4().hex
    args = f"--rounds 1 --step {STEP:g} --rate {RATE} --workdir {workdir}"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "demo", f"ARGS={args}"],
        cwd=ROOT,
        env={**os.environ, MARKER: marker},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, to stop it whole if it hangs
    )
    try:
        stdout, stderr = make.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(make.pid, signal.SIGTERM)  # the demo stops its services on SIGTERM
        stdout, stderr = make.communicate(timeout=20)
        pytest.fail(f"make demo did not finish in {LIMIT:g} s:\n{stdout}\n{stderr}")
    return DemoRun(make.returncode, stdout, stderr, workdir, marker, parse_summary(stdout))


def test_demo_runs_headless_and_leaves_nothing_behind(demo: DemoRun) -> None:
    assert demo.returncode == 0, f"{demo.stdout}\n{demo.stderr}"
    assert "\x1b" not in demo.stdout, "not a terminal: plain lines, no ANSI escapes"
    assert "7/7 ready" in demo.stdout
    assert " · round 1 of 1: " in demo.stdout  # the plain view's headings count the rounds
    assert len(demo.summary) == len(SCENARIOS), demo.stdout
    not_reached = [name for name, fields in demo.summary.items() if not fields]
    assert not not_reached, f"scenarios not reached: {not_reached}\n{demo.stdout}"
    # Every scenario, the first included (mesh.yaml already holds it), was loaded in time.
    assert "had loaded scenario" not in demo.stdout, demo.stdout
    deadline = time.monotonic() + 5
    while (left := processes_with(demo.marker)) and time.monotonic() < deadline:
        time.sleep(0.1)  # processes killed a moment ago may still be on their way out
    assert not left, f"demo processes left behind: {left}"
    # The Prometheus targets file was written, and emptied on the way out.
    assert (demo.workdir / "targets.json").read_text().strip() == "[]"
    assert sorted(p.name for p in (demo.workdir / "logs").glob("*.log")) == sorted(
        f"{name}.log"
        for name in (
            *("productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3"),
            *("ratings-v1", "ratings-v2-flaky"),
        )
    )


def test_canary_splits_reviews_90_10(demo: DemoRun) -> None:
    canary = demo.summary["reviews-90-10"]
    reviews = counts(canary["reviews"])
    pages = int(canary["pages"])
    assert pages >= CANARY_MIN_PAGES, canary
    assert set(reviews) <= {"v1", "v2"} and sum(reviews.values()) == pages, canary
    share = reviews.get("v2", 0) / pages
    assert abs(share - CANARY_SHARE) <= CANARY_TOLERANCE, canary
    # meshlib's own metrics (productpage's view of reviews) count the same split.
    mesh = counts(canary["mesh-reviews"])
    assert abs(mesh.get("v2", 0) / sum(mesh.values()) - CANARY_SHARE) <= CANARY_TOLERANCE


def test_jason_goes_to_reviews_v2(demo: DemoRun) -> None:
    routed = demo.summary["reviews-jason-v2"]
    jason = int(routed["jason"])
    reviews = counts(routed["reviews"])
    assert jason >= 30, routed
    assert int(routed["jason-on-v2"]) == jason, routed
    assert reviews.get("v2", 0) == jason, routed  # nobody else
    assert reviews.get("v1", 0) == int(routed["pages"]) - jason, routed
    assert pct(routed["ratings-success"]) == 100.0, routed  # v2 calls ratings, which is fine
    for before in ("all-v1", "reviews-90-10"):
        assert int(demo.summary[before]["jason"]) > 0
    assert int(demo.summary["all-v1"]["jason-on-v2"]) == 0


def test_ratings_faults_show_in_success_rate(demo: DemoRun) -> None:
    delay = demo.summary["ratings-delay-jason"]  # ratings slow for jason: his page times out
    assert float(delay["ratings-p99"].removesuffix("ms")) >= 1500, delay
    assert counts(delay["reviews"]).get("unavailable", 0) == int(delay["jason"]), delay

    abort = demo.summary["ratings-abort-jason"]  # every ratings call is jason's, aborted
    assert int(float(abort["ratings-calls"])) >= 10, abort
    assert pct(abort["ratings-success"]) == 0.0, abort

    timeout = demo.summary["reviews-timeout"]  # productpage's route gives reviews 0.5 s
    assert counts(timeout["reviews"]) == {"unavailable": int(timeout["pages"])}, timeout

    flaky = demo.summary["ratings-flaky"]  # 30% of ratings calls fail, none retried
    retried = demo.summary["ratings-flaky-retries"]  # the same, retried up to 3 times
    assert int(float(flaky["ratings-calls"])) >= 100, flaky
    assert 50.0 <= pct(flaky["ratings-success"]) <= 85.0, flaky
    assert pct(retried["ratings-success"]) >= 95.0, retried


def test_one_trace_across_productpage_reviews_ratings(demo: DemoRun) -> None:
    match = re.search(
        r"^trace ([0-9a-f]{32}): productpage v1 -> reviews v2 -> ratings v1 "
        r"\((\d+) spans, parent links ok\)$",
        demo.stdout,
        re.MULTILINE,
    )
    assert match, demo.stdout
    trace_id = match[1]
    # productpage's SERVER and 2 CLIENT spans, details', reviews' SERVER and CLIENT, ratings'.
    assert int(match[2]) >= 6
    for log in ("productpage-v1", "reviews-v2", "ratings-v1"):
        assert trace_id in (demo.workdir / "logs" / f"{log}.log").read_text(), log
