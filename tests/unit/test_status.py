"""The status core (capibara_gateway/status.py) and its probes: what the gateway counts of each chat
(through the real ChatGateway over fake models), the rolling window, health "since", the JSON's
fit to GetStatusResponse, the inference load parsed from Prometheus text, and processes found by
their listening port."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from capibara_gateway import status_probes
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatInput
from capibara_gateway.health import HealthReport, ServiceHealth
from capibara_gateway.status import ChatOutcome, ChatStats, HealthSince, MeshStatus, Sample
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from capibara_grpc.errors import Unavailable
from capibara_grpc.stubs import gateway_pb2
from tests.unit.fakes import FakeModels, FakeRouter, Model, collect, mesh_config

CONFIG = mesh_config()


class Clock:
    def __init__(self, now: float = 1_000_020.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def gateway(stats: ChatStats, **models: Model) -> ChatGateway:
    return ChatGateway(CONFIG, FakeModels(**models).generate, FakeRouter("alpha"), stats=stats)


async def test_answered_chats_are_counted_per_model_with_their_route_and_first_token():
    stats = ChatStats()
    for _ in range(3):
        await collect(gateway(stats, alpha=Model(first_token_delay_s=0.003)).chat(ChatInput(message="hola"), 5.0))
    figures = stats.models(["alpha", "beta"])
    assert figures["alpha"]["requests"] == 3 and figures["alpha"]["errors"] == 0
    assert figures["alpha"]["completion_tokens"] == 9  # three tokens each
    assert figures["alpha"]["ttft_p50_ms"] >= 3 and figures["alpha"]["ttft_p95_ms"] >= 3
    assert figures["beta"]["requests"] == 0
    assert stats.routes() == [{"route_name": "programming", "requests": 3, "mean_confidence": 0.9, "fallbacks": 0}]
    assert stats.sources() == {"router": 3}
    assert figures["alpha"]["minutes"][-1]["requests"] == 3 and len(figures["alpha"]["minutes"]) == 15


async def test_a_failover_counts_against_the_model_that_failed_and_the_chat_for_the_one_that_answered():
    stats = ChatStats()
    await collect(gateway(stats, alpha=Model(fail_first=Unavailable("down"))).chat(ChatInput(message="hola"), 5.0))
    figures = stats.models(["alpha", "beta"])
    assert (figures["alpha"]["failovers"], figures["alpha"]["requests"]) == (1, 0)
    assert (figures["beta"]["requests"], figures["beta"]["errors"]) == (1, 0)


async def test_a_stream_that_breaks_after_its_first_token_is_an_error_of_its_model():
    stats = ChatStats()
    events = await collect(gateway(stats, alpha=Model(fail_after=1)).chat(ChatInput(message="hola"), 5.0))
    assert events[-1].code == "UNAVAILABLE"
    assert stats.models(["alpha"])["alpha"]["errors"] == 1


async def test_a_chat_no_model_can_answer_is_an_error_of_the_model_asked_for():
    stats = ChatStats()
    down = Model(fail_first=Unavailable("down"))
    with pytest.raises(Unavailable):
        await collect(gateway(stats, gamma=down).chat(ChatInput(message="hola", model="gamma"), 5.0))
    assert stats.models(["gamma"])["gamma"]["errors"] == 1


def test_tokens_per_second_is_tokens_over_generation_time_and_cache_hits_stay_out_of_it():
    stats = ChatStats()
    stats.record(ChatOutcome("alpha", "math", 0.5, "router", ttft_s=0.2, generation_s=2.0, completion_tokens=40))
    stats.record(ChatOutcome("alpha", "math", 0.7, "router", ttft_s=0.4, generation_s=2.0, completion_tokens=20))
    stats.record(ChatOutcome("alpha", "math", 0.9, "router", ttft_s=0.001, completion_tokens=60, cache_hit="exact"))
    figures = stats.models(["alpha"])["alpha"]
    assert figures["tokens_per_second"] == 15.0  # 60 tokens in 4 s; the replayed 60 are not generated
    assert (figures["ttft_p50_ms"], figures["ttft_p95_ms"]) == (200.0, 400.0)
    assert (figures["requests"], figures["cache_hits"]) == (3, 1)
    assert stats.routes()[0]["mean_confidence"] == 0.7


def test_chats_older_than_the_window_are_forgotten():
    clock = Clock()
    stats = ChatStats(window_minutes=15, clock=clock)
    stats.record(ChatOutcome("alpha", "math", 0.5, "router"))
    clock.now += 14 * 60
    stats.record(ChatOutcome("alpha", "math", 0.5, "router"))
    assert stats.models(["alpha"])["alpha"]["requests"] == 2
    clock.now += 60
    assert stats.models(["alpha"])["alpha"]["requests"] == 1
    assert stats.routes()[0]["requests"] == 1 and stats.sources() == {"router": 1}


def test_expired_minutes_are_dropped_when_the_minute_changes_and_not_on_every_chat():
    clock = Clock()
    stats = ChatStats(window_minutes=2, clock=clock)
    stats.record(ChatOutcome("alpha"))
    first = int(clock.now // 60)
    clock.now += 2 * 60
    stats.record(ChatOutcome("alpha"))
    assert first not in stats._models
    stats._models[first] = {}  # an expired bucket the same minute's chats no longer look for
    stats.record(ChatOutcome("alpha"))
    assert first in stats._models and stats.models(["alpha"])["alpha"]["requests"] == 2
    clock.now += 60
    stats.record(ChatOutcome("alpha"))
    assert first not in stats._models and stats.models(["alpha"])["alpha"]["requests"] == 3


def test_since_is_when_the_status_last_changed():
    clock = Clock(100.0)
    health = HealthSince(clock)
    health.update("phi", "SERVING")
    clock.now = 150.0
    health.update("phi", "SERVING")
    assert health.get("phi")["since"] == 100.0
    health.update("phi", "NOT_SERVING", "unreachable")
    assert health.get("phi") == {"status": "NOT_SERVING", "detail": "unreachable", "since": 150.0}
    assert health.get("never")["status"] == "UNKNOWN"


def test_the_snapshot_is_a_valid_get_status_response():
    clock = Clock()
    status = MeshStatus(["alpha", "beta"], {"gateway": "capibara.gateway.v1.ChatService"}, clock)
    alpha = "capibara.inference.v1.InferenceService/alpha"
    beta = "capibara.inference.v1.InferenceService/beta"
    report = HealthReport(
        [
            ServiceHealth("capibara.gateway.v1.ChatService", "SERVING"),
            ServiceHealth(alpha, "SERVING"),
            ServiceHealth(beta, "NOT_SERVING", "unreachable"),
        ],
        models=[alpha, beta],
    )
    status.record_health(report)
    status.record_sample(Sample(load={"alpha": (2.0, 1.0)}, memory={"envoy": (42, 30.5)}))
    status.chats.record(ChatOutcome("alpha", "math", 0.5, "router", completion_tokens=3, generation_s=1.0))
    keys = [{"key": "team-a", "model": "alpha", "requests": 1, "errors": 0, "prompt_tokens": 5, "completion_tokens": 3}]
    response = json_format.ParseDict(status.snapshot(keys), gateway_pb2.GetStatusResponse())
    assert response.status == "DEGRADED" and response.down == [f"{beta} NOT_SERVING (unreachable)"]
    by_model = {m.model_id: m for m in response.models}
    assert by_model["alpha"].status == "SERVING" and by_model["beta"].detail == "unreachable"
    assert (by_model["alpha"].queue_depth, by_model["alpha"].active_generations) == (2.0, 1.0)
    # beta has no gauge yet (nothing admitted for it): its plot is flat zero, not missing.
    assert [(p.queue_depth, p.active_generations) for p in by_model["beta"].load] == [(0.0, 0.0)]
    assert by_model["alpha"].requests == 1 and by_model["alpha"].tokens_per_second == 3.0
    assert response.services[0].name == "gateway" and response.services[0].since == clock.now
    assert response.processes[0].name == "envoy" and response.processes[0].rss_mib == 30.5
    assert response.keys[0].key == "team-a" and response.cache.answered == 1


def test_inference_load_is_read_from_its_prometheus_text():
    registry = CollectorRegistry()
    queue = Gauge("capibara_queue_depth", "q", ["model"], registry=registry)
    active = Gauge("capibara_active_generations", "a", ["model"], registry=registry)
    queue.labels("phi").set(3)
    active.labels("phi").set(2)
    active.labels("mixtral").set(1)
    load = status_probes.parse_load(generate_latest(registry).decode())
    assert load == {"phi": (3.0, 2.0), "mixtral": (0.0, 1.0)}


def test_a_process_is_found_by_the_port_it_listens_on():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert status_probes.pids_by_port({port}) == {port: os.getpid()}
        config = mesh_config()
        config.edge.port = port
        found = status_probes.memory(config)
    assert found["envoy"][0] == os.getpid() and found["envoy"][1] > 1
    # Nothing listens there any more.
    assert status_probes.pids_by_port({port}) == {}


async def test_a_chat_whose_client_went_away_before_its_first_token_is_not_an_error():
    stats = ChatStats()
    slow = Model(first_token_delay_s=5.0)
    chat = asyncio.create_task(collect(gateway(stats, alpha=slow).chat(ChatInput(message="hola"), 10.0)))
    await asyncio.sleep(0.1)
    chat.cancel()  # as grpc.aio cancels the handler when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await chat
    figures = stats.models(["", "alpha", "beta"])  # "": no model chosen yet
    assert sum(f["requests"] for f in figures.values()) == 1, figures  # it was counted
    assert sum(f["errors"] for f in figures.values()) == 0, figures  # and not as an error
