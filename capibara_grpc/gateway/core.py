"""Chat gateway core: validate, route, generate, stream events. No gRPC in here.

The routing event is sent together with the first token: until the backend has produced
something, any failure (bad input, unknown model, backend down) is still a plain error status
(400/404/503 over REST). Once the stream has started, a failure becomes an in-band error event.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import grpc

from capibara_grpc import metrics
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import (
    InvalidArgument,
    NotFound,
    Unimplemented,
    error_from_status_name,
    to_mesh_error,
)
from capibara_grpc.inference.core import validate_params
from capibara_grpc.inference.types import Finished, GenerateFn, Message, SamplingParams, Token
from capibara_grpc.gateway.cache import CachedAnswer, ResponseCache
from capibara_grpc.gateway.speaking import SpokenAnswer
from capibara_grpc.router.core import RouteDecision as RouterDecision
from capibara_grpc.speech.core import AudioChunk


# (query, recent user turns, timeout_s) -> the router's decision
RouteFn = Callable[[str, list[str], float], Awaitable["RouterDecision"]]
log = logging.getLogger(__name__)
ROUTER_TIMEOUT_S = 2.0
# Failures of a model that another model may not share: its backend is down, full or broken.
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                  grpc.StatusCode.UNKNOWN}
CONTEXT_TIMEOUT_S = 10.0


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


@dataclass
class RoutingDecision:
    model_id: str
    route_name: str
    confidence: float
    source: str  # "request", "router" or "default"
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


@dataclass
class StreamFailure:
    code: str  # gRPC status name
    message: str


ChatEvent = RoutingDecision | Token | ChatDone | StreamFailure | AudioChunk


async def _replay(answer: CachedAnswer) -> AsyncIterator[Token | Finished]:
    """A cached answer as the same stream a live one is: its tokens, then the final event."""
    for index, text in enumerate(answer.tokens):
        yield Token(text, index)
    yield answer.finished


class RecentTurns:
    """The last few user messages of recent conversations, so the router can keep a
    conversation's route for short follow-ups. Bounded: old conversations are forgotten."""

    def __init__(self, turns: int = 4, conversations: int = 10000):
        self.turns = turns
        self.conversations = conversations
        self._recent: collections.OrderedDict[str, list[str]] = collections.OrderedDict()

    def get(self, conversation_id: str) -> list[str]:
        return list(self._recent.get(conversation_id, [])) if conversation_id else []

    def add(self, conversation_id: str, message: str) -> None:
        if not conversation_id:
            return
        turns = self._recent.pop(conversation_id, [])
        self._recent[conversation_id] = (turns + [message])[-self.turns:]
        while len(self._recent) > self.conversations:
            self._recent.popitem(last=False)


@dataclass
class CompleteResult:
    response: str
    routing: RoutingDecision
    done: ChatDone


class ChatGateway:
    def __init__(self, config: MeshConfig, generate: GenerateFn, route: RouteFn | None = None, context=None,
                 consensus=None, speech=None, cache: ResponseCache | None = None):
        self.config = config
        self.generate = generate
        self.route_with_router = route
        # The context service client (enrich, append_turn), or None: plain system + user messages.
        self.context = context
        # (prompt, params, timeout_s) -> ConsensusAnswer, or None when no consensus service runs.
        self.consensus = consensus
        # The speech service client (voice_ids, synthesize), or None when no speech service runs.
        self.speech = speech
        # The response cache, or None when cache.enabled is false.
        self.cache = cache
        self.recent = RecentTurns()

    def validate(self, chat: ChatInput) -> None:
        if not chat.message.strip():
            raise InvalidArgument("message must not be empty or only whitespace")
        size = len(chat.message.encode("utf-8"))
        limit = self.config.gateway.max_message_bytes
        if size > limit:
            raise InvalidArgument(f"message is {size} bytes, over the limit of {limit} bytes")
        if chat.model:
            self.config.model(chat.model)
        if chat.consensus and self.consensus is None:
            raise Unimplemented("consensus is not available: the consensus service is not deployed in this mesh")
        if (chat.speak or chat.voice) and self.speech is None:
            raise Unimplemented("speak is not available: the speech service is not deployed in this mesh")
        validate_params(chat.params)

    async def _recent_turns(self, chat: ChatInput) -> list[str]:
        """The conversation's last user messages, for the router's follow-up rule: from the
        context service's memory, which every gateway replica shares, else from this process."""
        if not chat.conversation_id:
            return []
        if self.context is not None:
            try:
                return await self.context.recent_user_turns(chat.conversation_id, self.recent.turns, ROUTER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a routing hint; the chat goes on without it
                log.warning("recent turns unavailable (%s); routing without them", to_mesh_error(exc, "recent turns").message)
        return self.recent.get(chat.conversation_id)

    async def route(self, chat: ChatInput) -> RoutingDecision:
        if chat.model:
            return RoutingDecision(chat.model, "explicit", 1.0, "request", "the request named the model")
        default = self.config.gateway.default_model
        if not chat.use_router:
            return RoutingDecision(default, "default", 1.0, "default", "use_router is false: configured default model")
        if self.route_with_router is None:
            return RoutingDecision(default, "default", 1.0, "default", "no router service is deployed: configured default model")
        try:
            decision = await self.route_with_router(chat.message, await self._recent_turns(chat), ROUTER_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - routing must not fail the chat; the event says so
            error = to_mesh_error(exc, "routing")
            return RoutingDecision(default, "default", 0.0, "default",
                                   f"router unavailable ({error.code.name}: {error.message}): configured default model",
                                   fallback=True)
        return RoutingDecision(
            decision.model_id, decision.route_name, decision.confidence, "router", decision.reasoning,
            fallback=decision.fallback, scores=[(route, score) for route, _, score in decision.scores],
            next_best=[model for _, model, _ in sorted(decision.scores, key=lambda s: -s[2])],
        )

    def messages(self, chat: ChatInput) -> list[Message]:
        system = self.config.gateway.system_prompt if chat.system_prompt is None else chat.system_prompt
        messages = [Message("system", system)] if system.strip() else []
        messages.append(Message("user", chat.message))
        return messages

    async def chat(self, chat: ChatInput, timeout_s: float) -> AsyncIterator[ChatEvent]:
        started = time.perf_counter()
        self.validate(chat)
        if chat.voice:
            voices = await self.speech.voice_ids(CONTEXT_TIMEOUT_S)
            if chat.voice not in voices:
                raise NotFound(f"unknown voice '{chat.voice[:80]}' (available: {', '.join(voices)})")
        answer = self._consensus(chat, timeout_s, started) if chat.consensus else self._generate(chat, timeout_s, started)
        spoken = SpokenAnswer(self.speech.synthesize, chat.voice, timeout_s) if chat.speak else None
        # aclosing: a client that goes away stops generation upstream at once, not at garbage collection.
        async with contextlib.aclosing(answer):
            try:
                async for event in answer:
                    if spoken and isinstance(event, Token):
                        spoken.feed(event.text)
                    yield event
                    if isinstance(event, StreamFailure):
                        return
                if spoken:
                    spoken.finish()
                    try:
                        async for chunk in spoken.audio():
                            yield chunk
                    except Exception as exc:  # noqa: BLE001 - the text is out; the speech failure is in-band
                        error = to_mesh_error(exc, "speech")
                        yield StreamFailure(error.code.name, f"the answer could not be spoken: {error.message}")
            finally:
                if spoken:
                    await spoken.aclose()

    async def _generate(self, chat: ChatInput, timeout_s: float, started: float) -> AsyncIterator[ChatEvent]:
        decision = await self.route(chat)
        self.recent.add(chat.conversation_id, chat.message)
        remember = self.context is not None and bool(chat.conversation_id)
        stream, first, decision, cache_slot = await self._first_item_with_failover(chat, decision, timeout_s)
        metrics.ROUTING_DECISIONS.labels(decision.route_name, decision.model_id, decision.source).inc()
        answer: list[str] = []
        try:
            if remember:
                # Stored once the answer has started: a request that fails before that returns an
                # error status, and the client's retry must not store the message twice.
                await self.context.append_turn(chat.conversation_id, "user", chat.message, "", CONTEXT_TIMEOUT_S)
            yield decision
            item = first
            while True:
                if isinstance(item, Finished):
                    if remember:
                        try:
                            await self.context.append_turn(chat.conversation_id, "assistant", "".join(answer),
                                                           item.model_id or decision.model_id, CONTEXT_TIMEOUT_S)
                        except Exception as exc:  # noqa: BLE001 - the client must know it was not stored
                            error = to_mesh_error(exc, "storing the answer")
                            yield StreamFailure(error.code.name, f"the answer was not stored: {error.message}")
                            return
                    if cache_slot is not None:
                        await self._remember_answer(cache_slot, answer, item)
                    yield ChatDone(item, (time.perf_counter() - started) * 1000)
                    return
                answer.append(item.text)
                yield item
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    yield StreamFailure("INTERNAL", "the inference stream ended without a final event")
                    return
                except Exception as exc:  # noqa: BLE001 - reported in-band, the stream has started
                    error = to_mesh_error(exc, "chat stream")
                    yield StreamFailure(error.code.name, error.message)
                    return
        finally:
            await stream.aclose()

    def candidates(self, decision: RoutingDecision) -> list[str]:
        """Models to try in order: the decision, its configured fallbacks, then the router's
        next-best. A model the client named is the only candidate."""
        if decision.source == "request":
            return [decision.model_id]
        order = [decision.model_id, *self.config.models[decision.model_id].fallbacks, *decision.next_best]
        return [m for m in dict.fromkeys(order) if m in self.config.models]

    async def _first_item_with_failover(self, chat: ChatInput, decision: RoutingDecision, timeout_s: float):
        """(open stream, its first item, the decision actually used). A model whose backend is
        down or fails before its first token is skipped for the next candidate, and the decision
        says so; once a token is out, the model is never switched."""
        failed: list[tuple[str, str]] = []  # (model id, why)
        candidates = self.candidates(decision)
        for attempt, model_id in enumerate(candidates):
            stream = None
            try:
                if self.context is not None and chat.system_prompt is None:
                    messages = await self.context.enrich(chat.message, chat.conversation_id, model_id, CONTEXT_TIMEOUT_S)
                else:
                    messages = self.messages(chat)
                cached, cache_slot = await self._cached_answer(chat, model_id, messages, decision.route_name)
                stream = (_replay(cached) if cached else self.generate(model_id, messages, chat.params, timeout_s)).__aiter__()
                first = await stream.__anext__()
            except Exception as exc:
                if stream is not None:
                    await stream.aclose()
                error = to_mesh_error(exc, f"model {model_id}")
                if error.code not in FAILOVER_CODES or attempt == len(candidates) - 1:
                    if failed:
                        error.message += f" (after failing over from {', '.join(why for _, why in failed)})"
                    raise error from exc
                failed.append((model_id, f"{model_id} ({error.code.name}: {error.message})"))
                continue
            for failed_model, _ in failed:
                metrics.FAILOVERS.labels(failed_model, model_id).inc()
            if failed:
                decision = dataclasses.replace(
                    decision, model_id=model_id, fallback=True, failed_models=[m for m, _ in failed],
                    reasoning=f"{decision.reasoning}; failed over to {model_id}: " + "; ".join(why for _, why in failed))
            return stream, first, decision, None if cached else cache_slot
        raise AssertionError("no candidate model")  # candidates() always holds the decision's model

    async def _cached_answer(self, chat: ChatInput, model_id: str, messages: list[Message], route: str):
        """(a cached answer or None, the slot to store a live answer in or None)."""
        if self.cache is None:
            return None, None
        defaults = self.config.models[model_id].defaults
        temperature = chat.params.temperature if chat.params.temperature is not None else defaults.temperature
        if temperature > 0 and not self.cache.settings.cache_sampled:
            metrics.CACHE_REQUESTS.labels("bypass", route).inc()
            return None, None
        try:
            return await self.cache.lookup(model_id, chat.params, messages, route, defaults)
        except Exception:  # noqa: BLE001 - a cache that is down must not fail the chat
            log.exception("response cache lookup failed")
            return None, None

    async def _remember_answer(self, slot, tokens: list[str], finished: Finished) -> None:
        try:
            await self.cache.store_answer(slot, tokens, finished)
        except Exception:  # noqa: BLE001 - the answer is out; not caching it only costs speed
            log.exception("response cache store failed")

    async def _consensus(self, chat: ChatInput, timeout_s: float, started: float) -> AsyncIterator[ChatEvent]:
        """Every model answers, the consensus service combines (vote); the combined answer comes
        as one token delta, since it is only known once all candidates are in."""
        answer = await self.consensus(chat.message, chat.params, timeout_s)
        yield RoutingDecision(answer.chosen_model_id, "consensus", answer.agreement, "consensus", answer.reasoning,
                              scores=answer.scores)
        yield Token(answer.text, 0)
        finished = Finished("stop", prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                            model_id=answer.chosen_model_id)
        yield ChatDone(finished, (time.perf_counter() - started) * 1000)

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
