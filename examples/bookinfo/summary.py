"""The end-of-demo summary: per scenario, what the load generator saw and what metrics counted.

One line per scenario, in `key=value` form so that a person can read it and a test can parse
it (tests/e2e/test_demo.py does):

    summary reviews-90-10: seconds=7.2 pages=351 ok=100.0% reviews=v1:316,v2:35 v2-share=10.0%
      stars=10.0% jason=70 jason-on-v2=8 mesh-reviews=v1:321,v2:37 ratings-calls=37
      ratings-success=100.0% ratings-p99=9.4ms

(one line, wrapped here). pages, ok, reviews, v2-share, stars, jason and jason-on-v2 come from
the answers the load generator received (reviews: the version that answered, or "unavailable";
stars: the share of pages that showed ratings); mesh-reviews and ratings-* from meshlib's
metrics, in the callers' view.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from examples.bookinfo.load import Tally
from examples.bookinfo.policy import Scenario
from examples.bookinfo.stats import SOURCE, Totals, service_p99, service_success
from examples.bookinfo.view import millis, percent


@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: int = 0
    seconds: float = 0.0  # time counted (from "applied everywhere" to the next scenario)
    metrics: Totals = field(default_factory=Totals)


def counts(counter: Counter[str]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in sorted(counter.items())) or "-"


def line(result: ScenarioResult, tally: Tally | None, cumulative: Totals) -> str:
    name = result.scenario.name
    if not result.runs or tally is None:
        return f"summary {name}: not reached"
    window = result.metrics
    mesh_reviews: Counter[str] = Counter()
    for (reporter, service, version, _), value in window.requests.items():
        if reporter == SOURCE and service == "reviews":
            mesh_reviews[version] += int(value)
    calls, success = service_success(window, "ratings", cumulative)
    p99 = service_p99(window, "ratings", cumulative)
    fields = {
        "seconds": f"{result.seconds:.1f}",
        "pages": str(tally.pages),
        "ok": percent(tally.ok / tally.pages if tally.pages else None),
        "reviews": counts(tally.reviews),
        "v2-share": percent(tally.reviews["v2"] / tally.ok if tally.ok else None),
        "stars": percent(tally.ratings_shown / tally.ok if tally.ok else None),
        "jason": str(tally.jason),
        "jason-on-v2": str(tally.jason_reviews["v2"]),
        "mesh-reviews": counts(mesh_reviews),
        "ratings-calls": f"{calls:g}",
        "ratings-success": percent(success),
        "ratings-p99": millis(p99) + ("ms" if p99 is not None else ""),
    }
    return f"summary {name}: " + " ".join(f"{k}={v}" for k, v in fields.items())


def lines(
    results: Sequence[ScenarioResult], tallies: dict[int, Tally], cumulative: Totals
) -> list[str]:
    return [line(r, tallies.get(i), cumulative) for i, r in enumerate(results)]
