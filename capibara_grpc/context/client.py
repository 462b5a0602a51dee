"""The context service as seen by the gateway: a gRPC client returning plain Python."""

from __future__ import annotations

import grpc

from capibara_grpc import tracing
from capibara_grpc.chat import convert as chat_convert
from capibara_grpc.chat.types import Message, ToolCall
from capibara_grpc.stubs import context_pb2, context_pb2_grpc


class ContextClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = context_pb2_grpc.ContextServiceStub(channel)

    async def enrich(
        self,
        message: str,
        conversation_id: str,
        model_id: str,
        timeout_s: float,
        route: str = "",
        tool_results: list[Message] | None = None,
    ) -> list[Message]:
        response = await self.stub.Enrich(
            context_pb2.EnrichRequest(
                message=message,
                conversation_id=conversation_id,
                model_id=model_id,
                route=route,
                tool_results=chat_convert.messages_to_pb(tool_results or []),
            ),
            timeout=timeout_s,
        )
        return chat_convert.messages_from_pb(response.messages)

    async def append_turn(
        self,
        conversation_id: str,
        role: str,
        content: str,
        model_id: str,
        timeout_s: float,
        tool_calls: list[ToolCall] | None = None,
        tool_call_id: str = "",
    ) -> None:
        # The request id (one per chat) and the role make the idempotency key: a retried call
        # stores the turn once. A request sends several tool results: each one's call id is in it.
        request_id = tracing.current_request_id.get()
        key = f"{request_id}:{role}" + (f":{tool_call_id}" if tool_call_id else "")
        await self.stub.AppendTurn(
            context_pb2.AppendTurnRequest(
                conversation_id=conversation_id,
                role=chat_convert.ROLE_TO_PB[role],
                content=content,
                model_id=model_id,
                request_id=key if request_id else "",
                tool_calls=chat_convert.tool_calls_to_pb(tool_calls or []),
                tool_call_id=tool_call_id,
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

    async def list_mcp_tools(self, names: list[str], timeout_s: float) -> list:
        """The MCP tools `names` ("<server>" or "<server>.<tool>") stand for (McpTool messages)."""
        response = await self.stub.ListMcpTools(context_pb2.ListMcpToolsRequest(names=names), timeout=timeout_s)
        return list(response.tools)

    async def call_mcp_tool(
        self, server: str, name: str, arguments_json: str, timeout_s: float
    ) -> tuple[str, bool, float]:
        """(result, is_error, ms) of one MCP tool call the model made."""
        response = await self.stub.CallMcpTool(
            context_pb2.CallMcpToolRequest(server=server, name=name, arguments_json=arguments_json), timeout=timeout_s
        )
        return response.result, response.is_error, response.ms
