"""The mesh's MCP tools: each one a thin call through the mesh's own gRPC API.

One MCPServer serves both transports: `capibara mcp` runs it over stdio with every call going
through the TLS edge (the caller's API key, the edge's rate limits), and the gateway process
serves it over Streamable HTTP behind the edge's /mcp route (calls go through the mesh listener,
like the gateway's own). The server is built around `channel_for(service)`, so the tools never
know which of the two they run in.

A failure the caller can fix (empty message, unknown model, bad JSON, an invalid key) is a
ToolError: the tool result has is_error set and a message naming the problem, as the gRPC status
said it. The SDK turns any other exception into "Error executing tool <name>" without details,
so every gRPC error is mapped here and nothing else is expected to escape.
"""

from __future__ import annotations

import contextlib
import json
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import grpc
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Audio
from pydantic import BaseModel, Field

from capibara_grpc import tracing
from capibara_grpc.chat.request import LIMITS, check_number
from capibara_grpc.errors import InvalidField
from capibara_grpc.router.client import RouterClient
from capibara_grpc.stubs import (
    consensus_pb2,
    consensus_pb2_grpc,
    context_pb2,
    context_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    speech_pb2,
    speech_pb2_grpc,
)
from capibara_grpc.tracing import KEY_ID_HEADER

# "auto": the router picks the model by the message's meaning (the gateway's empty model).
AUTO = "auto"
# Deadline of the calls that do not generate (routing, listing, TOON); generating calls get the
# server's `generate_timeout_s`.
QUICK_TIMEOUT_S = 30.0

# service name ("gateway", "router", ...) -> a channel that reaches it, or None when it is not deployed.
ChannelFor = Callable[[str], grpc.aio.Channel | None]


class ChatAnswer(BaseModel):
    answer: str = Field(description="The model's answer.")
    model_id: str = Field(description="The model that answered.")
    route: str = Field(description="The router's route for the message; 'explicit' when a model was named.")
    reasoning: str = Field(description="Why this model: the router's reasoning, or that it was asked for.")
    confidence: float = Field(description="The router's confidence in the route, 0 to 1.")
    failed_models: list[str] = Field(description="Models tried first that failed (failover).")
    thinking: str = Field(
        default="", description="A reasoning model's thinking, apart from the answer ('' for other models)."
    )
    completion_tokens: int
    latency_ms: float


class RouteScore(BaseModel):
    route: str
    model_id: str
    score: float


class RouteResult(BaseModel):
    """The `route` tool's answer: the router's RouteDecision (capibara_grpc/chat/types.py), described."""

    route: str = Field(description="The route chosen for the query.")
    model_id: str = Field(description="The model that route uses.")
    confidence: float = Field(description="Calibrated probability that the route is right, 0 to 1.")
    fallback: bool = Field(description="True when confidence was too low and the default route was taken.")
    reasoning: str
    scores: list[RouteScore] = Field(description="Every route's similarity score, best first.")


class Candidate(BaseModel):
    model_id: str
    text: str


class ConsensusResult(BaseModel):
    """The `consensus` tool's answer: the final answer with every candidate's own and each failure."""

    answer: str = Field(description="The combined answer.")
    chosen_model_id: str = Field(description="The candidate the answer comes from ('' when fused).")
    agreement: float = Field(description="How much the candidates agreed, 0 to 1.")
    reasoning: str
    candidates: list[Candidate] = Field(description="Each model's own answer.")
    failed: list[str] = Field(description="'model: error' of each candidate that failed.")


class ModelState(BaseModel):
    model_id: str
    healthy: bool = Field(description="Whether the model's server answers now.")
    status: str = Field(description="'ok', 'loading', 'unreachable' or the backend's error.")
    protocol: str = Field(description="'llama_cpp' or 'openai'.")
    context_window: int = Field(description="Tokens per request slot (0 when unknown).")


class ToonEncoding(BaseModel):
    toon: str = Field(description="The value in TOON.")
    json_tokens: int = Field(description="Tokens of the compact JSON, by the model's tokenizer.")
    toon_tokens: int = Field(description="Tokens of the TOON text.")
    savings: float = Field(description="Fraction of tokens saved by TOON (negative when larger).")


class ToonDecoding(BaseModel):
    value: Any = Field(description="The decoded JSON value, keys in document order.")


def _tool_error(exc: grpc.aio.AioRpcError) -> ToolError:
    return ToolError(f"{exc.code().name}: {exc.details()}")


def _text(value: str, name: str, limit: int = 100_000) -> str:
    """A required text argument of a tool whose service takes any text (route, speak, toon): not
    empty, not only whitespace, not huge. A chat's message and a consensus prompt are checked where
    they arrive (the gateway, the consensus service), as from every other edge."""
    if not value.strip():
        raise ToolError(f"{name}: must not be empty or only whitespace")
    if len(value) > limit:
        raise ToolError(f"{name}: is {len(value)} characters long; at most {limit}")
    return value


def _limited(name: str, description: str) -> Field:
    """A number argument with the chat core's limits in its schema (capibara_grpc/chat/request.py),
    checked by `_checked` with the same words as on REST, gRPC and the OpenAI API."""
    return Field(description=description, json_schema_extra=LIMITS[name].json_schema())


def _checked(**numbers) -> None:
    """The chat core's check of number arguments, before a protobuf field could refuse a value it
    cannot hold: a tool error in the words every edge uses."""
    try:
        for name, value in numbers.items():
            check_number(name, value)
    except InvalidField as exc:
        raise ToolError(f"INVALID_ARGUMENT: {exc.message}") from None


def build_server(
    channel_for: ChannelFor,
    metadata: typing.Sequence[tuple[str, str]] = (),
    generate_timeout_s: float = 300.0,
) -> MCPServer:
    """The MCPServer with the mesh's tools. `channel_for(service)` gives the gRPC channel that
    reaches a service ("gateway", "router", ...); `metadata` goes with every call (an API key)."""
    server = MCPServer(
        "capibara",
        instructions=(
            "Capibara is a multi-model LLM mesh. `chat` answers a message (model 'auto' lets the router "
            "pick by meaning); `route` shows which model a message would go to; `consensus` asks several "
            "models and combines their answers; `speak` turns text into speech; `list_models` shows the "
            "models and their health; `toon_encode`/`toon_decode` convert JSON to TOON and back."
        ),
    )

    stub_classes = {
        "gateway": gateway_pb2_grpc.ChatServiceStub,
        "consensus": consensus_pb2_grpc.ConsensusServiceStub,
        "speech": speech_pb2_grpc.SpeechServiceStub,
        "inference": inference_pb2_grpc.InferenceServiceStub,
        "context": context_pb2_grpc.ContextServiceStub,
    }
    stubs = {name: stub_class(channel) for name, stub_class in stub_classes.items() if (channel := channel_for(name))}
    call_metadata = tuple(metadata)

    router = RouterClient(channel) if (channel := channel_for("router")) else None

    @contextlib.contextmanager
    def tool_call(ctx: Context | None):
        """The metadata of a call to a service on behalf of a tool call, and its gRPC errors as
        tool errors."""
        # Over HTTP, the edge's x-request-id goes on to the services (the channels' interceptors
        # send the current one), so one id follows a tool call through every hop's logs; and so
        # does the id of the caller's API key, which the edge's guard alone sets (it drops a
        # client's own copy), so the gateway counts MCP usage per key as for any other call.
        headers = (ctx.headers if ctx is not None else None) or {}
        request_id = headers.get(tracing.REQUEST_ID, "")
        key_id = headers.get(KEY_ID_HEADER, "")
        metadata = (*call_metadata, (KEY_ID_HEADER, key_id)) if key_id else call_metadata
        token = tracing.current_request_id.set(request_id) if request_id else None
        try:
            yield metadata
        except grpc.aio.AioRpcError as exc:
            raise _tool_error(exc) from None
        finally:
            if token is not None:
                tracing.current_request_id.reset(token)

    async def call(service: str, method_name: str, request, ctx: Context | None, timeout_s: float = QUICK_TIMEOUT_S):
        if service not in stubs:
            raise ToolError(f"the {service} service is not deployed in this mesh")
        with tool_call(ctx) as metadata:
            return await getattr(stubs[service], method_name)(request, timeout=timeout_s, metadata=metadata)

    @server.tool(title="Chat with the mesh")
    async def chat(
        message: Annotated[str, Field(description="The user's message.")],
        model: Annotated[
            str,
            Field(description="A model id from list_models, or 'auto' to let the router pick one by meaning."),
        ] = AUTO,
        conversation_id: Annotated[
            str, Field(description="Continue this conversation (the mesh keeps its history); '' = none.")
        ] = "",
        max_tokens: Annotated[int | None, _limited("max_tokens", "Most tokens to generate.")] = None,
        temperature: Annotated[float | None, _limited("temperature", "Sampling temperature.")] = None,
        ctx: Context | None = None,
    ) -> ChatAnswer:
        """Answer a message with one of the mesh's models; returns the answer with the route and model used."""
        _checked(max_tokens=max_tokens, temperature=temperature)
        request = gateway_pb2.CompleteRequest(
            message=message,
            model="" if model == AUTO else model,
            conversation_id=conversation_id,
        )
        if max_tokens is not None:
            request.max_tokens = max_tokens
        if temperature is not None:
            request.temperature = temperature
        response = await call("gateway", "Complete", request, ctx, generate_timeout_s)
        routing = response.routing
        return ChatAnswer(
            answer=response.response,
            model_id=response.model_id,
            route=routing.route_name,
            reasoning=routing.reasoning,
            confidence=routing.confidence,
            failed_models=list(routing.failed_models),
            thinking=response.reasoning,
            completion_tokens=response.usage.completion_tokens,
            latency_ms=response.latency_ms,
        )

    @server.tool(title="Route a message")
    async def route(
        query: Annotated[str, Field(description="The message to route.")],
        ctx: Context | None = None,
    ) -> RouteResult:
        """Which route and model the router picks for a message, with its confidence and every route's score."""
        if router is None:
            raise ToolError("the router service is not deployed in this mesh")
        with tool_call(ctx) as metadata:
            decision = await router.route(_text(query, "query"), [], QUICK_TIMEOUT_S, metadata)
        return RouteResult(
            route=decision.route_name,
            model_id=decision.model_id,
            confidence=decision.confidence,
            fallback=decision.fallback,
            reasoning=decision.reasoning,
            scores=[RouteScore(route=r, model_id=m, score=s) for r, m, s in decision.scores],
        )

    @server.tool(title="Ask several models")
    async def consensus(
        prompt: Annotated[str, Field(description="The question every model answers.")],
        models: Annotated[
            list[str], Field(description="Model ids to ask (from list_models); empty = every model.", max_length=8)
        ] = [],  # noqa: B006 - the SDK copies arguments per call; a default list is its schema's default
        strategy: Annotated[
            Literal["vote", "weighted", "judge", "fuse", "self_consistency"],
            Field(
                description="How answers are combined: vote (most agreed answer), weighted, judge (a model "
                "picks), fuse (a model merges), self_consistency (one model sampled several times)."
            ),
        ] = "vote",
        max_tokens: Annotated[int | None, _limited("max_tokens", "Most tokens per answer.")] = None,
        ctx: Context | None = None,
    ) -> ConsensusResult:
        """Ask several models the same question and combine their answers into one."""
        _checked(max_tokens=max_tokens)
        request = consensus_pb2.DecideRequest(
            prompt=prompt,
            models=models,
            strategy=consensus_pb2.Strategy.Value(f"STRATEGY_{strategy.upper()}"),
        )
        if max_tokens is not None:
            request.params.max_tokens = max_tokens
        response = await call("consensus", "Decide", request, ctx, generate_timeout_s)
        final = response.final
        return ConsensusResult(
            answer=final.text,
            chosen_model_id=final.chosen_model_id,
            agreement=final.agreement,
            reasoning=final.reasoning,
            candidates=[Candidate(model_id=c.model_id, text=c.text) for c in response.candidates],
            failed=[f"{f.model_id}: {f.code} {f.message}" for f in response.failures],
        )

    @server.tool(title="Speak text")
    async def speak(
        text: Annotated[str, Field(description="Plain text to speak (at most the mesh's speech.max_text_chars).")],
        voice: Annotated[str, Field(description="A voice id such as 'espeak:en'; '' = the default voice.")] = "",
        language: Annotated[str, Field(description="'en', 'es', 'es-MX'...; '' = the voice's language.")] = "",
        ctx: Context | None = None,
    ) -> Audio:
        """Turn text into speech: returns audio/wav."""
        request = speech_pb2.SpeakRequest(text=_text(text, "text"), voice=voice, language=language)
        body = await call("speech", "Speak", request, ctx, generate_timeout_s)
        return Audio(data=body.data, format="wav")

    @server.tool(title="List the models")
    async def list_models(ctx: Context | None = None) -> list[ModelState]:
        """The mesh's models and whether each can answer now."""
        response = await call("inference", "ListModels", inference_pb2.ListModelsRequest(), ctx)
        return [
            ModelState(
                model_id=m.model_id,
                healthy=m.healthy,
                status=m.status,
                protocol=m.protocol,
                context_window=m.context_window,
            )
            for m in response.models
        ]

    @server.tool(title="JSON to TOON")
    async def toon_encode(
        value: Annotated[Any, Field(description="Any JSON value (object, array...) to encode; key order is kept.")],
        model_id: Annotated[str, Field(description="Model whose tokenizer counts tokens; '' = the default.")] = "",
        ctx: Context | None = None,
    ) -> ToonEncoding:
        """Encode JSON as TOON (Token-Oriented Object Notation), with the tokens each form costs."""
        request = context_pb2.EncodeToonRequest(json_text=json.dumps(value, ensure_ascii=False), model_id=model_id)
        response = await call("context", "EncodeToon", request, ctx)
        return ToonEncoding(
            toon=response.toon,
            json_tokens=response.json_tokens,
            toon_tokens=response.toon_tokens,
            savings=response.savings,
        )

    @server.tool(title="TOON to JSON")
    async def toon_decode(
        toon: Annotated[str, Field(description="A TOON document.")],
        ctx: Context | None = None,
    ) -> ToonDecoding:
        """Decode a TOON document into JSON."""
        response = await call("context", "DecodeToon", context_pb2.DecodeToonRequest(toon=_text(toon, "toon")), ctx)
        return ToonDecoding(value=json.loads(response.json_text))

    return server
