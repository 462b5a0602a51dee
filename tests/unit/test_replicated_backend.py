"""A model with replicas that the inference service balances itself (backend.balance: affinity),
against fake llama-servers over loopback: turns of a conversation go to one server, a refused
server's chats go to the other, health and Prometheus figures say so."""

from __future__ import annotations

import pathlib

import pytest
import yaml
from prometheus_client import REGISTRY

from capibara_grpc.chat.types import Finished, Message, SamplingParams
from capibara_grpc.config import parse_config
from capibara_grpc.config.schema import TracingConfig, url_host_port
from capibara_grpc.errors import Unavailable
from capibara_grpc.inference.backends import ReplicatedBackend
from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.telemetry import install, spans
from capibara_grpc.telemetry.receiver import OtlpReceiver
from capibara_grpc.telemetry.settings import resolve
from tests.support.fake_upstreams import FakeUpstream, serving


@pytest.fixture
def servers():
    with serving({"a": FakeUpstream("llama_server"), "b": FakeUpstream("llama_server")}) as started:
        yield started


@pytest.fixture
async def engine(servers):
    backend = {"url": servers["a"].root_url, "protocol": "llama_cpp", "replicas": [servers["b"].root_url]}
    text = yaml.safe_dump(
        {
            "models": {"m": {"backend": backend}},
            "gateway": {"default_model": "m"},
            "router": {"enabled": False},
        }
    )
    engine = InferenceEngine(parse_config(text, source="unit.yaml", check_files={"inference"}), 60)
    await engine.start()
    yield engine
    await engine.stop()


def conversation(first: str, turns: int) -> list[Message]:
    messages = [Message("system", "Be brief."), Message("user", first)]
    for turn in range(turns):
        messages += [Message("assistant", f"answer {turn}"), Message("user", f"and then {turn}?")]
    return messages


async def chat(engine, messages) -> Finished:
    items = [item async for item in engine.generate("m", messages, SamplingParams(max_tokens=5))]
    assert isinstance(items[-1], Finished)
    return items[-1]


def served(servers) -> dict[str, int]:
    return {name: len(server.chat_requests()) for name, server in servers.items()}


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_model_is_balanced_by_the_inference_service(engine):
    assert isinstance(engine.backends["m"], ReplicatedBackend)
    assert engine.config.backend_base_url("m") == engine.config.models["m"].backend.url.rstrip("/")


async def test_a_conversations_turns_go_to_one_server_and_another_conversation_to_the_other(engine, servers):
    for turn in range(4):
        await chat(engine, conversation("first conversation", turn))
    counts = served(servers)
    assert sorted(counts.values()) == [0, 4], counts
    await chat(engine, conversation("second conversation", 0))
    assert sorted(served(servers).values()) == [1, 4]


async def test_a_refused_server_loses_no_chat_and_its_conversations_move(engine, servers):
    await chat(engine, conversation("moving", 0))
    (home,) = [name for name, count in served(servers).items() if count]
    other = "b" if home == "a" else "a"
    servers[home].stop()  # as a killed server: its connections closed, new ones refused
    for turn in range(1, 4):
        await chat(engine, conversation("moving", turn))
    assert served(servers)[other] == 3
    picker = engine.backends["m"].picker
    assert picker.last.url == servers[other].root_url and picker.last.outcome == "affinity"
    (status,) = await engine.list_models()
    assert status.healthy and "1 of 2 servers down" in status.status, status
    assert sample("capibara_replica_up", model="m", replica=servers[home].root_url) == 0


async def test_a_503_while_loading_goes_to_the_other_server(engine, servers):
    await chat(engine, conversation("loading", 0))
    (home,) = [name for name, count in served(servers).items() if count]
    servers[home].fail_next(503, body={"error": {"message": "Loading model"}})
    await chat(engine, conversation("loading", 1))
    other = "b" if home == "a" else "a"
    assert served(servers)[other] == 1


async def test_every_server_down_is_unavailable(engine, servers):
    for server in servers.values():
        server.stop()
    with pytest.raises(Unavailable):
        await chat(engine, conversation("nobody", 0))
    (status,) = await engine.list_models()
    assert not status.healthy and status.status.startswith("every server is down"), status


async def test_the_choices_are_prometheus_metrics(engine, servers):
    await chat(engine, conversation("counted", 0))
    await chat(engine, conversation("counted", 1))
    choice = engine.backends["m"].picker.last
    assert sample("capibara_replica_choices_total", model="m", replica=choice.url, outcome="affinity") >= 1
    assert sample("capibara_replica_pinned_conversations", model="m", replica=choice.url) >= 1
    assert sample("capibara_replica_in_flight", model="m", replica=choice.url) == 0
    assert sample("capibara_replica_last_choice_timestamp_seconds", model="m", replica=choice.url, outcome="affinity")


def test_least_requests_keeps_the_model_on_envoys_models_listener():
    from capibara_grpc.edge.envoy_config import build

    servers = ["http://127.0.0.1:7080", "http://127.0.0.1:7081"]

    def config(balance: str):
        backend = {"url": servers[0], "protocol": "llama_cpp", "replicas": servers[1:], "balance": balance}
        text = yaml.safe_dump(
            {"models": {"m": {"backend": backend}}, "gateway": {"default_model": "m"}, "router": {"enabled": False}}
        )
        return parse_config(text, source="unit.yaml", check_files=set())

    least, affinity = config("least_requests"), config("affinity")
    assert least.backend_base_url("m") == f"http://127.0.0.1:{least.edge.models_port}/models/m"
    assert affinity.backend_base_url("m") == servers[0]
    files = (pathlib.Path("capibara.pb"), pathlib.Path("edge.crt"), pathlib.Path("edge.key"))
    clusters = {c["name"] for c in build(least, *files)["static_resources"]["clusters"]}
    assert "model-m" in clusters
    rendered = build(affinity, *files)["static_resources"]
    assert "model-m" not in {c["name"] for c in rendered["clusters"]}
    assert all(listener["name"] != "models" for listener in rendered["listeners"])
    # Admission: the model's slots are every server's.
    assert affinity.models["m"].slots == 8 and affinity.models["m"].server_slots == 4


async def test_a_traced_chat_names_the_replica_that_answered_on_the_model_calls_span(engine, servers):
    async with OtlpReceiver() as receiver:
        uninstall = await install(resolve(TracingConfig(endpoint=receiver.endpoint, schedule_delay_ms=50), {}), "x")
        try:
            generate = spans.TRACER.start("Generate", spans.SERVER, None, "inference")
            token = spans.current.set(generate)
            await chat(engine, conversation("Hello", 0))
            spans.current.reset(token)
            generate.end()
            received = await receiver.wait_for(lambda got: got if len(got) == 2 else None, 5)
        finally:
            await uninstall()
    (call,) = [s for s in received if s.name.startswith("chat ")]
    answered = "a" if served(servers)["a"] else "b"
    host, port = url_host_port(servers[answered].root_url)
    assert (call.attributes["server.address"], call.attributes["server.port"]) == (host, port)
    assert call.attributes["capibara.replica.choice"] and call.attributes["gen_ai.usage.output_tokens"] > 0
