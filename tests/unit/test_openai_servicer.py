"""OpenAIService over real gRPC (loopback, the mesh's interceptor), the chat flow behind it with
fake models: HttpBody answers and SSE frames as the edge passes them on, statuses before the first
token, an in-band error frame after it, the routing decision in initial metadata."""

from __future__ import annotations

import json

import grpc
from capibara_gateway.core import ChatGateway
from capibara_gateway.openai_servicer import OpenAIServicer
from google.api import httpbody_pb2

from capibara_grpc.errors import Unavailable
from capibara_grpc.stubs import openai_pb2_grpc
from tests.unit.fakes import FakeContext, FakeModels, Model, mesh_config, serving, status_of

CONFIG = mesh_config()
HELLO = [{"role": "user", "content": "hola"}]


def body(**fields) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(fields).encode())


async def call(models: FakeModels, method: str, request, context=None):
    """(responses, initial metadata) of one call."""

    def add(server):
        gateway = ChatGateway(CONFIG, models.generate, context=context)
        openai_pb2_grpc.add_OpenAIServiceServicer_to_server(OpenAIServicer(gateway), server)

    async with serving(add) as channel:
        rpc = getattr(openai_pb2_grpc.OpenAIServiceStub(channel), method)(request, timeout=5)
        responses = [r async for r in rpc] if method == "ChatCompletions" else [await rpc]
        return responses, dict(await rpc.initial_metadata())


async def test_one_answer_with_failover_in_the_extension_and_the_headers():
    models = FakeModels(alpha=Model(fail_first=Unavailable("alpha is down")))
    (answer,), headers = await call(models, "ChatCompletions", body(model="auto", messages=HELLO))
    assert answer.content_type == "application/json"
    completion = json.loads(answer.data)
    assert completion["model"] == "beta" and completion["choices"][0]["message"]["content"] == "Hola, mundo"
    assert completion["capibara"]["failed_models"] == ["alpha"]
    assert headers["x-capibara-model"] == "beta" and headers["x-capibara-failed-models"] == "alpha"


async def test_a_stream_is_sse_frames_ending_with_done():
    models = FakeModels(alpha=Model())
    request = body(model="alpha", messages=HELLO, stream=True, stream_options={"include_usage": True})
    frames, _ = await call(models, "ChatCompletions", request)
    assert {f.content_type for f in frames} == {"text/event-stream"}
    texts = [f.data.decode() for f in frames]
    assert all(t.startswith("data: ") and t.endswith("\n\n") for t in texts)
    assert texts[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(t[6:]) for t in texts[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hola, mundo"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"] is not None


async def test_a_failure_after_the_first_token_is_an_error_frame():
    models = FakeModels(gamma=Model(fail_after=1, fail_with=Unavailable("backend died")))
    frames, _ = await call(models, "ChatCompletions", body(model="gamma", messages=HELLO, stream=True))
    last = json.loads(frames[-1].data.decode()[6:])
    assert last == {"error": {"message": "backend died", "type": "server_error", "param": None, "code": "unavailable"}}


async def test_failures_before_the_first_token_are_statuses():
    models = FakeModels(alpha=Model(fail_first=Unavailable("model 'alpha' is unavailable")))

    def add(server):
        openai_pb2_grpc.add_OpenAIServiceServicer_to_server(
            OpenAIServicer(ChatGateway(CONFIG, models.generate)), server
        )

    async with serving(add) as channel:
        stub = openai_pb2_grpc.OpenAIServiceStub(channel)
        for request, code, details in (
            (body(model="alpha", messages=HELLO, stream=True), grpc.StatusCode.UNAVAILABLE, "model 'alpha'"),
            (body(model="nope", messages=HELLO), grpc.StatusCode.NOT_FOUND, "param model: "),
            (body(model="alpha", messages=HELLO, n=3), grpc.StatusCode.INVALID_ARGUMENT, "param n: "),
        ):
            got_code, got_details = await status_of(stub.ChatCompletions(request, timeout=5))
            assert got_code == code and got_details.startswith(details), got_details


async def test_the_client_conversation_follows_the_enriched_system_message():
    models = FakeModels(alpha=Model())
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hola"},
        {"role": "assistant", "content": "hola"},
        {"role": "user", "content": "¿y?"},
    ]
    await call(models, "ChatCompletions", body(model="alpha", messages=messages), context=FakeContext())
    _, sent = models.calls[-1]
    assert [(m.role, m.content) for m in sent] == [
        ("system", "context for alpha\n\nbe brief"),
        ("user", "hola"),
        ("assistant", "hola"),
        ("user", "¿y?"),
    ]
