"""gRPC face of the chat gateway: ChatService (Chat, Complete) and MeshService (GetHealth)."""

from __future__ import annotations

import dataclasses

from google.protobuf import json_format

from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatDone, ChatInput, RoutingDecision, ToolStep
from capibara_gateway.health import MeshHealth
from capibara_gateway.status import MeshStatus
from capibara_grpc import api_keys
from capibara_grpc.api_keys import KeyUsage
from capibara_grpc.audio import AudioChunk
from capibara_grpc.chat import convert as chat_convert
from capibara_grpc.chat.types import Message, Reasoning, Token, ToolCallDelta
from capibara_grpc.errors import InvalidField, StreamError, Unavailable, Unimplemented, remaining_s
from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc


def conversation_from_pb(request) -> tuple[str, list[Message] | None]:
    """(the message answered, the client's whole conversation or None) of a request. With
    conversation_id, `messages` may hold only tool results answering the stored tool calls: the
    new input in place of `message` ("" here: the gateway answers the stored question)."""
    if not request.messages:
        return request.message, None
    messages = chat_convert.messages_from_pb(request.messages)
    if request.conversation_id and not request.message and all(m.role == "tool" for m in messages):
        return "", messages
    if request.message or request.conversation_id:
        raise InvalidField(
            "messages",
            "give either messages, or message (with conversation_id if any), not both; with conversation_id, "
            "messages may hold only tool results (ROLE_TOOL) answering the conversation's tool calls",
        )
    # The last user message is the one routed and answered; the gateway checks there is one.
    return next((m.content for m in reversed(messages) if m.role == "user"), ""), messages


def chat_input_from_pb(request) -> ChatInput:
    """ChatRequest and CompleteRequest have the same fields."""
    message, messages = conversation_from_pb(request)
    return ChatInput(
        message=message,
        messages=messages,
        conversation_id=request.conversation_id,
        model=request.model,
        use_router=request.use_router if request.HasField("use_router") else True,
        consensus=request.consensus,
        params=chat_convert.params_from_pb(request),
        system_prompt=request.system_prompt if request.HasField("system_prompt") else None,
        # Only ChatRequest can speak: a unary Complete has no audio events to carry.
        speak=getattr(request, "speak", False),
        voice=getattr(request, "voice", ""),
        mcp_tools=list(request.mcp_tools),
    )


def routing_to_pb(decision: RoutingDecision) -> gateway_pb2.Routing:
    return gateway_pb2.Routing(
        model_id=decision.model_id,
        route_name=decision.route_name,
        confidence=decision.confidence,
        scores=[gateway_pb2.RouteScore(route_name=n, score=s) for n, s in decision.scores],
        fallback=decision.fallback,
        reasoning=decision.reasoning,
        source=decision.source,
        failed_models=decision.failed_models,
    )


def done_to_pb(done: ChatDone) -> gateway_pb2.Done:
    return gateway_pb2.Done(
        usage=chat_convert.usage_to_pb(done.finished),
        timings=chat_convert.timings_to_pb(done.finished),
        finish_reason=chat_convert.FINISH_TO_PB[done.finished.finish_reason],
        latency_ms=done.latency_ms,
        model_id=done.finished.model_id,
        cache_hit=done.finished.cache_hit,
    )


def tool_step_to_pb(step: ToolStep) -> gateway_pb2.ToolStep:
    return gateway_pb2.ToolStep(
        name=step.name,
        arguments=step.arguments,
        result=step.result,
        is_error=step.is_error,
        ms=step.ms,
        server=step.server,
        tool=step.tool,
    )


def event_to_pb(event) -> gateway_pb2.ChatResponse:
    if isinstance(event, RoutingDecision):
        return gateway_pb2.ChatResponse(routing=routing_to_pb(event))
    if isinstance(event, Token):
        return gateway_pb2.ChatResponse(token=gateway_pb2.TokenDelta(text=event.text, index=event.index))
    if isinstance(event, Reasoning):
        return gateway_pb2.ChatResponse(reasoning=gateway_pb2.ReasoningDelta(text=event.text, index=event.index))
    if isinstance(event, ToolCallDelta):
        return gateway_pb2.ChatResponse(tool_call=chat_convert.tool_call_delta_to_pb(event))
    if isinstance(event, ToolStep):
        return gateway_pb2.ChatResponse(tool_step=tool_step_to_pb(event))
    if isinstance(event, ChatDone):
        return gateway_pb2.ChatResponse(done=done_to_pb(event))
    if isinstance(event, StreamError):
        return gateway_pb2.ChatResponse(error=gateway_pb2.StreamError(code=event.code, message=event.message))
    if isinstance(event, AudioChunk):
        return gateway_pb2.ChatResponse(
            audio=gateway_pb2.SpokenAudio(
                pcm16=event.pcm,
                sample_rate=event.sample_rate,
                sentence_index=event.sentence_index,
                sentence=event.sentence,
            )
        )
    raise TypeError(f"unknown chat event {event!r}")


class ChatServicer(gateway_pb2_grpc.ChatServiceServicer):
    def __init__(self, gateway: ChatGateway):
        self.gateway = gateway

    def _timeout(self, context) -> float:
        return remaining_s(context, self.gateway.config.gateway.default_deadline_s)

    async def Chat(self, request, context):
        usage = KeyUsage(context, self.gateway.config.models, request.model)
        with usage.counting():
            chat = dataclasses.replace(chat_input_from_pb(request), key_id=usage.key)
            async for event in usage.watch(self.gateway.chat(chat, self._timeout(context))):
                yield event_to_pb(event)

    async def Complete(self, request, context):
        usage = KeyUsage(context, self.gateway.config.models, request.model)
        with usage.counting():
            chat = dataclasses.replace(chat_input_from_pb(request), key_id=usage.key)
            result = await self.gateway.complete(chat, self._timeout(context), usage.watch)
        return gateway_pb2.CompleteResponse(
            response=result.response,
            model_id=result.done.finished.model_id or result.routing.model_id,
            routing=routing_to_pb(result.routing),
            usage=chat_convert.usage_to_pb(result.done.finished),
            latency_ms=result.done.latency_ms,
            finish_reason=chat_convert.FINISH_TO_PB[result.done.finished.finish_reason],
            timings=chat_convert.timings_to_pb(result.done.finished),
            cache_hit=result.done.finished.cache_hit,
            reasoning=result.reasoning,
            tool_calls=chat_convert.tool_calls_to_pb(result.tool_calls),
            tool_steps=[tool_step_to_pb(step) for step in result.tool_steps],
        )


class MeshServicer(gateway_pb2_grpc.MeshServiceServicer):
    def __init__(self, health: MeshHealth, status: MeshStatus | None = None):
        self.health = health
        self.status = status

    async def GetStatus(self, request, context):
        if self.status is None:
            raise Unimplemented("the status endpoint is not enabled in this gateway")
        snapshot = self.status.snapshot(api_keys.key_usage(), api_keys.key_calls())
        return json_format.ParseDict(snapshot, gateway_pb2.GetStatusResponse())

    async def GetHealth(self, request, context):
        report = await self.health.check()
        verdict = report.verdict
        if not verdict.can_chat:
            # 503 over REST: a load balancer should take this edge out. The message names what is down.
            raise Unavailable(verdict.summary)
        # SERVING, or DEGRADED (200: chats are still served) listing what is down.
        return gateway_pb2.GetHealthResponse(
            status=verdict.status,
            services=[
                gateway_pb2.ServiceHealth(service=s.service, status=s.status, detail=s.detail) for s in report.services
            ],
            down=verdict.down,
        )
