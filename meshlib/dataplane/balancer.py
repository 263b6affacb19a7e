"""Load balancing: which endpoint of a cluster gets the next request (ISTIO.md §2.3).

    in_flight = InFlight()
    balancer = make_balancer(traffic_policy.load_balancer, in_flight)
    endpoint = balancer.pick(endpoints, usable, hash_key(settings, request, source_ip))

One balancer serves one cluster. `endpoints` is the cluster's full, stably ordered list;
`usable` says no to ejected or already-tried endpoints. Per-list data (weights, keys, the hash
ring, round-robin state) is built once and cached by the tuple's identity and, failing that, by
its content (endpoint keys and weights), so pass the Snapshot's tuple to stay on the fast path.

- LEAST_REQUEST (also unset, UNSPECIFIED, LEAST_CONN): power of two choices. Two distinct usable
  endpoints are drawn uniformly and the one with the higher effective weight
  `weight / (in_flight + 1)` wins: Envoy's weighted formula with `active_request_bias` 1.0,
  applied to the two candidates instead of through Envoy's EDF scheduler. With equal weights
  this is exactly Envoy's "fewer requests in flight wins".
- ROUND_ROBIN: smooth weighted round robin (nginx): weights 1:3 give b, a, b, b. Equal weights
  take a plain rotation. Unusable endpoints sit out the round.
- RANDOM: uniform random among usable endpoints; endpoint weights are ignored, as Envoy's
  RandomLoadBalancer ignores them (it takes hosts[random % count]). PASSTHROUGH behaves the
  same: there is no original destination to pass through to in library mode.
- CONSISTENT_HASH: a ring hash (Envoy's ketama-style ring, hashed with blake2b so a key maps to
  the same endpoint in every process). `maglev.tableSize` builds the same ring with the table
  size as its minimum size. Without a hash key a random point of the ring is used, as Envoy does.

`warmup` (slow start) is not applied.
"""

from __future__ import annotations

import math
import random
import secrets
import struct
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from hashlib import blake2b
from typing import Generic, Protocol, TypeVar

from meshlib.policy.destination_rule import LoadBalancerSettings
from meshlib.policy.matching import RequestAttributes
from meshlib.policy.snapshot import Endpoint

Usable = Callable[[Endpoint], bool]

DEFAULT_RING_SIZE = 1024  # ringHash.minimumRingSize
DEFAULT_MAGLEV_TABLE_SIZE = 65537
# Envoy allows 8M points; a Python build of that takes seconds, and past ~10^5 points a ring
# is as even as it gets. Larger minimum sizes are capped here.
MAX_RING_SIZE = 1 << 17

_TRIES = 4  # random draws before a scan of all endpoints, when draws hit unusable ones
_POINTS = struct.Struct("<8Q")  # eight 64-bit ring points from one 64-byte blake2b digest
_CACHE_SIZE = 16  # distinct endpoint lists (subsets) remembered per balancer


class InFlight:
    """Thread-safe count of requests in flight per endpoint key (str(endpoint))."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self, key: str) -> None:
        """One more request is in flight to `key`."""
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def finish(self, key: str) -> None:
        """One request to `key` ended; the count never goes below zero."""
        with self._lock:
            count = self._counts.get(key, 0) - 1
            if count > 0:
                self._counts[key] = count
            else:
                self._counts.pop(key, None)

    def get(self, key: str) -> int:
        """Requests in flight to `key` now (a lock-free read)."""
        return self._counts.get(key, 0)

    def __repr__(self) -> str:
        return f"InFlight({dict(self._counts)!r})"


class Balancer(Protocol):
    """Chooses an endpoint for one attempt of one request."""

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        usable: Usable,
        hash_key: str | None = None,
    ) -> Endpoint | None:
        """A usable endpoint, or None when there is none."""


T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


class _Table:
    """What every balancer needs to know about one endpoint list."""

    __slots__ = ("equal", "keys", "total", "weights")

    def __init__(self, keys: tuple[str, ...], weights: tuple[int, ...]) -> None:
        self.keys = keys
        self.weights = weights
        self.total = sum(weights)
        self.equal = len(set(weights)) <= 1


class _Cache(Generic[T]):
    """Per-list data, found by the list's identity (tuples only) or else by its content."""

    __slots__ = ("_build", "_by_content", "_by_id", "_lock")

    def __init__(self, build: Callable[[_Table], T]) -> None:
        self._build = build
        self._by_id: dict[int, tuple[Sequence[Endpoint], T]] = {}
        self._by_content: dict[tuple[tuple[str, ...], tuple[int, ...]], T] = {}
        self._lock = threading.Lock()

    def get(self, endpoints: Sequence[Endpoint]) -> T:
        hit = self._by_id.get(id(endpoints))
        if hit is not None and hit[0] is endpoints:  # the entry holds the list: ids stay valid
            return hit[1]
        keys = tuple(e.key for e in endpoints)
        weights = tuple(max(e.weight, 1) for e in endpoints)  # Envoy's minimum weight is 1
        with self._lock:
            value = self._by_content.get((keys, weights))
            if value is None:
                value = self._build(_Table(keys, weights))
                _put(self._by_content, (keys, weights), value)
            if isinstance(endpoints, tuple):  # immutable, so identity implies content
                _put(self._by_id, id(endpoints), (endpoints, value))
            return value


def _put(cache: dict[K, V], key: K, value: V) -> None:
    if len(cache) >= _CACHE_SIZE:
        del cache[next(iter(cache))]  # oldest first; callers hold the cache's lock
    cache[key] = value


def _table(table: _Table) -> _Table:
    return table


def _draw(
    endpoints: Sequence[Endpoint], usable: Usable, rnd: Callable[[], float], skip: int
) -> int:
    """A uniformly chosen usable index other than `skip` (-1 for none), or -1 if there is none.

    Rejection sampling first, then a scan; both draw uniformly, so their mixture does too.
    """
    n = len(endpoints)
    m = n if skip < 0 else n - 1
    if m <= 0:
        return -1
    for _ in range(_TRIES):
        i = int(rnd() * m)
        if 0 <= skip <= i:
            i += 1
        if usable(endpoints[i]):
            return i
    found = [i for i in range(n) if i != skip and usable(endpoints[i])]
    return found[int(rnd() * len(found))] if found else -1


class LeastRequestBalancer:
    """Power of two choices; the candidate with more effective weight left wins (equal
    weights: the one with fewer requests in flight, of two drawn with replacement)."""

    __slots__ = ("_in_flight", "_random", "_tables")

    def __init__(self, in_flight: InFlight, rng: random.Random) -> None:
        self._in_flight = in_flight
        self._random = rng.random
        self._tables: _Cache[_Table] = _Cache(_table)

    def pick(
        self, endpoints: Sequence[Endpoint], usable: Usable, hash_key: str | None = None
    ) -> Endpoint | None:
        if len(endpoints) <= 1:
            return endpoints[0] if endpoints and usable(endpoints[0]) else None
        rnd = self._random
        a = _draw(endpoints, usable, rnd, -1)
        if a < 0:
            return None
        table = self._tables.get(endpoints)
        keys, get = table.keys, self._in_flight.get
        if table.equal:
            # Envoy's unweightedHostPick draws both candidates with replacement: one endpoint
            # may be drawn twice, so even the busiest still gets a share (one pick in n * n)
            b = _draw(endpoints, usable, rnd, -1)  # -1: none usable now (ejected meanwhile)
            if b >= 0 and get(keys[b]) < get(keys[a]):
                a = b
            return endpoints[a]
        b = _draw(endpoints, usable, rnd, a)
        if b < 0:
            return endpoints[a]
        # weight_b / (active_b + 1) > weight_a / (active_a + 1), without division.
        weights = table.weights
        if weights[b] * (get(keys[a]) + 1) > weights[a] * (get(keys[b]) + 1):
            a = b
        return endpoints[a]


class _RoundRobinState:
    __slots__ = ("current", "next", "table")

    def __init__(self, table: _Table, rng: random.Random) -> None:
        self.table = table
        n = len(table.keys)
        self.next = rng.randrange(n) if n else 0  # Envoy starts each proxy at a random host
        self.current = [0] * n
        for _ in range(rng.randrange(min(table.total, 64) or 1)):  # and at a random phase
            _smooth_step(self.current, table.weights, None, None)


def _smooth_step(
    current: list[int],
    weights: tuple[int, ...],
    endpoints: Sequence[Endpoint] | None,
    usable: Usable | None,
) -> int:
    """One round of nginx's smooth weighted round robin over the usable endpoints."""
    best, best_weight, total = -1, 0, 0
    for i, weight in enumerate(weights):
        if usable is not None and endpoints is not None and not usable(endpoints[i]):
            continue
        value = current[i] + weight
        current[i] = value
        total += weight
        if best < 0 or value > best_weight:
            best, best_weight = i, value
    if best >= 0:
        current[best] = best_weight - total
    return best


class RoundRobinBalancer:
    """Smooth weighted round robin; a plain rotation when all weights are equal."""

    __slots__ = ("_lock", "_states")

    def __init__(self, rng: random.Random) -> None:
        self._lock = threading.Lock()
        self._states: _Cache[_RoundRobinState] = _Cache(lambda t: _RoundRobinState(t, rng))

    def pick(
        self, endpoints: Sequence[Endpoint], usable: Usable, hash_key: str | None = None
    ) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        state = self._states.get(endpoints)
        with self._lock:  # held for a few predicate calls; there is no I/O here
            if state.table.equal:
                i = state.next
                for _ in range(n):
                    if i >= n:
                        i = 0
                    if usable(endpoints[i]):
                        state.next = i + 1
                        return endpoints[i]
                    i += 1
                return None
            best = _smooth_step(state.current, state.table.weights, endpoints, usable)
        return endpoints[best] if best >= 0 else None


class RandomBalancer:
    """Uniform random among the usable endpoints, whatever their weights (also PASSTHROUGH)."""

    __slots__ = ("_random",)

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random

    def pick(
        self, endpoints: Sequence[Endpoint], usable: Usable, hash_key: str | None = None
    ) -> Endpoint | None:
        # Envoy's RandomLoadBalancer draws hosts[random % count]: weights play no part.
        i = _draw(endpoints, usable, self._random, -1)
        return endpoints[i] if i >= 0 else None


class _Ring:
    """Sorted hash points and, for each, the index of the endpoint that owns it."""

    __slots__ = ("owners", "points")

    def __init__(self, table: _Table, minimum_size: int) -> None:
        # Points per unit of the smallest weight, rounded up to a power of two: adding or
        # removing an endpoint then leaves every other endpoint's points where they were
        # (until the count crosses a power of two), so only about 1/(N+1) of keys move.
        weights, smallest = table.weights, min(table.weights)
        ratio = sum(weights) / smallest
        per_unit = float(1 << max(math.ceil(minimum_size / ratio) - 1, 0).bit_length())
        per_unit = min(per_unit, MAX_RING_SIZE / ratio)
        pairs: list[tuple[int, int]] = []
        for owner, (key, weight) in enumerate(zip(table.keys, weights, strict=True)):
            count = max(int(per_unit * weight / smallest), 1)
            for block in range((count + 7) // 8):
                digest = blake2b(f"{key}_{block}".encode(), digest_size=64).digest()
                pairs.extend((p, owner) for p in _POINTS.unpack(digest)[: count - 8 * block])
        pairs.sort()
        self.points = [p for p, _ in pairs]
        self.owners = [o for _, o in pairs]


def _hash64(key: str) -> int:
    digest = blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RingHashBalancer:
    """Consistent hashing on a ring; unusable endpoints hand over to the next one clockwise."""

    __slots__ = ("_random", "_rings")

    def __init__(self, rng: random.Random, minimum_ring_size: int = DEFAULT_RING_SIZE) -> None:
        self._random = rng
        self._rings: _Cache[_Ring] = _Cache(lambda t: _Ring(t, minimum_ring_size))

    def ring_size(self, endpoints: Sequence[Endpoint]) -> int:
        """How many points the ring for `endpoints` has."""
        return len(self._rings.get(endpoints).points) if endpoints else 0

    def pick(
        self, endpoints: Sequence[Endpoint], usable: Usable, hash_key: str | None = None
    ) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        ring = self._rings.get(endpoints)
        points, owners = ring.points, ring.owners
        h = self._random.getrandbits(64) if hash_key is None else _hash64(hash_key)
        size = len(points)
        pos = bisect_left(points, h)
        if pos == size:
            pos = 0
        owner = owners[pos]
        if usable(endpoints[owner]):
            return endpoints[owner]
        rejected = {owner}
        for _ in range(size - 1):
            pos += 1
            if pos == size:
                pos = 0
            owner = owners[pos]
            if owner in rejected:
                continue
            if usable(endpoints[owner]):
                return endpoints[owner]
            rejected.add(owner)
            if len(rejected) == n:
                break
        return None


def _ring_size(settings: LoadBalancerSettings) -> int:
    ch = settings.consistent_hash
    if ch is None:
        return DEFAULT_RING_SIZE
    if ch.maglev is not None:
        return ch.maglev.table_size or DEFAULT_MAGLEV_TABLE_SIZE
    if ch.ring_hash is not None:
        return ch.ring_hash.minimum_ring_size or DEFAULT_RING_SIZE
    return ch.minimum_ring_size or DEFAULT_RING_SIZE  # deprecated top-level field


def make_balancer(
    settings: LoadBalancerSettings | None,
    in_flight: InFlight,
    rng: random.Random | None = None,
) -> Balancer:
    """The balancer a DestinationRule's `loadBalancer` asks for (LEAST_REQUEST when unset)."""
    rng = rng if rng is not None else random.Random()
    algorithm = settings.algorithm if settings is not None else "LEAST_REQUEST"
    if algorithm == "ROUND_ROBIN":
        return RoundRobinBalancer(rng)
    if algorithm in ("RANDOM", "PASSTHROUGH"):
        return RandomBalancer(rng)
    if algorithm == "CONSISTENT_HASH" and settings is not None:
        return RingHashBalancer(rng, _ring_size(settings))
    return LeastRequestBalancer(in_flight, rng)


def hash_key(
    settings: LoadBalancerSettings | None, request: RequestAttributes, source_ip: str | None
) -> str | None:
    """The consistent-hash key of a request, or None when it has none (a random pick follows).

    A missing `httpCookie` is not generated here: setting it on the response is the adapter's
    part.
    """
    ch = settings.consistent_hash if settings is not None else None
    if ch is None:
        return None
    if ch.http_header_name is not None:
        return request.headers.get(ch.http_header_name.lower())
    if ch.http_cookie is not None:
        return cookie_value(request.headers.get("cookie"), ch.http_cookie.name)
    if ch.http_query_parameter_name is not None:
        return request.query_param(ch.http_query_parameter_name)
    if ch.use_source_ip:
        return source_ip or None
    return None


def cookie_to_set(
    settings: LoadBalancerSettings | None, request: RequestAttributes
) -> tuple[str, str] | None:
    """For `consistentHash.httpCookie` with a `ttl`, when the request lacks the cookie: a new
    value to hash and the `Set-Cookie` header the response carries, as Envoy generates them
    (the value quoted; `Max-Age` unless the ttl is 0, a session cookie; `Path`; `HttpOnly`;
    the cookie's attributes). Else None."""
    ch = settings.consistent_hash if settings is not None else None
    cookie = ch.http_cookie if ch is not None else None
    if cookie is None or cookie.ttl is None:
        return None
    if cookie_value(request.headers.get("cookie"), cookie.name) is not None:
        return None
    value = secrets.token_hex(8)  # Envoy hashes the connection's address; one per request here
    parts = [f'{cookie.name}="{value}"']
    if cookie.ttl.seconds > 0:
        parts.append(f"Max-Age={int(cookie.ttl.seconds)}")
    if cookie.path:
        parts.append(f"Path={cookie.path}")
    parts.append("HttpOnly")
    for attribute in cookie.attributes:
        if isinstance(attribute, dict) and attribute.get("name"):
            given = attribute.get("value")
            parts.append(f"{attribute['name']}={given}" if given else str(attribute["name"]))
    return value, "; ".join(parts)


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header, as Envoy parses it; never raises.

    Pairs are split on ";" and on "," (repeated Cookie headers arrive joined with ","; neither
    is allowed inside a cookie value), and one pair of surrounding double quotes is removed.
    """
    if not header:
        return None
    for part in header.replace(",", ";").split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None
