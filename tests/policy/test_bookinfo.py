"""Istio's bookinfo networking samples (our own equivalents) load with Istio's meaning."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshlib.cli import main
from meshlib.config import MeshConfig
from meshlib.policy.loader import load_paths
from meshlib.policy.snapshot import Snapshot
from tests.conftest import BOOKINFO

NETWORKING = BOOKINFO / "networking"
SERVICES = BOOKINFO / "services.yaml"
REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"


def routes(capsys: pytest.CaptureFixture[str], *files: str, **request: Any) -> dict[str, Any]:
    """Run `meshlib routes ... --output json` and return the decoded contract."""
    argv = ["routes", *(str(NETWORKING / f) for f in files), str(SERVICES)]
    argv += ["--host", request.pop("host"), "--output", "json"]
    for name, value in request.pop("headers", {}).items():
        argv += ["--header", f"{name}={value}"]
    for key, value in request.items():
        argv += [f"--{key}", value]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def split(explained: dict[str, Any]) -> dict[str | None, float]:
    return {d["subset"]: d["weight"] for d in explained["destinations"]}


@pytest.mark.parametrize("file", sorted(p.name for p in NETWORKING.glob("*.yaml")))
def test_every_sample_loads_without_errors(file: str) -> None:
    """Each sample file loads with no error (gateways are warnings, never errors)."""
    result = load_paths([NETWORKING / file, SERVICES])
    assert result.errors == ()
    assert result.resources


def test_reviews_90_10(capsys: pytest.CaptureFixture[str]) -> None:
    """The 90/10 canary shows both subsets with their shares and endpoints."""
    out = routes(
        capsys,
        "destination-rule-all.yaml",
        "virtual-service-reviews-90-10.yaml",
        host="reviews:9080",
    )
    assert out["host"] == REVIEWS
    assert out["virtualService"] == "default/reviews"
    assert out["route"] == {"index": 0, "name": None}
    assert split(out) == {"v1": 90, "v2": 10}
    assert [d["endpoints"] for d in out["destinations"]] == [
        ["127.0.0.1:19083"],
        ["127.0.0.1:19084"],
    ]
    assert all(d["port"] == 9080 for d in out["destinations"])


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        pytest.param("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}, id="80-20"),
        pytest.param("virtual-service-reviews-50-v3.yaml", {"v1": 50, "v3": 50}, id="50-v3"),
        pytest.param("virtual-service-reviews-v2-v3.yaml", {"v2": 50, "v3": 50}, id="v2-v3"),
        pytest.param("virtual-service-reviews-v3.yaml", {"v3": 100}, id="v3"),
        pytest.param("virtual-service-all-v1.yaml", {"v1": 100}, id="all-v1"),
        pytest.param("virtual-service-ratings-db.yaml", {"v3": 100}, id="ratings-db"),
    ],
)
def test_reviews_splits(
    capsys: pytest.CaptureFixture[str], file: str, expected: dict[str, float]
) -> None:
    """Each reviews scenario sends the documented shares to each subset."""
    out = routes(capsys, "destination-rule-all.yaml", file, host="reviews")
    assert split(out) == expected


@pytest.mark.parametrize(
    ("user", "subset", "index"),
    [
        pytest.param("jason", "v2", 0, id="jason"),
        pytest.param("alice", "v1", 1, id="someone-else"),
        pytest.param(None, "v1", 1, id="anonymous"),
    ],
)
def test_end_user_jason_goes_to_v2(
    capsys: pytest.CaptureFixture[str], user: str | None, subset: str, index: int
) -> None:
    """The test-v2 route sends end-user: jason to v2 and everyone else to v1."""
    headers = {"end-user": user} if user else {}
    out = routes(
        capsys,
        "destination-rule-all.yaml",
        "virtual-service-reviews-test-v2.yaml",
        host="reviews",
        headers=headers,
    )
    assert split(out) == {subset: 100}
    assert out["route"]["index"] == index


def test_jason_v2_others_v3(capsys: pytest.CaptureFixture[str]) -> None:
    """The jason-v2-v3 scenario splits by user between v2 and v3."""
    files = ("destination-rule-all.yaml", "virtual-service-reviews-jason-v2-v3.yaml")
    assert split(routes(capsys, *files, host="reviews", headers={"end-user": "jason"})) == {
        "v2": 100
    }
    assert split(routes(capsys, *files, host="reviews")) == {"v3": 100}


def test_ratings_abort_for_jason(capsys: pytest.CaptureFixture[str]) -> None:
    """jason's ratings requests are aborted with 500 at 100%; others are untouched."""
    files = ("destination-rule-all.yaml", "virtual-service-ratings-test-abort.yaml")
    jason = routes(capsys, *files, host="ratings", headers={"end-user": "jason"})
    assert jason["fault"] == {"abort": {"httpStatus": 500, "percentage": 100.0}}
    assert split(jason) == {"v1": 100}
    assert routes(capsys, *files, host="ratings")["fault"] is None


def test_ratings_delay_for_jason(capsys: pytest.CaptureFixture[str]) -> None:
    """jason's ratings requests are delayed 7s at 100%."""
    files = ("destination-rule-all.yaml", "virtual-service-ratings-test-delay.yaml")
    jason = routes(capsys, *files, host="ratings", headers={"end-user": "jason"})
    assert jason["fault"] == {"delay": {"fixedDelay": "7s", "percentage": 100.0}}


def test_details_abort_555(capsys: pytest.CaptureFixture[str]) -> None:
    """The details fault sample aborts every request with 555."""
    out = routes(capsys, "fault-injection-details-v1.yaml", host="details")
    assert out["fault"]["abort"] == {"httpStatus": 555, "percentage": 100.0}
    assert split(out) == {"v1": 100}


def test_ratings_mysql_subsets(capsys: pytest.CaptureFixture[str]) -> None:
    """The ratings-mysql scenarios route ratings to the mysql subsets and their endpoints."""
    out = routes(
        capsys, "destination-rule-all.yaml", "virtual-service-ratings-mysql.yaml", host="ratings"
    )
    assert split(out) == {"v2-mysql": 100}
    assert out["destinations"][0]["endpoints"] == ["127.0.0.1:19088"]
    vm = routes(
        capsys, "destination-rule-all.yaml", "virtual-service-ratings-mysql-vm.yaml", host="ratings"
    )
    assert split(vm) == {"v2-mysql-vm": 100}


def test_gateway_bound_virtual_service_does_not_apply_to_the_mesh() -> None:
    """A VirtualService bound to a Gateway only is ignored, as a sidecar ignores it."""
    result = load_paths([NETWORKING / "bookinfo-gateway.yaml", SERVICES])
    snapshot = Snapshot.build(result.resources, MeshConfig())
    assert snapshot.virtual_host("productpage.default.svc.cluster.local") is None
    assert any("Gateway" in (w.resource or "") for w in result.warnings)


def test_reviews_random_load_balancer() -> None:
    """destination-rule-reviews sets RANDOM for every subset."""
    result = load_paths([NETWORKING / "destination-rule-reviews.yaml", SERVICES])
    snapshot = Snapshot.build(result.resources, MeshConfig())
    for subset in ("v1", "v2", "v3"):
        policy = snapshot.traffic_policy(REVIEWS, subset, 9080)
        assert policy.load_balancer is not None
        assert policy.load_balancer.algorithm == "RANDOM"


def test_all_mtls_sets_istio_mutual() -> None:
    """destination-rule-all-mtls asks for Istio mTLS on every service."""
    result = load_paths([NETWORKING / "destination-rule-all-mtls.yaml", SERVICES])
    snapshot = Snapshot.build(result.resources, MeshConfig())
    for host in (REVIEWS, RATINGS, "details.default.svc.cluster.local"):
        tls = snapshot.traffic_policy(host, "v1", 9080).tls
        assert tls is not None and tls.mode == "ISTIO_MUTUAL"


def test_egress_google_apis_port_rewrite_and_tls_origination(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Port 80 requests to googleapis route to port 443, where the DR originates TLS."""
    out = routes(capsys, "egress-rule-google-apis.yaml", host="www.googleapis.com:80")
    assert out["virtualService"] == "default/rewrite-port-for-googleapis"
    assert out["destinations"][0]["port"] == 443
    assert out["destinations"][0]["endpoints"] == ["www.googleapis.com:443"]
    result = load_paths([NETWORKING / "egress-rule-google-apis.yaml"])
    snapshot = Snapshot.build(result.resources, MeshConfig())
    port_443 = snapshot.traffic_policy("www.googleapis.com", None, 443)
    assert port_443.tls is not None and port_443.tls.mode == "SIMPLE"
    assert port_443.load_balancer is None  # port-level settings replace the whole policy
    assert (
        snapshot.traffic_policy("www.googleapis.com", None, 80).load_balancer.algorithm
        == "ROUND_ROBIN"
    )


def test_port_match_only_applies_to_that_port(capsys: pytest.CaptureFixture[str]) -> None:
    """A request to googleapis on 443 matches no route of the port-80 VirtualService (404 NR)."""
    out = routes(capsys, "egress-rule-google-apis.yaml", host="www.googleapis.com", scheme="https")
    assert out["virtualService"] == "default/rewrite-port-for-googleapis"
    assert out["route"] is None
    assert out["destinations"] == []
