"""Tool calling in the gateway's core with small fakes behind it: tool call pieces stream through
and are assembled by complete(), chats with tools go only to models that take them, and what is
refused (a named model without tools, consensus) is a 400 naming the field. A stored conversation
with tools: test_tools_conversation.py."""

from __future__ import annotations

import dataclasses

import pytest
from capibara_gateway import servicer
from capibara_gateway.cache import MemoryStore, ResponseCache
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatDone, ChatInput, RoutingDecision, assemble_tool_calls

from capibara_grpc.chat.types import Message, SamplingParams, ToolCall, ToolCallDelta
from capibara_grpc.config import CacheConfig
from capibara_grpc.errors import InvalidField, Unavailable
from capibara_grpc.stubs import inference_pb2
from tests.unit.fakes import FakeContext, FakeModels, FakeRouter, Model, collect, fake_consensus, mesh_config

# alpha (the default, falling back to beta) does not take tools.
CONFIG = mesh_config()
CONFIG.models["alpha"] = dataclasses.replace(CONFIG.models["alpha"], tools=False)
WEATHER = '{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{}}}}'
CALLS = [
    ToolCallDelta(0, "call_1", "get_weather", ""),
    ToolCallDelta(0, arguments='{"city":'),
    ToolCallDelta(0, arguments='"Lima"}'),
    ToolCallDelta(1, "call_2", "get_weather", '{"city":"Cusco"}'),
]


def with_tools(**fields) -> ChatInput:
    return ChatInput("what's the weather in Lima?", params=SamplingParams(tools=[WEATHER]), **fields)


def gateway(models: FakeModels, **services) -> ChatGateway:
    return ChatGateway(CONFIG, models.generate, **services)


def test_pieces_assemble_into_whole_calls_in_index_order():
    assert assemble_tool_calls(list(reversed(CALLS[3:])) + CALLS[:3]) == [
        ToolCall("call_1", "get_weather", '{"city":"Lima"}'),
        ToolCall("call_2", "get_weather", '{"city":"Cusco"}'),
    ]


async def test_tool_call_pieces_stream_through_and_become_grpc_events():
    models = FakeModels(beta=Model(tokens=[], tool_calls=CALLS))
    events = await collect(gateway(models).chat(with_tools(model="beta"), 5.0))
    assert [type(e).__name__ for e in events] == ["RoutingDecision", *["ToolCallDelta"] * 4, "ChatDone"]
    assert events[-1].finished.finish_reason == "tool_calls"
    assert models.params[0].tools == [WEATHER]
    pb = [servicer.event_to_pb(e) for e in events]
    assert pb[1].tool_call.id == "call_1" and pb[1].tool_call.name == "get_weather"
    assert pb[2].tool_call.index == 0 and pb[2].tool_call.arguments == '{"city":'
    assert pb[-1].done.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS


async def test_complete_returns_the_whole_calls():
    models = FakeModels(beta=Model(tokens=["Let me check."], tool_calls=CALLS))
    result = await gateway(models).complete(with_tools(model="beta"), 5.0)
    assert result.response == "Let me check." and result.done.finished.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call_1", "get_weather", '{"city":"Lima"}'),
        ("call_2", "get_weather", '{"city":"Cusco"}'),
    ]


async def test_auto_routes_only_among_models_that_take_tools():
    models = FakeModels()
    events = await collect(gateway(models, route=FakeRouter("alpha")).chat(with_tools(), 5.0))
    routing = events[0]
    assert isinstance(routing, RoutingDecision) and routing.model_id == "beta"
    assert "alpha does not take tools" in routing.reasoning
    assert models.called == ["beta"]
    # Without tools the router's pick stands.
    models = FakeModels()
    await collect(gateway(models, route=FakeRouter("alpha")).chat(ChatInput("hola"), 5.0))
    assert models.called == ["alpha"]


async def test_failover_with_tools_skips_models_that_do_not_take_them():
    models = FakeModels(beta=Model(fail_first=Unavailable("down")))
    router = FakeRouter("beta", scores=[("a", "beta", 0.5), ("b", "alpha", 0.3), ("c", "gamma", 0.2)])
    events = await collect(gateway(models, route=router).chat(with_tools(), 5.0))
    assert models.called == ["beta", "gamma"] and events[0].model_id == "gamma"


async def test_a_conversation_with_tool_messages_also_goes_to_a_model_that_takes_tools():
    messages = [
        Message("user", "weather in Lima?"),
        Message("assistant", "", [ToolCall("call_1", "get_weather", '{"city":"Lima"}')]),
        Message("tool", "sunny", tool_call_id="call_1"),
    ]
    models = FakeModels()
    await collect(gateway(models).chat(ChatInput("weather in Lima?", messages=messages), 5.0))
    assert models.called == ["beta"]
    sent = models.calls[0][1]
    assert [m.role for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[2].tool_calls[0].id == "call_1" and sent[3].tool_call_id == "call_1"


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"model": "alpha"}, "model", "model 'alpha' does not take tools"),
        ({"consensus": True}, "tools", "consensus does not take tools"),
    ],
)
async def test_refused_with_tools_naming_the_field(fields, field, words):
    models = FakeModels()
    gw = gateway(models, consensus=fake_consensus, context=FakeContext())
    with pytest.raises(InvalidField) as refused:
        await collect(gw.chat(with_tools(**fields), 5.0))
    assert refused.value.field == field and words in refused.value.text
    assert models.calls == []


async def test_an_answer_that_calls_tools_is_not_cached():
    cache = ResponseCache(CacheConfig(enabled=True), MemoryStore(100))
    models = FakeModels(beta=Model(tokens=["Checking."], tool_calls=CALLS))
    gw = gateway(models, cache=cache)
    for _ in range(2):
        events = await collect(gw.chat(with_tools(model="beta"), 5.0))
        assert isinstance(events[-1], ChatDone) and events[-1].finished.cache_hit == ""
    assert models.called == ["beta", "beta"]
    # A text answer to the same request with tools is cached (the key holds the tools).
    models.models["beta"] = Model(tokens=["Sunny."])
    await collect(gw.chat(with_tools(model="beta"), 5.0))
    events = await collect(gw.chat(with_tools(model="beta"), 5.0))
    assert events[-1].finished.cache_hit == "exact" and len(models.called) == 3
