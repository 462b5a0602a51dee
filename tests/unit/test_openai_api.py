"""The OpenAI-compatible API's request checks and answer shapes, without a mesh."""

from __future__ import annotations

import json

import pytest
from capibara_gateway import openai_api
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatDone, RoutingDecision

from capibara_grpc.chat.types import Finished, ToolCall, ToolCallDelta
from capibara_grpc.config import load_config
from capibara_grpc.errors import InvalidArgument, InvalidField, NotFound

CONFIG = load_config()
HELLO = [{"role": "user", "content": "hola"}]
# Keys in an order json.dumps(sort_keys=True) would change: the tool must reach the model as sent.
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, ñ",
        "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}


# The gateway's own check, which every edge's request goes through after its translation.
GATEWAY = ChatGateway(CONFIG, generate=None)


def parse(**body):
    return openai_api.parse_chat_request(json.dumps(body).encode(), CONFIG)


def parse_and_validate(**body):
    """What the /v1 edge refuses: the JSON's shapes (openai_api) and the chat core's limits."""
    parsed = parse(**body)
    GATEWAY.validate(parsed.chat)
    return parsed


def test_auto_consensus_and_a_model_id():
    auto = parse(model="auto", messages=HELLO)
    assert auto.chat.model == "" and not auto.chat.consensus and auto.chat.use_router
    assert parse(model="consensus", messages=HELLO).chat.consensus
    assert parse(model="phi", messages=HELLO).chat.model == "phi"


def test_the_messages_are_the_conversation_and_the_last_user_turn_is_the_message():
    parsed = parse(
        model="phi",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "last"},
        ],
    )
    assert [(m.role, m.content) for m in parsed.chat.messages] == [
        ("system", "be brief"),
        ("user", "ab"),
        ("assistant", "ok"),
        ("user", "last"),
    ]
    assert parsed.chat.message == "last"


def test_sampling_fields():
    parsed = parse(
        model="phi",
        messages=HELLO,
        max_completion_tokens=9,
        temperature=0.5,
        top_p=0.9,
        stop="\n",
        seed=3,
        user="u",
        n=1,
        response_format={"type": "text"},
        stream=True,
        stream_options={"include_usage": True},
    )
    p = parsed.chat.params
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (9, 0.5, 0.9, ["\n"], 3)
    assert parsed.stream and parsed.include_usage


@pytest.mark.parametrize(
    "body, param",
    [
        ({"n": 2}, "n"),
        ({"functions": []}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"tools": {}}, "tools"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [{"role": "assistant", "content": None}, *HELLO]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}, *HELLO]}, "messages[0].tool_calls[0]"),
        ({"messages": [*HELLO, {"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[1].tool_call_id"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.1}, "frequency_penalty"),
        ({"response_format": {"type": "grammar"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**400}, "max_tokens"),
        ({"max_completion_tokens": 10000}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ],
)
def test_what_is_not_supported_is_refused_naming_the_field(body, param):
    with pytest.raises(InvalidField) as refused:
        parse_and_validate(**{"model": "phi", "messages": HELLO, **body})
    assert refused.value.field == param


def test_response_format_becomes_a_json_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert json.loads(parse(model="phi", messages=HELLO, response_format=spec).chat.params.json_schema) == schema
    as_object = parse(model="phi", messages=HELLO, response_format={"type": "json_object"})
    assert json.loads(as_object.chat.params.json_schema) == {"type": "object"}
    assert parse(model="phi", messages=HELLO, response_format={"type": "text"}).chat.params.json_schema == ""


def test_unknown_model_and_bad_json():
    with pytest.raises(NotFound, match="param model: the model 'gpt5' does not exist"):
        parse(model="gpt5", messages=HELLO)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        openai_api.parse_chat_request(b"{", CONFIG)
    with pytest.raises(NotFound, match="consensus"):
        openai_api.parse_chat_request(json.dumps({"model": "consensus", "messages": HELLO}).encode(), CONFIG, False)


def test_answer_and_chunks_in_openai_shapes():
    decision = RoutingDecision("phi", "conversation", 0.9, "router", "why", failed_models=["ghost"])
    done = ChatDone(Finished("stop_sequence", prompt_tokens=3, completion_tokens=2, model_id="phi"), 12.0)
    completion = openai_api.Completion("auto")
    answer = completion.response("hi", decision, done)
    assert answer["object"] == "chat.completion" and answer["model"] == "phi"
    assert answer["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert answer["capibara"]["failed_models"] == ["ghost"]
    first = completion.first_chunk(decision, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert completion.last_chunk(done, False)["choices"][0]["finish_reason"] == "stop"
    assert completion.usage_chunk(done)["choices"] == []
    assert openai_api.sse("[DONE]") == b"data: [DONE]\n\n"
    assert openai_api.sse({"a": "ñ"}) == 'data: {"a":"ñ"}\n\n'.encode()
    assert dict(openai_api.routing_headers(decision))["x-capibara-failed-models"] == "ghost"


def test_models():
    ids = [m["id"] for m in openai_api.model_list(CONFIG, True)]
    assert ids[:2] == ["auto", "consensus"] and set(CONFIG.models) <= set(ids)
    assert "consensus" not in [m["id"] for m in openai_api.model_list(CONFIG, False)]
    with pytest.raises(NotFound):
        openai_api.model_entry(CONFIG, True, "nope")


def test_embedding_requests():
    one = openai_api.parse_embedding_request(b'{"model": "m", "input": "hola"}')
    assert one.texts == ["hola"] and not one.base64
    many = openai_api.parse_embedding_request(b'{"model": "m", "input": ["a", "b"], "encoding_format": "base64"}')
    assert many.texts == ["a", "b"] and many.base64
    answer = openai_api.embedding_response(many, [[1.0, 0.0], [0.0, 1.0]], 4, "minilm")
    assert answer["usage"] == {"prompt_tokens": 4, "total_tokens": 4} and answer["model"] == "minilm"
    assert answer["data"][1]["index"] == 1 and isinstance(answer["data"][1]["embedding"], str)
    for body, param in (
        ({"input": "x"}, "model"),
        ({"model": "m", "input": [1, 2]}, "input"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": "x", "dimensions": 8}, "dimensions"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ):
        with pytest.raises(InvalidField) as refused:
            openai_api.parse_embedding_request(json.dumps(body).encode())
        assert refused.value.field == param


def test_speech_requests():
    parsed = openai_api.parse_speech_request(b'{"model": "tts-1", "input": "hola", "voice": "espeak:es"}')
    assert (parsed.text, parsed.voice, parsed.response_format) == ("hola", "espeak:es", "wav")
    for body, param in (
        ({"model": "tts-1", "input": "x", "response_format": "mp3"}, "response_format"),
        ({"model": "tts-1", "input": " "}, "input"),
        ({"model": "tts-1", "input": "x", "speed": 2}, "speed"),
        ({"model": "tts-1", "input": "x", "instructions": "sing"}, "instructions"),
    ):
        with pytest.raises(InvalidField) as refused:
            openai_api.parse_speech_request(json.dumps(body).encode())
        assert refused.value.field == param


def test_the_native_chat_request_takes_a_message_list():
    from capibara_gateway.servicer import chat_input_from_pb

    from capibara_grpc.stubs import gateway_pb2, inference_pb2

    def turn(role, content):
        return inference_pb2.ChatMessage(role=role, content=content)

    request = gateway_pb2.ChatRequest(
        messages=[turn(inference_pb2.ROLE_SYSTEM, "brief"), turn(inference_pb2.ROLE_USER, "hola")], model="phi"
    )
    chat = chat_input_from_pb(request)
    assert chat.message == "hola" and [m.role for m in chat.messages] == ["system", "user"]
    assert chat_input_from_pb(gateway_pb2.CompleteRequest(message="hola")).messages is None
    for bad_request in (
        gateway_pb2.ChatRequest(message="x", messages=[turn(inference_pb2.ROLE_USER, "y")]),
        gateway_pb2.ChatRequest(messages=[turn(inference_pb2.ROLE_ASSISTANT, "y")]),
        gateway_pb2.CompleteRequest(messages=[turn(inference_pb2.ROLE_UNSPECIFIED, "y")]),
    ):
        with pytest.raises(InvalidField) as refused:
            GATEWAY.validate(chat_input_from_pb(bad_request))
        assert refused.value.field.startswith("messages")


def test_the_conversation_id_extension_uses_the_stored_history():
    parsed = parse(model="phi", messages=HELLO, capibara={"conversation_id": "c1"})
    assert parsed.chat.conversation_id == "c1" and parsed.chat.messages is None and parsed.chat.message == "hola"
    two = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    for body, param in (
        ({"messages": two, "capibara": {"conversation_id": "c1"}}, "messages"),
        ({"capibara": {"memory": True}}, "capibara"),
        ({"capibara": {"conversation_id": 5}}, "capibara.conversation_id"),
    ):
        with pytest.raises(InvalidField) as refused:
            parse(**{"model": "phi", "messages": HELLO, **body})
        assert refused.value.field == param


def test_tools_and_tool_choice():
    parsed = parse_and_validate(
        model="phi", messages=HELLO, tools=[TOOL], tool_choice="required", parallel_tool_calls=False
    )
    params = parsed.chat.params
    assert params.tools == [json.dumps(TOOL, ensure_ascii=False, separators=(",", ":"))]
    assert params.tools[0].startswith('{"type":"function","function":{"name":"get_weather","description"')
    assert params.tool_choice == "required" and params.parallel_tool_calls is False
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_and_validate(model="phi", messages=HELLO, tools=[TOOL], tool_choice=named).chat.params.tool_choice == (
        "get_weather"
    )
    for choice in ("auto", "none"):
        assert parse(model="auto", messages=HELLO, tools=[TOOL], tool_choice=choice).chat.params.tool_choice == choice
    plain = parse(model="phi", messages=HELLO).chat.params
    assert plain.tools == [] and plain.tool_choice == "" and plain.parallel_tool_calls is None


def test_a_conversation_with_tool_calls_and_results():
    messages = [
        {"role": "user", "content": "weather in Lima?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Lima"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
    ]
    chat = parse_and_validate(model="phi", messages=messages, tools=[TOOL]).chat
    assert chat.message == "weather in Lima?"
    assert [(m.role, m.content, m.tool_call_id) for m in chat.messages] == [
        ("user", "weather in Lima?", ""),
        ("assistant", "", ""),
        ("tool", "sunny", "call_1"),
    ]
    assert chat.messages[1].tool_calls == [ToolCall("call_1", "get_weather", '{"city":"Lima"}')]


def test_tool_calls_in_openai_shapes_and_as_the_sdk_assembles_them():
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    decision = RoutingDecision("phi", "conversation", 0.9, "router", "why")
    done = ChatDone(Finished("tool_calls", prompt_tokens=3, completion_tokens=9, model_id="phi"), 12.0)
    completion = openai_api.Completion("auto")
    calls = [ToolCall("call_1", "get_weather", '{"city":"Lima"}'), ToolCall("call_2", "get_weather", "{}")]
    answer = completion.response("", decision, done, tool_calls=calls)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0] == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Lima"}'},
    }
    assert completion.response("Checking.", decision, done, tool_calls=calls)["choices"][0]["message"]["content"] == (
        "Checking."
    )

    deltas = [
        ToolCallDelta(0, "call_1", "get_weather", ""),
        ToolCallDelta(0, arguments='{"city":'),
        ToolCallDelta(0, arguments='"Lima"}'),
        ToolCallDelta(1, "call_2", "get_weather", "{}"),
    ]
    chunks = [completion.first_chunk(decision, False)]
    for delta in deltas:
        chunks += completion.tool_call_chunks(delta)
    chunks.append(completion.last_chunk(done, False))
    assert chunks[1]["choices"][0]["delta"] == {
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        ]
    }
    assert chunks[2]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}
    # A first piece that carries arguments too: the call's first chunk, then its arguments.
    assert len(chunks) == 7 and chunks[5]["choices"][0]["delta"]["tool_calls"][0]["function"] == {"arguments": "{}"}
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        ("call_1", "function", "get_weather", '{"city":"Lima"}'),
        ("call_2", "function", "get_weather", "{}"),
    ]
