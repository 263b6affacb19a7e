"""Load balancers: distributions, unusable endpoints, consistent hashing, hash keys, InFlight.

Statistical tests draw from a fixed `random.Random(seed)` and state their tolerance; the
bounds are several standard deviations wide, so they hold for any seed.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from meshlib.dataplane import balancer as balancer_module
from meshlib.dataplane.balancer import (
    Balancer,
    InFlight,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    cookie_value,
    hash_key,
    make_balancer,
)
from meshlib.policy.common import Duration
from meshlib.policy.destination_rule import (
    ConsistentHashLB,
    HTTPCookie,
    LoadBalancerSettings,
    MagLev,
    RingHash,
)
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Endpoint

SEED = 20240611

ROUND_ROBIN = LoadBalancerSettings(simple="ROUND_ROBIN")
RANDOM = LoadBalancerSettings(simple="RANDOM")
HASH = LoadBalancerSettings(consistent_hash=ConsistentHashLB(http_header_name="x-user"))
ALL_SETTINGS = {
    "default": None,
    "LEAST_REQUEST": LoadBalancerSettings(simple="LEAST_REQUEST"),
    "ROUND_ROBIN": ROUND_ROBIN,
    "RANDOM": RANDOM,
    "PASSTHROUGH": LoadBalancerSettings(simple="PASSTHROUGH"),
    "CONSISTENT_HASH": HASH,
}


def endpoints(*weights: int) -> tuple[Endpoint, ...]:
    """Endpoints 10.0.0.<i>:8080 with the given weights."""
    return tuple(Endpoint(f"10.0.0.{i}", 8080, weight=w) for i, w in enumerate(weights))


def everyone(endpoint: Endpoint) -> bool:
    """A `usable` predicate that accepts every endpoint."""
    return True


def tally(
    balancer: Balancer, eps: Sequence[Endpoint], picks: int, key: str | None = None
) -> Counter[str]:
    """How often each endpoint was picked, by address."""
    counts: Counter[str] = Counter()
    for _ in range(picks):
        chosen = balancer.pick(eps, everyone, key)
        assert chosen is not None
        counts[chosen.address] += 1
    return counts


def share(counts: Counter[str], address: str) -> float:
    """The percentage of picks that went to `address`."""
    return 100 * counts[address] / sum(counts.values())


# InFlight


def test_in_flight_counts_and_never_goes_negative() -> None:
    """start/finish move the count per key, and finishing an idle key leaves it at zero."""
    in_flight = InFlight()
    in_flight.start("a:1")
    in_flight.start("a:1")
    in_flight.finish("a:1")
    in_flight.finish("b:1")
    assert (in_flight.get("a:1"), in_flight.get("b:1")) == (1, 0)
    in_flight.finish("a:1")
    in_flight.finish("a:1")
    assert in_flight.get("a:1") == 0


def test_in_flight_is_exact_under_eight_threads() -> None:
    """8 threads x 10,000 concurrent starts, then as many finishes, count exactly."""
    in_flight = InFlight()
    barrier = threading.Barrier(8)

    def run(step: str) -> None:
        barrier.wait()
        for _ in range(10_000):
            getattr(in_flight, step)("10.0.0.1:80")

    for step, expected in (("start", 80_000), ("finish", 0)):
        threads = [threading.Thread(target=run, args=(step,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert in_flight.get("10.0.0.1:80") == expected


# make_balancer and behaviour every algorithm shares


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        (None, LeastRequestBalancer),
        (LoadBalancerSettings(simple="UNSPECIFIED"), LeastRequestBalancer),
        (LoadBalancerSettings(simple="LEAST_CONN"), LeastRequestBalancer),
        (LoadBalancerSettings(simple="LEAST_REQUEST"), LeastRequestBalancer),
        (ROUND_ROBIN, RoundRobinBalancer),
        (RANDOM, RandomBalancer),
        (LoadBalancerSettings(simple="PASSTHROUGH"), RandomBalancer),
        (HASH, RingHashBalancer),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_make_balancer_follows_the_algorithm(
    settings: LoadBalancerSettings | None, kind: type
) -> None:
    """Each loadBalancer setting gets its balancer; unset means LEAST_REQUEST (Istio >= 1.14)."""
    assert isinstance(make_balancer(settings, InFlight()), kind)


@pytest.mark.parametrize("name", ALL_SETTINGS)
@pytest.mark.parametrize(
    "weights", [(1, 1, 1, 1, 1, 1), (1, 2, 3, 1, 2, 3)], ids=["equal", "weighted"]
)
def test_unusable_endpoints_are_never_chosen(name: str, weights: tuple[int, ...]) -> None:
    """Across 2,000 picks (hash keys varying), an endpoint `usable` rejects is never returned."""
    eps = endpoints(*weights)
    balancer = make_balancer(ALL_SETTINGS[name], InFlight(), random.Random(SEED))
    banned = {str(eps[0]), str(eps[2]), str(eps[3])}
    seen = set()
    for i in range(2_000):
        chosen = balancer.pick(eps, lambda e: str(e) not in banned, f"user-{i}")
        assert chosen is not None
        assert str(chosen) not in banned
        seen.add(str(chosen))
    assert seen == {str(e) for e in eps} - banned


@pytest.mark.parametrize("name", ALL_SETTINGS)
def test_none_when_no_endpoint_is_usable(name: str) -> None:
    """No endpoints, or none usable, gives None; a single usable one is always returned."""
    eps = endpoints(1, 2, 1)
    balancer = make_balancer(ALL_SETTINGS[name], InFlight(), random.Random(SEED))
    assert balancer.pick((), everyone, "k") is None
    assert balancer.pick(eps, lambda e: False, "k") is None
    assert balancer.pick(eps[:1], lambda e: False, "k") is None
    for i in range(50):
        assert balancer.pick(eps, lambda e: e is eps[1], f"k{i}") is eps[1]


# ROUND_ROBIN


def test_round_robin_weights_one_to_three_are_exact_and_interleaved() -> None:
    """Weights 1:3 give exactly 100/300 of 400 picks, one light pick in every cycle of four."""
    eps = endpoints(1, 3)
    balancer = make_balancer(ROUND_ROBIN, InFlight(), random.Random(SEED))
    picks = [balancer.pick(eps, everyone) for _ in range(400)]
    assert picks.count(eps[0]) == 100
    assert picks.count(eps[1]) == 300
    for start in range(0, 400, 4):
        assert picks[start : start + 4].count(eps[0]) == 1


def test_round_robin_equal_weights_rotate_around_unusable_endpoints() -> None:
    """With equal weights and one endpoint out, the other three share 300 picks exactly."""
    eps = endpoints(1, 1, 1, 1)
    balancer = make_balancer(ROUND_ROBIN, InFlight(), random.Random(SEED))
    counts = Counter(str(balancer.pick(eps, lambda e: e is not eps[2])) for _ in range(300))
    assert counts == {"10.0.0.0:8080": 100, "10.0.0.1:8080": 100, "10.0.0.3:8080": 100}


def test_round_robin_weighted_skips_unusable_endpoints() -> None:
    """Weights 1:2:3 with the middle one out share 400 picks 1:3 among the other two."""
    eps = endpoints(1, 2, 3)
    balancer = make_balancer(ROUND_ROBIN, InFlight(), random.Random(SEED))
    counts = Counter(str(balancer.pick(eps, lambda e: e is not eps[1])) for _ in range(400))
    assert counts == {"10.0.0.0:8080": 100, "10.0.0.2:8080": 300}


def test_round_robin_is_exact_across_threads() -> None:
    """4 threads x 1,000 picks over 4 equal endpoints give each exactly 1,000."""
    eps = endpoints(1, 1, 1, 1)
    balancer = make_balancer(ROUND_ROBIN, InFlight(), random.Random(SEED))
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def run() -> None:
        local = Counter(str(balancer.pick(eps, everyone)) for _ in range(1_000))
        with lock:
            counts.update(local)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {str(e): 1_000 for e in eps}


# RANDOM and PASSTHROUGH


def test_random_ignores_weights() -> None:
    """Weights 1:2:7 make no difference, as in Envoy's RandomLoadBalancer: each endpoint gets
    a third of 20,000 picks, within +-2 percentage points."""
    eps = endpoints(1, 2, 7)
    counts = tally(make_balancer(RANDOM, InFlight(), random.Random(SEED)), eps, 20_000)
    for endpoint in eps:
        assert share(counts, endpoint.address) == pytest.approx(100 / 3, abs=2)


def test_random_is_uniform_among_usable_endpoints() -> None:
    """With weights 5:1:3 and the first one out, 20,000 picks split 50/50 within +-2 points."""
    eps = endpoints(5, 1, 3)
    balancer = make_balancer(RANDOM, InFlight(), random.Random(SEED))
    counts = Counter(str(balancer.pick(eps, lambda e: e is not eps[0])) for _ in range(20_000))
    assert 100 * counts[str(eps[1])] / 20_000 == pytest.approx(50, abs=2)
    assert 100 * counts[str(eps[2])] / 20_000 == pytest.approx(50, abs=2)


def test_passthrough_picks_like_random() -> None:
    """PASSTHROUGH has no original destination in library mode, so it draws exactly as RANDOM."""
    eps = endpoints(1, 2, 3)
    passthrough = LoadBalancerSettings(simple="PASSTHROUGH")
    a = make_balancer(passthrough, InFlight(), random.Random(SEED))
    b = make_balancer(RANDOM, InFlight(), random.Random(SEED))
    assert [a.pick(eps, everyone) for _ in range(200)] == [
        b.pick(eps, everyone) for _ in range(200)
    ]


# LEAST_REQUEST


def test_least_request_prefers_fewer_in_flight() -> None:
    """Of two endpoints, the busier one is picked only when it is drawn twice: the two
    candidates are drawn with replacement, as Envoy's unweightedHostPick does (1/4 of picks)."""
    eps = endpoints(1, 1)
    in_flight = InFlight()
    for _ in range(3):
        in_flight.start(str(eps[0]))
    counts = tally(make_balancer(None, in_flight, random.Random(SEED)), eps, 20_000)
    assert share(counts, eps[0].address) == pytest.approx(25, abs=2)


def test_least_request_power_of_two_choices() -> None:
    """Of 5 endpoints loaded 0..4 (candidates drawn with replacement), the busiest gets 4 +- 1 %
    and the idlest 36 +- 2 %."""
    eps = endpoints(1, 1, 1, 1, 1)
    in_flight = InFlight()
    for load, endpoint in enumerate(eps):
        for _ in range(load):
            in_flight.start(str(endpoint))
    counts = tally(make_balancer(None, in_flight, random.Random(SEED)), eps, 20_000)
    # The busiest wins only when drawn twice: (1/5)^2 = 4 %.
    assert share(counts, eps[4].address) == pytest.approx(4, abs=1)
    # The idlest wins whenever drawn: 1 - (4/5)^2 = 36 % of draws include it.
    assert share(counts, eps[0].address) == pytest.approx(36, abs=2)


def test_least_request_second_draw_finding_none_keeps_the_first() -> None:
    """Endpoints ejected between the two draws (another thread): the second draw finds none
    usable, and the first candidate is picked, not whichever endpoint is last in the list."""
    eps = endpoints(1, 1, 1)
    in_flight = InFlight()
    in_flight.start(str(eps[0]))
    in_flight.start(str(eps[1]))  # the last endpoint, eps[2], is the idlest
    checks = 0

    def ejected_after_the_first_draw(endpoint: Endpoint) -> bool:
        nonlocal checks
        checks += 1
        return checks == 1 and endpoint is eps[0]

    balancer = make_balancer(None, in_flight, random.Random(SEED))
    for _ in range(50):
        checks = 0
        picked = balancer.pick(eps, ejected_after_the_first_draw)
        assert picked in (None, eps[0])


def test_least_request_idle_endpoints_share_evenly() -> None:
    """With nothing in flight, 4 equal endpoints each get 25 % of 20,000 picks, +-2 points."""
    eps = endpoints(1, 1, 1, 1)
    counts = tally(make_balancer(None, InFlight(), random.Random(SEED)), eps, 20_000)
    for endpoint in eps:
        assert share(counts, endpoint.address) == pytest.approx(25, abs=2)


@pytest.mark.parametrize(
    ("loads", "winner"),
    [((2, 1), 0), ((3, 0), 1), ((0, 0), 0), ((6, 1), 1)],
    ids=["3/3 beats 1/2", "1/1 beats 3/4", "idle: heavier", "1/2 beats 3/7"],
)
def test_least_request_weighted_effective_weight(loads: tuple[int, int], winner: int) -> None:
    """With weights 3 and 1 the higher weight / (in_flight + 1) wins (Envoy, bias 1.0)."""
    eps = endpoints(3, 1)
    in_flight = InFlight()
    for endpoint, load in zip(eps, loads, strict=True):
        for _ in range(load):
            in_flight.start(str(endpoint))
    balancer = make_balancer(None, in_flight, random.Random(SEED))
    assert all(balancer.pick(eps, everyone) is eps[winner] for _ in range(100))


# CONSISTENT_HASH

KEYS = [f"user-{i}" for i in range(10_000)]


def owners(balancer: Balancer, eps: Sequence[Endpoint], keys: Sequence[str]) -> list[Endpoint]:
    """The endpoint each key maps to with every endpoint usable."""
    result = []
    for key in keys:
        chosen = balancer.pick(eps, everyone, key)
        assert chosen is not None
        result.append(chosen)
    return result


def test_ring_hash_is_sticky() -> None:
    """Each of 1,000 keys maps to the same endpoint on every pick."""
    eps = endpoints(*[1] * 10)
    balancer = make_balancer(HASH, InFlight(), random.Random(SEED))
    first = owners(balancer, eps, KEYS[:1_000])
    for _ in range(3):
        assert owners(balancer, eps, KEYS[:1_000]) == first
    assert len({str(e) for e in first}) == 10


def test_ring_hash_is_stable_across_instances_and_list_objects() -> None:
    """Balancers with different random seeds map keys alike, for a tuple or an equal list."""
    eps = endpoints(*[1] * 10)
    a = make_balancer(HASH, InFlight(), random.Random(1))
    b = make_balancer(HASH, InFlight(), random.Random(2))
    assert owners(a, eps, KEYS[:1_000]) == owners(b, list(eps), KEYS[:1_000])


# Computed once; equal in every process whatever PYTHONHASHSEED (blake2b, not hash()).
GOLDEN = ["10.0.0.6", "10.0.0.2", "10.0.0.6", "10.0.0.0", "10.0.0.1"]


def test_ring_hash_is_stable_across_processes() -> None:
    """The mapping depends on nothing but the key and endpoints: fixed values, no salted hash()."""
    eps = endpoints(*[1] * 10)
    balancer = make_balancer(HASH, InFlight(), random.Random(SEED))
    got = [e.address for e in owners(balancer, eps, ["alice", "bob", "carol", "dave", "eve"])]
    assert got == GOLDEN


def test_adding_an_endpoint_moves_about_one_key_in_eleven() -> None:
    """Going from 10 to 11 endpoints moves 5-15 % of 10,000 keys, all to the new endpoint."""
    before = owners(make_balancer(HASH, InFlight()), endpoints(*[1] * 10), KEYS)
    eleven = endpoints(*[1] * 11)
    after = owners(make_balancer(HASH, InFlight()), eleven, KEYS)
    moved = [str(new) for old, new in zip(before, after, strict=True) if old != new]
    assert 5 <= 100 * len(moved) / len(KEYS) <= 15
    assert set(moved) == {str(eleven[10])}


def test_unusable_hashed_endpoint_hands_over_clockwise() -> None:
    """Keys of an unusable endpoint go to other endpoints, stably; all other keys stay put."""
    eps = endpoints(*[1] * 10)
    balancer = make_balancer(HASH, InFlight(), random.Random(SEED))
    usual = owners(balancer, eps, KEYS[:2_000])
    down = eps[3]
    assert any(owner is down for owner in usual)
    for key, owner in zip(KEYS[:2_000], usual, strict=True):
        chosen = balancer.pick(eps, lambda e: e is not down, key)
        assert chosen is not None
        if owner is down:
            assert chosen is not down
            assert balancer.pick(eps, lambda e: e is not down, key) is chosen
        else:
            assert chosen is owner


def test_ring_hash_follows_weights() -> None:
    """Weights 1:3 give the heavy endpoint 75 % of 10,000 keys, within +-5 points (ring arcs)."""
    eps = endpoints(1, 3)
    counts = Counter(str(e) for e in owners(make_balancer(HASH, InFlight()), eps, KEYS))
    assert 100 * counts[str(eps[1])] / len(KEYS) == pytest.approx(75, abs=5)


def test_ring_hash_without_key_picks_at_random() -> None:
    """With no hash key, 8,000 picks spread over 4 endpoints, each 25 % +-6 points (arcs)."""
    eps = endpoints(1, 1, 1, 1)
    counts = tally(make_balancer(HASH, InFlight(), random.Random(SEED)), eps, 8_000)
    for endpoint in eps:
        assert share(counts, endpoint.address) == pytest.approx(25, abs=6)


@pytest.mark.parametrize(
    ("hashing", "minimum"),
    [
        (ConsistentHashLB(use_source_ip=True), 1024),
        (ConsistentHashLB(use_source_ip=True, ring_hash=RingHash()), 1024),
        (ConsistentHashLB(use_source_ip=True, ring_hash=RingHash(minimum_ring_size=4096)), 4096),
        (ConsistentHashLB(use_source_ip=True, minimum_ring_size=3000), 3000),
        (ConsistentHashLB(use_source_ip=True, maglev=MagLev(table_size=251)), 251),
        (ConsistentHashLB(use_source_ip=True, maglev=MagLev()), 65537),
    ],
    ids=["default", "ringHash", "ringHash 4096", "deprecated", "maglev 251", "maglev default"],
)
def test_ring_size_honours_settings(hashing: ConsistentHashLB, minimum: int) -> None:
    """The ring has at least the configured size and, rounded per endpoint, under twice it."""
    eps = endpoints(1, 1, 1)
    balancer = make_balancer(LoadBalancerSettings(consistent_hash=hashing), InFlight())
    assert isinstance(balancer, RingHashBalancer)
    assert minimum <= balancer.ring_size(eps) < 2 * minimum + len(eps)


def test_ring_is_built_once_per_endpoint_list() -> None:
    """1,000 lookups, an equal tuple and an equal list reuse one ring; new endpoints build
    one (counted through the cache's build function: the compiled build's balancer cannot be
    patched); the balancer picks from that same cached ring."""
    built: list[object] = []

    def build(table: object) -> object:
        built.append(table)
        return object()

    cache: Any = balancer_module._Cache(build)
    eps = endpoints(1, 1, 1)
    ring = cache.get(eps)
    for _ in range(1_000):
        assert cache.get(eps) is ring
    assert cache.get(endpoints(1, 1, 1)) is ring and cache.get(list(eps)) is ring
    assert len(built) == 1
    assert cache.get(endpoints(1, 1, 2)) is not ring
    assert len(built) == 2

    balancer: Any = make_balancer(HASH, InFlight(), random.Random(SEED))
    for i in range(1_000):
        balancer.pick(eps, everyone, f"k{i}")
    balancer.pick(endpoints(1, 1, 1), everyone, "k")
    balancer.pick(list(eps), everyone, "k")
    assert len(balancer._rings._by_content) == 1  # the picks built one ring between them
    balancer.pick(endpoints(1, 1, 2), everyone, "k")
    assert len(balancer._rings._by_content) == 2


# hash_key


def request(headers: dict[str, str] | None = None, query: str = "") -> RequestAttributes:
    """A GET to reviews with the given headers and query string."""
    return RequestAttributes("GET", "reviews:9080", "/", query=query, headers=headers)


def by(**key: object) -> LoadBalancerSettings:
    """Consistent-hash settings with one hash key."""
    return LoadBalancerSettings(consistent_hash=ConsistentHashLB(**key))  # type: ignore[arg-type]


def test_hash_key_from_header_looks_up_the_lowercase_name() -> None:
    """httpHeaderName is matched case-insensitively; a missing header gives None."""
    settings = by(http_header_name="X-User")
    assert hash_key(settings, request({"x-user": "alice"}), None) == "alice"
    assert hash_key(settings, request({"x-other": "alice"}), None) is None


def test_hash_key_from_cookie() -> None:
    """httpCookie takes the named cookie's value from the Cookie header."""
    settings = by(http_cookie=HTTPCookie(name="session", ttl=Duration.of("0s")))
    cookies = 'theme=dark; session="abc123"; lang=en'
    assert hash_key(settings, request({"cookie": cookies}), None) == "abc123"
    assert hash_key(settings, request({"cookie": "theme=dark,session=x9"}), None) == "x9"
    assert hash_key(settings, request({"cookie": "sessionid=1"}), None) is None
    assert hash_key(settings, request(), None) is None


@pytest.mark.parametrize(
    "header",
    ["", ";", "=", "session", '"', 'a="open; b', "session\x00=; ;;=;", "\u00e9=\u00e8; ==="],
)
def test_malformed_cookie_header_never_raises(header: str) -> None:
    """A malformed Cookie header gives a value or None, never an exception."""
    value = cookie_value(header, "session")
    assert value is None or isinstance(value, str)
    assert cookie_value(f"{header}; session=ok", "session") in ("ok", value)


def test_hash_key_from_query_parameter_and_source_ip() -> None:
    """httpQueryParameterName reads the query; useSourceIp the caller's address."""
    assert hash_key(by(http_query_parameter_name="u"), request(query="a=1&u=bob"), None) == "bob"
    assert hash_key(by(http_query_parameter_name="u"), request(query="a=1"), None) is None
    assert hash_key(by(use_source_ip=True), request(), "10.1.2.3") == "10.1.2.3"
    assert hash_key(by(use_source_ip=True), request(), None) is None


def test_no_hash_key_without_consistent_hashing() -> None:
    """Without consistentHash there is no hash key."""
    assert hash_key(None, request({"x-user": "a"}), "10.1.2.3") is None
    assert hash_key(ROUND_ROBIN, request({"x-user": "a"}), "10.1.2.3") is None


def _cookie_settings(**cookie: object) -> LoadBalancerSettings:
    return LoadBalancerSettings(
        consistent_hash=ConsistentHashLB(http_cookie=HTTPCookie(name="stick", **cookie))  # type: ignore[arg-type]
    )


def test_hash_cookie_is_generated_as_envoy_writes_it() -> None:
    """Only with a ttl and only when the request lacks it; a quoted value, Max-Age unless
    the ttl is 0 (a session cookie), the path, HttpOnly, then the cookie's attributes."""
    from meshlib.dataplane.balancer import cookie_to_set

    bare = request()
    with_cookie = request({"cookie": 'a=1; stick="ab"'})
    assert cookie_to_set(_cookie_settings(), bare) is None  # no ttl: never generated
    settings = _cookie_settings(ttl=Duration(90.0, "90s"), path="/api")
    assert cookie_to_set(settings, with_cookie) is None
    assert hash_key(settings, with_cookie, None) == "ab"
    generated = cookie_to_set(settings, bare)
    assert generated is not None
    value, header = generated
    assert len(value) == 16 and header == f'stick="{value}"; Max-Age=90; Path=/api; HttpOnly'
    session = cookie_to_set(
        _cookie_settings(
            ttl=Duration(0.0, "0s"), attributes=({"name": "SameSite", "value": "Strict"},)
        ),
        bare,
    )
    assert session is not None and session[1] == f'stick="{session[0]}"; HttpOnly; SameSite=Strict'
    assert cookie_value(session[1].split(";")[0], "stick") == session[0]  # read back as sent
