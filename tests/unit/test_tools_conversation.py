"""A stored conversation with tools, in the gateway's core and its edges: the answer that calls tools
is stored with its calls, the next request brings the tool results (native `messages` of tool
messages with conversation_id, or /v1 tool messages with capibara.conversation_id), each result is
stored once, and the question they answer is the stored one."""

from __future__ import annotations

import dataclasses
import json

import pytest
from capibara_gateway import openai_api, servicer
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatInput

from capibara_grpc.chat.types import Message, SamplingParams, ToolCall, ToolCallDelta
from capibara_grpc.errors import InvalidField
from capibara_grpc.stubs import gateway_pb2, inference_pb2
from tests.unit.fakes import FakeContext, FakeModels, Model, collect, mesh_config

CONFIG = mesh_config()
WEATHER = '{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{}}}}'
CALLS = [ToolCallDelta(0, "call_1", "get_weather", '{"city":'), ToolCallDelta(0, arguments='"Lima"}')]
RESULT = Message("tool", "19 C, cloudy", tool_call_id="call_1")


class ToolMemory(FakeContext):
    """FakeContext that also keeps each turn's tool calls and call id, and what Enrich was given."""

    def __init__(self):
        super().__init__()
        self.extras: list[tuple[list[ToolCall], str]] = []
        self.results: list[list[Message] | None] = []

    async def enrich(self, message, conversation_id, model_id, timeout_s, route="", tool_results=None):
        self.results.append(tool_results)
        return [*await super().enrich(message, conversation_id, model_id, timeout_s, route), *(tool_results or [])]

    async def append_turn(
        self, conversation_id, role, content, model_id, timeout_s, tool_calls=None, tool_call_id=""
    ) -> None:
        await super().append_turn(conversation_id, role, content, model_id, timeout_s)
        self.extras.append((tool_calls or [], tool_call_id))


async def test_the_call_is_stored_then_the_results_and_the_answer():
    memory = ToolMemory()
    models = FakeModels(alpha=Model(tokens=[], tool_calls=CALLS))
    gateway = ChatGateway(CONFIG, models.generate, context=memory)
    params = SamplingParams(tools=[WEATHER])
    await collect(gateway.chat(ChatInput("weather in Lima?", conversation_id="c", params=params), 5.0))
    assert memory.turns == [("c", "user", "weather in Lima?", ""), ("c", "assistant", "", "alpha")]
    assert memory.extras[1] == ([ToolCall("call_1", "get_weather", '{"city":"Lima"}')], "")

    models.models["alpha"] = Model(tokens=["19 C in Lima."])
    second = ChatInput("", conversation_id="c", params=params, messages=[RESULT])
    await collect(gateway.chat(second, 5.0))
    assert memory.results[-1] == [RESULT]
    assert models.calls[-1][1][-2:] == [Message("user", "weather in Lima?"), RESULT]  # the stored question
    assert memory.turns[2:] == [("c", "tool", "19 C, cloudy", ""), ("c", "assistant", "19 C in Lima.", "alpha")]
    assert memory.extras[2:] == [([], "call_1"), ([], "")]


@pytest.mark.parametrize(
    ("chat", "field", "words"),
    [
        (ChatInput("hola", conversation_id="c", messages=[RESULT]), "message", "either message or tool results"),
        (
            ChatInput("", conversation_id="c", messages=[RESULT, Message("user", "and?")]),
            "messages[1].role",
            "only tool results",
        ),
        (ChatInput("", conversation_id="c", messages=[Message("tool", "x")]), "messages[0].tool_call_id", "required"),
        (ChatInput("", conversation_id="empty", messages=[RESULT]), "messages", "no tool calls"),
    ],
)
async def test_tool_results_that_cannot_be_answered_are_refused(chat, field, words):
    models = FakeModels()
    with pytest.raises(InvalidField) as refused:
        await collect(ChatGateway(CONFIG, models.generate, context=ToolMemory()).chat(chat, 5.0))
    assert refused.value.field == field and words in refused.value.text
    assert models.calls == []


def test_native_requests_send_tool_results_as_messages_with_the_conversation_id():
    tool = inference_pb2.ChatMessage(role=inference_pb2.ROLE_TOOL, content="19 C", tool_call_id="call_1")
    chat = servicer.chat_input_from_pb(gateway_pb2.ChatRequest(conversation_id="c", messages=[tool]))
    assert (
        chat.message == "" and chat.conversation_id == "c" and chat.messages == [Message("tool", "19 C", [], "call_1")]
    )
    user = inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content="hola")
    with pytest.raises(InvalidField, match="only tool results"):
        servicer.chat_input_from_pb(gateway_pb2.CompleteRequest(conversation_id="c", messages=[user]))


def test_openai_tool_messages_with_the_conversation_id_are_the_new_input():
    body = {
        "model": "alpha",
        "tools": [json.loads(WEATHER)],
        "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "19 C"}],
        "capibara": {"conversation_id": "c"},
    }
    chat = openai_api.parse_chat_request(json.dumps(body).encode(), CONFIG).chat
    assert (
        chat.conversation_id == "c" and chat.message == "" and chat.messages == [Message("tool", "19 C", [], "call_1")]
    )
    user_and_tools = dict(body, messages=[{"role": "user", "content": "hola"}, *body["messages"]])
    with pytest.raises(InvalidField, match="or only the tool messages"):
        openai_api.parse_chat_request(json.dumps(user_and_tools).encode(), CONFIG)
    one_user = dict(body, messages=[{"role": "user", "content": "hola"}])  # tools with a stored conversation
    chat = openai_api.parse_chat_request(json.dumps(one_user).encode(), CONFIG).chat
    assert chat.messages is None and chat.message == "hola" and chat.params.tools
    assert dataclasses.asdict(chat)["conversation_id"] == "c"
