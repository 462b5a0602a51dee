"""The fake upstreams (tests/support/fake_upstreams.py), read with the official OpenAI SDK as a client would."""

from __future__ import annotations

import json
import time

import httpx2
import openai
import pytest

from tests.support.fake_upstreams import FLAVORS, FakeUpstream

KEY = "sk-test-123"
HELLO = [{"role": "user", "content": "hello big world"}]
FIELD = {"openai": None, "vllm": "reasoning", "ollama": "reasoning", "llama_server": "reasoning_content"}


def client(up: FakeUpstream, key: str = KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=up.base_url, api_key=key, http_client=openai.DefaultHttpxClient(), max_retries=0, **kwargs
    )


@pytest.fixture(params=FLAVORS)
def up(request):
    with FakeUpstream(flavor=request.param, api_key=KEY, models=["gpt-test"], reasoning="let me think") as server:
        yield server


def test_stream_assembles_the_answer_and_the_usage(up):
    stream = client(up).chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "echo: hello big world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4 + 3)  # reasoning is generated too
    # reasoning arrives before the answer, under the flavor's own field (the hosted API streams none)
    thought = "".join((d.model_extra or {}).get(FIELD[up.flavor]) or "" for d in deltas)
    assert thought == ("" if up.flavor == "openai" else "let me think")
    if FIELD[up.flavor]:
        first_thought = next(i for i, d in enumerate(deltas) if (d.model_extra or {}).get(FIELD[up.flavor]))
        assert first_thought < next(i for i, d in enumerate(deltas) if d.content)
    if up.flavor in ("openai", "vllm"):
        assert usage.completion_tokens_details.reasoning_tokens == 3


def test_non_stream_answer_truncated_to_max_tokens(up):
    answer = client(up).chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=2)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == "echo: hello"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == 3
    assert [r.body["max_tokens"] for r in up.chat_requests()] == [2]


def test_json_schema_answer_is_json(up):
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    answer = client(up).chat.completions.create(model="gpt-test", messages=HELLO, response_format=schema)
    assert json.loads(answer.choices[0].message.content) == {"answer": "echo: hello big world"}


def test_rate_limit_carries_retry_after(up):
    up.fail_next(429, {"Retry-After": "3"})
    with pytest.raises(openai.RateLimitError) as caught:
        client(up).chat.completions.create(model="gpt-test", messages=HELLO)
    assert caught.value.response.headers["retry-after"] == "3"
    assert "Rate limit" in caught.value.response.json()["error"]["message"]
    assert client(up).chat.completions.create(model="gpt-test", messages=HELLO).choices  # only the next one


def test_wrong_key_is_refused(up):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(up, key="sk-wrong-key").chat.completions.create(model="gpt-test", messages=HELLO)
    assert KEY not in caught.value.response.text


def test_broken_stream(up):
    up.break_stream_after(2)
    chunks = []
    stream = client(up).chat.completions.create(model="gpt-test", messages=HELLO, stream=True)
    if up.flavor == "ollama":  # its /v1 layer turns the runner's error line into an empty chunk, then ends
        chunks = list(stream)
        assert chunks[-1].model == "" and chunks[-1].choices[0].delta.content == ""
    else:
        with pytest.raises(openai.APIError):
            chunks.extend(stream)
    tokens = [c for c in chunks if c.choices and (c.choices[0].delta.content or c.choices[0].delta.model_extra)]
    assert len(tokens) == 2
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_cut_stream(up):
    up.cut_stream_after(1)
    with pytest.raises(openai.APIConnectionError):
        list(client(up).chat.completions.create(model="gpt-test", messages=HELLO, stream=True))


def test_slow_first_chunk_and_stall(up):
    up.delay_first_chunk(0.15)
    up.stall_after(1, 0.15)
    started = time.perf_counter()
    arrivals = []
    for _ in client(up).chat.completions.create(model="gpt-test", messages=HELLO, stream=True):
        arrivals.append(time.perf_counter() - started)
    assert arrivals[0] >= 0.15 and arrivals[-1] >= 0.3


def test_refuse_then_accept(up):
    up.refuse()
    with pytest.raises(openai.APIConnectionError):
        client(up).models.list()
    up.accept()
    assert [m.id for m in client(up).models.list()] == ["gpt-test:latest" if up.flavor == "ollama" else "gpt-test"]


def test_strict_openai_flavor():
    with FakeUpstream(flavor="openai", api_key=KEY) as up:
        c = client(up)
        with pytest.raises(openai.BadRequestError) as caught:
            c.chat.completions.create(model="gpt-test", messages=HELLO, extra_body={"top_k": 40})
        assert caught.value.body == {
            "message": "Unrecognized request argument supplied: top_k",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        with pytest.raises(openai.BadRequestError, match="'reasoning_content' was unexpected"):
            c.chat.completions.create(model="gpt-test", messages=[HELLO[0] | {"reasoning_content": "x"}])
        with pytest.raises(openai.NotFoundError) as caught:
            c.chat.completions.create(model="gpt-other", messages=HELLO)
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError) as caught:
            client(up, key="sk-wrong-key").models.list()
        assert caught.value.code == "invalid_api_key" and "sk-wr***ey" in caught.value.message
        assert httpx2.get(up.root_url + "/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_reasoning_field_can_be_forced():
    with FakeUpstream(flavor="vllm", reasoning="so then", reasoning_field="reasoning_content") as up:
        stream = client(up).chat.completions.create(model="gpt-test", messages=HELLO, stream=True)
        extras = [c.choices[0].delta.model_extra for c in stream if c.choices]
        assert "".join(e.get("reasoning_content") or "" for e in extras) == "so then"
        assert not any("reasoning" in e for e in extras)


@pytest.mark.parametrize("flavor", ["vllm", "ollama", "llama_server"])
def test_lenient_flavors_ignore_unknown_fields(flavor):
    with FakeUpstream(flavor=flavor) as up:
        answer = client(up).chat.completions.create(
            model="gpt-test", messages=HELLO, extra_body={"top_k": 40, "repeat_penalty": 1.1}
        )
        assert answer.choices[0].message.content == "echo: hello big world"


def test_other_endpoints():
    auth = {"Authorization": f"Bearer {KEY}"}
    with FakeUpstream(flavor="vllm", api_key=KEY, max_model_len=2048) as up:
        assert httpx2.get(up.root_url + "/health").status_code == 200  # public
        assert httpx2.post(up.root_url + "/tokenize", json={"prompt": "a b"}).status_code == 401
        tokens = httpx2.post(up.root_url + "/tokenize", json={"prompt": "a b"}, headers=auth).json()
        assert (tokens["count"], tokens["max_model_len"], tokens["tokens"][0]) == (3, 2048, 1)  # BOS first
        assert client(up).models.list().data[0].model_extra["max_model_len"] == 2048
    with FakeUpstream(flavor="llama_server", api_key=KEY, max_model_len=1024) as up:
        assert httpx2.get(up.root_url + "/health").json() == {"status": "ok"}
        assert httpx2.get(up.root_url + "/props").status_code == 401
        props = httpx2.get(up.root_url + "/props", headers=auth).json()
        assert props["default_generation_settings"]["n_ctx"] == 1024
        tokens = httpx2.post(up.root_url + "/tokenize", json={"content": "a b", "add_special": False}, headers=auth)
        assert len(tokens.json()["tokens"]) == 2
    with FakeUpstream(flavor="ollama") as up:
        assert httpx2.get(up.root_url + "/").text == "Ollama is running"
        assert httpx2.post(up.root_url + "/tokenize", json={}).status_code == 404


def test_required_headers_and_recording():
    with FakeUpstream(flavor="vllm", required_headers={"X-Tenant": "blue"}) as up:
        with pytest.raises(openai.BadRequestError):
            client(up).chat.completions.create(model="gpt-test", messages=HELLO)
        tenant = client(up, default_headers={"X-Tenant": "blue"})
        assert tenant.chat.completions.create(model="gpt-test", messages=HELLO).choices[0].message.content
        recorded = up.chat_requests()
        assert [r.headers.get("x-tenant") for r in recorded] == [None, "blue"]
        assert recorded[1].body["messages"] == HELLO and KEY not in repr(recorded)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK = [{"role": "user", "content": "weather in Paris?"}]


def assemble(chunks) -> tuple[dict[int, dict], list[str]]:
    """Tool calls put together from a stream's deltas as the OpenAI SDK's users do; and the finish reasons."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += (tc.function and tc.function.name) or ""
                call["arguments"] += (tc.function and tc.function.arguments) or ""
    return calls, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_stream_answers_tools_with_a_call(up):
    chunks = list(
        client(up).chat.completions.create(
            model="gpt-test", messages=ASK, tools=[WEATHER, TIME], stream=True, stream_options={"include_usage": True}
        )
    )
    calls, finishes = assemble(chunks)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finishes == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    sent = up.chat_requests()[-1].body
    assert json.dumps(sent["tools"]) == json.dumps([WEATHER, TIME])  # recorded as sent, key order too


@pytest.mark.parametrize("flavor", FLAVORS)
def test_wire_shape_of_each_flavor(flavor):
    with FakeUpstream(flavor=flavor, tool_arguments={"city": "Paris", "at": "noon"}) as up:
        response = httpx2.post(
            up.base_url + "/chat/completions",
            json={"model": "gpt-test", "messages": ASK, "tools": [WEATHER], "stream": True},
        )
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    deltas = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
    first = deltas[0]
    if flavor == "ollama":  # whole, keys sorted by Go's json.Marshal
        assert len(deltas) == 1 and first["function"]["arguments"] == '{"at":"noon","city":"Paris"}'
    elif flavor == "vllm":  # the name first, no arguments key
        assert first["function"] == {"name": "get_weather"} and len(deltas) > 2
    elif flavor == "openai":
        assert first["function"] == {"name": "get_weather", "arguments": ""} and len(deltas) > 2
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    else:  # llama-server: the first diff already holds what was parsed of the arguments
        assert first["function"]["name"] == "get_weather" and first["function"]["arguments"]
    assert first["type"] == "function" and first["id"] and all("id" not in d for d in deltas[1:])


def test_parallel_calls_and_tool_choice(up):
    up.tool_calls = 2
    ask = dict(model="gpt-test", messages=ASK, tools=[WEATHER, TIME], stream=True)
    calls, finishes = assemble(list(client(up).chat.completions.create(**ask)))
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"] and finishes == ["tool_calls"]
    assert len({c["id"] for c in calls.values()}) == 2
    calls, _ = assemble(list(client(up).chat.completions.create(**ask, parallel_tool_calls=False)))
    assert len(calls) == 1
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, _ = assemble(list(client(up).chat.completions.create(**ask, tool_choice=named)))
    assert [c["name"] for c in calls.values()] == ["get_time", "get_time"]
    chunks = list(client(up).chat.completions.create(**ask, tool_choice="none"))
    assert assemble(chunks) == ({}, ["stop"])


def test_non_stream_call_and_the_tool_result_round_trip(up):
    answer = client(up).chat.completions.create(model="gpt-test", messages=ASK, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "tool_calls"
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    followup = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    stream = client(up).chat.completions.create(model="gpt-test", messages=followup, tools=[WEATHER], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tool said: sunny, 21 C"
    assert assemble(chunks) == ({}, ["stop"])
