"""What a chat is: the request as the gateway sees it, and the events of its answer.

A streamed answer is, in order: one RoutingDecision (sent with the first token), Token deltas
(and, from a reasoning model, Reasoning deltas before or between them), then one ChatDone, or
one StreamError if it fails after it started; then, when the answer is spoken, AudioChunks (or a
StreamError if speaking fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from capibara_grpc.audio import AudioChunk
from capibara_grpc.chat.types import Finished, Message, Reasoning, SamplingParams, Token
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
class ChatDone:
    finished: Finished
    latency_ms: float


ChatEvent = RoutingDecision | Token | Reasoning | ChatDone | StreamError | AudioChunk


@dataclass
class CompleteResult:
    response: str
    routing: RoutingDecision
    done: ChatDone
    # A reasoning model's thinking, apart from the response ("" for other models).
    reasoning: str = ""
