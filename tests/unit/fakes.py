"""Small fakes for the fast unit tests: models that answer, fail or fill up on demand, and the
other services as the gateway sees them. No llama-server, no Envoy, no network."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import grpc

from capibara_grpc.audio import AudioChunk
from capibara_grpc.chat.types import (
    ConsensusAnswer,
    Finished,
    Message,
    RouteDecision,
    SamplingParams,
    Token,
    ToolCallDelta,
)
from capibara_grpc.config import MeshConfig, parse_config
from capibara_grpc.context.core import ContextEngine
from capibara_grpc.context.memory import SqliteStore
from capibara_grpc.context.servicer import ContextServicer
from capibara_grpc.context.tokens import ModelTokens
from capibara_grpc.errors import MeshError, Unavailable, error_mapping_server
from capibara_grpc.stubs import context_pb2_grpc

# Three models; "alpha" falls back to "beta". Backends point at a closed port (nothing listens on 9).
CONFIG_YAML = """
gateway: {default_model: alpha, system_prompt: "Be brief."}
models:
  alpha:
    backend: {url: "http://127.0.0.1:9"}
    defaults: {temperature: 0}
    fallbacks: [beta]
  beta:
    backend: {url: "http://127.0.0.1:9"}
    defaults: {temperature: 0}
  gamma:
    backend: {url: "http://127.0.0.1:9"}
    defaults: {temperature: 0}
"""


def mesh_config(extra: str = "") -> MeshConfig:
    return parse_config(CONFIG_YAML + extra, check_files=False)


@dataclass
class Model:
    """How one fake model behaves: its tokens, and an error before the first token
    (`fail_first`) or after `fail_after` tokens; `finish=False` ends without a final event;
    `first_token_delay_s` is how long it thinks before its first token."""

    tokens: list[str] = field(default_factory=lambda: ["Hola", ", ", "mundo"])
    fail_first: MeshError | None = None
    fail_after: int | None = None
    fail_with: MeshError = field(default_factory=lambda: Unavailable("backend died"))
    finish: bool = True
    first_token_delay_s: float = 0.0
    # Pieces of tool calls yielded after the tokens; the answer then finishes with "tool_calls".
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class FakeModels:
    """A GenerateFn over fake models; records every call and whether its stream was closed."""

    def __init__(self, **models: Model):
        self.models = models
        self.calls: list[tuple[str, list[Message]]] = []
        self.params: list[SamplingParams] = []
        self.closed: list[str] = []

    async def generate(
        self, model_id: str, messages: list[Message], params: SamplingParams, timeout_s: float
    ) -> AsyncIterator[Token | ToolCallDelta | Finished]:
        self.calls.append((model_id, messages))
        self.params.append(params)
        model = self.models.get(model_id, Model())
        try:
            if model.fail_first is not None:
                raise model.fail_first
            await asyncio.sleep(model.first_token_delay_s)
            for index, text in enumerate(model.tokens):
                if model.fail_after is not None and index == model.fail_after:
                    raise model.fail_with
                yield Token(text, index)
            for delta in model.tool_calls:
                yield delta
            if model.finish:
                reason = "tool_calls" if model.tool_calls else "stop"
                yield Finished(reason, prompt_tokens=3, completion_tokens=len(model.tokens), model_id=model_id)
        finally:
            self.closed.append(model_id)

    @property
    def called(self) -> list[str]:
        return [model_id for model_id, _ in self.calls]


class FakeRouter:
    """RouteFn: picks `model_id` for route `route`, the other models ranked by `scores`."""

    def __init__(
        self,
        model_id: str = "alpha",
        route: str = "programming",
        scores: list[tuple[str, str, float]] | None = None,
        error: Exception | None = None,
    ):
        self.decision = RouteDecision(
            model_id=model_id,
            route_name=route,
            confidence=0.9,
            fallback=False,
            reasoning=f"router picked {route}",
            scores=scores or [(route, model_id, 0.9)],
        )
        self.error = error
        self.queries: list[tuple[str, list[str]]] = []

    async def __call__(self, query: str, history: list[str], timeout_s: float) -> RouteDecision:
        self.queries.append((query, history))
        if self.error:
            raise self.error
        return self.decision


class FakeContext:
    """The context service: enrich adds one system line; turns are kept in a list."""

    def __init__(self, fail_append: Exception | None = None):
        self.turns: list[tuple[str, str, str, str]] = []
        self.enriched: list[str] = []
        self.fail_append = fail_append

    async def enrich(
        self, message: str, conversation_id: str, model_id: str, timeout_s: float, route: str = ""
    ) -> list[Message]:
        self.enriched.append(model_id)
        return [Message("system", f"context for {model_id}"), Message("user", message)]

    async def append_turn(self, conversation_id: str, role: str, content: str, model_id: str, timeout_s: float) -> None:
        if self.fail_append and role == "assistant":
            raise self.fail_append
        self.turns.append((conversation_id, role, content, model_id))

    async def recent_user_turns(self, conversation_id: str, count: int, timeout_s: float) -> list[str]:
        return [content for cid, role, content, _ in self.turns if cid == conversation_id and role == "user"][-count:]


class FakeSpeech:
    """The speech service: one chunk per sentence (its text as bytes), or `error` when speaking."""

    def __init__(self, voices: tuple[str, ...] = ("espeak:es",), error: Exception | None = None):
        self.voices = list(voices)
        self.error = error
        self.spoken: list[str] = []

    async def voice_ids(self, timeout_s: float) -> list[str]:
        return self.voices

    async def synthesize(self, text: str, voice: str, timeout_s: float) -> AsyncIterator[AudioChunk]:
        if self.error:
            raise self.error
        self.spoken.append(text)
        yield AudioChunk(text.encode(), 16000, 0, text)


async def fake_consensus(prompt: str, params: SamplingParams, timeout_s: float) -> ConsensusAnswer:
    return ConsensusAnswer(
        text="42",
        chosen_model_id="beta",
        agreement=2 / 3,
        reasoning="2 of 3 agree",
        scores=[("alpha", 0.5), ("beta", 0.9)],
        prompt_tokens=9,
        completion_tokens=3,
    )


async def collect(events: AsyncIterator) -> list:
    return [event async for event in events]


@contextlib.asynccontextmanager
async def serving(add_servicers):
    """A real grpc.aio server on a free loopback port, with the mesh's error mapping, and a
    channel to it: `add_servicers(server)` puts the servicers under test on it."""
    server = error_mapping_server()
    add_servicers(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


@contextlib.asynccontextmanager
async def context_service(config: MeshConfig, database: pathlib.Path):
    """A ContextService stub to the real servicer and engine over `serving`, with its conversation
    memory in an SQLite file at `database`."""
    store = SqliteStore(database)
    try:
        async with aiohttp.ClientSession() as session:
            servicer = ContextServicer(ContextEngine(config, store, ModelTokens(config, session)))
            async with serving(
                lambda server: context_pb2_grpc.add_ContextServiceServicer_to_server(servicer, server)
            ) as channel:
                yield context_pb2_grpc.ContextServiceStub(channel)
    finally:
        await store.close()


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call that must fail: awaited (unary) or read to the end (stream)."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")
