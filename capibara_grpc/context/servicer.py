"""gRPC face of the context core: ContextService.

TOON over REST comes as raw bodies (google.api.HttpBody, EncodeToonJson and DecodeToonJson) so
that JSON key order survives the edge: a Struct is a map. Their JSON is read and checked here.
"""

from __future__ import annotations

from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

from capibara_grpc.chat import convert
from capibara_grpc.context import toon
from capibara_grpc.context.core import NO_DATA, ContextEngine, plain
from capibara_grpc.context.mcp_rpcs import McpToolRpcs
from capibara_grpc.errors import InvalidArgument
from capibara_grpc.stubs import context_pb2, context_pb2_grpc


def value_to_python(value: struct_pb2.Value):
    return json_format.MessageToDict(value)


def python_to_value(obj) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(obj, value)
    return value


class ContextServicer(McpToolRpcs, context_pb2_grpc.ContextServiceServicer):
    def __init__(self, engine: ContextEngine):
        self.engine = engine

    async def Enrich(self, request, context):
        if request.data_json:
            data = toon.parse_json(request.data_json, "data_json")
        else:
            data = plain(value_to_python(request.data)) if request.HasField("data") else NO_DATA
        tool_results = convert.messages_from_pb(request.tool_results)
        if any(m.role != "tool" or not m.tool_call_id for m in tool_results):
            raise InvalidArgument("tool_results: only ROLE_TOOL messages, each with its tool_call_id")
        result = await self.engine.enrich(
            request.message,
            request.conversation_id,
            data,
            request.model_id,
            route=request.route,
            tool_results=tool_results or None,
        )
        return context_pb2.EnrichResponse(
            prompt=result.prompt,
            messages=convert.messages_to_pb(result.messages),
            added_context=[
                context_pb2.AddedContext(kind=a.kind, content=a.content, reason=a.reason) for a in result.added
            ],
        )

    async def EncodeToon(self, request, context):
        if request.json_text:
            value = toon.parse_json(request.json_text, "json_text")
        elif request.HasField("json"):
            value = plain(value_to_python(request.json))
        else:
            raise InvalidArgument("json is required (or json_text, which keeps key order)")
        options = toon.encode_options(_set_fields(request.options))
        encoding = await self.engine.toon_encode(value, request.model_id, options)
        return context_pb2.EncodeToonResponse(
            toon=encoding.toon,
            json_tokens=encoding.json_tokens,
            toon_tokens=encoding.toon_tokens,
            savings=encoding.savings,
            tokens_estimated=encoding.tokens_estimated,
        )

    async def DecodeToon(self, request, context):
        value = self.engine.toon_decode(request.toon, toon.decode_options(_set_fields(request.options)))
        return context_pb2.DecodeToonResponse(json=python_to_value(value), json_text=toon.compact_json(value))

    async def EncodeToonJson(self, request, context):
        body = _json_object(request, ENCODE_FIELDS)
        if "json" in body:
            value = body["json"]
        elif isinstance(body.get("json_text"), str):
            value = toon.parse_json(body["json_text"], "json_text")
        else:
            raise InvalidArgument("json is required: the value to encode, any JSON")
        model_id = body.get("model_id", "")
        if not isinstance(model_id, str):
            raise InvalidArgument("model_id must be a string")
        encoding = await self.engine.toon_encode(value, model_id, toon.encode_options(body.get("options")))
        answer = {
            "toon": encoding.toon,
            "json_tokens": encoding.json_tokens,
            "toon_tokens": encoding.toon_tokens,
            "savings": encoding.savings,
            "tokens_estimated": encoding.tokens_estimated,
        }
        return httpbody_pb2.HttpBody(content_type=JSON, data=toon.compact_json(answer).encode())

    async def DecodeToonJson(self, request, context):
        if request.content_type.split(";")[0].strip().lower() in TOON_TYPES:
            try:
                text, options = request.data.decode("utf-8"), toon.DecodeOptions()
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"the TOON document is not UTF-8 (byte {exc.start})") from exc
        else:
            body = _json_object(request, DECODE_FIELDS)
            if not isinstance(body.get("toon"), str):
                raise InvalidArgument("toon is required: the TOON document, as a string")
            text, options = body["toon"], toon.decode_options(body.get("options"))
        value = self.engine.toon_decode(text, options)
        return httpbody_pb2.HttpBody(content_type=JSON, data=b'{"json":' + toon.compact_json(value).encode() + b"}")

    async def GetConversation(self, request, context):
        if not request.conversation_id:
            raise InvalidArgument("conversation_id is required")
        turns = await self.engine.store.turns(request.conversation_id)
        return context_pb2.GetConversationResponse(
            conversation_id=request.conversation_id,
            turns=[
                context_pb2.ConversationTurn(
                    role=convert.ROLE_TO_PB[t.role],
                    content=t.content,
                    model_id=t.model_id,
                    created_at=t.created_at,
                    tool_calls=convert.tool_calls_to_pb(t.tool_calls),
                    tool_call_id=t.tool_call_id,
                )
                for t in turns
            ],
        )

    async def DeleteConversation(self, request, context):
        if not request.conversation_id:
            raise InvalidArgument("conversation_id is required")
        return context_pb2.DeleteConversationResponse(
            deleted_turns=await self.engine.store.delete(request.conversation_id)
        )

    async def AppendTurn(self, request, context):
        role = convert.ROLE_FROM_PB.get(request.role)
        calls = convert.tool_calls_from_pb(request.tool_calls)
        # Content is required, but an answer that only calls tools has none, nor may a tool's result.
        if (
            not request.conversation_id
            or role not in ("user", "assistant", "tool")
            or not (request.content or calls or role == "tool")
        ):
            raise InvalidArgument("conversation_id, a user, assistant or tool role and content are required")
        if (role == "tool") != bool(request.tool_call_id):
            raise InvalidArgument("tool_call_id is required in a tool turn, and only there")
        if calls and role != "assistant" or any(not c.id or not c.name for c in calls):
            raise InvalidArgument("tool_calls: only an assistant turn makes tool calls, each with an id and a name")
        stored = await self.engine.store.append(
            request.conversation_id,
            role,
            request.content,
            request.model_id,
            request.request_id,
            tool_calls=calls,
            tool_call_id=request.tool_call_id,
        )
        return context_pb2.AppendTurnResponse(stored=stored)


JSON = "application/json"
# A decode body with one of these content types is the TOON document itself.
TOON_TYPES = ("text/plain", "text/toon", "application/toon")
# REST body fields (snake_case or lowerCamel, as the transcoder accepts elsewhere) -> name.
ENCODE_FIELDS = {"json": "json", "json_text": "json_text", "jsonText": "json_text", "model_id": "model_id"}
ENCODE_FIELDS |= {"modelId": "model_id", "options": "options"}
DECODE_FIELDS = {"toon": "toon", "options": "options"}


def _json_object(request: httpbody_pb2.HttpBody, fields: dict[str, str]) -> dict:
    """A raw REST body as a JSON object, keys in order; unknown fields are refused, named."""
    body = toon.parse_json(request.data, "the body") if request.data.strip() else {}
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    named = {}
    for key, value in body.items():
        if key not in fields:
            shown = "".join(c if c.isalnum() or c in "_-." else "?" for c in key[:64])
            accepted = ", ".join(sorted(set(fields.values())))
            raise InvalidArgument(f"unknown field '{shown}' (accepted: {accepted})")
        named[fields[key]] = value
    return named


def _set_fields(options) -> dict:
    """The fields of a Toon*Options message that were set (0 and "" are unset, as in proto3)."""
    return {f.name: value for f, value in options.ListFields()}
