"""An agent loop run by a real agent library against the mesh's /v1: the OpenAI Agents SDK
(openai-agents) with its Chat Completions model pointed at the edge, calling a local Python tool.
Once against a fake upstream that calls tools (the loop: call, the tool's result, the answer that
uses it), once against the local stand-in llama-server with the tool required."""

from __future__ import annotations

import json

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from tests.support.fake_upstreams import FakeUpstream
from tests.support.mesh import launched_model, running_mesh

BASE = 12000  # edge 12001, services 12050-12055, metrics 12070-12075, llama-server 12080, admin 12901
set_tracing_disabled(True)  # no trace export to OpenAI's servers


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream(flavor="openai", models=["gpt-test"]) as up:
        yield up


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstream):
    models = {
        "gpt-oss-20b": {
            "backend": {"url": upstream.base_url, "protocol": "openai", "model_name": "gpt-test"},
            "defaults": {"max_tokens": 40},
        },
        "phi": launched_model(BASE + 80, protocol="openai", temperature=0),
    }
    with running_mesh(tmp_path_factory.mktemp("agents"), BASE, models, router=False) as running:
        yield running


def mesh_model(mesh, model_id: str) -> OpenAIChatCompletionsModel:
    http_client = openai.DefaultAsyncHttpxClient(verify=mesh.ssl_context())
    client = openai.AsyncOpenAI(base_url=mesh.base_url + "/v1", api_key="none", http_client=http_client)
    return OpenAIChatCompletionsModel(model=model_id, openai_client=client)


def weather_tool(calls: list[str]):
    @function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city.

        Args:
            city: the city's name.
        """
        calls.append(city)
        return f"18 °C and sunny in {city}"

    return get_weather


def describe(event) -> str | None:
    """One line of the streamed transcript, or None for what is not worth a line."""
    if event.type == "raw_response_event":
        data = event.data
        if data.type == "response.output_text.delta":
            return f"  text delta {data.delta!r}"
        if data.type == "response.function_call_arguments.delta":
            return f"  arguments delta {data.delta!r}"
        if data.type == "response.output_item.added" and getattr(data.item, "type", "") == "function_call":
            return f"  call started: {data.item.name} ({data.item.call_id})"
        return None
    if event.type == "agent_updated_stream_event":
        return f"agent: {event.new_agent.name}"
    item = event.item
    if item.type == "tool_call_item":
        return f"tool call: {item.raw_item.name}({item.raw_item.arguments})"
    if item.type == "tool_call_output_item":
        return f"tool output: {item.output!r}"
    if item.type == "message_output_item":
        return "message: " + "".join(getattr(part, "text", "") for part in item.raw_item.content)
    return f"{event.name}"


async def run_streamed(agent: Agent, question: str, **run) -> tuple[object, list[str]]:
    result = Runner.run_streamed(agent, question, **run)
    transcript = []
    async for event in result.stream_events():
        if (line := describe(event)) is not None:
            transcript.append(line)
    return result, transcript


async def test_an_agent_loop_against_a_model_that_calls_tools(mesh, upstream):
    calls: list[str] = []
    agent = Agent(
        name="weather",
        instructions="Answer with the weather, using the tool.",
        tools=[weather_tool(calls)],
        model=mesh_model(mesh, "gpt-oss-20b"),
    )
    result, transcript = await run_streamed(agent, "What is the weather in Paris?", max_turns=4)
    print("\n--- streamed agent loop (openai-agents, /v1, model gpt-oss-20b) ---")
    print("\n".join(transcript))
    assert calls == ["Paris"]
    assert result.final_output == "tool said: 18 °C and sunny in Paris"
    assert any(line.startswith("tool call: get_weather(") for line in transcript)
    # Two model calls reached the upstream: the tool's schema as the SDK wrote it, then its result.
    bodies = [r.body for r in upstream.requests if r.path.endswith("/chat/completions")][-2:]
    assert bodies[0]["tools"][0]["function"]["name"] == "get_weather"
    assert bodies[1]["messages"][-1]["role"] == "tool"
    assert bodies[1]["messages"][-1]["content"] == "18 °C and sunny in Paris"


async def test_an_agent_with_the_tool_required_on_the_local_stand_in(mesh):
    calls: list[str] = []
    agent = Agent(
        name="weather",
        instructions="Use the get_weather tool.",
        tools=[weather_tool(calls)],
        model=mesh_model(mesh, "phi"),
        model_settings=ModelSettings(tool_choice="required", max_tokens=60),
        # tool_choice required holds on every turn: the first tool result ends the run.
        tool_use_behavior="stop_on_first_tool",
    )
    result, transcript = await run_streamed(
        agent, "What is the weather in Paris?", max_turns=2, run_config=RunConfig(tracing_disabled=True)
    )
    print("\n--- streamed agent loop (openai-agents, /v1, local stand-in phi) ---")
    print("\n".join(transcript))
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == f"18 °C and sunny in {calls[0]}"
    call = next(line for line in transcript if line.startswith("tool call: "))
    assert json.loads(call[len("tool call: get_weather(") : -1]) == {"city": calls[0]}
