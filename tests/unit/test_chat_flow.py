"""The gateway's chat flow with small fakes behind it: routing, failover, in-band errors,
conversation memory, the cache replay, speaking, consensus."""

from __future__ import annotations

import grpc
import pytest
from capibara_gateway.cache import MemoryStore, ResponseCache
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatDone, ChatInput, RoutingDecision

from capibara_grpc.audio import AudioChunk
from capibara_grpc.chat.types import Token
from capibara_grpc.config import CacheConfig
from capibara_grpc.errors import InvalidArgument, MeshError, ResourceExhausted, StreamError, Unavailable
from tests.unit.fakes import (
    FakeContext,
    FakeModels,
    FakeRouter,
    FakeSpeech,
    Model,
    collect,
    fake_consensus,
    mesh_config,
)

CONFIG = mesh_config()


def gateway(models: FakeModels, **services) -> ChatGateway:
    return ChatGateway(CONFIG, models.generate, **services)


def kinds(events: list) -> list[str]:
    return [type(event).__name__ for event in events]


def text(events: list) -> str:
    return "".join(event.text for event in events if isinstance(event, Token))


async def test_a_chat_streams_routing_tokens_and_done_in_that_order():
    models = FakeModels()
    events = await collect(gateway(models, route=FakeRouter("beta")).chat(ChatInput("hola"), 5.0))
    assert kinds(events) == ["RoutingDecision", "Token", "Token", "Token", "ChatDone"]
    assert events[0].model_id == "beta" and events[0].source == "router" and not events[0].failed_models
    assert text(events) == "Hola, mundo" and events[-1].finished.model_id == "beta"
    # Without a context service: the configured system prompt and the message.
    assert [(m.role, m.content) for m in models.calls[0][1]] == [("system", "Be brief."), ("user", "hola")]
    assert models.closed == ["beta"]


async def test_first_model_down_fails_over_and_the_routing_event_says_so():
    models = FakeModels(alpha=Model(fail_first=Unavailable("backend http://127.0.0.1:9 unreachable")))
    events = await collect(gateway(models, route=FakeRouter("alpha")).chat(ChatInput("hola"), 5.0))
    routing = events[0]
    assert routing.model_id == "beta" and routing.fallback and routing.failed_models == ["alpha"]
    assert "failed over to beta" in routing.reasoning and "alpha (UNAVAILABLE" in routing.reasoning
    assert text(events) == "Hola, mundo" and models.called == ["alpha", "beta"]


async def test_a_full_model_fails_over_like_a_down_one():
    models = FakeModels(alpha=Model(fail_first=ResourceExhausted("alpha queue is full", retry_after_s=1)))
    events = await collect(gateway(models).chat(ChatInput("hola"), 5.0))  # no router: the default, alpha
    assert events[0].source == "default" and events[0].model_id == "beta"
    assert "alpha (RESOURCE_EXHAUSTED: alpha queue is full)" in events[0].reasoning


async def test_fallbacks_come_before_the_routers_next_best():
    models = FakeModels(alpha=Model(fail_first=Unavailable("down")), beta=Model(fail_first=Unavailable("down")))
    router = FakeRouter(
        "alpha", scores=[("programming", "alpha", 0.6), ("creative", "gamma", 0.3), ("math", "beta", 0.1)]
    )
    events = await collect(gateway(models, route=router).chat(ChatInput("hola"), 5.0))
    assert models.called == ["alpha", "beta", "gamma"]
    assert events[0].model_id == "gamma" and events[0].failed_models == ["alpha", "beta"]


async def test_a_named_model_never_fails_over():
    models = FakeModels(alpha=Model(fail_first=Unavailable("alpha is down")))
    with pytest.raises(MeshError) as raised:
        await collect(gateway(models, route=FakeRouter()).chat(ChatInput("hola", model="alpha"), 5.0))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.message == "alpha is down"
    assert models.called == ["alpha"]


async def test_every_candidate_down_is_a_status_naming_them():
    models = FakeModels(
        alpha=Model(fail_first=Unavailable("alpha is down")), beta=Model(fail_first=Unavailable("beta is down"))
    )
    with pytest.raises(MeshError) as raised:
        await collect(gateway(models).chat(ChatInput("hola"), 5.0))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert "after failing over from alpha (UNAVAILABLE: alpha is down)" in raised.value.message


async def test_failing_mid_stream_is_an_in_band_error_and_never_fails_over():
    models = FakeModels(alpha=Model(fail_after=1, fail_with=Unavailable("backend died")))
    events = await collect(gateway(models).chat(ChatInput("hola"), 5.0))
    assert kinds(events) == ["RoutingDecision", "Token", "StreamError"]
    assert events[-1] == StreamError("UNAVAILABLE", "backend died")
    assert models.called == ["alpha"] and models.closed == ["alpha"]


async def test_a_stream_without_a_final_event_ends_with_an_internal_error():
    events = await collect(gateway(FakeModels(alpha=Model(finish=False))).chat(ChatInput("hola"), 5.0))
    assert events[-1] == StreamError("INTERNAL", "the inference stream ended without a final event")


async def test_complete_turns_the_in_band_error_into_a_status():
    models = FakeModels(alpha=Model(fail_after=2, fail_with=Unavailable("backend died")))
    with pytest.raises(MeshError) as raised:
        await gateway(models).complete(ChatInput("hola"), 5.0)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.message == "backend died"
    result = await gateway(FakeModels()).complete(ChatInput("hola"), 5.0)
    assert result.response == "Hola, mundo" and result.routing.model_id == "alpha"


@pytest.mark.parametrize(
    "chat, code",
    [
        (ChatInput("   "), grpc.StatusCode.INVALID_ARGUMENT),
        (ChatInput("x" * 20000), grpc.StatusCode.INVALID_ARGUMENT),
        (ChatInput("hola", model="nope"), grpc.StatusCode.NOT_FOUND),
        (ChatInput("hola", consensus=True), grpc.StatusCode.UNIMPLEMENTED),
        (ChatInput("hola", speak=True), grpc.StatusCode.UNIMPLEMENTED),
    ],
    ids=["blank", "too-long", "unknown-model", "no-consensus", "no-speech"],
)
async def test_bad_requests_fail_before_anything_is_called(chat, code):
    models = FakeModels()
    with pytest.raises(MeshError) as raised:
        await collect(gateway(models).chat(chat, 5.0))
    assert raised.value.code == code and models.calls == []


async def test_the_router_down_routes_to_the_default_model_and_says_why():
    router = FakeRouter(error=Unavailable("router is down"))
    events = await collect(gateway(FakeModels(), route=router).chat(ChatInput("hola"), 5.0))
    assert events[0].model_id == "alpha" and events[0].fallback and events[0].source == "default"
    assert "router unavailable (UNAVAILABLE: router is down)" in events[0].reasoning


async def test_conversation_turns_are_stored_and_feed_the_routers_follow_ups():
    context, router = FakeContext(), FakeRouter("gamma")
    chat = gateway(FakeModels(), route=router, context=context)
    await collect(chat.chat(ChatInput("first", conversation_id="c1"), 5.0))
    await collect(chat.chat(ChatInput("second", conversation_id="c1"), 5.0))
    assert context.turns[:2] == [("c1", "user", "first", ""), ("c1", "assistant", "Hola, mundo", "gamma")]
    assert router.queries[1] == ("second", ["first"])
    assert context.enriched == ["gamma", "gamma"]


async def test_an_answer_that_was_not_stored_ends_with_an_in_band_error():
    context = FakeContext(fail_append=Unavailable("database is down"))
    events = await collect(gateway(FakeModels(), context=context).chat(ChatInput("hola", conversation_id="c1"), 5.0))
    assert kinds(events)[-2:] == ["Token", "StreamError"]
    assert events[-1] == StreamError("UNAVAILABLE", "the answer was not stored: database is down")


def cache(**settings) -> ResponseCache:
    return ResponseCache(CacheConfig(**settings), MemoryStore(100))


async def test_a_cache_hit_replays_the_answer_without_generating():
    models = FakeModels()
    chat = gateway(models, cache=cache())
    first = await collect(chat.chat(ChatInput("hola"), 5.0))
    again = await collect(chat.chat(ChatInput("hola"), 5.0))
    assert models.called == ["alpha"]
    assert kinds(again) == kinds(first) and text(again) == text(first)
    assert first[-1].finished.cache_hit == "" and again[-1].finished.cache_hit == "exact"


async def test_a_sampled_request_bypasses_the_cache_and_a_failed_answer_is_not_stored():
    models = FakeModels(alpha=Model(fail_after=1))
    chat = gateway(models, cache=cache())
    await collect(chat.chat(ChatInput("hola"), 5.0))
    models.models["alpha"] = Model()
    await collect(chat.chat(ChatInput("hola"), 5.0))
    sampled = ChatInput("hola")
    sampled.params.temperature = 0.8
    await collect(chat.chat(sampled, 5.0))
    assert models.called == ["alpha", "alpha", "alpha"]


async def test_a_cache_that_is_down_does_not_fail_the_chat():
    broken = cache()

    async def lookup(*args):
        raise ConnectionError("redis is down")

    broken.lookup = lookup
    events = await collect(gateway(FakeModels(), cache=broken).chat(ChatInput("hola"), 5.0))
    assert isinstance(events[-1], ChatDone)


async def test_a_spoken_answer_sends_its_audio_after_the_text():
    speech = FakeSpeech()
    chat = ChatInput("hola", speak=True, voice="espeak:es")
    events = await collect(gateway(FakeModels(alpha=Model(tokens=["Uno. ", "Dos."])), speech=speech).chat(chat, 5.0))
    assert kinds(events) == ["RoutingDecision", "Token", "Token", "ChatDone", "AudioChunk", "AudioChunk"]
    assert [e.sentence_index for e in events if isinstance(e, AudioChunk)] == [0, 1]


async def test_speech_failing_after_the_text_is_an_in_band_error():
    speech = FakeSpeech(error=Unavailable("espeak-ng failed"))
    events = await collect(gateway(FakeModels(), speech=speech).chat(ChatInput("hola", speak=True), 5.0))
    assert kinds(events)[-2:] == ["ChatDone", "StreamError"]
    assert events[-1] == StreamError("UNAVAILABLE", "the answer could not be spoken: espeak-ng failed")


async def test_nothing_is_spoken_after_an_in_band_error():
    speech = FakeSpeech()
    models = FakeModels(alpha=Model(fail_after=1))
    events = await collect(gateway(models, speech=speech).chat(ChatInput("hola", speak=True), 5.0))
    assert kinds(events) == ["RoutingDecision", "Token", "StreamError"] and speech.spoken == []


async def test_an_unknown_voice_is_not_found():
    with pytest.raises(MeshError) as raised:
        await collect(gateway(FakeModels(), speech=FakeSpeech()).chat(ChatInput("hola", voice="nope"), 5.0))
    assert raised.value.code == grpc.StatusCode.NOT_FOUND and "available: espeak:es" in raised.value.message


async def test_consensus_is_one_routing_event_one_token_and_done():
    events = await collect(gateway(FakeModels(), consensus=fake_consensus).chat(ChatInput("hola", consensus=True), 5.0))
    assert kinds(events) == ["RoutingDecision", "Token", "ChatDone"]
    routing: RoutingDecision = events[0]
    assert routing.source == "consensus" and routing.model_id == "beta" and events[1].text == "42"
    assert events[2].finished.completion_tokens == 3


async def test_a_client_that_goes_away_closes_the_upstream_stream():
    models = FakeModels(alpha=Model(tokens=["a"] * 50))
    stream = gateway(models).chat(ChatInput("hola"), 5.0)
    assert isinstance(await anext(stream), RoutingDecision)
    await anext(stream)
    await stream.aclose()
    assert models.closed == ["alpha"]


async def test_invalid_sampling_parameters_are_rejected():
    chat = ChatInput("hola")
    chat.params.max_tokens = 0
    with pytest.raises(InvalidArgument):
        await collect(gateway(FakeModels()).chat(chat, 5.0))
