"""Metadata exchange in Istio's form: `x-envoy-peer-metadata`, a base64 protobuf Struct.

The codec is checked against the protobuf runtime (what Envoy's sidecars use) both ways, and
against headers captured from real Istio sidecars.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
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


def node_metadata(labels: int) -> dict[str, Any]:
    """What an older sidecar (Istio's metadata_exchange filter) sends: every key of its node
    metadata listed in EXCHANGE_KEYS, platform metadata of a GKE node, and all the pod's
    labels — Istio's and `labels` more of a typical length (a team's or a tool's)."""
    pod_labels = {
        "app": "reviews",
        "version": "v3",
        "pod-template-hash": "58b6479b",
        "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": "reviews",
        "service.istio.io/canonical-revision": "v3",
        **{f"example.com/label-{i:03d}": f"value-{i:03d}-{'x' * 24}" for i in range(labels)},
    }
    return {
        "APP_CONTAINERS": "reviews,log-shipper",
        "CLUSTER_ID": "Kubernetes",
        "INSTANCE_IPS": "10.52.0.34,fe80::a075:11ff:fe5e:f1cd",
        "ISTIO_VERSION": "1.14.5",
        "LABELS": pod_labels,
        "MESH_ID": "cluster.local",
        "NAME": "reviews-v3-58b6479b-62rv5",
        "NAMESPACE": "default",
        "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/reviews-v3",
        "PLATFORM_METADATA": {
            "gcp_cluster_location": "us-central1-c",
            "gcp_cluster_name": "prod-cluster-1",
            "gcp_gce_instance": "gke-prod-cluster-1-default-pool-1a2b3c4d-x9z8",
            "gcp_gce_instance_id": "1234567890123456789",
            "gcp_gce_instance_created_by": "projects/1234567890/zones/us-central1-c/"
            "instanceGroupManagers/gke-prod-cluster-1-default-pool-1a2b3c4d-grp",
            "gcp_gke_cluster_url": "https://container.googleapis.com/v1/projects/my-project/"
            "locations/us-central1-c/clusters/prod-cluster-1",
            "gcp_project": "my-project",
            "gcp_project_number": "1234567890",
        },
        "SERVICE_ACCOUNT": "bookinfo-reviews",
        "WORKLOAD_NAME": "reviews-v3",
    }


def sidecar_header(labels: int) -> str:
    """`node_metadata(labels)` as the sidecar sends it: serialized by the protobuf runtime,
    deterministically, and base64-encoded."""
    message = struct_pb2.Struct()
    message.update(node_metadata(labels))
    return base64.b64encode(message.SerializeToString(deterministic=True)).decode()


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(0, id="istio-labels-only-1.6k"),
        pytest.param(20, id="20-more-3.2k"),
        pytest.param(60, id="60-more-6.6k"),
        pytest.param(170, id="170-more-15.8k"),
    ],
)
def test_a_large_sidecar_header_names_its_workload(labels: int) -> None:
    """Older sidecars send their whole node metadata: on a GKE node with a few labels that
    is already close to meshlib's own form's 2,048 characters, and a pod with many labels
    sends several KiB. Up to MAX_ISTIO_HEADER_LENGTH it names the workload as Istio's stats
    would."""
    value = sidecar_header(labels)
    assert len(value) <= peer.MAX_ISTIO_HEADER_LENGTH
    assert decode(value) == sidecar("reviews-v3", "reviews", "v3")


def test_an_istio_header_over_its_limit_is_unknown_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sidecar header longer than MAX_ISTIO_HEADER_LENGTH is the unknown peer, and one
    warning (not one per request) names the header, its length and the limit."""
    value = sidecar_header(200)
    assert len(value) > peer.MAX_ISTIO_HEADER_LENGTH
    peer._warned.discard(peer.ISTIO_HEADER)  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="meshlib.telemetry"):
        for _ in range(100):
            assert decode(value) is UNKNOWN_PEER
        assert decode(sidecar_header(210)) is UNKNOWN_PEER  # another one: still said once
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert f"x-envoy-peer-metadata is {len(value)} characters long" in message
    assert f"over the {peer.MAX_ISTIO_HEADER_LENGTH} meshlib reads" in message


def test_meshlibs_own_form_keeps_its_limit(caplog: pytest.LogCaptureFixture) -> None:
    """meshlib's form holds eight short values: over MAX_HEADER_LENGTH it is not read, and
    the warning names meshlib's header and its limit, whatever the length."""
    peer._warned.discard(peer.HEADER)
    too_long = "w=reviews-v3;" + "x=" + "y" * peer.MAX_HEADER_LENGTH
    with caplog.at_level(logging.WARNING, logger="meshlib.telemetry"):
        assert decode(too_long) is UNKNOWN_PEER
        assert decode("w=a;" + "y" * peer.MAX_ISTIO_HEADER_LENGTH) is UNKNOWN_PEER
    (record,) = caplog.records
    assert f"x-meshlib-peer-metadata is {len(too_long)} characters long" in record.getMessage()
    assert f"over the {peer.MAX_HEADER_LENGTH} meshlib reads" in record.getMessage()


def test_a_struct_of_too_many_fields_is_refused() -> None:
    """The decoder stops after MAX_FIELDS protobuf fields, so a crafted header of thousands of
    tiny entries costs no more than the largest real one; a real one stays far below it."""
    tiny = b"".join(_struct._field(0x0A, b"") for _ in range(_struct.MAX_FIELDS + 1))
    assert _struct.decode(tiny) is None
    assert _struct.decode(tiny[:-2]) == {}
    value = base64.b64encode(tiny).decode()
    assert len(value) <= peer.MAX_ISTIO_HEADER_LENGTH and decode(value) is UNKNOWN_PEER
    message = struct_pb2.Struct()
    message.update(node_metadata(170))
    assert _struct.decode(message.SerializeToString(), max_fields=_struct.MAX_FIELDS // 2)


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


LARGE = base64.b64decode(sidecar_header(170))  # a real-looking Struct of ~11.9 KB


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(LARGE) - 1), st.integers(0, 255), st.integers(0, len(LARGE)))
def test_a_damaged_large_header_never_raises(at: int, byte: int, cut: int) -> None:
    """A large sidecar header with one byte changed and cut anywhere decodes to valid,
    bounded fields (or the unknown peer), never an exception."""
    data = (LARGE[:at] + bytes((byte,)) + LARGE[at + 1 :])[:cut]
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
