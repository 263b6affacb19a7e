"""Metadata exchange: the peer header's round trip, garbage handling and mTLS precedence."""

from __future__ import annotations

import base64
import dataclasses
import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.config import MeshConfig
from meshlib.errors import ConfigError
from meshlib.telemetry import _struct, peer
from meshlib.telemetry.peer import (
    HEADER,
    MAX_HEADER_LENGTH,
    UNKNOWN_PEER,
    PeerIdentity,
    decode,
    encode,
    from_principal,
    identity_of,
)

REVIEWS = MeshConfig(
    service="reviews",
    version="v2",
    namespace="bookinfo",
    workload="reviews-v2",
    service_account="bookinfo-reviews",
    cluster="east-1",
)
# The caps each field's validation imposes (Kubernetes names and label values, SPIFFE URIs).
CAPS = {
    "workload": 253,
    "namespace": 63,
    "app": 63,
    "version": 63,
    "canonical_service": 63,
    "canonical_revision": 63,
    "principal": 512,
    "cluster": 63,
}


def test_unknown_peer_has_istios_defaults() -> None:
    """An unknown peer is "unknown" everywhere except canonical revision "latest"."""
    assert dataclasses.asdict(UNKNOWN_PEER) == {
        "workload": "unknown",
        "namespace": "unknown",
        "app": "unknown",
        "version": "unknown",
        "canonical_service": "unknown",
        "canonical_revision": "latest",
        "principal": "unknown",
        "cluster": "unknown",
    }
    assert HEADER == "x-meshlib-peer-metadata"


def test_round_trip() -> None:
    """What a workload encodes is what its peer decodes, every field included."""
    value = encode(REVIEWS)
    assert (
        decode(value)
        == identity_of(REVIEWS)
        == PeerIdentity(
            workload="reviews-v2",
            namespace="bookinfo",
            app="reviews",
            version="v2",
            canonical_service="reviews",
            canonical_revision="v2",
            principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
            cluster="east-1",
        )
    )
    assert len(value) < 200 and value.isascii() and "\n" not in value


def test_canonical_labels_travel() -> None:
    """Canonical name/revision labels win over app/version, as Istio computes them."""
    config = MeshConfig(
        service="ratings",
        labels={
            "service.istio.io/canonical-name": "ratings-svc",
            "service.istio.io/canonical-revision": "r7",
        },
    )
    found = decode(encode(config))
    assert (found.app, found.version) == ("ratings", "unknown")
    assert (found.canonical_service, found.canonical_revision) == ("ratings-svc", "r7")


def test_missing_labels_are_unknown_on_the_peer_side() -> None:
    """A workload without app/version labels shows up as "unknown" (revision "latest")."""
    found = decode(encode(MeshConfig(workload="batch-job")))
    assert found.workload == "batch-job"
    assert (found.app, found.version) == ("unknown", "unknown")
    assert (found.canonical_service, found.canonical_revision) == ("batch-job", "latest")


def test_invalid_local_values_are_not_sent() -> None:
    """A field a peer would reject is left out of the header rather than sent mangled (the
    workload's name cannot even be set so: MeshConfig refuses it)."""
    value = encode(MeshConfig(workload="reviews-v2", cluster="bad cluster"))
    assert "c=" not in value
    assert decode(value).workload == "reviews-v2" and decode(value).cluster == "unknown"
    with pytest.raises(ConfigError, match="workload"):
        MeshConfig(workload="Not a name!")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param(";;;", id="separators"),
        pytest.param("w=", id="empty-value"),
        pytest.param("garbage", id="no-equals"),
        pytest.param("=x;=y", id="no-key"),
        pytest.param('w=a"b;n=x\ny', id="quotes-newlines"),
        pytest.param("w=" + "a" * 300, id="too-long-value"),
        pytest.param("n=UPPER;a=-dash;v=dot.", id="bad-charset"),
        pytest.param("p=http://evil/ns/x/sa/y", id="not-spiffe"),
        pytest.param("\x00\xff\u2028", id="binary"),
    ],
)
def test_garbage_decodes_to_unknown(value: str | None) -> None:
    """Unusable values give the unknown peer's fields, never an exception."""
    assert decode(value) == UNKNOWN_PEER


def test_one_bad_field_spoils_only_itself() -> None:
    """Valid fields survive next to an invalid one; unknown keys are ignored."""
    found = decode("w=ratings-v1;n=Bad_NS;a=ratings;future=1;cr=v1")
    assert found == PeerIdentity(workload="ratings-v1", app="ratings", canonical_revision="v1")


def test_overlong_header_is_not_parsed() -> None:
    """A header beyond MAX_HEADER_LENGTH is the unknown peer, whatever it holds."""
    value = encode(REVIEWS) + ";x=" + "y" * MAX_HEADER_LENGTH
    assert decode(value) == UNKNOWN_PEER


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=3000))
def test_arbitrary_text_never_raises_and_stays_bounded(value: str) -> None:
    """Any string decodes, and every field is valid ASCII within its cap."""
    found = decode(value)
    for field, cap in CAPS.items():
        text = getattr(found, field)
        assert 0 < len(text) <= cap
        assert text.isascii() and text.isprintable()
        assert '"' not in text and "\\" not in text


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["w", "n", "a", "v", "cs", "cr", "p", "c", "zz"]),
        st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    )
)
def test_arbitrary_fields_never_raise(fields: dict[str, str]) -> None:
    """Well-formed headers with arbitrary values decode to bounded, valid fields."""
    found = decode(";".join(f"{k}={v}" for k, v in fields.items()))
    for field, cap in CAPS.items():
        assert len(getattr(found, field)) <= cap


def test_mtls_identity_wins_over_claims() -> None:
    """A certificate's SPIFFE URI sets principal and namespace; the header fills the rest."""
    claimed = decode(encode(REVIEWS))
    proven = from_principal("spiffe://cluster.local/ns/other/sa/impostor", claimed)
    assert proven.principal == "spiffe://cluster.local/ns/other/sa/impostor"
    assert proven.namespace == "other"
    assert (proven.workload, proven.app, proven.cluster) == ("reviews-v2", "reviews", "east-1")


def test_mtls_identity_without_claims() -> None:
    """Without a header, the certificate alone gives principal and namespace."""
    proven = from_principal("spiffe://example.org/ns/payments/sa/api")
    assert proven == dataclasses.replace(
        UNKNOWN_PEER, principal="spiffe://example.org/ns/payments/sa/api", namespace="payments"
    )


@pytest.mark.parametrize(
    ("uri", "principal", "namespace"),
    [
        pytest.param(
            "spiffe://td/workload/x", "spiffe://td/workload/x", "bookinfo", id="non-istio-path"
        ),
        pytest.param("spiffe://td", "spiffe://td", "bookinfo", id="no-path"),
        pytest.param("https://td/ns/x/sa/y", "unknown", "bookinfo", id="not-spiffe"),
        pytest.param('spiffe://td/ns/x/sa/"y', "unknown", "bookinfo", id="bad-chars"),
        pytest.param("spiffe://td/" + "a" * 600, "unknown", "bookinfo", id="too-long"),
        pytest.param(None, "unknown", "bookinfo", id="none"),
    ],
)
def test_unusable_certificate_identity(uri: str | None, principal: str, namespace: str) -> None:
    """A URI that is not Istio's form keeps the claimed namespace; an invalid one gives no principal."""
    claimed = decode(encode(REVIEWS))
    proven = from_principal(uri, claimed)
    assert (proven.principal, proven.namespace) == (principal, namespace)


def remembered() -> tuple[int, int]:
    """Header values decode's cache holds, in both generations, and their characters."""
    keys = [*peer._memo.recent, *peer._memo.older]
    return len(keys), sum(map(len, keys))


def test_decode_cache_stays_bounded() -> None:
    """However many distinct values arrive, the cache holds at most two generations of
    _CACHE_SIZE values and twice its budget of characters (plus the value that started the
    generation), and still decodes each value right."""
    for i in range(3 * peer._CACHE_SIZE):
        decode(f"w=job-{i}")
    assert len(peer._cache) <= peer._CACHE_SIZE
    assert remembered()[0] <= 2 * peer._CACHE_SIZE
    assert decode("w=job-1").workload == "job-1"
    for i in range(600):  # forged Istio headers near the limit: the characters bound them
        labels = {f"l{j}": f"{i}-{j}" + "x" * 50 for j in range(180)}
        struct = _struct.encode({"WORKLOAD_NAME": "forged", "LABELS": labels})
        value = base64.b64encode(struct).decode()
        assert 12_000 < len(value) <= peer.MAX_ISTIO_HEADER_LENGTH
        assert decode(value).workload == "forged"
    chars = remembered()[1]
    assert chars <= 2 * peer._memo.chars + peer.MAX_ISTIO_HEADER_LENGTH


def test_a_real_caller_stays_cached_through_a_flood_of_forged_headers() -> None:
    """Made-up identities are cached like any other (nothing tells them from a real one),
    but they cannot push a caller that keeps calling out of the cache: between two of its
    requests come 200 forged headers, 5,000 in all, and its header is decoded once (the
    same object comes back every time)."""
    header = encode(REVIEWS)
    first = decode(header)
    for i in range(5000):
        decode(f"w=forged-{i};n=bookinfo")
        if i % 200 == 0:
            assert decode("".join(header)) is first  # an equal string, not the same one
    assert remembered()[0] <= 2 * peer._CACHE_SIZE


def test_junk_headers_are_not_cached() -> None:
    """Values that decode to nothing usable (garbage, Istio's form that is not a Struct,
    values over their limit) take no place in the cache, so any number of them leaves a real
    caller's entry where it was."""
    header = encode(REVIEWS)
    first = decode(header)
    before = remembered()
    for i in range(5000):
        for junk in (
            f"junk-{i}",
            base64.b64encode(i.to_bytes(4, "big") * 3).decode(),
            f"x={i}",
            "w=" + "a" * (MAX_HEADER_LENGTH + i % 50),
        ):
            assert decode(junk) is UNKNOWN_PEER
    assert remembered() == before
    assert decode(header) is first


def test_docstring_examples() -> None:
    """The module's docstring examples run as written."""
    assert doctest.testmod(peer).failed == 0
