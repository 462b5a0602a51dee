"""The context service as an MCP client (context.mcp_servers), over the real edge: a small MCP
server written with the official SDK (tests/support/mcp_weather_server.py) over stdio and over
Streamable HTTP; the right tool called only when relevant (Spanish and English), with the right
argument; its result in the prompt; a hung server timing out while the chat answers; a crashed
server reconnected. Base port 31000."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.support.mcp_weather_server import ECHO_MARKER, FORECAST_MARKER, RATE_MARKER, STYLE_MARKER
from tests.support.mesh import REPO, launched_model, running_mesh
from tests.unit.test_mcp_sources import WEATHER_PATTERNS

BASE = 31000
HTTP_PORT = BASE + 95
SERVER = [sys.executable, "-m", "tests.support.mcp_weather_server"]


def stdio_server(log: pathlib.Path, *extra: str, **settings) -> dict:
    return {"command": SERVER[0], "args": [*SERVER[1:], "--log", str(log), *extra], **settings}


def start_http_server(log: pathlib.Path) -> subprocess.Popen:
    """The test server over Streamable HTTP on HTTP_PORT, once it accepts connections."""
    argv = [*SERVER, "--transport", "http", "--port", str(HTTP_PORT), "--log", str(log)]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/mcp", timeout=1)
        except urllib.error.HTTPError:
            return process  # answering (a GET without a session is refused)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the MCP test server did not start over HTTP")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("mcp-logs")


@pytest.fixture(scope="module")
def http_server(logs):
    holder = {"process": start_http_server(logs / "rates.jsonl")}
    yield holder
    holder["process"].kill()
    holder["process"].wait()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, logs, http_server):
    # One llama-server answers for the three model ids of the routes file (the router is on).
    backend = launched_model(BASE + 80, max_tokens=8)
    alias = {"backend": backend["backend"], "defaults": backend["defaults"]}
    models = {"gpt-oss-20b": backend, "phi": alias, "mixtral": alias}
    servers = {
        "weather": stdio_server(
            logs / "weather.jsonl",
            tools={"forecast": {"patterns": WEATHER_PATTERNS, "arguments": {"city": "city"}}},
            resources={"style_guide": {"uri": "notes://style-guide", "routes": ["programming"]}},
        ),
        "rates": {
            "url": f"http://127.0.0.1:{HTTP_PORT}/mcp",
            "reconnect_max_s": 2,
            "tools": {
                "exchange_rate": {
                    "patterns": [r"\b(exchange rate|tipo de cambio) (of|for|del|de) (?P<currency>[a-z]{3})\b"],
                    "arguments": {"currency": "currency"},
                }
            },
        },
        "slow": stdio_server(
            logs / "slow.jsonl",
            "--hang",
            timeout_s=1.5,
            tools={"echo": {"patterns": [r"\b(horoscopo|horoscope)\b"], "arguments": {"text": "message"}}},
        ),
        "flaky": stdio_server(
            logs / "flaky.jsonl",
            "--crash-after",
            "2",
            reconnect_max_s=2,
            tools={"echo": {"patterns": [r"\b(chiste|joke)\b"], "arguments": {"text": "message"}}},
        ),
    }
    directory = tmp_path_factory.mktemp("mcp-mesh")
    with running_mesh(directory, BASE, models, context={"mcp_servers": servers}) as running:
        for name in servers:
            running.wait_for_output(f"mcp server {name}: session open", timeout_s=60)
        yield running


def enrich(mesh, message: str, route: str = "") -> tuple[dict[str, str], str]:
    """{kind: content} of the MCP additions, and the prompt."""
    status, body, _ = mesh.request("POST", "/api/context/enrich", {"message": message, "route": route})
    assert status == 200, body
    return {a["kind"]: a["content"] for a in body["added_context"] if a["kind"].startswith("mcp:")}, body["prompt"]


def calls(log: pathlib.Path, name: str) -> list[dict]:
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e["arguments"] for e in entries if e.get("name") == name]


def counter(mesh, metric: str, /, **labels) -> float:
    text = urllib.request.urlopen(mesh.metrics_url("context"), timeout=10).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if (
            line.startswith(metric + "{")
            and ",".join(sorted(line[line.index("{") + 1 : line.index("}")].split(","))) == wanted
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    "message, city",
    [
        ("What's the weather like in Paris?", "paris"),
        ("Is it raining in London right now?", "london"),
        ("¿Qué tiempo hace en Málaga?", "malaga"),
        ("¿Cómo está el clima en Bogotá hoy?", "bogota"),
    ],
)
def test_the_weather_tool_is_called_with_the_city_and_its_answer_reaches_the_prompt(mesh, logs, message, city):
    added, prompt = enrich(mesh, message)
    assert list(added) == ["mcp:weather/forecast"]
    assert f"Forecast for {city.title()}" in added["mcp:weather/forecast"] and FORECAST_MARKER in prompt
    assert calls(logs / "weather.jsonl", "forecast")[-1] == {"city": city}


@pytest.mark.parametrize(
    "message",
    [
        "no tengo tiempo para estudiar en casa",
        "el clima laboral en la empresa es malo",
        "how do I forecast sales in Excel?",
        "What is the capital of France?",
        "¿Qué es Python?",
    ],
)
def test_no_tool_is_called_for_a_message_that_needs_none(mesh, logs, message):
    before = len(calls(logs / "weather.jsonl", "forecast"))
    added, prompt = enrich(mesh, message)
    assert added == {} and "MCP" not in prompt
    assert len(calls(logs / "weather.jsonl", "forecast")) == before


def test_a_resource_is_read_for_its_route_only(mesh):
    added, prompt = enrich(mesh, "write a function that reverses a list", route="programming")
    assert list(added) == ["mcp:weather/style_guide"] and STYLE_MARKER in prompt
    added, _ = enrich(mesh, "write a function that reverses a list", route="conversation")
    assert added == {}


@pytest.mark.parametrize(
    "message, read",
    [
        ("Write a Python function that reverses a list", True),
        ("Escribe una función en Python que ordene una lista", True),
        ("Hola, ¿qué tal estás?", False),
    ],
)
def test_a_chat_reads_the_resource_when_the_router_chooses_its_route(mesh, logs, message, read):
    request_id = f"mcp-test-{uuid.uuid4().hex}"  # not 36 characters: Envoy rewrites UUIDs
    before = len(calls(logs / "weather.jsonl", "notes://style-guide"))
    status, body, _ = mesh.request(
        "POST", "/api/chat", {"message": message, "max_tokens": 4}, headers={"x-request-id": request_id}
    )
    assert status == 200 and body["response"], body
    assert (body["routing"]["route_name"] == "programming") == read, body["routing"]
    assert len(calls(logs / "weather.jsonl", "notes://style-guide")) == before + read
    if read:  # the context service says, for this chat, what it added to the prompt
        wait_for_line(mesh, f'"request_id": "{request_id}"', "mcp:weather/style_guide added to the prompt")


def wait_for_line(mesh, *parts: str, timeout_s: float = 30) -> str:
    """The line of up.log holding every one of `parts` (the services' logs reach it a little later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in mesh.output().splitlines() if all(p in line for p in parts)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no line with {parts} in up.log:\n{mesh.output()[-3000:]}")


def test_a_server_over_http_is_used_too(mesh, logs):
    added, prompt = enrich(mesh, "¿Cuál es el tipo de cambio del USD?")
    assert list(added) == ["mcp:rates/exchange_rate"] and "USD" in added["mcp:rates/exchange_rate"]
    assert RATE_MARKER in prompt and calls(logs / "rates.jsonl", "exchange_rate")[-1] == {"currency": "usd"}
    added, _ = enrich(mesh, "What is the exchange rate of GBP?")
    assert "GBP" in added["mcp:rates/exchange_rate"]


def test_a_hung_server_times_out_and_the_chat_still_answers(mesh, logs):
    timeouts = counter(mesh, "capibara_mcp_calls_total", server="slow", name="echo", outcome="timeout")
    status, body, _ = mesh.request("POST", "/api/chat", {"message": "¿Qué dice mi horóscopo de hoy?", "max_tokens": 4})
    assert status == 200 and body["response"], body
    assert calls(logs / "slow.jsonl", "echo"), "the hung server was never called"
    added, _ = enrich(mesh, "what does my horoscope say")
    assert added == {}
    assert counter(mesh, "capibara_mcp_calls_total", server="slow", name="echo", outcome="timeout") >= timeouts + 2
    # Logged once per episode, not once per call.
    wait_for_line(mesh, "mcp:slow/echo left out of the prompt (timeout)")
    assert mesh.output().count("mcp:slow/echo left out of the prompt (timeout)") == 1


def wait_until_added(mesh, message: str, kind: str, timeout_s: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        added, _ = enrich(mesh, message)
        if kind in added:
            return added
        time.sleep(0.5)
    raise AssertionError(f"{kind} not added within {timeout_s:g} s:\n{mesh.output()[-3000:]}")


def test_a_stdio_server_that_crashes_is_started_again(mesh, logs):
    log = logs / "flaky.jsonl"
    first, _ = enrich(mesh, "cuéntame un chiste de gatos")  # call 1 of the first process
    assert ECHO_MARKER in first["mcp:flaky/echo"] and "cuéntame un chiste de gatos" in first["mcp:flaky/echo"]
    crashed, _ = enrich(mesh, "tell me a joke")  # call 2: the process exits instead of answering
    assert crashed == {}
    wait_until_added(mesh, "tell me another joke", "mcp:flaky/echo")
    starts = {json.loads(line)["pid"] for line in log.read_text().splitlines() if '"start"' in line}
    assert len(starts) >= 2
    assert counter(mesh, "capibara_mcp_sessions_total", server="flaky", event="lost") >= 1


def test_an_http_server_that_crashes_is_reconnected_when_it_is_back(mesh, logs, http_server):
    http_server["process"].kill()
    http_server["process"].wait()
    added, _ = enrich(mesh, "exchange rate of JPY")
    assert added == {}  # down: the answer comes without it
    http_server["process"] = start_http_server(logs / "rates.jsonl")
    added = wait_until_added(mesh, "exchange rate of JPY", "mcp:rates/exchange_rate")
    assert "JPY" in added["mcp:rates/exchange_rate"] and RATE_MARKER in added["mcp:rates/exchange_rate"]


def test_the_route_field_is_optional_and_unknown_routes_trigger_nothing(mesh):
    added, _ = enrich(mesh, "write a function that reverses a list", route="no-such-route")
    assert added == {}
    assert re.search(
        r"capibara_mcp_sessions_total\{", urllib.request.urlopen(mesh.metrics_url("context")).read().decode()
    )


def test_a_server_down_at_start_costs_nothing_and_is_used_once_it_is_up(logs):
    """In-process (no mesh): McpSources with a command that does not exist and a URL nobody
    answers yet; messages get no MCP context at once, and the URL is used once a server is there."""
    import asyncio

    from prometheus_client import REGISTRY

    from capibara_grpc.config.schema import McpServerConfig, McpToolConfig
    from capibara_grpc.context.mcp_sources import McpSources

    port = BASE + 96
    tool = {"forecast": McpToolConfig(patterns=WEATHER_PATTERNS, arguments={"city": "city"})}
    servers = {
        "missing": McpServerConfig(command="/nonexistent/mcp-server", tools=tool, reconnect_max_s=1),
        "later": McpServerConfig(url=f"http://127.0.0.1:{port}/mcp", tools=tool, reconnect_max_s=1),
    }

    async def scenario():
        sources = McpSources(servers)
        sources.start()
        try:
            await asyncio.sleep(0.5)
            assert await sources.additions("weather in Quito", "") == []
            argv = [*SERVER, "--transport", "http", "--port", str(port), "--log", str(logs / "later.jsonl")]
            process = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stderr=subprocess.DEVNULL)
            try:
                for _ in range(300):
                    added = await sources.additions("weather in Quito", "")
                    if added:
                        return added
                    await asyncio.sleep(0.1)
                raise AssertionError("the server that came up later was never used")
            finally:
                process.kill()
                await process.wait()
        finally:
            await sources.stop()

    def failed() -> float:
        return REGISTRY.get_sample_value("capibara_mcp_sessions_total", {"server": "missing", "event": "failed"}) or 0

    before = failed()
    added = asyncio.run(scenario())
    assert [a.kind for a in added] == ["mcp:later/forecast"] and "Forecast for Quito" in added[0].content
    assert failed() > before
