"""Tool calling on the inference side, through a real mesh (`capibara up`) and its gRPC edge:
InferenceService.Generate against a fake of each kind of model server
(tests/support/fake_upstreams.py, each streaming tool calls in its own wire format) and against the
shipped stand-in, SmolLM2-135M on a llama-server the mesh launches with
config/templates/chatml-tools.jinja.
"""

from __future__ import annotations

import json

import pytest

from capibara_grpc.stubs import inference_pb2 as pb
from capibara_grpc.stubs import inference_pb2_grpc
from tests.support.channels import edge_channel
from tests.support.fake_upstreams import FLAVORS, FakeUpstream, serving
from tests.support.mesh import launched_model, running_mesh

BASE = 15000  # edge 15001, services 15050.., llama-server 15080, admin 15901
# JSON text as a client wrote it: spacing and key order are the client's, and must reach the server so.
WEATHER = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",'
    ' "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
CLOCK = (
    '{"function": {"name": "get_time", "description": "Get the local time in a city",'
    ' "parameters": {"required": ["city"], "properties": {"city": {"type": "string"}}, "type": "object"}},'
    ' "type": "function"}'
)
ASK = pb.ChatMessage(role=pb.ROLE_USER, content="What is the weather in Paris?")


@pytest.fixture(scope="module")
def upstreams():
    servers = {
        flavor: FakeUpstream(flavor=flavor, tool_calls=2, tool_arguments={"city": "Paris"}) for flavor in FLAVORS
    }
    with serving(servers):
        yield servers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstreams):
    models = {
        flavor: {
            "backend": {"url": up.base_url, "protocol": "openai", "server": flavor, "model_name": "gpt-test"},
            "defaults": {"max_tokens": 40},
        }
        for flavor, up in upstreams.items()
    }
    models["local"] = launched_model(BASE + 80)
    with running_mesh(tmp_path_factory.mktemp("tool-backends"), BASE, models, router=False) as running:
        yield running


async def generate(mesh, model_id: str, messages: list[pb.ChatMessage], **params) -> list[pb.GenerateResponse]:
    async with edge_channel(mesh) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(model_id=model_id, messages=messages, params=pb.GenerationParams(**params))
        return [response async for response in stub.Generate(request, timeout=120)]


def calls(responses: list[pb.GenerateResponse]) -> list[dict]:
    """The tool calls the chunks make, put together as a client does: by index, the id and name
    from the first piece, the arguments appended."""
    made: dict[int, dict] = {}
    for response in responses:
        if response.WhichOneof("chunk") == "tool_call":
            piece = response.tool_call
            call = made.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or piece.id
            call["name"] += piece.name
            call["arguments"] += piece.arguments
    return [made[i] for i in sorted(made)]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_each_server_gets_the_tools_as_sent_and_its_streamed_calls_arrive_whole(mesh, upstreams, flavor):
    responses = await generate(mesh, flavor, [ASK], tools=[WEATHER, CLOCK], parallel_tool_calls=True)
    sent = upstreams[flavor].chat_requests()[-1].body
    assert [json.dumps(tool) for tool in sent["tools"]] == [WEATHER, CLOCK]  # key order and all
    made = calls(responses)
    assert [c["name"] for c in made] == ["get_weather", "get_time"]
    assert all(json.loads(c["arguments"]) == {"city": "Paris"} for c in made)
    assert all(c["id"] for c in made) and made[0]["id"] != made[1]["id"]
    assert not [r for r in responses if r.WhichOneof("chunk") == "token"]
    done = responses[-1].done
    assert responses[-1].WhichOneof("chunk") == "done" and done.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert done.usage.completion_tokens > 0


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_the_tool_result_goes_back_and_the_answer_uses_it(mesh, flavor):
    first = await generate(mesh, flavor, [ASK], tools=[WEATHER], parallel_tool_calls=False)
    (call,) = calls(first)
    history = [
        ASK,
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(**call)]),
        pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id=call["id"], content="sunny, 21 C"),
    ]
    responses = await generate(mesh, flavor, history, tools=[WEATHER])
    answer = "".join(r.token.text for r in responses if r.WhichOneof("chunk") == "token")
    assert answer == "tool said: sunny, 21 C"
    assert responses[-1].done.finish_reason == pb.FINISH_REASON_STOP


# -- the stand-in: SmolLM2-135M on a real llama-server ---------------------------------------------


@pytest.mark.parametrize("choice, name", [("required", None), ("get_time", "get_time")])
async def test_the_stand_in_makes_a_valid_call_when_one_is_required_or_named(mesh, choice, name):
    responses = await generate(
        mesh, "local", [ASK], tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=100, temperature=0
    )
    made = calls(responses)
    assert made, [r for r in responses if r.WhichOneof("chunk") == "token"]
    assert made[0]["name"] == name if name else made[0]["name"] in ("get_weather", "get_time")
    assert isinstance(json.loads(made[0]["arguments"]), dict) and made[0]["id"]
    assert responses[-1].done.finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_the_stand_in_answers_text_without_tools(mesh):
    responses = await generate(mesh, "local", [ASK], max_tokens=20, temperature=0)
    assert not calls(responses) and "".join(r.token.text for r in responses if r.WhichOneof("chunk") == "token")
