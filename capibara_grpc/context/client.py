"""The context service as seen by the gateway: a gRPC client returning plain Python."""

from __future__ import annotations

import grpc

from capibara_grpc import tracing
from capibara_grpc.chat import convert as chat_convert
from capibara_grpc.chat.types import Message
from capibara_grpc.stubs import context_pb2, context_pb2_grpc


class ContextClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = context_pb2_grpc.ContextServiceStub(channel)

    async def enrich(
        self, message: str, conversation_id: str, model_id: str, timeout_s: float, route: str = ""
    ) -> list[Message]:
        response = await self.stub.Enrich(
            context_pb2.EnrichRequest(message=message, conversation_id=conversation_id, model_id=model_id, route=route),
            timeout=timeout_s,
        )
        return chat_convert.messages_from_pb(response.messages)

    async def append_turn(self, conversation_id: str, role: str, content: str, model_id: str, timeout_s: float) -> None:
        # The request id (one per chat) and the role make the idempotency key: a retried call
        # stores the turn once.
        request_id = tracing.current_request_id.get()
        await self.stub.AppendTurn(
            context_pb2.AppendTurnRequest(
                conversation_id=conversation_id,
                role=chat_convert.ROLE_TO_PB[role],
                content=content,
                model_id=model_id,
                request_id=f"{request_id}:{role}" if request_id else "",
            ),
            timeout=timeout_s,
        )

    async def recent_user_turns(self, conversation_id: str, count: int, timeout_s: float) -> list[str]:
        """The conversation's last `count` user messages, from the shared memory (any replica)."""
        response = await self.stub.GetConversation(
            context_pb2.GetConversationRequest(conversation_id=conversation_id), timeout=timeout_s
        )
        user = [turn.content for turn in response.turns if chat_convert.ROLE_FROM_PB.get(turn.role) == "user"]
        return user[-count:]
