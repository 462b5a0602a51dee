"""The status page's figures for a model with replicas the inference service balances: read from
its Prometheus text (capibara_replica_*), shown per server with the last choice."""

from __future__ import annotations

from capibara_gateway import status_probes
from capibara_gateway.status import MeshStatus, Sample
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from capibara_grpc.stubs import gateway_pb2

A, B = "http://127.0.0.1:7080", "http://127.0.0.1:7081"


def exposition() -> str:
    registry = CollectorRegistry()
    labels = ["model", "replica"]
    in_flight = Gauge("capibara_replica_in_flight", "i", labels, registry=registry)
    pinned = Gauge("capibara_replica_pinned_conversations", "p", labels, registry=registry)
    up = Gauge("capibara_replica_up", "u", labels, registry=registry)
    choices = Counter("capibara_replica_choices", "c", [*labels, "outcome"], registry=registry)
    last = Gauge("capibara_replica_last_choice_timestamp_seconds", "l", [*labels, "outcome"], registry=registry)
    in_flight.labels("phi", A).set(2)
    in_flight.labels("phi", B).set(0)
    pinned.labels("phi", A).set(7)
    pinned.labels("phi", B).set(3)
    up.labels("phi", A).set(1)
    up.labels("phi", B).set(0)
    choices.labels("phi", A, "affinity").inc(20)
    choices.labels("phi", A, "new").inc(7)
    choices.labels("phi", B, "fallback").inc(2)
    choices.labels("phi", B, "new").inc(1)
    last.labels("phi", A, "affinity").set(1000.0)
    last.labels("phi", B, "fallback").set(1005.0)
    Gauge("capibara_queue_depth", "q", ["model"], registry=registry).labels("phi").set(1)
    return generate_latest(registry).decode()


def test_each_server_and_the_last_choice_are_read_from_the_inference_metrics():
    replicas = status_probes.parse_replicas(exposition())
    assert replicas == {
        "phi": {
            "replicas": [
                {"url": A, "in_flight": 2, "pinned": 7, "up": True, "affinity": 20, "new_conversations": 7},
                {"url": B, "in_flight": 0, "pinned": 3, "up": False, "fallback": 2, "new_conversations": 1},
            ],
            "last_replica": {"url": B, "outcome": "fallback", "at": 1005.0},
        }
    }
    assert status_probes.parse_replicas("") == {}


def test_the_snapshot_carries_them_as_get_status_response_fields():
    status = MeshStatus(["phi", "mixtral"], {})
    text = exposition()
    status.record_sample(Sample(load=status_probes.parse_load(text), replicas=status_probes.parse_replicas(text)))
    response = json_format.ParseDict(status.snapshot(), gateway_pb2.GetStatusResponse())
    by_model = {m.model_id: m for m in response.models}
    phi = by_model["phi"]
    assert [(r.url, r.in_flight, r.pinned, r.affinity, r.fallback, r.up) for r in phi.replicas] == [
        (A, 2, 7, 20, 0, True),
        (B, 0, 3, 0, 2, False),
    ]
    assert (phi.last_replica.url, phi.last_replica.outcome) == (B, "fallback")
    assert not by_model["mixtral"].replicas and not by_model["mixtral"].HasField("last_replica")
