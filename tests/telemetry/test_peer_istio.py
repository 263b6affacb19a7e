"""Metadata exchange in Istio's form: `x-envoy-peer-metadata`, a base64 protobuf Struct.

The codec is checked against the protobuf runtime (what Envoy's sidecars use) both ways, and
against headers captured from real Istio sidecars.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meshlib.config import MeshConfig
from meshlib.telemetry import _struct, peer
from meshlib.telemetry.peer import UNKNOWN_PEER, PeerIdentity, decode, identity_of, istio_headers
from tests.telemetry.test_peer import REVIEWS  # reviews-v2 of bookinfo, in cluster east-1

# Sent by the sidecars of bookinfo's reviews-v3 (a request to ratings) and ratings-v1 (its
# answer), Istio 1.14.5: every node metadata field of that release (APP_CONTAINERS,
# INSTANCE_IPS, MESH_ID, NAME, OWNER, an empty PLATFORM_METADATA Struct...), all pod labels.
SIDECAR_REVIEWS_V3 = (
    "ChsKDkFQUF9DT05UQUlORVJTEgkaB3Jldmlld3MKGgoKQ0xVU1RFUl9JRBIMGgpLdWJlcm5ldGVzCh4KDElOU1RBTkNF"
    "X0lQUxIOGgwxNzIuMTYuMC4xMzMKGQoNSVNUSU9fVkVSU0lPThIIGgYxLjE0LjUK0wEKBkxBQkVMUxLIASrFAQoQCgNh"
    "cHASCRoHcmV2aWV3cwofChFwb2QtdGVtcGxhdGUtaGFzaBIKGgg1OGI2NDc5YgokChlzZWN1cml0eS5pc3Rpby5pby90"
    "bHNNb2RlEgcaBWlzdGlvCiwKH3NlcnZpY2UuaXN0aW8uaW8vY2Fub25pY2FsLW5hbWUSCRoHcmV2aWV3cworCiNzZXJ2"
    "aWNlLmlzdGlvLmlvL2Nhbm9uaWNhbC1yZXZpc2lvbhIEGgJ2MwoPCgd2ZXJzaW9uEgQaAnYzChoKB01FU0hfSUQSDxoN"
    "Y2x1c3Rlci5sb2NhbAojCgROQU1FEhsaGXJldmlld3MtdjMtNThiNjQ3OWItNjJydjUKFgoJTkFNRVNQQUNFEgkaB2Rl"
    "ZmF1bHQKTgoFT1dORVISRRpDa3ViZXJuZXRlczovL2FwaXMvYXBwcy92MS9uYW1lc3BhY2VzL2RlZmF1bHQvZGVwbG95"
    "bWVudHMvcmV2aWV3cy12MwoXChFQTEFURk9STV9NRVRBREFUQRICKgAKHQoNV09SS0xPQURfTkFNRRIMGgpyZXZpZXdz"
    "LXYz"
)
SIDECAR_RATINGS_V1 = (
    "ChsKDkFQUF9DT05UQUlORVJTEgkaB3JhdGluZ3MKGgoKQ0xVU1RFUl9JRBIMGgpLdWJlcm5ldGVzCh0KDElOU1RBTkNF"
    "X0lQUxINGgsxNzIuMTYuMC42OQoZCg1JU1RJT19WRVJTSU9OEggaBjEuMTQuNQrVAQoGTEFCRUxTEsoBKscBChAKA2Fw"
    "cBIJGgdyYXRpbmdzCiEKEXBvZC10ZW1wbGF0ZS1oYXNoEgwaCjg1Y2M0NmI2ZDQKJAoZc2VjdXJpdHkuaXN0aW8uaW8v"
    "dGxzTW9kZRIHGgVpc3RpbwosCh9zZXJ2aWNlLmlzdGlvLmlvL2Nhbm9uaWNhbC1uYW1lEgkaB3JhdGluZ3MKKwojc2Vy"
    "dmljZS5pc3Rpby5pby9jYW5vbmljYWwtcmV2aXNpb24SBBoCdjEKDwoHdmVyc2lvbhIEGgJ2MQoaCgdNRVNIX0lEEg8a"
    "DWNsdXN0ZXIubG9jYWwKJQoETkFNRRIdGhtyYXRpbmdzLXYxLTg1Y2M0NmI2ZDQtbjdxZGcKFgoJTkFNRVNQQUNFEgka"
    "B2RlZmF1bHQKTgoFT1dORVISRRpDa3ViZXJuZXRlczovL2FwaXMvYXBwcy92MS9uYW1lc3BhY2VzL2RlZmF1bHQvZGVw"
    "bG95bWVudHMvcmF0aW5ncy12MQoXChFQTEFURk9STV9NRVRBREFUQRICKgAKHQoNV09SS0xPQURfTkFNRRIMGgpyYXRp"
    "bmdzLXYx"
)


def sidecar(workload: str, app: str, version: str) -> PeerIdentity:
    """A bookinfo workload as Istio's stats name it (no principal without mTLS)."""
    return PeerIdentity(
        workload=workload,
        namespace="default",
        app=app,
        version=version,
        canonical_service=app,
        canonical_revision=version,
        cluster="Kubernetes",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(SIDECAR_REVIEWS_V3, sidecar("reviews-v3", "reviews", "v3"), id="request"),
        pytest.param(SIDECAR_RATINGS_V1, sidecar("ratings-v1", "ratings", "v1"), id="response"),
    ],
)
def test_a_sidecars_header_names_its_workload(value: str, expected: PeerIdentity) -> None:
    """A header captured from a real sidecar gives the labels Istio's own stats would."""
    assert decode(value) == expected
    assert decode(value.rstrip("=") + "=" * 0) == expected  # Envoy reads it unpadded too


def test_what_we_send_is_what_protobuf_writes() -> None:
    """Our Struct is byte for byte the protobuf runtime's deterministic serialization of the
    fields Istio's sidecars send (no principal: Istio takes it from mTLS only)."""
    (name, value), (id_name, node) = istio_headers(REVIEWS)
    assert (name, id_name) == ("x-envoy-peer-metadata", "x-envoy-peer-metadata-id")
    expected = struct_pb2.Struct()
    expected.update(
        {
            "NAMESPACE": "bookinfo",
            "WORKLOAD_NAME": "reviews-v2",
            "CLUSTER_ID": "east-1",
            "LABELS": {
                "app": "reviews",
                "version": "v2",
                "service.istio.io/canonical-name": "reviews",
                "service.istio.io/canonical-revision": "v2",
            },
        }
    )
    assert base64.b64decode(value, validate=True) == expected.SerializeToString(deterministic=True)
    assert decode(value) == dataclasses.replace(identity_of(REVIEWS), principal="unknown")
    assert node.startswith("meshlib~") and node.isascii() and len(node) < 64


def test_the_id_changes_with_the_metadata() -> None:
    """The receiving proxy caches a peer's metadata under its id: a new version of the same
    workload must not be taken for the old one, and every instance of one version shares it."""

    def reviews(version: str) -> MeshConfig:
        return MeshConfig(service="reviews", version=version, workload=f"reviews-{version}")

    assert istio_headers(reviews("v2"))[1] != istio_headers(reviews("v3"))[1]
    assert istio_headers(reviews("v2")) == istio_headers(reviews("v2"))


def test_unknown_fields_are_not_sent() -> None:
    """A workload that does not know its name or labels sends what it knows."""
    (_, value), _ = istio_headers(MeshConfig())
    sent = struct_pb2.Struct()
    sent.ParseFromString(base64.b64decode(value))
    assert set(sent.fields) == {"NAMESPACE", "CLUSTER_ID", "LABELS"}
    assert dict(sent.fields["LABELS"].struct_value.fields)["service.istio.io/canonical-revision"]


# Values as protobuf's Struct holds them: strings, numbers, booleans, null, lists, Structs.
_scalars = st.one_of(st.text(max_size=20), st.floats(allow_nan=False), st.booleans(), st.none())
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _values, max_size=8))
def test_any_struct_decodes_as_protobuf_reads_it(fields: dict[str, Any]) -> None:
    """Whatever Struct the protobuf runtime writes, `_struct.decode` finds its strings and
    those of its Structs one level down, and skips the rest."""
    message = struct_pb2.Struct()
    message.update(fields)
    expected: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            expected[key] = value
        elif isinstance(value, dict):
            expected[key] = {k: v for k, v in value.items() if isinstance(v, str)}
    assert _struct.decode(message.SerializeToString()) == expected


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=8))
def test_encode_is_protobufs_deterministic_serialization(fields: dict[str, str]) -> None:
    """Keys in order, as Envoy writes them. (Where one key is a prefix of another, upb, the
    Python runtime, puts the longer first, and C++'s protobuf, Envoy's, the shorter, as
    `encode` does: no two of the keys Istio sends are so.)"""
    assume(not any(a != b and b.startswith(a) for a in fields for b in fields))
    message = struct_pb2.Struct()
    message.update(fields)
    assert _struct.encode(fields) == message.SerializeToString(deterministic=True)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    """Any bytes, base64-encoded as a peer would send them, decode to valid, bounded fields."""
    found = decode(base64.b64encode(data).decode())
    for field in dataclasses.fields(found):
        text = getattr(found, field.name)
        assert 0 < len(text) <= 512 and text.isascii() and text.isprintable()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Cg", id="truncated"),
        pytest.param("C!==", id="not-base64"),
        pytest.param(base64.b64encode(b"\x0a\x05\x0a\x03abc").decode(), id="entry-cut-short"),
        pytest.param(base64.b64encode(b"\x0b").decode(), id="group-wire-type"),
        pytest.param(
            base64.b64encode(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").decode(),
            id="varint-overflow",
        ),
        pytest.param("Q2c" + "é", id="not-ascii"),
    ],
)
def test_malformed_structs_are_the_unknown_peer(value: str) -> None:
    assert decode(value) == UNKNOWN_PEER


def test_values_outside_kubernetes_rules_are_unknown() -> None:
    """Istio's form is checked as meshlib's is: a value no workload could have is "unknown"."""
    message = struct_pb2.Struct()
    message.update(
        {"WORKLOAD_NAME": "bad name!", "NAMESPACE": "x" * 64, "LABELS": {"app": "ratings"}}
    )
    found = decode(base64.b64encode(message.SerializeToString()).decode())
    assert found == PeerIdentity(app="ratings")


def test_exchange_headers_in_both_forms() -> None:
    assert peer.EXCHANGE_HEADERS == (
        "x-meshlib-peer-metadata",
        "x-envoy-peer-metadata",
        "x-envoy-peer-metadata-id",
    )


def test_meshlibs_form_is_taken_only_when_it_names_istios_workload() -> None:
    """A meshlib peer names itself in both forms, and its own (with the principal) is taken;
    a meshlib header relayed past a sidecar (a proxy copying its request's headers) names
    another workload than the sidecar's Istio header, which is taken."""
    (_, istio), _ = istio_headers(REVIEWS)
    mine = peer.encode(REVIEWS)
    assert peer.claim(mine, istio) is mine
    assert peer.claim(mine, SIDECAR_RATINGS_V1) == SIDECAR_RATINGS_V1  # relayed: stale
    assert peer.claim(mine, None) is mine and peer.claim(None, istio) is istio
    assert peer.claim("", istio) is istio and peer.claim(None, None) is None


def test_a_oneof_set_twice_is_its_last_value() -> None:
    """As protobuf reads a Value whose kind comes twice: the last one wins."""

    def field(tag: int, payload: bytes) -> bytes:
        return bytes((tag, len(payload))) + payload

    value = field(0x1A, b"first") + field(0x1A, b"last")  # string_value twice
    entry = field(0x0A, b"NAMESPACE") + field(0x12, value)
    assert _struct.decode(field(0x0A, entry)) == {"NAMESPACE": "last"}
    number_last = field(0x1A, b"text") + bytes((0x11,)) + bytes(8)  # then number_value
    entry = field(0x0A, b"NAMESPACE") + field(0x12, number_last)
    assert _struct.decode(field(0x0A, entry)) == {}
