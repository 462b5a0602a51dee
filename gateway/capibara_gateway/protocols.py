"""What the gateway needs from the other services, as typed protocols.

The gRPC clients (capibara_grpc.<service>.client) satisfy them; unit tests pass small fakes. A
service that is not deployed is None, and the gateway says so (UNIMPLEMENTED, or a routing
decision that names the default model).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from capibara_grpc.audio import AudioChunk
from capibara_grpc.chat.types import ConsensusAnswer, Message, RouteDecision, SamplingParams, ToolCall

# (query, recent user turns, timeout_s) -> the router's decision (RouterClient.route)
RouteFn = Callable[[str, list[str], float], Awaitable[RouteDecision]]


class Context(Protocol):
    """The context service (ContextClient): prompts with context, and conversation memory."""

    async def enrich(
        self,
        message: str,
        conversation_id: str,
        model_id: str,
        timeout_s: float,
        route: str = "",
        tool_results: list[Message] | None = None,
    ) -> list[Message]:
        """The messages to send `model_id`: system prompt with added context, history, the message
        (or `tool_results`, answering the conversation's newest tool calls, in its place).
        `route`: the router's choice, which may trigger MCP servers."""
        ...

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
        """Store one turn (idempotent per request id and role, and call id for a tool result)."""
        ...

    async def recent_user_turns(self, conversation_id: str, count: int, timeout_s: float) -> list[str]:
        """The conversation's last `count` user messages."""
        ...


class Consensus(Protocol):
    """The consensus service's vote (ConsensusClient.decide): several models answer, one answer
    is chosen. A callable, like RouteFn and GenerateFn: the gateway needs one call of it."""

    async def __call__(self, prompt: str, params: SamplingParams, timeout_s: float) -> ConsensusAnswer: ...


class Speech(Protocol):
    """The speech service (SpeechClient)."""

    async def voice_ids(self, timeout_s: float) -> list[str]: ...

    def synthesize(self, text: str, voice: str, timeout_s: float) -> AsyncIterator[AudioChunk]:
        """PCM16 audio of `text` (an async generator)."""
        ...
