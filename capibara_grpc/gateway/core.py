"""Chat gateway core: validate, route, generate, stream events. No gRPC in here.

The routing event is sent together with the first token: until the backend has produced
something, any failure (bad input, unknown model, backend down) is still a plain error status
(400/404/503 over REST). Once the stream has started, a failure becomes an in-band error event.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import (
    InvalidArgument,
    MeshError,
    NotFound,
    Unimplemented,
    as_mesh_error,
    error_from_status_name,
)
from capibara_grpc.inference.core import validate_params
from capibara_grpc.inference.types import Finished, Message, SamplingParams, Token

log = logging.getLogger(__name__)

# (model_id, messages, params, timeout_s) -> stream of tokens then one Finished
GenerateFn = Callable[[str, list[Message], SamplingParams, float], AsyncIterator[Token | Finished]]


@dataclass
class ChatInput:
    message: str
    conversation_id: str = ""
    model: str = ""
    use_router: bool = True
    consensus: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    system_prompt: str | None = None


@dataclass
class RoutingDecision:
    model_id: str
    route_name: str
    confidence: float
    source: str  # "request", "router" or "default"
    reasoning: str
    fallback: bool = False
    scores: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ChatDone:
    finished: Finished
    latency_ms: float


@dataclass
class StreamFailure:
    code: str  # gRPC status name
    message: str


ChatEvent = RoutingDecision | Token | ChatDone | StreamFailure


@dataclass
class CompleteResult:
    response: str
    routing: RoutingDecision
    done: ChatDone


class ChatGateway:
    def __init__(self, config: MeshConfig, generate: GenerateFn):
        self.config = config
        self.generate = generate

    def validate(self, chat: ChatInput) -> None:
        if not chat.message.strip():
            raise InvalidArgument("message must not be empty or only whitespace")
        size = len(chat.message.encode("utf-8"))
        limit = self.config.gateway.max_message_bytes
        if size > limit:
            raise InvalidArgument(f"message is {size} bytes, over the limit of {limit} bytes")
        if chat.model and chat.model not in self.config.models:
            raise NotFound(f"unknown model '{chat.model}' (available: {', '.join(sorted(self.config.models))})")
        if chat.consensus:
            raise Unimplemented("consensus is not available: the consensus service is not deployed in this mesh yet")
        validate_params(chat.params)

    def route(self, chat: ChatInput) -> RoutingDecision:
        if chat.model:
            return RoutingDecision(chat.model, "explicit", 1.0, "request", "the request named the model")
        default = self.config.gateway.default_model
        why = (
            "use_router is false: configured default model"
            if not chat.use_router
            else "no router service is deployed: configured default model"
        )
        return RoutingDecision(default, "default", 1.0, "default", why)

    def messages(self, chat: ChatInput) -> list[Message]:
        system = self.config.gateway.system_prompt if chat.system_prompt is None else chat.system_prompt
        messages = [Message("system", system)] if system.strip() else []
        messages.append(Message("user", chat.message))
        return messages

    async def chat(self, chat: ChatInput, timeout_s: float) -> AsyncIterator[ChatEvent]:
        started = time.perf_counter()
        self.validate(chat)
        decision = self.route(chat)
        stream = self.generate(decision.model_id, self.messages(chat), chat.params, timeout_s).__aiter__()
        try:
            # Errors before the first item propagate as a status: nothing has been sent yet.
            first = await stream.__anext__()
            yield decision
            item = first
            while True:
                if isinstance(item, Finished):
                    yield ChatDone(item, (time.perf_counter() - started) * 1000)
                    return
                yield item
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    yield StreamFailure("INTERNAL", "the inference stream ended without a final event")
                    return
                except Exception as exc:  # noqa: BLE001 - reported in-band, the stream has started
                    error = as_mesh_error(exc)
                    if error is None:
                        log.exception("chat stream failed")
                        error = MeshError(f"internal error: {type(exc).__name__}")
                    yield StreamFailure(error.code.name, error.message)
                    return
        finally:
            await stream.aclose()

    async def complete(self, chat: ChatInput, timeout_s: float) -> CompleteResult:
        parts: list[str] = []
        routing = done = None
        async for event in self.chat(chat, timeout_s):
            if isinstance(event, RoutingDecision):
                routing = event
            elif isinstance(event, Token):
                parts.append(event.text)
            elif isinstance(event, ChatDone):
                done = event
            elif isinstance(event, StreamFailure):
                raise error_from_status_name(event.code, event.message)
        assert routing is not None and done is not None
        return CompleteResult("".join(parts), routing, done)
