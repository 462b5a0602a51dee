"""protobuf <-> the plain chat types of capibara_grpc.chat.types, for every service and client.

The messages (ChatMessage, GenerationParams, GenerateResponse, Usage, Timings) are declared in
capibara.inference.v1 and imported by the gateway, context and consensus protos.
"""

from __future__ import annotations

from capibara_grpc.chat.types import (
    Finished,
    Generated,
    Message,
    Reasoning,
    SamplingParams,
    Token,
    ToolCall,
    ToolCallDelta,
)
from capibara_grpc.stubs import inference_pb2 as pb

ROLE_TO_PB = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
FINISH_TO_PB = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}

_OPTIONAL_PARAMS = ("max_tokens", "temperature", "top_p", "repeat_penalty", "seed", "top_k", "parallel_tool_calls")
# Plain string fields, "" = unset.
_TEXT_PARAMS = ("json_schema", "reasoning_effort", "tool_choice")


def params_from_pb(message) -> SamplingParams:
    """Read sampling fields from any message that has them (GenerationParams, ChatRequest...)."""
    params = SamplingParams(stop=list(message.stop))
    if "tools" in message.DESCRIPTOR.fields_by_name:
        params.tools = list(message.tools)
    for name in _TEXT_PARAMS:
        if name in message.DESCRIPTOR.fields_by_name:
            setattr(params, name, getattr(message, name))
    for name in _OPTIONAL_PARAMS:
        if name in message.DESCRIPTOR.fields_by_name and message.HasField(name):
            setattr(params, name, getattr(message, name))
    return params


def params_to_pb(params: SamplingParams) -> pb.GenerationParams:
    out = pb.GenerationParams(
        stop=params.stop,
        json_schema=params.json_schema,
        reasoning_effort=params.reasoning_effort,
        tools=params.tools,
        tool_choice=params.tool_choice,
    )
    for name in _OPTIONAL_PARAMS:
        value = getattr(params, name)
        if value is not None:
            setattr(out, name, value)
    return out


def tool_calls_from_pb(calls) -> list[ToolCall]:
    return [ToolCall(c.id, c.name, c.arguments) for c in calls]


def tool_calls_to_pb(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def messages_from_pb(messages) -> list[Message]:
    return [
        Message(
            role=ROLE_FROM_PB.get(m.role, "invalid"),
            content=m.content,
            tool_calls=tool_calls_from_pb(m.tool_calls),
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    ]


def messages_to_pb(messages: list[Message]) -> list[pb.ChatMessage]:
    return [
        pb.ChatMessage(
            role=ROLE_TO_PB[m.role],
            content=m.content,
            tool_calls=tool_calls_to_pb(m.tool_calls),
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    ]


def tool_call_delta_to_pb(item: ToolCallDelta) -> pb.ToolCallChunk:
    return pb.ToolCallChunk(index=item.index, id=item.id, name=item.name, arguments=item.arguments)


def tool_call_delta_from_pb(chunk: pb.ToolCallChunk) -> ToolCallDelta:
    return ToolCallDelta(chunk.index, chunk.id, chunk.name, chunk.arguments)


def usage_pb(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        reasoning_tokens=reasoning_tokens,
    )


def usage_to_pb(done: Finished) -> pb.Usage:
    return usage_pb(done.prompt_tokens, done.completion_tokens, done.reasoning_tokens)


def timings_to_pb(done: Finished) -> pb.Timings:
    return pb.Timings(
        time_to_first_token_ms=done.time_to_first_token_ms,
        prompt_ms=done.prompt_ms,
        generation_ms=done.generation_ms,
        tokens_per_second=done.tokens_per_second,
        total_ms=done.total_ms,
        time_to_first_reasoning_ms=done.time_to_first_reasoning_ms,
    )


def chunk_to_pb(item: Generated) -> pb.GenerateResponse:
    if isinstance(item, Token):
        return pb.GenerateResponse(token=pb.TokenChunk(text=item.text, index=item.index))
    if isinstance(item, Reasoning):
        return pb.GenerateResponse(reasoning=pb.ReasoningChunk(text=item.text, index=item.index))
    if isinstance(item, ToolCallDelta):
        return pb.GenerateResponse(tool_call=tool_call_delta_to_pb(item))
    return pb.GenerateResponse(
        done=pb.GenerationDone(
            finish_reason=FINISH_TO_PB[item.finish_reason],
            usage=usage_to_pb(item),
            timings=timings_to_pb(item),
            model_id=item.model_id,
            backend_model=item.backend_model,
        )
    )


def chunk_from_pb(response: pb.GenerateResponse) -> Generated:
    kind = response.WhichOneof("chunk")
    if kind == "token":
        return Token(text=response.token.text, index=response.token.index)
    if kind == "reasoning":
        return Reasoning(text=response.reasoning.text, index=response.reasoning.index)
    if kind == "tool_call":
        return tool_call_delta_from_pb(response.tool_call)
    done = response.done
    return Finished(
        finish_reason=FINISH_FROM_PB.get(done.finish_reason, "stop"),
        prompt_tokens=done.usage.prompt_tokens,
        completion_tokens=done.usage.completion_tokens,
        time_to_first_token_ms=done.timings.time_to_first_token_ms,
        prompt_ms=done.timings.prompt_ms,
        generation_ms=done.timings.generation_ms,
        tokens_per_second=done.timings.tokens_per_second,
        total_ms=done.timings.total_ms,
        model_id=done.model_id,
        backend_model=done.backend_model,
        reasoning_tokens=done.usage.reasoning_tokens,
        time_to_first_reasoning_ms=done.timings.time_to_first_reasoning_ms,
    )
