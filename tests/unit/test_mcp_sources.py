"""When the context service calls an MCP tool or reads a resource, and with which arguments
(capibara_grpc/context/mcp_triggers.py): pure logic, no server."""

from __future__ import annotations

import pytest

from capibara_grpc.config.schema import McpResourceConfig, McpServerConfig, McpToolConfig
from capibara_grpc.context import mcp_triggers as triggers

pytestmark = pytest.mark.unit

# The worked example of docs/context.md#mcp-servers (and of tests/test_context_mcp.py).
WEATHER_PATTERNS = [
    r"\b(weather|forecast)( like| today| tomorrow)? (in|for) (?P<city>[a-z]+)",
    r"\bis it (raining|snowing|sunny|cold|hot) in (?P<city>[a-z]+)",
    r"\bque tiempo (hace|hara|va a hacer)( hoy| manana)? en (?P<city>[a-z]+)",
    r"\b(clima|pronostico)( de hoy| de manana)? en (?P<city>[a-z]+)",
    r"\b(llueve|llovera|va a llover)( hoy| manana)? en (?P<city>[a-z]+)",
]
SERVER = McpServerConfig(
    command="python",
    tools={
        "forecast": McpToolConfig(patterns=WEATHER_PATTERNS, arguments={"city": "city"}),
        "echo": McpToolConfig(
            routes=["translation"], patterns=[r"\b(spell|deletrea)\b"], arguments={"text": "message"}
        ),
    },
    resources={"style_guide": McpResourceConfig(uri="notes://style-guide", routes=["programming"])},
)
USES = {use.name: use for use in triggers.uses_of("weather", SERVER)}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def fired(name: str, message: str, route: str = "conversation"):
    return triggers.fires(USES[name], triggers.normalized(message), route)


@pytest.mark.parametrize(
    "message, city",
    [
        ("What's the weather like in Paris?", "paris"),
        ("weather forecast for Lima", "lima"),
        ("Is it raining in London right now?", "london"),
        ("¿Qué tiempo hace en Málaga?", "malaga"),
        ("¿Qué tiempo hará mañana en Sevilla?", "sevilla"),
        ("¿Cómo está el clima en Bogotá hoy?", "bogota"),
        ("¿Va a llover mañana en Bilbao?", "bilbao"),
    ],
)
def test_the_weather_tool_fires_for_weather_questions_with_the_city_as_argument(message, city):
    hit = fired("forecast", message)
    assert hit is not None, message
    assert triggers.tool_arguments(USES["forecast"], hit, message, CITY_SCHEMA) == {"city": city}


@pytest.mark.parametrize(
    "message",
    [
        "no tengo tiempo para estudiar en casa",
        "el clima laboral en la empresa es malo",
        "how do I forecast sales in Excel?",
        "whether or not to go to Paris",
        "¿Qué es Python?",
        "what is the capital of France",
        "cuánto tiempo se tarda en llegar a Roma",
    ],
)
def test_the_weather_tool_does_not_fire_for_other_questions(message):
    assert fired("forecast", message) is None


def test_a_route_trigger_fires_only_on_that_route():
    assert fired("style_guide", "write a function that reverses a list", route="programming") is not None
    assert fired("style_guide", "write a function that reverses a list", route="conversation") is None
    assert fired("style_guide", "hola", route="") is None


def test_routes_and_patterns_together_both_must_match():
    assert fired("echo", "deletrea gato", route="translation") is not None
    assert fired("echo", "deletrea gato", route="conversation") is None
    assert fired("echo", "traduce gato", route="translation") is None


def test_the_whole_message_goes_as_written():
    hit = fired("echo", "  Deletrea «Ñandú», por favor ", route="translation")
    schema = {"properties": {"text": {"type": "string"}}, "required": ["text"]}
    assert triggers.tool_arguments(USES["echo"], hit, "  Deletrea «Ñandú», por favor ", schema) == {
        "text": "Deletrea «Ñandú», por favor"
    }


def test_arguments_the_schema_does_not_list_are_not_sent():
    hit = fired("forecast", "weather in Oslo")
    assert triggers.tool_arguments(USES["forecast"], hit, "weather in Oslo", {"properties": {}}) == {}
    assert triggers.unknown_arguments(USES["forecast"].arguments, {"properties": {"town": {}}}) == ["city"]


def test_a_required_argument_the_message_cannot_fill_means_no_call():
    use = triggers.Use("s", "convert", patterns=(triggers.re.compile(r"convert (?P<amount>\w+)?"),))
    use = triggers.Use("s", "convert", patterns=use.patterns, arguments={"amount": "amount"})
    schema = {"properties": {"amount": {"type": "integer"}}, "required": ["amount"]}
    hit = triggers.fires(use, "convert 12", "")
    assert triggers.tool_arguments(use, hit, "convert 12", schema) == {"amount": 12}  # converted to the type
    hit = triggers.fires(use, "convert twelve", "")
    assert triggers.tool_arguments(use, hit, "convert twelve", schema) is None  # not an integer
    hit = triggers.fires(use, "convert ", "")
    assert triggers.tool_arguments(use, hit, "convert ", schema) is None  # the group is empty


def test_a_use_with_no_trigger_never_fires():
    assert triggers.fires(triggers.Use("s", "t"), "anything", "programming") is None


def test_results_are_bounded_and_named_by_server_and_tool():
    hit = fired("forecast", "weather in Oslo")
    added = triggers.addition(USES["forecast"], hit, "x" * 50, {"city": "oslo"}, limit=20)
    assert added.kind == "mcp:weather/forecast"
    assert "x" * 20 + " … (cut at 20 of 50 characters)" in added.content and "x" * 21 not in added.content
    assert "city='oslo'" in added.reason and "weather in oslo" in added.reason
    resource = triggers.addition(USES["style_guide"], triggers.Hit("the route is programming", {}), "rules", None, 99)
    assert resource.kind == "mcp:weather/style_guide" and "notes://style-guide" in resource.content


# -- configuration errors name the file and the line --------------------------------------------

CONFIG = """\
gateway:
  default_model: phi
router:
  enabled: {router}
  routes_file: {routes}
context:
  mcp_servers:
    weather:
{server}
models:
  phi: {{backend: {{url: "http://127.0.0.1:8081", protocol: llama_cpp}}}}
  gpt-oss-20b: {{backend: {{url: "http://127.0.0.1:8080", protocol: llama_cpp}}}}
  mixtral: {{backend: {{url: "http://127.0.0.1:8082", protocol: llama_cpp}}}}
"""


def config_error(server: str, router: bool = False) -> str:
    from capibara_grpc.config import parse_config
    from capibara_grpc.config.parsing import ConfigError
    from tests.support.mesh import REPO

    text = CONFIG.format(server=server, router=str(router).lower(), routes=REPO / "config" / "routes.yaml")
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="mesh.yaml", check_files=False)
    return str(raised.value)


@pytest.mark.parametrize(
    "server, line, says",
    [
        ("      url: http://x:1/mcp\n      command: uvx\n      tools: {t: {patterns: [a]}}", 9, "not both"),
        ("      tools: {t: {patterns: [a]}}", 9, "give either command"),
        ("      url: ftp://x/mcp\n      tools: {t: {patterns: [a]}}", 9, "must be an http(s) URL"),
        ("      command: uvx\n      timeout_s: 9\n      tools: {t: {patterns: [a]}}", 10, "at most 8"),
        ("      command: uvx", 9, "nothing would ever be used"),
        ("      command: uvx\n      tools:\n        t: {patterns: ['(unclosed']}", 11, "not a regular expression"),
        ("      command: uvx\n      tools:\n        t: {arguments: {city: city}}", 11, "routes and/or patterns"),
        (
            "      command: uvx\n      tools:\n        t:\n          patterns: ['in (?P<town>[a-z]+)']\n"
            "          arguments: {city: city}",
            13,
            "'city' is neither `message` nor a named group",
        ),
        ("      command: uvx\n      resources:\n        r: {routes: [programming]}", 11, "uri is required"),
    ],
)
def test_a_bad_mcp_server_setting_is_refused_naming_its_line(server, line, says):
    message = config_error(server)
    assert message.startswith(f"mesh.yaml:{line}:") and says in message, message


def test_an_unknown_route_is_refused_when_the_router_runs():
    message = config_error("      command: uvx\n      tools:\n        t: {routes: [progamming]}", router=True)
    assert message.startswith("mesh.yaml:11:") and "no route is called progamming" in message
    assert "programming" in message.split("(routes:")[1]


# -- the gateway passes the router's choice to Enrich --------------------------------------------


async def test_the_gateway_passes_the_chosen_route_to_the_context_service():
    from capibara_gateway.core import ChatGateway
    from capibara_gateway.events import ChatInput

    from capibara_grpc.chat.types import Message
    from tests.unit.fakes import FakeContext, FakeModels, FakeRouter, collect, mesh_config

    class RouteRecordingContext(FakeContext):
        def __init__(self):
            super().__init__()
            self.routes: list[str] = []

        async def enrich(self, message, conversation_id, model_id, timeout_s, route=""):
            self.routes.append(route)
            return [Message("user", message)]

    context = RouteRecordingContext()
    gateway = ChatGateway(
        mesh_config(), FakeModels().generate, route=FakeRouter("beta", "translation"), context=context
    )
    await collect(gateway.chat(ChatInput("traduce gato"), 5.0))
    # The client's own turns (the OpenAI API) are enriched with the route too.
    await collect(gateway.chat(ChatInput("traduce perro", messages=[Message("user", "traduce perro")]), 5.0))
    assert context.routes == ["translation", "translation"]
