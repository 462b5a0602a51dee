"""Tool calling (OpenAI `tools`) end to end: the official openai SDK through the edge's /v1, and
the native REST API, on a mesh of its own: gpt-oss-20b and mixtral are fake upstreams that call
tools (OpenAI's and llama-server's streaming shapes), phi the local stand-in llama-server, and
notools a model configured with `tools: false`."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.fake_upstreams import FakeUpstream, serving
from tests.support.mesh import launched_model, running_mesh

BASE = 11000  # edge 11001, services 11050-11055, metrics 11070-11075, llama-server 11080, admin 11901
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Keys in an order sorting would change, a non-ASCII description: what reaches the upstream must
# be this, key for key and in this order.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "strict": True,
        "description": "The weather now in a city — °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "strict": True,
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def upstreams():
    servers = {
        # Two calls at once unless the request says parallel_tool_calls: false.
        "openai": FakeUpstream(flavor="openai", models=["gpt-test"], tool_calls=2),
        "llama": FakeUpstream(flavor="llama_server", models=["mixtral-test"]),
        "notools": FakeUpstream(flavor="openai", models=["plain"]),
    }
    with serving(servers):
        yield servers


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, upstreams):
    def hosted(up: FakeUpstream, **extra) -> dict:
        backend = {"url": up.base_url, "protocol": "openai", "model_name": up.models[0]}
        return {"backend": backend | extra.pop("backend", {}), "defaults": {"max_tokens": 40}, **extra}

    models = {
        "gpt-oss-20b": hosted(upstreams["openai"]),
        "phi": launched_model(BASE + 80, protocol="openai", temperature=0),
        "mixtral": hosted(upstreams["llama"], backend={"server": "llama_server"}),
        "notools": hosted(upstreams["notools"], tools=False),
    }
    with running_mesh(tmp_path_factory.mktemp("tools"), BASE, models) as running:
        yield running


@pytest.fixture(scope="module")
def api(mesh) -> openai.OpenAI:
    http_client = openai.DefaultHttpxClient(verify=mesh.ssl_context())
    return openai.OpenAI(base_url=mesh.base_url + "/v1", api_key="none", http_client=http_client, max_retries=0)


def last_body(up: FakeUpstream) -> dict:
    return [r for r in up.requests if r.path.endswith("/chat/completions")][-1].body


def test_a_tool_call_not_streamed(api, upstreams):
    completion = api.chat.completions.create(
        model="gpt-oss-20b", messages=QUESTION, tools=[WEATHER], parallel_tool_calls=False
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert completion.usage.completion_tokens > 0
    sent = last_body(upstreams["openai"])
    # The tools reach the upstream exactly as the client sent them: same keys, same order.
    assert json.dumps(sent["tools"], ensure_ascii=False) == json.dumps([WEATHER], ensure_ascii=False)
    assert sent["parallel_tool_calls"] is False


def test_parallel_calls(api):
    completion = api.chat.completions.create(model="gpt-oss-20b", messages=QUESTION, tools=[WEATHER, TIME])
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2
    assert all(json.loads(c.function.arguments) == {"city": "Paris"} for c in calls)


@pytest.mark.parametrize("model", ["gpt-oss-20b", "mixtral"])
def test_streamed_calls_as_the_sdk_assembles_them(api, model):
    """The SDK's own stream helper: its events and its final completion (strict tools: parsed)."""
    with api.chat.completions.stream(model=model, messages=QUESTION, tools=[WEATHER, TIME]) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and all(c.function.parsed_arguments == {"city": "Paris"} for c in calls)
    assert calls[0].function.name == "get_weather"
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, e.name, e.parsed_arguments) for e in done] == [
        (i, c.function.name, {"city": "Paris"}) for i, c in enumerate(calls)
    ]


def test_streamed_chunks_have_the_openai_shape(api):
    chunks = list(
        api.chat.completions.create(
            model="mixtral", messages=QUESTION, tools=[WEATHER], stream=True, stream_options={"include_usage": True}
        )
    )
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, rest = pieces[0], pieces[1:]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == ""
    assert rest and all(p.id is None and p.type is None and p.function.name is None for p in rest)
    assert json.loads("".join(p.function.arguments for p in rest)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0


def test_the_round_trip_with_the_tool_result(api):
    first = api.chat.completions.create(
        model="gpt-oss-20b", messages=QUESTION, tools=[WEATHER], parallel_tool_calls=False
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
        {"role": "tool", "tool_call_id": call.id, "content": "18 °C and sunny"},
    ]
    answer = api.chat.completions.create(model="gpt-oss-20b", messages=messages, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "tool said: 18 °C and sunny"


def test_tool_choice(api, upstreams):
    none = api.chat.completions.create(model="gpt-oss-20b", messages=QUESTION, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    named = api.chat.completions.create(
        model="gpt-oss-20b",
        messages=QUESTION,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert {c.function.name for c in named.choices[0].message.tool_calls} == {"get_time"}
    assert last_body(upstreams["openai"])["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    required = api.chat.completions.create(
        model="gpt-oss-20b", messages=QUESTION, tools=[WEATHER], tool_choice="required"
    )
    assert required.choices[0].finish_reason == "tool_calls"
    assert last_body(upstreams["openai"])["tool_choice"] == "required"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"model": "gpt-oss-20b", "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"model": "notools"}, "model", "model 'notools' does not take tools"),
        ({"model": "consensus"}, "tools", "consensus does not take tools"),
        ({"model": "auto", "tools": [{"type": "web_search"}]}, "tools[0].type", "only function tools"),
        ({"model": "auto", "functions": [WEATHER["function"]]}, "functions", "unsupported field"),
    ],
)
def test_refused_with_the_param_named(api, body, param, words):
    body = {"messages": QUESTION, "tools": [WEATHER], **body}
    extra = {"capibara": body.pop("capibara")} if "capibara" in body else None
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(**body, extra_body=extra)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == param and words in error["message"]


def test_auto_routes_to_a_model_that_takes_tools(api):
    completion = api.chat.completions.create(model="auto", messages=QUESTION, tools=[WEATHER], tool_choice="required")
    assert completion.model in ("gpt-oss-20b", "phi", "mixtral")
    assert completion.choices[0].finish_reason == "tool_calls"


def test_the_local_stand_in_calls_the_required_tool(api):
    completion = api.chat.completions.create(
        model="phi", messages=QUESTION, tools=[WEATHER], tool_choice="required", max_tokens=60
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_the_local_stand_in_streams_a_valid_call_when_one_is_required_or_named(api, tool_choice):
    """SmolLM2-135M through its shipped template with tools: a call the SDK assembles from deltas,
    to a declared tool (the named one when named), with arguments that parse."""
    with api.chat.completions.stream(
        model="phi", messages=QUESTION, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=60, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    expected = {"get_weather", "get_time"} if tool_choice == "required" else {"get_time"}
    assert call.function.name in expected and isinstance(json.loads(call.function.arguments), dict), call


def test_native_rest_api(mesh):
    body = {"message": "What is the weather in Paris?", "model": "mixtral", "tools": [json.dumps(WEATHER)]}
    status, answer, _ = mesh.request("POST", "/api/chat", body)
    assert status == 200, answer
    assert answer["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
    (call,) = answer["tool_calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"} and call["id"]
    status, text, _ = mesh.request("POST", "/api/chat/stream", body)
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    pieces = [e["tool_call"] for e in events if "tool_call" in e]
    assert pieces[0]["name"] == "get_weather" and pieces[0]["id"]
    assert json.loads("".join(p.get("arguments", "") for p in pieces)) == {"city": "Paris"}
    assert events[-1]["done"]["finish_reason"] == "FINISH_REASON_TOOL_CALLS"
