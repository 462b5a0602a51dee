"""gRPC face of the OpenAI-compatible API (capibara.gateway.v1.OpenAIService): OpenAI's JSON in
and out as google.api.HttpBody, which Envoy's transcoder passes raw (POST /v1/chat/completions,
GET /v1/models[/{id}]). The chat itself is the ChatGateway's, as for ChatService.

Before the first token any failure is a gRPC status, so the client gets an HTTP error (in OpenAI's
shape, written by the edge); after it, an in-band `data: {"error": ...}` frame ends the stream.
"""

from __future__ import annotations

import contextlib

from google.api import httpbody_pb2

from capibara_gateway import openai_api
from capibara_gateway.core import ChatGateway
from capibara_gateway.events import ChatDone, RoutingDecision, ToolStep
from capibara_grpc.api_keys import KeyUsage
from capibara_grpc.audio.wav import wav_file
from capibara_grpc.chat.types import Reasoning, Token, ToolCallDelta
from capibara_grpc.errors import InvalidArgument, InvalidField, StreamError, Unimplemented, remaining_s
from capibara_grpc.stubs import openai_pb2_grpc

JSON, EVENT_STREAM = "application/json", "text/event-stream"


@contextlib.contextmanager
def _param_errors():
    """A refused field in the OpenAI API's words: "param <name>: ...", which the edge's guard turns
    into `error.param` (envoy/rest_guard.lua); REST and gRPC show the chat core's message as is."""
    try:
        yield
    except InvalidField as exc:
        raise InvalidArgument(f"param {exc.field}: {exc.text}") from None


def _json_body(payload: dict) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=JSON, data=openai_api.dumps(payload))


class OpenAIServicer(openai_pb2_grpc.OpenAIServiceServicer):
    def __init__(self, gateway: ChatGateway, embed=None, speech=None):
        self.gateway = gateway
        # RouterClient.embed and the SpeechClient; None when the service is not deployed.
        self.embed = embed
        self.speech = speech

    @property
    def _consensus(self) -> bool:
        return self.gateway.consensus is not None

    async def ChatCompletions(self, request, context):
        usage = KeyUsage(context, self.gateway.config.models)
        with usage.counting(), _param_errors():
            async with contextlib.aclosing(self._chat_completions(request, context, usage)) as bodies:
                async for body in bodies:
                    yield body

    async def _chat_completions(self, request, context, usage: KeyUsage):
        parsed = openai_api.parse_chat_request(request.data, self.gateway.config, self._consensus)
        usage.model = parsed.chat.model
        parsed.chat.key_id = usage.key
        timeout_s = remaining_s(context, self.gateway.config.gateway.default_deadline_s)
        completion = openai_api.Completion(parsed.model)
        if not parsed.stream:
            result = await self.gateway.complete(parsed.chat, timeout_s, usage.watch)
            await context.send_initial_metadata(openai_api.routing_headers(result.routing))
            yield _json_body(
                completion.response(
                    result.response, result.routing, result.done, result.reasoning, result.tool_calls, result.tool_steps
                )
            )
            return
        events = usage.watch(self.gateway.chat(parsed.chat, timeout_s))
        async with contextlib.aclosing(events):
            async for body in self._stream(events, completion, parsed.include_usage, context):
                yield body

    async def _stream(self, events, completion: openai_api.Completion, include_usage: bool, context):
        def frame(payload) -> httpbody_pb2.HttpBody:
            return httpbody_pb2.HttpBody(content_type=EVENT_STREAM, data=openai_api.sse(payload))

        async for event in events:
            if isinstance(event, RoutingDecision):
                await context.send_initial_metadata(openai_api.routing_headers(event))
                yield frame(completion.first_chunk(event, include_usage))
            elif isinstance(event, Token):
                if event.text:
                    yield frame(completion.chunk({"content": event.text}, include_usage=include_usage))
            elif isinstance(event, Reasoning):
                # As llama-server, vLLM and DeepSeek stream it, apart from the answer's content.
                yield frame(completion.chunk({"reasoning_content": event.text}, include_usage=include_usage))
            elif isinstance(event, ToolCallDelta):
                for chunk in completion.tool_call_chunks(event, include_usage):
                    yield frame(chunk)
            elif isinstance(event, ToolStep):
                yield frame(completion.tool_step_chunk(event, include_usage))
            elif isinstance(event, StreamError):
                yield frame(openai_api.stream_error(event.code, event.message))
                return
            elif isinstance(event, ChatDone):
                yield frame(completion.last_chunk(event, include_usage))
                if include_usage:
                    yield frame(completion.usage_chunk(event))
                yield frame("[DONE]")

    async def ListModels(self, request, context):
        return _json_body({"object": "list", "data": openai_api.model_list(self.gateway.config, self._consensus)})

    async def GetModel(self, request, context):
        return _json_body(openai_api.model_entry(self.gateway.config, self._consensus, request.model))

    async def Embeddings(self, request, context):
        with _param_errors():
            parsed = openai_api.parse_embedding_request(request.data)
        if self.embed is None:
            raise Unimplemented("embeddings need the router service, which is not deployed in this mesh")
        timeout_s = remaining_s(context, self.gateway.config.gateway.default_deadline_s)
        vectors, tokens, model = await self.embed(parsed.texts, timeout_s)
        return _json_body(openai_api.embedding_response(parsed, vectors, tokens, model))

    async def AudioSpeech(self, request, context):
        with _param_errors():
            parsed = openai_api.parse_speech_request(request.data)
        if self.speech is None:
            raise Unimplemented("speech needs the speech service, which is not deployed in this mesh")
        timeout_s = remaining_s(context, self.gateway.config.gateway.default_deadline_s)
        if parsed.voice:
            voices = await self.speech.voice_ids(timeout_s)
            if parsed.voice not in voices:
                raise InvalidArgument(
                    f"param voice: unknown voice '{parsed.voice[:80]}' (available: {', '.join(voices)})"
                )
        pcm, sample_rate = bytearray(), 0
        async for chunk in self.speech.synthesize(parsed.text, parsed.voice, timeout_s):
            pcm += chunk.pcm
            sample_rate = chunk.sample_rate
        audio = wav_file(bytes(pcm), sample_rate) if parsed.response_format == "wav" else bytes(pcm)
        return httpbody_pb2.HttpBody(content_type=openai_api.SPEECH_FORMATS[parsed.response_format], data=audio)
