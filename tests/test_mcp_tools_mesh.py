"""MCP tools run by the mesh (request mcp_tools), end to end on a mesh of its own: the test MCP
server (tests/support/mcp_weather_server.py) over stdio, once answering and once hung; fake
upstreams that call tools (tests/support/fake_upstreams.py). A tool called and its result in the
answer (native stream, /v1 stream and not streamed); a hung tool cut at the server's timeout_s and
reported to the model as an error; a failing tool reported to the model; the step limit; a tool the
configuration does not offer refused with 400 naming it.

BASE 14000: edge 14001, services 14050-14055, metrics 14070-14075, admin 14901."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

from tests.support.fake_upstreams import FakeUpstream, serving
from tests.support.mcp_weather_server import ECHO_MARKER, FORECAST_MARKER
from tests.support.mesh import running_mesh

BASE = 14000
SERVER = [sys.executable, "-m", "tests.support.mcp_weather_server"]
TIMEOUT_S = 1.5
STEPS = 2


@pytest.fixture(scope="module")
def upstreams():
    servers = {
        # Calls the first tool offered with {"city": "Paris"}, then quotes its result.
        "city": FakeUpstream(flavor="openai", models=["gpt-test"]),
        # Calls it with {"text": "hola"}: right for echo, wrong for forecast (which needs a city).
        "text": FakeUpstream(flavor="llama_server", models=["phi-test"], tool_arguments={"text": "hola"}),
        # Never stops calling tools, unless tool_choice is none.
        "loop": FakeUpstream(flavor="vllm", models=["loop-test"], tools_after_results=True),
    }
    with serving(servers):
        yield servers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstreams):
    logs = tmp_path_factory.mktemp("mcp-tool-logs")

    def hosted(up: FakeUpstream, **backend) -> dict:
        return {"backend": {"url": up.base_url, "protocol": "openai", "model_name": up.models[0], **backend}}

    models = {
        "gpt-oss-20b": hosted(upstreams["city"]),
        "phi": hosted(upstreams["text"], server="llama_server"),
        "mixtral": hosted(upstreams["loop"], server="vllm"),
    }
    servers = {
        "weather": {
            "command": SERVER[0],
            "args": [*SERVER[1:], "--log", str(logs / "weather.jsonl")],
            "offer_tools": ["forecast", "echo"],
        },
        "slow": {
            "command": SERVER[0],
            "args": [*SERVER[1:], "--hang", "--log", str(logs / "slow.jsonl")],
            "timeout_s": TIMEOUT_S,
            "offer_tools": ["*"],
        },
    }
    context = {"mcp_servers": servers, "mcp_tool_steps": STEPS}
    with running_mesh(tmp_path_factory.mktemp("mcp-tools"), BASE, models, context=context) as running:
        for name in servers:
            running.wait_for_output(f"mcp server {name}: session open", timeout_s=60)
        yield running


def stream(mesh, path: str, body: dict) -> list[dict]:
    """The events (JSON) of a streamed answer, "[DONE]" left out."""
    status, text, _ = mesh.request("POST", path, body)
    assert status == 200, text
    frames = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    return [json.loads(frame) for frame in frames if frame != "[DONE]"]


def test_a_tool_is_run_and_its_result_is_in_the_answer(mesh, upstreams):
    body = {"message": "What's the weather in Paris?", "model": "gpt-oss-20b", "mcp_tools": ["weather.forecast"]}
    events = stream(mesh, "/api/chat/stream", body)
    print("native events:\n" + "\n".join(json.dumps(e, ensure_ascii=False) for e in events))
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "routing" and kinds[1] == "tool_step" and kinds[-1] == "done", kinds
    step = events[1]["tool_step"]
    assert step["name"] == "weather__forecast" and step["server"] == "weather" and step["tool"] == "forecast"
    assert json.loads(step["arguments"]) == {"city": "Paris"} and not step.get("is_error")
    assert FORECAST_MARKER in step["result"]
    answer = "".join(e["token"]["text"] for e in events if "token" in e)
    assert answer.startswith("tool said:") and FORECAST_MARKER in answer
    # What the model was offered: the tool as a function with the server's input schema.
    first = [r.body for r in upstreams["city"].chat_requests() if r.body["messages"][-1]["role"] == "user"][-1]
    (tool,) = first["tools"]
    assert tool["function"]["name"] == "weather__forecast" and tool["function"]["parameters"]["required"] == ["city"]


def test_over_v1_streamed_and_not(mesh):
    body = {
        "model": "gpt-oss-20b",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "stream": True,
        "capibara": {"mcp_tools": ["weather"]},
    }
    chunks = stream(mesh, "/v1/chat/completions", body)
    print("/v1 chunks:\n" + "\n".join(json.dumps(c, ensure_ascii=False) for c in chunks))
    steps = [c["capibara"]["tool_step"] for c in chunks if "tool_step" in c.get("capibara", {})]
    assert [s["name"] for s in steps] == ["weather__forecast"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert FORECAST_MARKER in text
    status, answer, _ = mesh.request("POST", "/v1/chat/completions", {**body, "stream": False})
    assert status == 200, answer
    assert FORECAST_MARKER in answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert [s["name"] for s in answer["capibara"]["tool_steps"]] == ["weather__forecast"]


def test_a_hung_tool_is_cut_at_its_timeout_and_the_model_told(mesh):
    body = {"message": "say hola", "model": "phi", "mcp_tools": ["slow.echo"]}
    events = stream(mesh, "/api/chat/stream", body)
    (step,) = [e["tool_step"] for e in events if "tool_step" in e]
    print("hung tool step:", json.dumps(step))
    assert step["is_error"] and f"no answer within {TIMEOUT_S:g} s" in step["result"]
    assert TIMEOUT_S * 1000 <= step["ms"] < TIMEOUT_S * 1000 + 1500, step["ms"]
    answer = "".join(e["token"]["text"] for e in events if "token" in e)
    assert "no answer within" in answer and "done" in events[-1]


def test_a_failing_tool_is_reported_to_the_model(mesh):
    # forecast needs a city; this model sends {"text": "hola"}: the server answers an error.
    events = stream(mesh, "/api/chat/stream", {"message": "weather?", "model": "phi", "mcp_tools": ["weather"]})
    (step,) = [e["tool_step"] for e in events if "tool_step" in e]
    assert step["name"] == "weather__forecast" and step["is_error"], step
    assert "city" in step["result"]
    answer = "".join(e["token"]["text"] for e in events if "token" in e)
    assert answer.startswith("tool said:") and "done" in events[-1]
    # And echo, which takes text, answers.
    events = stream(mesh, "/api/chat/stream", {"message": "echo", "model": "phi", "mcp_tools": ["weather.echo"]})
    (step,) = [e["tool_step"] for e in events if "tool_step" in e]
    assert not step.get("is_error") and ECHO_MARKER in step["result"]


def test_the_step_limit(mesh, upstreams):
    events = stream(
        mesh, "/api/chat/stream", {"message": "weather?", "model": "mixtral", "mcp_tools": ["weather.echo"]}
    )
    steps = [e["tool_step"] for e in events if "tool_step" in e]
    print("step limit:", json.dumps(steps), json.dumps(events[-1]))
    assert len(steps) == STEPS
    assert "done" in events[-1], events[-1]
    last = upstreams["loop"].chat_requests()[-1].body
    assert last["tool_choice"] == "none" and sum(m["role"] == "tool" for m in last["messages"]) == STEPS


@pytest.mark.parametrize(
    ("names", "says"),
    [
        (["weather.exchange_rate"], "the tool 'exchange_rate' is not offered by 'weather'"),
        (["nowhere"], "no MCP server 'nowhere' offers tools"),
    ],
)
def test_a_tool_not_allowed_is_a_400_naming_it(mesh, names, says):
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "hi", "model": "gpt-oss-20b", "mcp_tools": names})
    assert status == 400 and says in json.dumps(body), body
    v1 = {"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}], "capibara": {"mcp_tools": names}}
    status, body, _ = mesh.request("POST", "/v1/chat/completions", v1)
    assert status == 400 and says in body["error"]["message"] and body["error"]["param"] == "mcp_tools", body


def test_the_context_service_refuses_what_is_not_offered(mesh):
    """ListMcpTools and CallMcpTool are reachable through the edge: they check the config too."""
    import grpc

    from capibara_grpc.stubs import context_pb2, context_pb2_grpc

    credentials = grpc.ssl_channel_credentials(pathlib.Path(mesh.cert).read_bytes())
    with grpc.secure_channel(f"localhost:{BASE + 1}", credentials) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CallMcpTool(context_pb2.CallMcpToolRequest(server="weather", name="exchange_rate"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        listed = stub.ListMcpTools(context_pb2.ListMcpToolsRequest(names=["weather"]), timeout=10)
        assert [t.name for t in listed.tools] == ["forecast", "echo"]
