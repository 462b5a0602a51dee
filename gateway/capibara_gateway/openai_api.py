"""The OpenAI-compatible API's JSON: requests parsed and checked into a ChatInput, answers and
stream chunks written in OpenAI's shapes. No gRPC in here (openai_servicer.py carries it).

Every field is either honoured or refused with INVALID_ARGUMENT naming it: nothing is silently
dropped. This module checks the JSON's shapes and types; the limits of the values are the chat
core's (capibara_grpc/chat/request.py), the same on every edge. openai_servicer.py words a refused
field as "param <name>: ...", which the edge turns into OpenAI's `error.param`.

Just over 500 lines: it is the one place that lists every OpenAI field the API takes or refuses,
which a reader wants to see together.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import uuid
from dataclasses import dataclass

import orjson

from capibara_gateway.events import ChatDone, ChatInput, RoutingDecision, ToolStep
from capibara_grpc.chat.request import check_number
from capibara_grpc.chat.types import TOOL_CHOICES, Message, SamplingParams, ToolCall, ToolCallDelta
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import InvalidArgument, InvalidField, NotFound

AUTO, CONSENSUS = "auto", "consensus"
# Fields honoured; everything else (functions, logprobs, audio, n > 1...) is a 400 naming it.
SUPPORTED_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "user",
    "response_format",
    "n",
    "reasoning_effort",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "capibara",
)
# "developer" is the newer name of "system" in OpenAI's API.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}


def bad(param: str, text: str) -> InvalidField:
    return InvalidField(param, text)


@dataclass
class ChatCompletionRequest:
    chat: ChatInput
    model: str  # as asked: "auto", "consensus" or a model id
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, integer: bool = False):
    """A number field's value, None when absent; its range is checked by the chat core."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}")
    return value


def _content(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{i}]", "only text content parts ({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, "content must be a string or a list of text parts")


def parse_messages(value) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "'messages' must be a non-empty list")
    messages = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad(where, "each message must be an object with 'role' and 'content'")
        for key in item:
            if key not in MESSAGE_FIELDS:
                raise bad(f"{where}.{key}", f"unsupported message field '{key}'")
        role = ROLES.get(item.get("role"))
        if role is None:
            raise bad(f"{where}.role", f"role must be one of {', '.join(ROLES)}, got {item.get('role')!r}")
        calls = _tool_calls(item.get("tool_calls"), role, f"{where}.tool_calls")
        content = item.get("content")
        # An assistant message that calls tools may have no text (content null).
        text = "" if content is None and calls else _content(content, f"{where}.content")
        tool_call_id = item.get("tool_call_id")
        if role == "tool":
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise bad(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
        elif tool_call_id is not None:
            raise bad(f"{where}.tool_call_id", "only a tool message has a tool_call_id")
        messages.append(Message(role, text, calls, tool_call_id or ""))
    return messages


def _tool_calls(value, role: str, where: str) -> list[ToolCall]:
    """An assistant message's tool_calls: [{id, type: "function", function: {name, arguments}}]."""
    if value is None:
        return []
    if role != "assistant":
        raise bad(where, "only an assistant message has tool_calls")
    if not isinstance(value, list):
        raise bad(where, "must be a list of tool calls")
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad(f"{where}[{i}]", "must be {'id', 'type': 'function', 'function': {'name', 'arguments'}}")
        arguments = function.get("arguments", "")
        if not all(isinstance(v, str) for v in (call.get("id"), function.get("name"), arguments)):
            raise bad(f"{where}[{i}]", "id, function.name and function.arguments must be strings")
        calls.append(ToolCall(call["id"], function["name"], arguments))
    return calls


def _tools(value) -> list[str]:
    """Each function tool as JSON text, exactly as the client wrote it (key order kept), compact."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("tools", "must be a list of tools")
    texts = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise bad(f"tools[{i}]", "must be an object {'type': 'function', 'function': {...}}")
        if tool.get("type") != "function":
            raise bad(f"tools[{i}].type", f"only function tools are supported, got {tool.get('type')!r}")
        texts.append(dumps(tool).decode())
    return texts


def _tool_choice(value) -> str:
    """auto, none, required, or {"type": "function", "function": {"name": ...}} as the name."""
    if value is None:
        return ""
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise bad("tool_choice", f"must be auto, none, required or a function, got {value[:40]!r}")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(function, dict):
        raise bad("tool_choice", "must be auto, none, required or {'type': 'function', 'function': {'name': ...}}")
    name = function.get("name")
    if not isinstance(name, str) or not name or name in TOOL_CHOICES:
        raise bad("tool_choice.function.name", "must be the name of one of the tools")
    return name


# -- JSON on the /v1 path: orjson where it gives what json gives, json for the rest ----------------

_LONG_DIGITS = re.compile(rb"\d{19}")  # an integer of 19 digits or more may be past 64 bits


def loads(raw: bytes):
    """json.loads(raw): the same value, or the same error. orjson parses first; it makes integers
    past 64 bits floats (json keeps them exact: a run of 19 digits goes to json), and refuses what
    json takes (NaN, Infinity, 1e400 as inf, a byte order mark, UTF-16, a lone surrogate): json
    then answers, or raises its error as ever."""
    if type(raw) is bytes and not _LONG_DIGITS.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_PLAIN = {str, int, bool, type(None)}


def _orjson_writes_the_same(payload) -> bool:
    """orjson writes dicts, lists and tuples of strings, ints, bools and None as json does; a float
    only between 1e-4 and 1e16 (json writes 1e-05 where orjson writes 0.00001, and NaN where orjson
    writes null). Anything else (a subclass, a dataclass) is left to json."""
    stack = [payload]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            stack.extend(value)
        elif kind is float:
            if not (value == 0 or 1e-4 <= abs(value) < 1e16):  # NaN compares false
                return False
        elif kind not in _PLAIN:
            return False
    return True


def dumps(payload) -> bytes:
    """json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(), byte for byte, its
    errors too; orjson writes it when it writes the same (an integer past 64 bits, a key that is not
    a string or a lone surrogate make orjson refuse: json then writes it, or raises as ever)."""
    if _orjson_writes_the_same(payload):
        try:
            return orjson.dumps(payload)
        except orjson.JSONEncodeError:
            pass
    return _COMPACT.encode(payload).encode()


def json_body(raw: bytes, supported: tuple[str, ...]) -> dict:
    """The body as a JSON object; a field outside `supported` is a 400 naming it."""
    try:
        body = loads(raw or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    for key in body:
        if key not in supported:
            raise bad(key, f"unsupported field '{key}' (supported: {', '.join(supported)})")
    return body


def parse_chat_request(raw: bytes, config: MeshConfig, consensus_available: bool = True) -> ChatCompletionRequest:
    body = json_body(raw, SUPPORTED_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required: 'auto', 'consensus' or a model id (GET /v1/models)")
    if model not in (AUTO, CONSENSUS) and model not in config.models:
        raise NotFound(f"param model: the model '{model[:80]}' does not exist (see GET /v1/models)")
    if model == CONSENSUS and not consensus_available:
        raise NotFound("param model: 'consensus' is not available: no consensus service is deployed")
    messages = parse_messages(body.get("messages"))
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n", "only n=1 is supported (one choice per request)")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    max_tokens = _number(body, "max_tokens", integer=True)
    if max_tokens is None and (max_tokens := _number(body, "max_completion_tokens", integer=True)) is not None:
        try:
            check_number("max_tokens", max_tokens)
        except InvalidField as exc:  # the same limit, under the name the client used
            raise bad("max_completion_tokens", exc.text) from None
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop", "must be a string or a list of strings")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    include_usage = _stream_options(body.get("stream_options"), stream)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "'user' must be a string")
    json_schema = _response_format(body.get("response_format"))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        stop=stop,
        seed=_number(body, "seed", integer=True),
        json_schema=json_schema,
        reasoning_effort=_reasoning_effort(body.get("reasoning_effort")),
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=_flag(body, "parallel_tool_calls"),
    )
    # The last user message is the one routed and answered; the gateway checks there is one.
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    conversation_id = _conversation_id(body.get("capibara"))
    # With a stored conversation the new input is one user message, or the tool results answering
    # the conversation's tool calls (kept in `messages`; the gateway answers the stored question).
    tool_results = bool(conversation_id) and all(m.role == "tool" for m in messages)
    if conversation_id and not tool_results and (len(messages) != 1 or messages[0].role != "user"):
        raise bad(
            "messages",
            "with capibara.conversation_id the mesh keeps the history: send only the new user message, "
            "or only the tool messages answering the conversation's tool calls",
        )
    chat = ChatInput(
        message=last_user,
        conversation_id=conversation_id,
        model=model if model not in (AUTO, CONSENSUS) else "",
        consensus=model == CONSENSUS,
        params=params,
        messages=messages if tool_results or not conversation_id else None,
        mcp_tools=_mcp_tools(body.get("capibara")),
    )
    return ChatCompletionRequest(chat, model, stream, include_usage)


def _flag(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(name, f"'{name}' must be true or false")
    return value


def _reasoning_effort(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad("reasoning_effort", "must be a word such as low, medium or high")
    return value


def _conversation_id(value) -> str:
    """The extension field {"capibara": {"conversation_id": "..."}}: the mesh's stored conversation."""
    if value is None:
        return ""
    if not isinstance(value, dict) or any(k not in EXTENSION_FIELDS for k in value):
        raise bad("capibara", "the extension takes only {'conversation_id': '...', 'mcp_tools': [...]}")
    conversation_id = value.get("conversation_id") or ""
    if not isinstance(conversation_id, str) or len(conversation_id) > 128:
        raise bad("capibara.conversation_id", "must be a string of at most 128 characters")
    return conversation_id


EXTENSION_FIELDS = ("conversation_id", "mcp_tools")


def _mcp_tools(value) -> list[str]:
    """{"capibara": {"mcp_tools": ["<server>", "<server>.<tool>"]}}: MCP tools the mesh runs."""
    tools = value.get("mcp_tools") if isinstance(value, dict) else None
    if tools is None:
        return []
    if not isinstance(tools, list) or not all(isinstance(t, str) and t for t in tools) or len(tools) > 64:
        raise bad("capibara.mcp_tools", "must be a list of '<server>' or '<server>.<tool>' names")
    return tools


def _stream_options(value, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    if not isinstance(value, dict) or any(k != "include_usage" for k in value):
        raise bad("stream_options", "only stream_options.include_usage is supported")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("stream_options.include_usage", "must be true or false")
    return include


def _response_format(value) -> str:
    """The JSON Schema (JSON text) the answer must follow; "" for free text."""
    if value is None:
        return ""
    kind = value.get("type") if isinstance(value, dict) else value
    if kind == "text":
        return ""
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("response_format.json_schema", "must be {name, schema, strict?} with schema a JSON Schema object")
        return json.dumps(spec.get("schema") or {"type": "object"})
    raise bad("response_format", f"response_format {kind!r} is not supported (text, json_object, json_schema)")


# -- answers -----------------------------------------------------------------------------------


def routing_extension(decision: RoutingDecision) -> dict:
    """The mesh's decision, in the one extension field ("capibara") strict clients ignore."""
    return {
        "model_id": decision.model_id,
        "route_name": decision.route_name,
        "confidence": decision.confidence,
        "source": decision.source,
        "fallback": decision.fallback,
        "failed_models": list(decision.failed_models),
        "reasoning": decision.reasoning,
    }


def routing_headers(decision: RoutingDecision) -> tuple[tuple[str, str], ...]:
    """The same decision as response headers (gRPC initial metadata, which the edge passes on)."""
    return (
        ("x-capibara-model", decision.model_id),
        ("x-capibara-route", decision.route_name),
        ("x-capibara-confidence", f"{decision.confidence:.4f}"),
        ("x-capibara-source", decision.source),
        ("x-capibara-failed-models", ",".join(decision.failed_models)),
    )


def tool_step(step: ToolStep) -> dict:
    return {
        "name": step.name,
        "server": step.server,
        "tool": step.tool,
        "arguments": step.arguments,
        "result": step.result,
        "is_error": step.is_error,
        "ms": round(step.ms, 1),
    }


def usage(done: ChatDone) -> dict:
    f = done.finished
    figures = {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    }
    if f.reasoning_tokens:
        figures["completion_tokens_details"] = {"reasoning_tokens": f.reasoning_tokens}
    return figures


class Completion:
    """The ids and timestamps one answer shares across its chunks."""

    def __init__(self, model: str = ""):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(
        self,
        text: str,
        decision: RoutingDecision,
        done: ChatDone,
        reasoning: str = "",
        tool_calls: list[ToolCall] | None = None,
        tool_steps: list[ToolStep] | None = None,
    ) -> dict:
        self.model = done.finished.model_id or decision.model_id
        # A message that only calls tools has content null, as OpenAI's.
        message = {"role": "assistant", "content": None if tool_calls and not text else text}
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in tool_calls
            ]
        return {
            **self._base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": FINISH_REASONS.get(done.finished.finish_reason, "stop"),
                    "logprobs": None,
                }
            ],
            "usage": usage(done),
            "system_fingerprint": None,
            "capibara": routing_extension(decision)
            | ({"tool_steps": [*map(tool_step, tool_steps)]} if tool_steps else {}),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, include_usage: bool = False) -> dict:
        chunk = {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if include_usage:
            chunk["usage"] = None
        return chunk

    def tool_call_chunks(self, delta: ToolCallDelta, include_usage: bool = False) -> list[dict]:
        """A piece of a tool call as OpenAI streams it, which the SDKs assemble by `index`: the
        call's first chunk has its id, type and name with arguments "", the next ones only the
        index and an arguments fragment (any other field would be joined onto the first's)."""
        pieces = []
        if delta.id or delta.name:
            call = {"index": delta.index, "id": delta.id, "type": "function"}
            call["function"] = {"name": delta.name, "arguments": ""}
            pieces.append(call)
        if delta.arguments:
            pieces.append({"index": delta.index, "function": {"arguments": delta.arguments}})
        return [self.chunk({"tool_calls": [piece]}, include_usage=include_usage) for piece in pieces]

    def tool_step_chunk(self, step: ToolStep, include_usage: bool = False) -> dict:
        """An MCP tool the mesh ran: an empty delta with the step in the extension field."""
        chunk = self.chunk({}, include_usage=include_usage)
        chunk["capibara"] = {"tool_step": tool_step(step)}
        return chunk

    def first_chunk(self, decision: RoutingDecision, include_usage: bool) -> dict:
        self.model = decision.model_id
        chunk = self.chunk({"role": "assistant", "content": ""}, include_usage=include_usage)
        chunk["capibara"] = routing_extension(decision)
        return chunk

    def last_chunk(self, done: ChatDone, include_usage: bool) -> dict:
        reason = FINISH_REASONS.get(done.finished.finish_reason, "stop")
        return self.chunk({}, reason, include_usage)

    def usage_chunk(self, done: ChatDone) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage(done)}


def sse(payload: dict | str) -> bytes:
    if isinstance(payload, str):
        return f"data: {payload}\n\n".encode()
    return b"data: " + dumps(payload) + b"\n\n"


def stream_error(code: str, message: str) -> dict:
    """The in-band error of a stream that fails after its first token."""
    kind = "server_error" if code not in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED") else code.lower()
    return {"error": {"message": message, "type": kind, "param": None, "code": code.lower()}}


def model_list(config: MeshConfig, consensus_available: bool) -> list[dict]:
    ids = [AUTO, *([CONSENSUS] if consensus_available else []), *config.models]
    return [{"id": i, "object": "model", "created": 0, "owned_by": "capibara"} for i in ids]


def model_entry(config: MeshConfig, consensus_available: bool, model_id: str) -> dict:
    for entry in model_list(config, consensus_available):
        if entry["id"] == model_id:
            return entry
    raise NotFound(f"param model: the model '{model_id[:80]}' does not exist (see GET /v1/models)")


# -- embeddings and speech -----------------------------------------------------------------------

EMBEDDING_FIELDS = ("model", "input", "encoding_format", "user", "dimensions")
MAX_EMBEDDING_INPUTS = 256


@dataclass
class EmbeddingRequest:
    texts: list[str]
    model: str
    base64: bool


def parse_embedding_request(raw: bytes) -> EmbeddingRequest:
    """`input` a string or a list of strings (token arrays are refused); any `model` name is served
    by the router's encoder, which the answer names."""
    body = json_body(raw, EMBEDDING_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required (the router's encoder answers whatever the name)")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t for t in texts)):
        raise bad("input", "'input' must be a non-empty string or a list of non-empty strings")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise bad("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(texts)}")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    if body.get("dimensions") is not None:
        raise bad("dimensions", "'dimensions' is not supported: the encoder's size is fixed")
    return EmbeddingRequest(texts, model, encoding == "base64")


def embedding_response(request: EmbeddingRequest, vectors: list[list[float]], tokens: int, model: str) -> dict:
    def encoded(vector: list[float]):
        if request.base64:
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed")
SPEECH_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}


@dataclass
class SpeechRequest:
    text: str
    voice: str
    response_format: str


def parse_speech_request(raw: bytes) -> SpeechRequest:
    """`voice` is a voice id of GET /api/tts/voices ("" or absent = the default voice); wav (the
    default here) and pcm (PCM16 little-endian mono, at the voice's rate) only."""
    body = json_body(raw, SPEECH_FIELDS)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad("model", "'model' is required (any name: the voice chooses the engine)")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad("input", "'input' must be a non-empty string")
    voice = body.get("voice") or ""
    if not isinstance(voice, str):
        raise bad("voice", "'voice' must be a voice id (GET /api/tts/voices)")
    response_format = body.get("response_format", "wav")
    if response_format not in SPEECH_FORMATS:
        raise bad("response_format", f"response_format {response_format!r} is not supported (wav, pcm)")
    if body.get("speed") not in (None, 1, 1.0):
        raise bad("speed", "only speed 1.0 is supported")
    return SpeechRequest(text, voice, response_format)
