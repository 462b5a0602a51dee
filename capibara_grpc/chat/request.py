"""The chat request's fields and limits, in one table, and the one validation every edge runs.

Each edge translates what came in (REST and gRPC ChatService, the OpenAI API's JSON, an MCP tool
call, a consensus request, a direct InferenceService.Generate) into the plain types of
chat/types.py and calls `validate_params` / `validate_messages` here, once. The hops after it
trust the result: the mesh's own clients mark their calls with VALIDATED_HEADER (the edge strips
a client's copy), and a service checks only a call without it. `resolve` fills what a request
leaves unset with the chosen model's defaults, once a model is chosen; the resolved parameters
are what the cache keys on and what inference sends.

A refused value is an InvalidField: its message starts with the field's name ("max_tokens: must
be between 1 and 8192, got 10000"), which REST and gRPC show as is, the OpenAI API turns into
`error.param`, and MCP tools pass on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass

from capibara_grpc.chat.types import REASONING_EFFORT, ROLES, TOOL_CHOICES, Message, SamplingParams
from capibara_grpc.errors import InvalidField


@dataclass(frozen=True)
class Bound:
    """The values a number field takes: low..high, or (low, high] when `low_open`."""

    low: float
    high: float
    integer: bool = False
    low_open: bool = False

    def describe(self) -> str:
        if self.low_open:
            return f"in ({_number(self.low)}, {_number(self.high)}]"
        return f"between {_number(self.low)} and {_number(self.high)}"

    def json_schema(self) -> dict:
        """The bound as JSON Schema keywords, for the MCP tools' input schemas."""
        low = {"exclusiveMinimum": self.low} if self.low_open else {"minimum": self.low}
        return {**low, "maximum": self.high}

    def holds(self, value: float) -> bool:
        # An int is compared as it is: a JSON integer too large for a float is out of range, not an error.
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


# Every number of a chat request, with what each edge accepts: the same on REST, gRPC, the
# OpenAI API (whose own limits they follow where it has one) and MCP.
LIMITS: dict[str, Bound] = {
    "max_tokens": Bound(1, 8192, integer=True),
    "temperature": Bound(0, 2),
    "top_p": Bound(0, 1, low_open=True),
    "repeat_penalty": Bound(0, 5, low_open=True),
    "top_k": Bound(0, 1000, integer=True),
    "seed": Bound(0, (1 << 32) - 1, integer=True),
}
# Stop strings: at most this many (the OpenAI API's limit), none empty, each at most MAX_STOP_CHARS.
MAX_STOP = 4
MAX_STOP_CHARS = 200
# A request's JSON Schema (response_format on /v1), as JSON text.
MAX_JSON_SCHEMA_BYTES = 65536
# Tools of one request (the OpenAI API's limit), and the size of each as JSON text.
MAX_TOOLS = 128
MAX_TOOL_BYTES = 65536
# A function's name, as the OpenAI API allows it.
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Messages of a client's own conversation (OpenAI API, ChatRequest.messages).
MAX_MESSAGES = 1000
# A request's own system prompt (ChatRequest.system_prompt); the user's message has
# gateway.max_message_bytes.
MAX_SYSTEM_PROMPT_BYTES = 65536


def limits_markdown() -> str:
    """The table of limits as docs/api.md shows it (a unit test keeps the two the same)."""
    rows = [f"| `{name}` | {'integer' if b.integer else 'number'} {b.describe()} |" for name, b in LIMITS.items()]
    rows.append(f"| `stop` | at most {MAX_STOP} strings, none empty, each at most {MAX_STOP_CHARS} characters |")
    rows.append(
        f"| `json_schema` (`response_format` on /v1) | a JSON object of at most {MAX_JSON_SCHEMA_BYTES} bytes |"
    )
    rows.append("| `reasoning_effort` | one word: `low`, `medium`, `high`... |")
    rows.append(f"| `tools` | at most {MAX_TOOLS} function tools, each at most {MAX_TOOL_BYTES} bytes, names unique |")
    rows.append("| `tool_choice` | `auto`, `none`, `required` or the name of one of the tools |")
    rows.append(
        f"| `messages` | at most {MAX_MESSAGES}, roles system/user/assistant/tool (a tool message names its "
        "`tool_call_id`), one user message with text; with a conversation id, only tool messages |"
    )
    rows.append(f"| `system_prompt` | at most {MAX_SYSTEM_PROMPT_BYTES} bytes |")
    return "| field | accepted |\n|---|---|\n" + "\n".join(rows) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_number(name: str, value: float | None) -> None:
    """`value` of field `name` within LIMITS (None = unset: the model's default)."""
    if value is None:
        return
    bound = LIMITS[name]
    if bound.integer and isinstance(value, float) and not value.is_integer():
        raise InvalidField(name, f"must be an integer, got {value}")
    if not bound.holds(value):
        shown = str(value) if len(str(value)) <= 40 else str(value)[:40] + "..."
        raise InvalidField(name, f"must be {bound.describe()}, got {shown}")


def validate_params(params: SamplingParams) -> SamplingParams:
    """The request's sampling parameters, checked against the table; returned unchanged."""
    for name in LIMITS:
        check_number(name, getattr(params, name))
    if len(params.stop) > MAX_STOP:
        raise InvalidField("stop", f"takes at most {MAX_STOP} strings, got {len(params.stop)}")
    for i, stop in enumerate(params.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidField(f"stop[{i}]", f"must be a non-empty string of at most {MAX_STOP_CHARS} characters")
    if params.reasoning_effort and not REASONING_EFFORT.match(params.reasoning_effort):
        raise InvalidField(
            "reasoning_effort", f"must be a word such as low, medium or high, got '{params.reasoning_effort[:40]}'"
        )
    _validate_tools(params)
    if params.json_schema:
        if len(params.json_schema) > MAX_JSON_SCHEMA_BYTES:
            raise InvalidField("json_schema", f"is over the limit of {MAX_JSON_SCHEMA_BYTES} bytes")
        try:
            schema = json_schema(params.json_schema)
        except ValueError as exc:
            raise InvalidField("json_schema", f"is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise InvalidField("json_schema", "must be a JSON object (a JSON Schema)")
    return params


def tool_names(params: SamplingParams) -> list[str]:
    """The names of the request's function tools (validated: each is a JSON function tool)."""
    return [json_schema(text)["function"]["name"] for text in params.tools]


def _validate_tools(params: SamplingParams) -> None:
    if len(params.tools) > MAX_TOOLS:
        raise InvalidField("tools", f"takes at most {MAX_TOOLS} tools, got {len(params.tools)}")
    for i, text in enumerate(params.tools):
        where = f"tools[{i}]"
        if len(text) > MAX_TOOL_BYTES:
            raise InvalidField(where, f"is over the limit of {MAX_TOOL_BYTES} bytes")
        try:
            tool = json_schema(text)
        except ValueError as exc:
            raise InvalidField(where, f"is not valid JSON: {exc}") from None
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidField(where, "must be {'type': 'function', 'function': {'name', 'parameters'?, ...}}")
        if not isinstance(function.get("name"), str) or not TOOL_NAME.match(function["name"]):
            raise InvalidField(f"{where}.function.name", "must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidField(f"{where}.function.parameters", "must be a JSON Schema object")
    names = tool_names(params)
    if len(set(names)) != len(names):
        raise InvalidField("tools", "two tools have the same name")
    choice = params.tool_choice
    if choice and choice not in TOOL_CHOICES and choice not in names:
        raise InvalidField("tool_choice", f"must be auto, none, required or the name of a tool, got '{choice[:64]}'")
    if choice == "required" and not names:
        raise InvalidField("tool_choice", "'required' needs tools")


@functools.lru_cache(maxsize=64)
def json_schema(text: str) -> dict:
    """A request's JSON Schema, parsed once per process: validation and the backend that sends it
    read the same object (never modify it). The schema travels as JSON text between services, so
    its key order reaches the model as the client wrote it."""
    return json.loads(text)


def validate_messages(messages: list[Message], field: str = "messages", *, needs_user: bool = True) -> list[Message]:
    """A conversation a model can answer: known roles, tool messages naming their call, and (unless
    `needs_user` is false: tool results added to a stored conversation) a user message with text."""
    if not messages:
        raise InvalidField(field, "must not be empty")
    if len(messages) > MAX_MESSAGES:
        raise InvalidField(field, f"holds at most {MAX_MESSAGES} messages, got {len(messages)}")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidField(f"{field}[{i}].role", f"must be one of {', '.join(ROLES)}")
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidField(f"{field}[{i}].tool_call_id", "is required in a tool message")
        if message.tool_calls and message.role != "assistant":
            raise InvalidField(f"{field}[{i}].tool_calls", "only an assistant message makes tool calls")
        for j, call in enumerate(message.tool_calls):
            if not call.id or not TOOL_NAME.match(call.name):
                raise InvalidField(f"{field}[{i}].tool_calls[{j}]", "needs an id and a function name")
    if needs_user and not any(m.role == "user" and m.content.strip() for m in messages):
        raise InvalidField(field, "must hold at least one user message with text")
    return messages


def validate_message(text: str, limit_bytes: int, field: str = "message") -> str:
    """The user's message: not empty, not only whitespace, at most `limit_bytes` of UTF-8."""
    if not text.strip():
        raise InvalidField(field, "must not be empty or only whitespace")
    size = len(text.encode("utf-8"))
    if size > limit_bytes:
        raise InvalidField(field, f"is {size} bytes, over the limit of {limit_bytes} bytes")
    return text


def resolve(params: SamplingParams, defaults) -> SamplingParams:
    """`params` with every field it leaves unset taken from the model's `defaults`
    (config.SamplingDefaults): the parameters the model is asked with.

    One exception: while tools are offered, the default repeat_penalty is not applied (the server's
    own, none, is). A repetition penalty counts the prompt (llama-server and vLLM both), where the
    tools' names, argument names and the template's call markup stand: it pushes the model off the
    very tokens a call is made of (SmolLM2 with 1.1 wrote prose instead of a required call, and
    called with 1.0). A repeat_penalty the request sets itself is still sent."""
    calling = bool(params.tools) and params.tool_choice != "none"
    filled = {
        f.name: getattr(defaults, f.name)
        for f in dataclasses.fields(defaults)
        if getattr(params, f.name, None) is None and not (calling and f.name == "repeat_penalty")
    }
    return dataclasses.replace(params, **filled) if filled else params
