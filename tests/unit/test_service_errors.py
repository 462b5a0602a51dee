"""Each service's error mapping over real gRPC (a grpc.aio server on a loopback port with the mesh's
error mapping (errors.ErrorMappingServer); see test_gateway_servicer.py for why not grpcio-testing). The real cores
run behind the servicers; what they would reach is faked: model backends on a closed port (backend
down), a hashing sentence encoder, a speech engine that writes silence."""

from __future__ import annotations

import asyncio
import zlib

import grpc
import numpy as np
import pytest

from capibara_grpc.chat.types import Finished, Token
from capibara_grpc.config import parse_routes
from capibara_grpc.consensus.core import ConsensusEngine
from capibara_grpc.consensus.servicer import ConsensusServicer
from capibara_grpc.errors import Unavailable
from capibara_grpc.inference.admission import Admission
from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.inference.servicer import InferenceServicer
from capibara_grpc.router.core import Router
from capibara_grpc.router.servicer import RouterServicer
from capibara_grpc.speech.core import Speech
from capibara_grpc.speech.engines import Voice
from capibara_grpc.speech.servicer import SpeechServicer
from capibara_grpc.stubs import (
    consensus_pb2,
    consensus_pb2_grpc,
    context_pb2,
    inference_pb2,
    inference_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    speech_pb2,
    speech_pb2_grpc,
)
from tests.unit.fakes import context_service, mesh_config, serving, status_of

CONFIG = mesh_config()
INVALID, NOT_FOUND, UNAVAILABLE = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
)
USER = inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content="hola")


def hashed_encoding(texts: list[str]) -> np.ndarray:
    """A stand-in sentence encoder: character trigrams hashed into 64 dimensions, unit length."""
    vectors = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        padded = f"  {text.lower()} "
        for i in range(len(padded) - 2):
            vectors[row, zlib.crc32(padded[i : i + 3].encode()) % 64] += 1
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


# -- inference ---------------------------------------------------------------------------------


@pytest.fixture
async def inference():
    engine = InferenceEngine(CONFIG)
    await engine.start()
    servicer = InferenceServicer(engine)
    async with serving(
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    ) as ch:
        yield inference_pb2_grpc.InferenceServiceStub(ch), engine
    await engine.stop()


@pytest.mark.parametrize(
    "fields, code, details",
    [
        ({"model_id": "", "messages": [USER]}, INVALID, "model_id: is required"),
        ({"model_id": "alpha"}, INVALID, "messages: must not be empty"),
        ({"model_id": "alpha", "messages": [USER], "params": {"top_p": 2}}, INVALID, "top_p: must be in (0, 1], got 2"),
        ({"model_id": "nope", "messages": [USER]}, NOT_FOUND, "unknown model 'nope'"),
        ({"model_id": "alpha", "messages": [USER]}, UNAVAILABLE, "model 'alpha' is unavailable: backend"),
    ],
    ids=["no-model", "no-messages", "bad-params", "unknown-model", "backend-down"],
)
async def test_inference_generate_errors(inference, fields, code, details):
    stub, _ = inference
    got = await status_of(stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=5))
    assert got[0] == code and got[1].startswith(details)


async def test_inference_full_queue_is_resource_exhausted_with_retry_after(inference):
    stub, engine = inference
    engine.admission["alpha"] = Admission("alpha", slots=1, max_queued=0)
    async with engine.admission["alpha"].slot():  # one generation holds the only slot
        call = stub.Generate(inference_pb2.GenerateRequest(model_id="alpha", messages=[USER]), timeout=5)
        code, details = await status_of(call)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "model 'alpha' is busy" in details
    assert dict(await call.trailing_metadata())["retry-after"].isdigit()


async def test_inference_lists_a_down_backend_as_unhealthy(inference):
    stub, _ = inference
    models = (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)).models
    assert [(m.model_id, m.healthy) for m in models] == [("alpha", False), ("beta", False), ("gamma", False)]


# -- router ------------------------------------------------------------------------------------

ROUTES = """
default: {model: alpha, examples: ["asdf", "qwerty", "???", "jjjj", "xd", "hmm"]}
routes:
  programming:
    model: beta
    keywords: [python]
    examples: ["write a python function", "fix this bug in my code", "how do I sort a list in python",
               "explain this javascript error", "compile a rust program", "sql query for users"]
  creative_writing:
    model: gamma
    examples: ["write a poem about the sea", "tell me a story", "a haiku about autumn",
               "write song lyrics", "a short tale about a dragon", "compose a sonnet"]
"""


@pytest.fixture
async def router():
    core = Router(CONFIG, parse_routes(ROUTES, CONFIG), hashed_encoding)
    await asyncio.to_thread(core.fit)
    servicer = RouterServicer(core)
    async with serving(lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)) as ch:
        yield router_pb2_grpc.RouterServiceStub(ch)
    await core.close()


async def test_router_errors_and_answers(router):
    assert await status_of(router.Route(router_pb2.RouteRequest(query="  "), timeout=5)) == (
        INVALID,
        "query must not be empty",
    )
    decision = await router.Route(router_pb2.RouteRequest(query="a python function to sort a list"), timeout=5)
    assert decision.model_id in CONFIG.models and decision.scores
    routes = await router.ListRoutes(router_pb2.ListRoutesRequest(), timeout=5)
    assert {r.name for r in routes.routes} == {"programming", "creative_writing", "default"}


# -- context -----------------------------------------------------------------------------------


@pytest.fixture
async def context(tmp_path):
    async with context_service(CONFIG, tmp_path / "conversations.sqlite3") as stub:
        yield stub


async def test_context_errors(context):
    await context.AppendTurn(
        context_pb2.AppendTurnRequest(conversation_id="c1", role=inference_pb2.ROLE_USER, content="earlier"), timeout=5
    )
    cases = [
        (lambda: context.Enrich(context_pb2.EnrichRequest(message=" ")), INVALID, "message must not be empty"),
        (
            lambda: context.Enrich(context_pb2.EnrichRequest(message="hola", model_id="nope")),
            NOT_FOUND,
            "unknown model 'nope'",
        ),
        (
            lambda: context.DecodeToon(context_pb2.DecodeToonRequest(toon="a:\n   b: 1")),
            INVALID,
            "TOON does not parse: line 2",
        ),
        (lambda: context.EncodeToon(context_pb2.EncodeToonRequest()), INVALID, "json is required"),
        (lambda: context.GetConversation(context_pb2.GetConversationRequest()), INVALID, "conversation_id is required"),
        (
            lambda: context.AppendTurn(context_pb2.AppendTurnRequest(conversation_id="c1")),
            INVALID,
            "conversation_id, a user",
        ),
    ]
    for call, code, details in cases:
        got = await status_of(call())
        assert got[0] == code and got[1].startswith(details), got


async def test_history_is_kept_when_the_models_tokenizer_is_down(context):
    """A chat never fails for an optional endpoint: with the model's server down, the history is
    fitted with estimated counts, and the answer says they are estimates."""
    await context.AppendTurn(
        context_pb2.AppendTurnRequest(conversation_id="c2", role=inference_pb2.ROLE_USER, content="earlier"), timeout=5
    )
    enriched = await context.Enrich(
        context_pb2.EnrichRequest(message="hola", conversation_id="c2", model_id="alpha"), timeout=5
    )
    assert [m.content for m in enriched.messages][-2:] == ["earlier", "hola"]
    history = next(a for a in enriched.added_context if a.kind == "history")
    assert "tokens estimated" in history.reason


# -- consensus ---------------------------------------------------------------------------------


async def consensus_generate(model_id, messages, params, timeout_s):
    if model_id == "gamma":
        raise Unavailable("model 'gamma' is unavailable")
    yield Token("cuatro", 0)
    yield Finished("stop", prompt_tokens=2, completion_tokens=1, model_id=model_id)


@pytest.fixture
async def consensus():
    servicer = ConsensusServicer(ConsensusEngine(CONFIG, consensus_generate, hashed_encoding))
    async with serving(
        lambda server: consensus_pb2_grpc.add_ConsensusServiceServicer_to_server(servicer, server)
    ) as ch:
        yield consensus_pb2_grpc.ConsensusServiceStub(ch)


@pytest.mark.parametrize(
    "fields, code, details",
    [
        ({"prompt": " "}, INVALID, "prompt: must not be empty"),
        ({"prompt": "2+2", "models": ["nope"]}, NOT_FOUND, "unknown model 'nope'"),
        ({"prompt": "2+2", "quorum": 5}, INVALID, "quorum 5 is larger"),
        ({"prompt": "2+2", "models": ["alpha", "gamma"], "quorum": 2}, UNAVAILABLE, "quorum not met: 1 of 2"),
    ],
    ids=["blank", "unknown-model", "quorum", "below-quorum"],
)
async def test_consensus_decide_errors(consensus, fields, code, details):
    got = await status_of(consensus.Decide(consensus_pb2.DecideRequest(**fields), timeout=5))
    assert got[0] == code and got[1].startswith(details), got


async def test_consensus_below_quorum_ends_the_stream_with_an_error_event(consensus):
    request = consensus_pb2.CombineRequest(prompt="2+2", models=["alpha", "gamma"], quorum=2)
    events = [e async for e in consensus.Combine(request, timeout=5)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:2] == ["started", "started"] and sorted(kinds[2:4]) == ["failed", "finished"]
    assert kinds[-1] == "error" and events[-1].error.code == "UNAVAILABLE"
    answer = await consensus.Decide(
        consensus_pb2.DecideRequest(prompt="2+2", models=["alpha", "gamma"], quorum=1), timeout=5
    )
    assert answer.final.text == "cuatro" and [f.model_id for f in answer.failures] == ["gamma"]


# -- speech ------------------------------------------------------------------------------------


class SilentEngine:
    name = "espeak"
    sample_rate = 16000

    def voices(self) -> list[Voice]:
        return [Voice("espeak:es", "espeak", "es", "Spanish"), Voice("espeak:en-us", "espeak", "en", "English")]

    async def synthesize(self, sentence: str, voice: Voice):
        if "fail" in sentence:
            raise Unavailable("espeak-ng failed (exit 1)")
        yield b"\x00\x00" * 160


@pytest.fixture
async def speech():
    servicer = SpeechServicer(Speech(CONFIG, [SilentEngine()]))
    async with serving(lambda server: speech_pb2_grpc.add_SpeechServiceServicer_to_server(servicer, server)) as ch:
        yield speech_pb2_grpc.SpeechServiceStub(ch)


@pytest.mark.parametrize(
    "fields, code, details",
    [
        ({"text": "..."}, INVALID, "text has nothing to speak"),
        ({"text": "hola", "voice": "nope"}, NOT_FOUND, "unknown voice 'nope'"),
        ({"text": "hola", "language": "x!"}, INVALID, "language 'x!' is not a language tag"),
        ({"text": "hola", "voice": "espeak:es", "language": "en"}, INVALID, "voice 'espeak:es' speaks 'es'"),
        ({"text": "hola", "language": "fr"}, NOT_FOUND, "no espeak voice speaks 'fr'"),
        ({"text": "please fail"}, UNAVAILABLE, "espeak-ng failed"),
    ],
    ids=["nothing-to-speak", "unknown-voice", "bad-language", "wrong-language", "no-voice", "engine-failed"],
)
@pytest.mark.parametrize("method", ["Synthesize", "Speak"])
async def test_speech_errors(speech, method, fields, code, details):
    request_type = speech_pb2.SynthesizeRequest if method == "Synthesize" else speech_pb2.SpeakRequest
    got = await status_of(getattr(speech, method)(request_type(**fields), timeout=5))
    assert got[0] == code and got[1].startswith(details), got


async def test_speech_voices(speech):
    voices = await speech.ListVoices(speech_pb2.ListVoicesRequest(language="en"), timeout=5)
    assert [v.id for v in voices.voices] == ["espeak:en-us"]
