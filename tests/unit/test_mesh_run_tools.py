"""MCP tools run by the mesh (request mcp_tools), the gateway's loop with small fakes: the model is
offered <server>__<tool>, each call it makes is run through the context service and fed back, the
answer streams once it answers text; the step limit, unknown tools, client tools that end the loop,
and what the configuration does not allow (400 naming it)."""

from __future__ import annotations

import json

import pytest
from capibara_gateway import openai_api, servicer
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatDone, ChatInput, ToolStep

from capibara_grpc.chat.types import Finished, Message, SamplingParams, Token, ToolCallDelta
from capibara_grpc.config import mcp_offer
from capibara_grpc.errors import InvalidField
from capibara_grpc.stubs import context_pb2
from tests.unit.fakes import FakeContext, collect, mesh_config

CONFIG = mesh_config("""
context:
  mcp_tool_steps: 2
  mcp_servers:
    weather:
      command: fake
      offer_tools: ["*"]
    rates:
      command: fake
      offer_tools: [exchange_rate]
      api_keys: [alice]
    hidden:
      command: fake
      tools: {forecast: {patterns: [x]}}
""")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CLIENT_TOOL = '{"type":"function","function":{"name":"get_time","parameters":{"type":"object"}}}'


class ToolContext(FakeContext):
    def __init__(self, results: dict[str, tuple[str, bool]] | None = None):
        super().__init__()
        self.results = results or {}
        self.calls: list[tuple[str, str, str]] = []

    async def list_mcp_tools(self, names, timeout_s):
        return [
            context_pb2.McpTool(server="weather", name=n, description=f"{n} tool", input_schema_json=json.dumps(SCHEMA))
            for n in ("forecast", "alerts")
        ]

    async def call_mcp_tool(self, server, name, arguments_json, timeout_s):
        self.calls.append((server, name, arguments_json))
        result, is_error = self.results.get(name, (f"{name}: sunny in {json.loads(arguments_json)['city']}", False))
        return result, is_error, 1.5


class CallingModel:
    """Calls `name` (with {"city": "Lima"}) while the last message is the user's (or always, with
    `always`, unless tool_choice is none); after tool messages answers "tool said: <results>"."""

    def __init__(self, name: str = "weather__forecast", always: bool = False):
        self.name, self.always = name, always
        self.seen: list[tuple[list[Message], SamplingParams]] = []

    async def generate(self, model_id, messages, params, timeout_s):
        self.seen.append((list(messages), params))
        last = messages[-1]
        if (last.role == "user" or self.always) and params.tool_choice != "none":
            yield ToolCallDelta(0, f"call_{len(self.seen)}", self.name, "")
            yield ToolCallDelta(0, arguments='{"city": "Lima"}')
            yield Finished("tool_calls", prompt_tokens=10, completion_tokens=4, model_id=model_id)
            return
        results = [m.content for m in messages if m.role == "tool"]
        for i, word in enumerate(["tool said:", *results[-1:]]):
            yield Token(word, i)
        yield Finished("stop", prompt_tokens=20, completion_tokens=3, model_id=model_id)


def chat(**fields) -> ChatInput:
    return ChatInput("weather in Lima?", model="beta", mcp_tools=["weather"], **fields)


async def test_a_tool_is_run_and_its_result_answered():
    model, context = CallingModel(), ToolContext()
    events = await collect(ChatGateway(CONFIG, model.generate, context=context).chat(chat(), 5.0))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["RoutingDecision", "ToolStep", "Token", "Token", "ChatDone"]
    step = events[1]
    assert (step.name, step.server, step.tool, step.is_error) == ("weather__forecast", "weather", "forecast", False)
    assert step.result == "forecast: sunny in Lima" and step.arguments == '{"city": "Lima"}'
    assert context.calls == [("weather", "forecast", '{"city": "Lima"}')]
    assert "".join(e.text for e in events if isinstance(e, Token)) == "tool said:forecast: sunny in Lima"
    done = events[-1]
    assert done.finished.finish_reason == "stop" and done.finished.prompt_tokens == 30
    # The model was offered both tools, named <server>__<tool>, with the tool's schema.
    offered = [json.loads(t)["function"] for t in model.seen[0][1].tools]
    assert [(f["name"], f["parameters"]) for f in offered] == [
        ("weather__forecast", SCHEMA),
        ("weather__alerts", SCHEMA),
    ]
    # The second round saw the call and its result.
    second = model.seen[1][0]
    assert second[-2].tool_calls[0].name == "weather__forecast" and second[-1].role == "tool"
    assert second[-1].tool_call_id == second[-2].tool_calls[0].id
    pb = servicer.event_to_pb(step)
    assert pb.tool_step.name == "weather__forecast" and pb.tool_step.ms == 1.5


async def test_complete_lists_the_steps():
    result = await ChatGateway(CONFIG, CallingModel().generate, context=ToolContext()).complete(chat(), 5.0)
    assert result.response == "tool said:forecast: sunny in Lima"
    assert [s.name for s in result.tool_steps] == ["weather__forecast"] and not result.tool_calls


async def test_a_failing_tool_goes_back_to_the_model_as_an_error():
    context = ToolContext({"forecast": ("no answer within 1 s", True)})
    events = await collect(ChatGateway(CONFIG, CallingModel().generate, context=context).chat(chat(), 5.0))
    step = next(e for e in events if isinstance(e, ToolStep))
    assert step.is_error and step.result == "no answer within 1 s"
    assert isinstance(events[-1], ChatDone)
    assert "".join(e.text for e in events if isinstance(e, Token)).endswith("no answer within 1 s")


async def test_the_step_limit_then_the_model_must_answer():
    model, context = CallingModel(always=True), ToolContext()
    events = await collect(ChatGateway(CONFIG, model.generate, context=context).chat(chat(), 5.0))
    assert sum(isinstance(e, ToolStep) for e in events) == 2 and len(context.calls) == 2
    assert [p.tool_choice for _, p in model.seen] == ["", "", "none"]
    assert isinstance(events[-1], ChatDone) and events[-1].finished.finish_reason == "stop"


async def test_an_unknown_tool_is_an_error_result():
    model, context = CallingModel(name="weather__nope"), ToolContext()
    events = await collect(ChatGateway(CONFIG, model.generate, context=context).chat(chat(), 5.0))
    step = next(e for e in events if isinstance(e, ToolStep))
    assert step.is_error and "there is no tool 'weather__nope'" in step.result and not context.calls


async def test_a_client_tool_call_ends_the_loop():
    model = CallingModel(name="get_time")
    params = SamplingParams(tools=[CLIENT_TOOL])
    events = await collect(ChatGateway(CONFIG, model.generate, context=ToolContext()).chat(chat(params=params), 5.0))
    assert [type(e).__name__ for e in events] == ["RoutingDecision", "ToolCallDelta", "ToolCallDelta", "ChatDone"]
    assert events[-1].finished.finish_reason == "tool_calls" and len(model.seen) == 1


@pytest.mark.parametrize(
    ("names", "key", "says"),
    [
        (["nowhere"], "", "no MCP server 'nowhere' offers tools"),
        (["hidden"], "", "no MCP server 'hidden' offers tools"),
        (["rates.forecast"], "alice", "the tool 'forecast' is not offered by 'rates'"),
        (["rates"], "bob", "not available to this API key"),
        (["rates"], "", "not available to this API key"),
    ],
)
async def test_what_the_config_does_not_allow_is_refused(names, key, says):
    gateway = ChatGateway(CONFIG, CallingModel().generate, context=ToolContext())
    with pytest.raises(InvalidField, match=says) as refused:
        await collect(gateway.chat(ChatInput("hi", mcp_tools=names, key_id=key), 5.0))
    assert refused.value.field == "mcp_tools"
    assert mcp_offer.allowed(CONFIG.context.mcp_servers, ["rates", "weather.x"], "alice") == [
        ("rates", ""),
        ("weather", "x"),
    ]


def test_openai_extension_takes_mcp_tools():
    body = {"model": "beta", "messages": [{"role": "user", "content": "hi"}], "capibara": {"mcp_tools": ["weather"]}}
    assert openai_api.parse_chat_request(json.dumps(body).encode(), CONFIG).chat.mcp_tools == ["weather"]
    body["capibara"] = {"mcp_tools": "weather"}
    with pytest.raises(InvalidField, match="list of"):
        openai_api.parse_chat_request(json.dumps(body).encode(), CONFIG)
    step = ToolStep("weather__forecast", "{}", "ok", False, 2.0, "weather", "forecast")
    chunk = openai_api.Completion("beta").tool_step_chunk(step)
    assert chunk["choices"][0]["delta"] == {} and chunk["capibara"]["tool_step"]["result"] == "ok"


def test_results_are_cut_saying_so():
    cut = mcp_offer.cut("x" * 500, 100)
    assert len(cut) == 100 and cut.endswith(f"[cut: {500 - cut.index(chr(10))} of 500 characters left out]")
