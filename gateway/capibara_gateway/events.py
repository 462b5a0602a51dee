"""What a chat is: the request as the gateway sees it, and the events of its answer.

A streamed answer is, in order: one RoutingDecision (sent with the first token), Token deltas
(and, from a reasoning model, Reasoning deltas before or between them; when the request has tools,
ToolCallDelta pieces of the calls the model makes; with mcp_tools, a ToolStep per MCP tool the mesh
ran, between the rounds), then one ChatDone, or
one StreamError if it fails after it started; then, when the answer is spoken, AudioChunks (or a
StreamError if speaking fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from capibara_grpc.audio import AudioChunk
from capibara_grpc.chat.types import Finished, Message, Reasoning, SamplingParams, Token, ToolCall, ToolCallDelta
from capibara_grpc.errors import StreamError


@dataclass
class ChatInput:
    message: str
    conversation_id: str = ""
    model: str = ""
    use_router: bool = True
    consensus: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    system_prompt: str | None = None
    speak: bool = False
    voice: str = ""
    # The whole conversation from the client (the OpenAI API): `message` is its last user message,
    # routing and context read that; the model gets these turns after the enriched system message.
    messages: list[Message] | None = None
    # Tools of configured MCP servers the mesh runs for the model: "<server>" or "<server>.<tool>".
    mcp_tools: list[str] = field(default_factory=list)
    # The caller's API key id ("" without keys), which may restrict mcp_tools (mcp_servers.<id>.api_keys).
    key_id: str = ""


@dataclass
class RoutingDecision:
    model_id: str
    route_name: str
    confidence: float
    source: str  # "request", "router", "default" or "consensus"
    reasoning: str
    fallback: bool = False
    scores: list[tuple[str, float]] = field(default_factory=list)
    # The router's other models, best first: failover candidates after the configured fallbacks.
    next_best: list[str] = field(default_factory=list)
    # Models tried first whose backends failed before answering.
    failed_models: list[str] = field(default_factory=list)


@dataclass
class ToolStep:
    """An MCP tool the mesh ran for the model (request mcp_tools), and what the model got back."""

    name: str  # as offered to the model: <server>__<tool>
    arguments: str  # JSON text, as the model wrote them
    result: str
    is_error: bool
    ms: float
    server: str = ""
    tool: str = ""


@dataclass
class ChatDone:
    finished: Finished
    latency_ms: float


ChatEvent = RoutingDecision | Token | Reasoning | ToolCallDelta | ToolStep | ChatDone | StreamError | AudioChunk


@dataclass
class CompleteResult:
    response: str
    routing: RoutingDecision
    done: ChatDone
    # A reasoning model's thinking, apart from the response ("" for other models).
    reasoning: str = ""
    # The tools the model called (finish_reason "tool_calls"), each assembled from its pieces.
    tool_calls: list[ToolCall] = field(default_factory=list)
    # The MCP tools the mesh ran on the way (request mcp_tools), in order.
    tool_steps: list[ToolStep] = field(default_factory=list)


def assemble_tool_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Whole calls from their streamed pieces, in index order: the first piece of a call has its id
    and name, the arguments are the pieces' fragments joined (as the OpenAI SDKs assemble them)."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ToolCall("", "", ""))
        call.id = call.id or delta.id
        call.name = call.name or delta.name
        call.arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]
