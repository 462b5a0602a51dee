"""gRPC face of the context core: ContextService."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from capibara_grpc import chat_convert as convert
from capibara_grpc.context.core import NO_DATA, ContextEngine
from capibara_grpc.errors import InvalidArgument
from capibara_grpc.stubs import context_pb2, context_pb2_grpc


def value_to_python(value: struct_pb2.Value):
    return json_format.MessageToDict(value)


def python_to_value(obj) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(obj, value)
    return value


class ContextServicer(context_pb2_grpc.ContextServiceServicer):
    def __init__(self, engine: ContextEngine):
        self.engine = engine

    async def Enrich(self, request, context):
        data = value_to_python(request.data) if request.HasField("data") else NO_DATA
        result = await self.engine.enrich(request.message, request.conversation_id, data, request.model_id)
        return context_pb2.EnrichResponse(
            prompt=result.prompt,
            messages=convert.messages_to_pb(result.messages),
            added_context=[
                context_pb2.AddedContext(kind=a.kind, content=a.content, reason=a.reason) for a in result.added
            ],
        )

    async def EncodeToon(self, request, context):
        if not request.HasField("json"):
            raise InvalidArgument("json is required")
        encoding = await self.engine.toon_encode(value_to_python(request.json), request.model_id)
        return context_pb2.EncodeToonResponse(
            toon=encoding.toon,
            json_tokens=encoding.json_tokens,
            toon_tokens=encoding.toon_tokens,
            savings=encoding.savings,
        )

    async def DecodeToon(self, request, context):
        return context_pb2.DecodeToonResponse(json=python_to_value(self.engine.toon_decode(request.toon)))

    async def GetConversation(self, request, context):
        if not request.conversation_id:
            raise InvalidArgument("conversation_id is required")
        turns = await self.engine.store.turns(request.conversation_id)
        return context_pb2.GetConversationResponse(
            conversation_id=request.conversation_id,
            turns=[
                context_pb2.ConversationTurn(
                    role=convert.ROLE_TO_PB[t.role], content=t.content, model_id=t.model_id, created_at=t.created_at
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
        if not request.conversation_id or role not in ("user", "assistant") or not request.content:
            raise InvalidArgument("conversation_id, a user or assistant role and content are required")
        stored = await self.engine.store.append(
            request.conversation_id, role, request.content, request.model_id, request.request_id
        )
        return context_pb2.AppendTurnResponse(stored=stored)
