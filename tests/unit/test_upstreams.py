"""The model servers as the inference core calls them (capibara_grpc.upstream), against the fakes
of tests/support/fake_upstreams.py over real loopback sockets; and every config snippet of
docs/models.md, loaded, and (for the servers someone else runs) chatted with."""

from __future__ import annotations

import email.utils
import json
import os
import pathlib
import re
import ssl
import time

import pytest
import yaml

from capibara_grpc.chat.types import Finished, Message, Reasoning, SamplingParams, Token, ToolCall, ToolCallDelta
from capibara_grpc.config import ConfigError, parse_config
from capibara_grpc.errors import BackendRefusedKey, InvalidArgument, ResourceExhausted, Unavailable
from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.upstream.client import MAX_RETRY_AFTER_S, _retry_after_s
from tests.support.fake_upstreams import FakeUpstream

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "models.md"
SNIPPETS = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
KEY = "sk-unit-5e6f7a8b9c0d"


def mesh_text(models_yaml: str) -> str:
    first = next(iter(yaml.safe_load(models_yaml)["models"]))
    return models_yaml + f"gateway:\n  default_model: {first}\nrouter:\n  enabled: false\n"


def one_model(backend: dict, **model) -> str:
    return mesh_text(yaml.safe_dump({"models": {"m": {"backend": backend, **model}}}))


async def collect(engine: InferenceEngine, model_id: str, text: str = "hola", **params) -> list:
    return [item async for item in engine.generate(model_id, [Message("user", text)], SamplingParams(**params))]


@pytest.fixture
async def engine_for():
    engines = []

    async def start(text: str) -> InferenceEngine:
        engine = InferenceEngine(parse_config(text, source="unit.yaml", check_files={"inference"}), 60)
        await engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        await engine.stop()


# -- docs/models.md ------------------------------------------------------------------------------


def test_the_guide_has_a_snippet_for_each_kind_of_server():
    servers = [yaml.safe_load(s)["models"] for s in SNIPPETS]
    kinds = {
        m["backend"].get("server") or ("launched" if "launch" in m else "openai") for s in servers for m in s.values()
    }
    assert kinds == {"launched", "vllm", "ollama", "openai"}
    launched = {model_id for s in servers for model_id, m in s.items() if "launch" in m}
    assert launched == {"gpt-oss-20b", "phi", "mixtral"}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: next(iter(yaml.safe_load(s)["models"])))
async def test_each_snippet_loads_and_the_remote_ones_answer(snippet, engine_for, monkeypatch):
    """Loaded as written (no file or variable checks: the weights and keys are the reader's), then
    pointed at a fake of its server, with its variables set, and asked for a chat."""
    config = parse_config(mesh_text(snippet), source="docs/models.md", check_files=set())
    ((model_id, model),) = config.models.items()
    if model.launch is not None:
        assert model.server_kind == "llama_server" and model.launch.model_path.endswith(".gguf")
        return
    for name in model.backend.env_names:
        monkeypatch.setenv(name, KEY)
    flavor = model.server_kind
    with FakeUpstream(
        flavor=flavor, api_key=KEY if model.backend.api_key_env else None, models=[model.backend.model_name]
    ) as up:
        data = yaml.safe_load(snippet)
        backend = data["models"][model_id]["backend"]
        backend["url"] = up.base_url
        if "ca_file" in backend:
            backend["ca_file"] = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
        engine = await engine_for(mesh_text(yaml.safe_dump(data)))
        items = await collect(engine, model_id, "hello there")
    assert "".join(i.text for i in items if isinstance(i, Token)) == "echo: hello there"
    assert isinstance(items[-1], Finished) and items[-1].finish_reason == "stop"
    headers = up.chat_requests()[-1].headers
    assert ("authorization" in headers) == bool(model.backend.api_key_env)


# -- failures, as the inference core sees them ---------------------------------------------------


async def test_a_key_echoed_back_by_the_server_is_masked(engine_for, monkeypatch):
    monkeypatch.setenv("UNIT_KEY", KEY)
    with FakeUpstream(flavor="openai", api_key=KEY) as up:
        engine = await engine_for(
            one_model({"url": up.base_url, "protocol": "openai", "model_name": "gpt-test", "api_key_env": "UNIT_KEY"})
        )
        up.fail_next(status=400, body={"error": {"message": f"bad request from key {KEY}", "type": "x"}})
        with pytest.raises(InvalidArgument) as bad:
            await collect(engine, "m")
    assert KEY not in bad.value.message and "key ***" in bad.value.message


async def test_a_refused_key_names_the_variable(engine_for, monkeypatch):
    monkeypatch.setenv("UNIT_KEY", "sk-not-the-right-one")
    with FakeUpstream(flavor="openai", api_key=KEY) as up:
        engine = await engine_for(
            one_model({"url": up.base_url, "protocol": "openai", "model_name": "gpt-test", "api_key_env": "UNIT_KEY"})
        )
        with pytest.raises(BackendRefusedKey) as refused:
            await collect(engine, "m")
        status = (await engine.list_models())[0]
    assert (
        "backend.api_key_env UNIT_KEY" in refused.value.message and "sk-not-the-right-one" not in refused.value.message
    )
    assert not status.healthy and "refused the mesh's API key" in status.status


async def test_429_sets_a_cool_down_from_retry_after(engine_for):
    with FakeUpstream(flavor="vllm", models=["v"]) as up:
        engine = await engine_for(
            one_model({"url": up.base_url, "protocol": "openai", "server": "vllm", "model_name": "v"})
        )
        up.fail_next(status=429, headers={"Retry-After": "5"})
        with pytest.raises(ResourceExhausted) as limited:
            await collect(engine, "m")
        with pytest.raises(ResourceExhausted) as cooling:
            await collect(engine, "m")
    assert limited.value.retry_after_s == 5 and 1 <= cooling.value.retry_after_s <= 5
    assert len(up.chat_requests()) == 1


def test_retry_after_takes_seconds_or_a_date_in_utc_and_is_capped(monkeypatch):
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert _retry_after_s("7") == 7
        assert _retry_after_s(None) == 1 and _retry_after_s("soon") == 1
        assert 55 <= _retry_after_s(email.utils.formatdate(time.time() + 60, usegmt=True)) <= 61
        # "-0000": a date that names no zone is UTC (RFC 9110 dates always are), not local time.
        assert 55 <= _retry_after_s(email.utils.formatdate(time.time() + 60)) <= 61
        assert _retry_after_s("86400") == MAX_RETRY_AFTER_S
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


async def test_fields_a_server_refuses_or_names_otherwise(engine_for):
    """OpenAI's reasoning models: max_completion_tokens, no temperature or top_p."""
    with FakeUpstream(flavor="openai") as up:
        backend = {
            "url": up.base_url,
            "protocol": "openai",
            "model_name": "gpt-test",
            "drop_fields": ["temperature", "top_p"],
            "rename_fields": {"max_tokens": "max_completion_tokens"},
        }
        engine = await engine_for(one_model(backend, defaults={"max_tokens": 3}))
        items = await collect(engine, "m", "one two three four five", reasoning_effort="low")
    body = up.chat_requests()[-1].body
    assert "temperature" not in body and "top_p" not in body and "max_tokens" not in body
    assert body["max_completion_tokens"] == 3 and body["reasoning_effort"] == "low"
    assert items[-1].finish_reason == "length"


async def test_an_https_server_is_verified_with_the_configured_ca(engine_for, tmp_path):
    cert, key = self_signed(tmp_path)
    with FakeUpstream(flavor="openai", tls=(str(cert), str(key))) as up:
        trusted = await engine_for(
            one_model({"url": up.base_url, "protocol": "openai", "model_name": "gpt-test", "ca_file": str(cert)})
        )
        answered = await collect(trusted, "m", "over tls")
        untrusted = await engine_for(one_model({"url": up.base_url, "protocol": "openai", "model_name": "gpt-test"}))
        with pytest.raises(Unavailable) as refused:
            await collect(untrusted, "m")
    assert up.base_url.startswith("https://")
    assert "".join(i.text for i in answered if isinstance(i, Token)) == "echo: over tls"
    assert "unreachable (ClientConnectorCertificateError)" in refused.value.message


def self_signed(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A certificate for 127.0.0.1 that is its own CA, as the edge's (capibara_grpc/edge/tls.py)."""
    from capibara_grpc.config import parse_config as parse
    from capibara_grpc.edge.tls import ensure_certificate

    config = parse(f"state_dir: {directory}\n" + one_model({"url": "http://127.0.0.1:1"}), source="tls.yaml")
    return ensure_certificate(config)


async def test_a_stream_that_goes_silent_ends_with_an_error(engine_for):
    with FakeUpstream(flavor="ollama", models=["o"]) as up:
        engine = await engine_for(
            one_model(
                {"url": up.base_url, "protocol": "openai", "server": "ollama", "model_name": "o", "idle_timeout_s": 0.5}
            )
        )
        up.stall_after(2, 3.0)
        items = []
        with pytest.raises(Unavailable) as stalled:
            async for item in engine.generate("m", [Message("user", "one two three four")], SamplingParams()):
                items.append(item)
    # The two pieces sent before the stall (they may arrive, and go on, together).
    assert "".join(item.text for item in items) == "echo: one" and "idle_timeout_s" in stalled.value.message


async def test_several_servers_down_in_a_row_mark_a_model_without_health_down(engine_for):
    with FakeUpstream(flavor="openai") as up:
        engine = await engine_for(one_model({"url": up.base_url, "protocol": "openai", "model_name": "gpt-test"}))
        up.fail_next(status=503, count=3)
        for _ in range(3):
            with pytest.raises(Unavailable):
                await collect(engine, "m")
        down = (await engine.list_models())[0]
        await collect(engine, "m")
        up_again = (await engine.list_models())[0]
    assert not down.healthy and "last 3 chats failed" in down.status
    assert up_again.healthy


async def test_reasoning_under_either_field_comes_apart(engine_for):
    for field in ("reasoning_content", "reasoning"):
        with FakeUpstream(flavor="vllm", models=["v"], reasoning="think first", reasoning_field=field) as up:
            engine = await engine_for(
                one_model({"url": up.base_url, "protocol": "openai", "server": "vllm", "model_name": "v"})
            )
            items = await collect(engine, "m", "hola")
        assert "".join(i.text for i in items if isinstance(i, Reasoning)) == "think first"
        assert "".join(i.text for i in items if isinstance(i, Token)) == "echo: hola"


def test_an_unset_key_variable_stops_startup():
    os.environ.pop("UNIT_UNSET_KEY", None)
    with pytest.raises(ConfigError, match="UNIT_UNSET_KEY is not set"):
        parse_config(
            one_model({"url": "https://api.example.com/v1", "protocol": "openai", "api_key_env": "UNIT_UNSET_KEY"}),
            source="unit.yaml",
            check_files={"inference"},
        )


# -- tools -----------------------------------------------------------------------------------------

# As a client wrote them: the server must get these exact texts back (spacing and key order too).
WEATHER = (
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",'
    ' "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
)
CLOCK = '{"function": {"parameters": {"properties": {}, "type": "object"}, "name": "get_time"}, "type": "function"}'
ASK = [Message("user", "weather in Paris?")]


def served_by(up: FakeUpstream, **model) -> str:
    return one_model({"url": up.base_url, "protocol": "openai", "server": up.flavor, "model_name": "gpt-test"}, **model)


async def generate(engine: InferenceEngine, messages: list[Message], **params) -> list:
    return [item async for item in engine.generate("m", messages, SamplingParams(**params))]


def assembled(items: list) -> list[ToolCall]:
    """The calls the deltas make, as a client puts them together."""
    calls: dict[int, ToolCall] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            call = calls.setdefault(item.index, ToolCall("", "", ""))
            call.id, call.name = call.id or item.id, call.name + item.name
            call.arguments += item.arguments
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("flavor", ["openai", "vllm", "ollama", "llama_server"])
async def test_tools_go_out_as_sent_and_streamed_calls_come_back_whole(flavor, engine_for):
    with FakeUpstream(flavor=flavor, tool_calls=2, tool_arguments={"city": "Paris", "unit": "C"}) as up:
        engine = await engine_for(served_by(up))
        items = await generate(engine, ASK, tools=[WEATHER, CLOCK], parallel_tool_calls=True)
    body = up.chat_requests()[-1].body
    assert [json.dumps(tool) for tool in body["tools"]] == [WEATHER, CLOCK]
    assert "tool_choice" not in body and body["parallel_tool_calls"] is True
    calls = assembled(items)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert all(json.loads(c.arguments) == {"city": "Paris", "unit": "C"} for c in calls)
    assert len({c.id for c in calls}) == 2 and all(c.id for c in calls)
    assert not [i for i in items if isinstance(i, Token)]
    assert isinstance(items[-1], Finished) and items[-1].finish_reason == "tool_calls"
    assert items[-1].completion_tokens > 0


@pytest.mark.parametrize(
    ("flavor", "choice", "sent_choice", "sent_tools"),
    [
        ("openai", "get_time", {"type": "function", "function": {"name": "get_time"}}, ["get_weather", "get_time"]),
        ("vllm", "required", "required", ["get_weather", "get_time"]),
        # llama-server reads tool_choice as a string only; Ollama not at all: the named tool alone, required
        ("llama_server", "get_time", "required", ["get_time"]),
        ("ollama", "get_time", "required", ["get_time"]),
        ("llama_server", "none", "none", ["get_weather", "get_time"]),
        ("ollama", "none", None, None),  # Ollama ignores tool_choice: no tools at all
    ],
)
async def test_tool_choice_as_each_server_takes_it(flavor, choice, sent_choice, sent_tools, engine_for):
    with FakeUpstream(flavor=flavor) as up:
        engine = await engine_for(served_by(up))
        items = await generate(engine, ASK, tools=[WEATHER, CLOCK], tool_choice=choice)
    body = up.chat_requests()[-1].body
    assert body.get("tool_choice") == sent_choice
    assert ([t["function"]["name"] for t in body["tools"]] if "tools" in body else None) == sent_tools
    if choice == "none":
        assert items[-1].finish_reason == "stop" and not assembled(items)
    else:
        assert [c.name for c in assembled(items)] == ["get_time" if choice == "get_time" else "get_weather"]


async def test_the_tool_result_round_trip(engine_for):
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    history = [*ASK, Message("assistant", "", tool_calls=[call]), Message("tool", "sunny, 21 C", tool_call_id="call_1")]
    with FakeUpstream(flavor="openai") as up:  # the strict one: it refuses any message key not OpenAI's
        engine = await engine_for(served_by(up))
        items = await generate(engine, history, tools=[WEATHER])
    sent = up.chat_requests()[-1].body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}
    assert "".join(i.text for i in items if isinstance(i, Token)) == "tool said: sunny, 21 C"
    assert items[-1].finish_reason == "stop"


async def test_a_raw_model_takes_no_tools(engine_for):
    with FakeUpstream(flavor="llama_server") as up:
        engine = await engine_for(one_model({"url": up.root_url, "protocol": "llama_cpp"}, chat_template="raw"))
        with pytest.raises(InvalidArgument, match="does not take tools"):
            await generate(engine, ASK, tools=[WEATHER])


@pytest.mark.parametrize("flavor, field", [("llama_server", "repeat_penalty"), ("vllm", "repetition_penalty")])
async def test_no_repetition_penalty_while_tools_are_offered(flavor, field, engine_for):
    """The penalty counts the prompt, where the tools' names and the call markup stand."""
    with FakeUpstream(flavor=flavor) as up:
        engine = await engine_for(served_by(up, defaults={"repeat_penalty": 1.2}))
        await generate(engine, ASK, tools=[WEATHER])
        await generate(engine, ASK, tools=[WEATHER], tool_choice="none")
        await generate(engine, ASK)
    assert [r.body.get(field) for r in up.chat_requests()] == [None, 1.2, 1.2]
