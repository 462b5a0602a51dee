"""Native gRPC through Envoy (TLS, h2) and straight to the inference service."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import aiohttp
import grpc
import pytest

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.support.channels import edge_channel, service_channel
from tests.support.llama_slots import LONG

GRPCURL = str(pathlib.Path(sys.executable).parent / "grpcurl")


async def test_chat_streams_over_native_grpc_through_envoy(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        events = [
            e
            async for e in stub.Chat(
                gateway_pb2.ChatRequest(message="hola", max_tokens=12, model="phi", temperature=0), timeout=60
            )
        ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "routing" and kinds[-1] == "done"
    # A delta may carry more than one token (llama-server holds back incomplete UTF-8).
    assert 1 <= kinds.count("token") <= events[-1].done.usage.completion_tokens
    assert events[0].routing.model_id == "phi"
    assert events[-1].done.timings.time_to_first_token_ms > 0


async def test_complete_over_native_grpc(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        response = await stub.Complete(
            gateway_pb2.CompleteRequest(message="Say hello.", max_tokens=8, temperature=0), timeout=60
        )
    assert response.response and response.model_id == response.routing.model_id
    assert response.routing.source == "router"
    assert response.usage.completion_tokens <= 8


@pytest.mark.parametrize(
    "request_kwargs, code",
    [
        ({"message": "   "}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"message": "x" * 20000}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"message": "hola", "model": "nope"}, grpc.StatusCode.NOT_FOUND),
        ({"message": "hola", "top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_input_gets_the_right_status_over_grpc(mesh, request_kwargs, code):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.Chat(gateway_pb2.ChatRequest(**request_kwargs), timeout=30):
                pass
    assert error.value.code() == code
    assert error.value.details()


async def test_client_deadline_is_enforced(mesh):
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Complete(gateway_pb2.CompleteRequest(**LONG), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def grpcurl(mesh, *args: str) -> str:
    result = subprocess.run([GRPCURL, "-insecure", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_reflection_through_envoy_lists_every_service(mesh):
    services = set(grpcurl(mesh, mesh.edge, "list").split())
    assert {
        "capibara.gateway.v1.ChatService",
        "capibara.router.v1.RouterService",
        "capibara.context.v1.ContextService",
        "capibara.inference.v1.InferenceService",
        "capibara.consensus.v1.ConsensusService",
        "capibara.speech.v1.SpeechService",
        "grpc.health.v1.Health",
    } <= services
    described = grpcurl(mesh, mesh.edge, "describe", "capibara.gateway.v1.ChatRequest")
    assert "max_tokens" in described and "conversation_id" in described


def test_grpcurl_streams_chat_tokens(mesh):
    out = grpcurl(
        mesh,
        "-d",
        '{"message": "hola", "max_tokens": 5, "temperature": 0}',
        mesh.edge,
        "capibara.gateway.v1.ChatService/Chat",
    )
    messages = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert "routing" in messages[0] and "done" in messages[-1]
    assert 1 <= sum("token" in m for m in messages) <= 5


async def _tokenize(backend_url: str, text: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(backend_url + "/tokenize", json={"content": text, "add_special": True}) as response:
            return len((await response.json())["tokens"])


async def _apply_template(backend_url: str, messages: list[dict]) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.post(backend_url + "/apply-template", json={"messages": messages}) as response:
            return (await response.json())["prompt"]


@pytest.mark.parametrize("model_id", ["gpt-oss-20b", "mixtral"])  # llama_cpp and openai protocols
async def test_generate_applies_the_models_chat_template(mesh, model_id):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    async with service_channel(mesh, "inference") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            model_id=model_id,
            messages=[
                inference_pb2.ChatMessage(role=inference_pb2.ROLE_SYSTEM, content=messages[0]["content"]),
                inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content=messages[1]["content"]),
            ],
            params=inference_pb2.GenerationParams(max_tokens=4, temperature=0),
        )
        chunks = [c async for c in stub.Generate(request, timeout=60)]
    done = chunks[-1].done
    assert chunks[-1].WhichOneof("chunk") == "done"
    assert done.usage.completion_tokens == 4
    assert 1 <= sum(c.WhichOneof("chunk") == "token" for c in chunks) <= 4
    # The prompt the model saw is the templated conversation (<|im_start|>system ...), token for token.
    url = mesh.backend_url(model_id)
    templated = await _apply_template(url, messages)
    assert "<|im_start|>system" in templated
    assert done.usage.prompt_tokens == await _tokenize(url, templated)
    assert done.usage.prompt_tokens > await _tokenize(url, messages[0]["content"] + messages[1]["content"]) + 5


async def test_generate_rejects_an_unknown_model_and_empty_messages(mesh):
    async with service_channel(mesh, "inference") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for request, code in [
            (
                inference_pb2.GenerateRequest(
                    model_id="nope", messages=[inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content="hi")]
                ),
                grpc.StatusCode.NOT_FOUND,
            ),
            (inference_pb2.GenerateRequest(model_id="phi"), grpc.StatusCode.INVALID_ARGUMENT),
            (
                inference_pb2.GenerateRequest(model_id="phi", messages=[inference_pb2.ChatMessage(content="no role")]),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in stub.Generate(request, timeout=30):
                    pass
            assert error.value.code() == code, request


async def test_a_client_cannot_claim_its_request_was_validated(mesh):
    """x-capibara-validated marks the mesh's own calls, whose request an edge checked; the edge
    drops a client's copy, so a Generate sent straight through it is checked all the same."""
    request = inference_pb2.GenerateRequest(
        model_id="phi",
        messages=[inference_pb2.ChatMessage(role=inference_pb2.ROLE_USER, content="hola")],
        params=inference_pb2.GenerationParams(max_tokens=10000),
    )
    async with edge_channel(mesh) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(request, timeout=30, metadata=(("x-capibara-validated", "1"),)):
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "max_tokens: must be between 1 and 8192, got 10000"
