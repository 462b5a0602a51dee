"""Chat gateway core: validate, route, answer (with failover), stream events. No gRPC in here.

The routing event is sent together with the first token: until a model has produced something,
any failure (bad input, unknown model, every candidate down) is still a plain error status
(400/404/503 over REST). Once the stream has started, a failure is an in-band StreamError event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from capibara_gateway import failover, mcp_tools
from capibara_gateway.cache import CachedAnswer, CacheLookup, ResponseCache
from capibara_gateway.events import (
    ChatDone,
    ChatEvent,
    ChatInput,
    CompleteResult,
    RoutingDecision,
    ToolStep,
    assemble_tool_calls,
)
from capibara_gateway.protocols import Consensus, Context, RouteFn, Speech
from capibara_gateway.routing import Routing
from capibara_gateway.speaking import spoken
from capibara_gateway.status import ChatStats
from capibara_grpc import metrics
from capibara_grpc.chat.request import (
    MAX_SYSTEM_PROMPT_BYTES,
    resolve,
    validate_message,
    validate_messages,
    validate_params,
)
from capibara_grpc.chat.types import (
    Finished,
    GenerateFn,
    Message,
    Reasoning,
    SamplingParams,
    Token,
    ToolCallDelta,
)
from capibara_grpc.config import MeshConfig
from capibara_grpc.errors import InvalidField, NotFound, StreamError, Unimplemented
from capibara_grpc.telemetry import spans

log = logging.getLogger(__name__)
CONTEXT_TIMEOUT_S = 10.0


class ChatGateway:
    def __init__(
        self,
        config: MeshConfig,
        generate: GenerateFn,
        route: RouteFn | None = None,
        context: Context | None = None,
        consensus: Consensus | None = None,
        speech: Speech | None = None,
        cache: ResponseCache | None = None,
        stats: ChatStats | None = None,
    ):
        """Each service but inference is optional: None when it is not deployed in this mesh."""
        self.config = config
        self.generate = generate
        self.routing = Routing(config, route, context)
        self.context = context  # None: plain system + user messages, no conversation memory
        self.consensus = consensus
        self.speech = speech
        self.cache = cache  # None when cache.enabled is false
        self.stats = stats  # what the status page shows of each chat; None: not recorded

    # -- the chat, top to bottom -----------------------------------------------------------

    async def chat(self, chat: ChatInput, timeout_s: float) -> AsyncIterator[ChatEvent]:
        started = time.perf_counter()
        self.validate(chat)
        await self._check_voice(chat)
        if chat.consensus:
            answer = self._consensus(chat, timeout_s, started)
        else:
            answer = self._answer(chat, timeout_s, started)
        if self.stats is not None:
            answer = self.stats.observe(answer, chat.model)
        if chat.speak:
            answer = spoken(answer, self.speech.synthesize, chat.voice, timeout_s)
        # aclosing: a client that goes away stops generation upstream at once, not at garbage collection.
        async with contextlib.aclosing(answer):
            async for event in answer:
                yield event

    def validate(self, chat: ChatInput) -> None:
        """The chat as it came in by REST, gRPC, the OpenAI API or MCP, checked once, with the
        rules every edge shares (capibara_grpc/chat/request.py); context, inference and consensus
        trust it."""
        if _tool_results(chat) is not None:
            self._validate_tool_results(chat)
        else:
            if chat.messages is not None:
                validate_messages(chat.messages)
            validate_message(chat.message, self.config.gateway.max_message_bytes)
        if chat.model:
            self.config.model(chat.model)
        if chat.consensus and self.consensus is None:
            raise Unimplemented("consensus is not available: the consensus service is not deployed in this mesh")
        if (chat.speak or chat.voice) and self.speech is None:
            raise Unimplemented("speak is not available: the speech service is not deployed in this mesh")
        validate_params(chat.params)
        if _uses_tools(chat):
            self._validate_tools(chat)
        if chat.mcp_tools:
            if self.context is None:
                raise Unimplemented("mcp_tools need the context service, which is not deployed in this mesh")
            mcp_tools.check(self.config, chat)
        if chat.system_prompt is not None and len(chat.system_prompt.encode("utf-8")) > MAX_SYSTEM_PROMPT_BYTES:
            raise InvalidField("system_prompt", f"is over the limit of {MAX_SYSTEM_PROMPT_BYTES} bytes")

    def _validate_tool_results(self, chat: ChatInput) -> None:
        """`messages` with `conversation_id`: tool results answering the stored conversation's
        newest tool calls, the new input in place of a user message (the context service checks
        that they answer those calls)."""
        if self.context is None:
            raise Unimplemented("tool results with conversation_id need the context service's conversation memory")
        if chat.message:
            raise InvalidField("message", "give either message or tool results in messages, not both")
        validate_messages(chat.messages, needs_user=False)
        for i, message in enumerate(chat.messages):
            if message.role != "tool":
                raise InvalidField(
                    f"messages[{i}].role",
                    "with conversation_id the mesh keeps the history: messages may hold only tool results "
                    "(role tool) answering the conversation's tool calls",
                )

    def _validate_tools(self, chat: ChatInput) -> None:
        """Tools go only to models that take them (models.<id>.tools), and consensus votes on text."""
        if chat.consensus:
            raise InvalidField("tools", "consensus does not take tools: name a model or let the router choose")
        if chat.model and not self.config.models[chat.model].takes_tools:
            raise InvalidField(
                "model",
                f"model '{chat.model}' does not take tools (models.{chat.model}.tools is false): "
                "name a model that does, or let the router choose",
            )
        if not any(m.takes_tools for m in self.config.models.values()):
            raise InvalidField("tools", "no model of this mesh takes tools (models.<id>.tools)")

    async def _check_voice(self, chat: ChatInput) -> None:
        if chat.voice:
            voices = await self.speech.voice_ids(CONTEXT_TIMEOUT_S)
            if chat.voice not in voices:
                raise NotFound(f"unknown voice '{chat.voice[:80]}' (available: {', '.join(voices)})")

    async def _answer(self, chat: ChatInput, timeout_s: float, started: float) -> AsyncIterator[ChatEvent]:
        """One model's answer: routed, failed over before its first token if need be, from the
        cache or generated, stored in the conversation and the cache once finished."""
        if _tool_results(chat) is not None:
            chat = await self._with_stored_question(chat)
        decision = await self.routing.decide(chat)
        if _tool_results(chat) is None:
            self.routing.remember(chat)
        cache_slots: dict[str, CacheLookup | None] = {}
        offered = await mcp_tools.offer(self.context, chat) if chat.mcp_tools else None

        async def open_model(model_id: str):
            messages = await self._prompt(chat, model_id, decision.route_name)
            # What this model is asked with: the request's parameters, its defaults for the rest.
            params = resolve(chat.params, self.config.models[model_id].defaults)
            if offered is not None:  # the mesh runs MCP tools between rounds; never from the cache
                return mcp_tools.ToolLoop(self.config, self.context, self.generate, offered).run(
                    model_id, messages, params, timeout_s
                )
            cached, cache_slots[model_id] = await self._cached_answer(model_id, params, messages, decision.route_name)
            return _replay(cached) if cached else self.generate(model_id, messages, params, timeout_s)

        order = failover.candidates(decision, self.config.models)
        if _uses_tools(chat) or chat.mcp_tools:
            decision, order = self._tool_takers(decision, order)
        answering = await failover.first_to_answer(order, open_model)
        decision = failover.decided(decision, answering)
        metrics.ROUTING_DECISIONS.labels(decision.route_name, decision.model_id, decision.source).inc()
        if spans.recording():
            spans.annotate(_decision_attributes(decision))
        async with contextlib.aclosing(answering.stream) as stream:
            if self._remembers(chat):
                # Stored once the answer has started: a request that fails before that returns an
                # error status, and the client's retry must not store the message twice.
                await self._store_input(chat)
            yield decision
            tokens: list[str] = []
            calls: list[ToolCallDelta] = []
            finished: Finished | None = None
            try:
                async for item in stream:
                    if isinstance(item, Finished):
                        finished = item
                        break
                    # Reasoning is streamed but never kept: not the answer, the memory or the cache.
                    if isinstance(item, Token):
                        tokens.append(item.text)
                    elif isinstance(item, ToolCallDelta):
                        calls.append(item)
                    yield item
            except Exception as exc:  # noqa: BLE001 - the stream has started: reported in-band
                yield StreamError.from_exception(exc, "chat stream")
                return
            if finished is None:
                yield StreamError("INTERNAL", "the inference stream ended without a final event")
                return
            if (not_stored := await self._store_answer(chat, tokens, finished, decision, calls)) is not None:
                yield not_stored
                return
            # An empty answer (a reasoning model that spent max_tokens thinking) is not replayed, nor
            # an answer that calls tools: the calls' ids are one-off and the replay has only text.
            if (slot := cache_slots.get(answering.model_id)) is not None and any(tokens) and not calls:
                await self._cache_answer(slot, tokens, finished)
            yield ChatDone(finished, (time.perf_counter() - started) * 1000)

    async def _consensus(self, chat: ChatInput, timeout_s: float, started: float) -> AsyncIterator[ChatEvent]:
        """Every model answers, the consensus service combines (vote); the combined answer comes
        as one token delta, since it is only known once all candidates are in."""
        spans.annotate({"capibara.consensus.strategy": "vote"})
        answer = await self.consensus(chat.message, chat.params, timeout_s)
        yield RoutingDecision(
            answer.chosen_model_id, "consensus", answer.agreement, "consensus", answer.reasoning, scores=answer.scores
        )
        yield Token(answer.text, 0)
        finished = Finished(
            "stop",
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            model_id=answer.chosen_model_id,
        )
        yield ChatDone(finished, (time.perf_counter() - started) * 1000)

    async def complete(self, chat: ChatInput, timeout_s: float, watch=None) -> CompleteResult:
        """The whole answer at once. `watch` (KeyUsage.watch) sees every event on the way, as for a
        streamed chat, so an API key's usage counts the routed model even when the chat fails."""
        parts: list[str] = []
        thoughts: list[str] = []
        tool_calls: list[ToolCallDelta] = []
        tool_steps: list[ToolStep] = []
        routing = done = None
        events = self.chat(chat, timeout_s)
        async for event in watch(events) if watch is not None else events:
            if isinstance(event, RoutingDecision):
                routing = event
            elif isinstance(event, Token):
                parts.append(event.text)
            elif isinstance(event, Reasoning):
                thoughts.append(event.text)
            elif isinstance(event, ToolCallDelta):
                tool_calls.append(event)
            elif isinstance(event, ToolStep):
                tool_steps.append(event)
            elif isinstance(event, ChatDone):
                done = event
            elif isinstance(event, StreamError):
                raise event.to_exception()
        assert routing is not None and done is not None
        calls = assemble_tool_calls(tool_calls)
        return CompleteResult("".join(parts), routing, done, "".join(thoughts), calls, tool_steps)

    # -- the steps -------------------------------------------------------------------------

    def _tool_takers(self, decision: RoutingDecision, order: list[str]) -> tuple[RoutingDecision, list[str]]:
        """A chat with tools is answered (and failed over) only by models that take tools: the
        candidates that do, then any other configured model that does. A named model was checked."""
        models = self.config.models
        takers = [m for m in dict.fromkeys([*order, *models]) if models[m].takes_tools]
        if decision.source == "request" or not takers:
            return decision, order
        if takers[0] != decision.model_id:
            decision = dataclasses.replace(
                decision,
                model_id=takers[0],
                reasoning=f"{decision.reasoning}; {decision.model_id} does not take tools: {takers[0]} answers",
            )
        return decision, takers

    def messages(self, chat: ChatInput) -> list[Message]:
        """The prompt without a context service (or with the request's own system prompt)."""
        system = self.config.gateway.system_prompt if chat.system_prompt is None else chat.system_prompt
        messages = [Message("system", system)] if system.strip() else []
        messages.append(Message("user", chat.message))
        return messages

    async def _prompt(self, chat: ChatInput, model_id: str, route: str = "") -> list[Message]:
        """The messages for `model_id`: enriched by the context service (date, identity, memory,
        data, fitted to the model's window) unless the request brings its own system prompt."""
        if (results := _tool_results(chat)) is not None:  # after the stored history, with its calls
            return await self.context.enrich(
                chat.message, chat.conversation_id, model_id, CONTEXT_TIMEOUT_S, route, tool_results=results
            )
        if chat.messages is not None:
            return await self._client_conversation(chat, model_id, route)
        if self.context is not None and chat.system_prompt is None:
            return await self.context.enrich(chat.message, chat.conversation_id, model_id, CONTEXT_TIMEOUT_S, route)
        return self.messages(chat)

    async def _client_conversation(self, chat: ChatInput, model_id: str, route: str = "") -> list[Message]:
        """The client's own turns (no stored history): one system message first, the enriched one
        (configured prompt and added context) followed by the client's system messages."""
        system = self.config.gateway.system_prompt
        if self.context is not None:
            enriched = await self.context.enrich(chat.message, "", model_id, CONTEXT_TIMEOUT_S, route)
            system = next((m.content for m in enriched if m.role == "system"), system)
        systems = [system, *(m.content for m in chat.messages if m.role == "system")]
        text = "\n\n".join(s for s in systems if s.strip())
        turns = [m for m in chat.messages if m.role != "system"]
        return ([Message("system", text)] if text else []) + turns

    def _remembers(self, chat: ChatInput) -> bool:
        return self.context is not None and bool(chat.conversation_id)

    async def _with_stored_question(self, chat: ChatInput) -> ChatInput:
        """A chat whose new input is tool results is routed and enriched by the conversation's last
        user message, the question the tools were called for."""
        asked = await self.context.recent_user_turns(chat.conversation_id, 1, CONTEXT_TIMEOUT_S)
        if not asked:
            raise InvalidField("messages", "the conversation has no tool calls for these tool results to answer")
        return dataclasses.replace(chat, message=asked[-1])

    async def _store_input(self, chat: ChatInput) -> None:
        """The user message, or each tool result (its own idempotency key: its call's id)."""
        if (results := _tool_results(chat)) is None:
            await self.context.append_turn(chat.conversation_id, "user", chat.message, "", CONTEXT_TIMEOUT_S)
            return
        for result in results:
            await self.context.append_turn(
                chat.conversation_id, "tool", result.content, "", CONTEXT_TIMEOUT_S, tool_call_id=result.tool_call_id
            )

    async def _store_answer(
        self,
        chat: ChatInput,
        tokens: list[str],
        finished: Finished,
        decision: RoutingDecision,
        calls: list[ToolCallDelta] = (),
    ) -> StreamError | None:
        """Store the answer, with the tools it called, in the conversation; the in-band error when
        that failed."""
        if not self._remembers(chat):
            return None
        extra = {"tool_calls": assemble_tool_calls(list(calls))} if calls else {}
        try:
            await self.context.append_turn(
                chat.conversation_id,
                "assistant",
                "".join(tokens),
                finished.model_id or decision.model_id,
                CONTEXT_TIMEOUT_S,
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - the client must know it was not stored
            return StreamError.from_exception(exc, "storing the answer", "the answer was not stored: ")
        return None

    async def _cached_answer(
        self, model_id: str, params: SamplingParams, messages: list[Message], route: str
    ) -> tuple[CachedAnswer | None, CacheLookup | None]:
        """(the cached answer, None) on a hit; (None, where to store the live answer) on a miss;
        (None, None) without a cache, for sampled requests, or when the cache is down. `params`
        are resolved: the key is the same whatever the request left to the model's defaults."""
        if self.cache is None:
            return None, None
        if params.temperature > 0 and not self.cache.settings.cache_sampled:
            metrics.CACHE_REQUESTS.labels("bypass", route).inc()
            return None, None
        try:
            with spans.span("cache lookup", attributes={"capibara.cache.backend": self.cache.settings.backend}) as span:
                cached, slot = await self.cache.lookup(model_id, params, messages, route)
                span.set("capibara.cache.hit", cached is not None)
        except Exception:  # noqa: BLE001 - a cache that is down must not fail the chat
            log.exception("response cache lookup failed")
            return None, None
        if spans.recording():
            spans.annotate({"capibara.cache_hit": cached is not None})
        return (cached, None) if cached else (None, slot)

    async def _cache_answer(self, slot: CacheLookup, tokens: list[str], finished: Finished) -> None:
        try:
            await self.cache.store_answer(slot, tokens, finished)
        except Exception:  # noqa: BLE001 - the answer is out; not caching it only costs speed
            log.exception("response cache store failed")


def _decision_attributes(decision: RoutingDecision) -> dict:
    """The routing decision as carried out, on the chat's span (the model call's own span has
    the gen_ai.* attributes)."""
    return {
        "capibara.route": decision.route_name,
        "capibara.route.confidence": decision.confidence,
        "capibara.route.source": decision.source,
        "capibara.model_id": decision.model_id,
        "capibara.fallback": decision.fallback,
        "capibara.failed_models": list(decision.failed_models),
    }


def _tool_results(chat: ChatInput) -> list[Message] | None:
    """The tool results a chat with conversation_id brings as its new input (ChatInput.messages
    then holds only those), or None."""
    return chat.messages if chat.conversation_id and chat.messages is not None else None


def _uses_tools(chat: ChatInput) -> bool:
    """The request offers tools, or its conversation holds tool calls or results."""
    if chat.params.tools:
        return True
    return any(m.tool_calls or m.role == "tool" for m in chat.messages or [])


async def _replay(answer: CachedAnswer) -> AsyncIterator[Token | Finished]:
    """A cached answer as the same stream a live one is: its tokens, then the final event."""
    for index, text in enumerate(answer.tokens):
        yield Token(text, index)
    yield answer.finished
