"""The model call's span, with OpenTelemetry's GenAI semantic conventions (gen_ai.*): one CLIENT
span per generation the inference service asks of a model server, from the request until the
last token, with the first token as an event. Its `traceparent` goes to the model server as an
HTTP header (upstream/client.py), so a server that traces (vLLM with --otlp-traces-endpoint)
joins the same trace.

Prompts and answers are recorded only when the operator turns tracing.capture_content on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from capibara_grpc.chat.types import Finished, Message, Reasoning, SamplingParams, Token, ToolCallDelta
from capibara_grpc.telemetry import spans

# gen_ai.system (and its newer name, gen_ai.provider.name) by the kind of model server.
SYSTEMS = {"llama_server": "llama.cpp", "vllm": "vllm", "ollama": "ollama", "openai": "openai"}


def _messages_json(messages: list[Message]) -> str:
    return json.dumps([{"role": m.role, "content": m.content} for m in messages], ensure_ascii=False)


async def traced(
    model,
    request_model: str,
    server: tuple[str, int],
    messages: list[Message],
    params: SamplingParams,
    items: AsyncIterator,
) -> AsyncIterator:
    """`items` (a backend's generation) inside its span, a child of the current one (the
    inference service's Generate). `model`: the ModelConfig; `request_model`: the name sent to
    the server; `server`: its (host, port)."""
    parent = spans.current.get()
    operation = "text_completion" if model.chat_template == "raw" else "chat"
    span = spans.TRACER.start(f"{operation} {request_model}", spans.CLIENT, parent)
    capture = span.recording and spans.TRACER.exporter.settings.capture_content
    if span.recording:
        host, port = server
        system = SYSTEMS.get(model.server_kind, model.server_kind)
        span.attributes.update(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.system": system,
                "gen_ai.provider.name": system,
                "gen_ai.request.model": request_model,
                "gen_ai.request.max_tokens": params.max_tokens,
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p,
                "server.address": host,
                "server.port": port,
                "capibara.model_id": model.model_id,
            }
        )
        if params.seed is not None:
            span.attributes["gen_ai.request.seed"] = params.seed
        if capture:
            span.attributes["gen_ai.input.messages"] = _messages_json(messages)
    answer: list[str] = []
    first = True
    spans.current.set(span)  # the HTTP call below reads it for its traceparent header
    try:
        async for item in items:
            if first and isinstance(item, (Token, Reasoning, ToolCallDelta)):
                first = False
                span.event("gen_ai.first_token")
                if parent is not None:
                    parent.event("gen_ai.first_token")
            if capture and isinstance(item, Token):  # the answer's text, only to be put on the span
                answer.append(item.text)
            elif isinstance(item, Finished):
                _finished(span, item, answer)
            spans.current.set(parent)
            yield item
            spans.current.set(span)
    except GeneratorExit:
        if "gen_ai.response.finish_reasons" not in span.attributes:  # left before the answer ended
            span.fail("the caller stopped reading")
        raise
    except BaseException as exc:
        span.fail(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")
        raise
    finally:
        spans.current.set(parent)
        span.end()


def _finished(span: spans.Span, finished: Finished, answer: list[str]) -> None:
    span.update(
        {
            "gen_ai.response.model": finished.backend_model or span.attributes.get("gen_ai.request.model", ""),
            "gen_ai.response.finish_reasons": [finished.finish_reason],
            "gen_ai.usage.input_tokens": finished.prompt_tokens,
            "gen_ai.usage.output_tokens": finished.completion_tokens,
        }
    )
    if finished.reasoning_tokens:
        span.set("gen_ai.usage.reasoning_tokens", finished.reasoning_tokens)
    if "gen_ai.input.messages" in span.attributes:
        output = [{"role": "assistant", "content": "".join(answer), "finish_reason": finished.finish_reason}]
        span.set("gen_ai.output.messages", json.dumps(output, ensure_ascii=False))
