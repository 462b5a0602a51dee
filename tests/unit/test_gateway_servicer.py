"""The gateway's servicers over real gRPC: a grpc.aio server on a loopback port with the mesh's
error mapping, the chat flow behind it with fake models (no llama-server, no Envoy).

grpcio-testing's server runs synchronous servicers only; these are grpc.aio servicers behind the
mesh's error mapping, so they are served for real on 127.0.0.1:0 instead (a few ms per call).
"""

from __future__ import annotations

import grpc
import pytest
from capibara_gateway.core import ChatGateway
from capibara_gateway.health import HealthReport, ServiceHealth
from capibara_gateway.servicer import ChatServicer, MeshServicer

from capibara_grpc.chat.types import ToolCallDelta
from capibara_grpc.errors import ResourceExhausted, Unavailable
from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc, inference_pb2
from tests.unit.fakes import FakeModels, Model, mesh_config, serving, status_of

CONFIG = mesh_config()
GATEWAY = "capibara.gateway.v1.ChatService"
INFERENCE = "capibara.inference.v1.InferenceService"


class FakeMeshHealth:
    def __init__(self, report: HealthReport):
        self.report = report

    async def check(self) -> HealthReport:
        return self.report


def report(*down: str) -> HealthReport:
    models = [f"{INFERENCE}/alpha", f"{INFERENCE}/beta"]
    services = [
        ServiceHealth(name, "NOT_SERVING" if name in down else "SERVING")
        for name in [GATEWAY, INFERENCE, "capibara.router.v1.RouterService", *models]
    ]
    return HealthReport(services, required=[GATEWAY, INFERENCE], models=models)


@pytest.fixture
def models() -> FakeModels:
    return FakeModels(
        alpha=Model(fail_first=Unavailable("model 'alpha' is unavailable: backend unreachable")),
        beta=Model(fail_first=ResourceExhausted("model 'beta' is busy", retry_after_s=3)),
        gamma=Model(fail_after=1, fail_with=Unavailable("backend died")),
    )


@pytest.fixture
async def stubs(models):
    health = FakeMeshHealth(report())

    def add(server):
        gateway_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(ChatGateway(CONFIG, models.generate)), server)
        gateway_pb2_grpc.add_MeshServiceServicer_to_server(MeshServicer(health), server)

    async with serving(add) as channel:
        yield gateway_pb2_grpc.ChatServiceStub(channel), gateway_pb2_grpc.MeshServiceStub(channel), health, channel


@pytest.mark.parametrize(
    "request_fields, code, details",
    [
        ({"message": " "}, grpc.StatusCode.INVALID_ARGUMENT, "message: must not be empty or only whitespace"),
        (
            {"message": "hola", "max_tokens": -1},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens: must be between 1 and 8192, got -1",
        ),
        ({"message": "hola", "model": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        ({"message": "hola", "model": "alpha"}, grpc.StatusCode.UNAVAILABLE, "model 'alpha' is unavailable"),
        ({"message": "hola", "model": "beta"}, grpc.StatusCode.RESOURCE_EXHAUSTED, "model 'beta' is busy"),
        ({"message": "hola", "consensus": True}, grpc.StatusCode.UNIMPLEMENTED, "consensus is not available"),
    ],
    ids=["blank", "bad-params", "unknown-model", "backend-down", "full", "not-deployed"],
)
@pytest.mark.parametrize("method", ["Chat", "Complete"])
async def test_errors_before_the_first_token_are_statuses(stubs, method, request_fields, code, details):
    chat, *_ = stubs
    request = (gateway_pb2.ChatRequest if method == "Chat" else gateway_pb2.CompleteRequest)(**request_fields)
    got_code, got_details = await status_of(getattr(chat, method)(request, timeout=5))
    assert got_code == code and got_details.startswith(details)


async def test_a_full_model_sends_retry_after(stubs):
    chat, *_ = stubs
    call = chat.Complete(gateway_pb2.CompleteRequest(message="hola", model="beta"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert dict(await call.trailing_metadata())["retry-after"] == "3"


async def test_a_failure_after_the_first_token_is_an_error_event(stubs):
    chat, *_ = stubs
    events = [e async for e in chat.Chat(gateway_pb2.ChatRequest(message="hola", model="gamma"), timeout=5)]
    assert [e.WhichOneof("event") for e in events] == ["routing", "token", "error"]
    assert (events[-1].error.code, events[-1].error.message) == ("UNAVAILABLE", "backend died")
    code, details = await status_of(
        chat.Complete(gateway_pb2.CompleteRequest(message="hola", model="gamma"), timeout=5)
    )
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "backend died")


async def test_when_every_candidate_fails_the_status_names_them(stubs):
    chat, *_ = stubs
    # No router: the default model alpha (down), then its fallback beta (full).
    code, details = await status_of(chat.Complete(gateway_pb2.CompleteRequest(message="hola"), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        details == "model 'beta' is busy (after failing over from alpha (UNAVAILABLE: model 'alpha' is unavailable: "
        "backend unreachable))"
    )


async def test_failover_is_in_the_routing_event():
    models = FakeModels(alpha=Model(fail_first=Unavailable("alpha is down")))

    def add(server):
        gateway_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(ChatGateway(CONFIG, models.generate)), server)

    async with serving(add) as channel:
        response = await gateway_pb2_grpc.ChatServiceStub(channel).Complete(
            gateway_pb2.CompleteRequest(message="hola"), timeout=5
        )
    assert response.model_id == "beta" and response.response == "Hola, mundo"
    assert list(response.routing.failed_models) == ["alpha"] and response.routing.fallback
    assert "failed over to beta: alpha (UNAVAILABLE: alpha is down)" in response.routing.reasoning


async def test_a_malformed_request_is_invalid_argument(stubs):
    *_, channel = stubs
    call = channel.unary_unary(f"/{GATEWAY}/Complete")(b"\xff\xff\xff", timeout=5)
    code, details = await status_of(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid Complete request message" in details


async def test_health_is_unavailable_only_when_no_chat_can_be_served(stubs):
    _, mesh, health, _ = stubs
    assert (await mesh.GetHealth(gateway_pb2.GetHealthRequest(), timeout=5)).status == "SERVING"
    health.report = report(f"{INFERENCE}/alpha")
    degraded = await mesh.GetHealth(gateway_pb2.GetHealthRequest(), timeout=5)
    assert degraded.status == "DEGRADED" and degraded.down == [f"{INFERENCE}/alpha NOT_SERVING"]
    health.report = report(INFERENCE)
    code, details = await status_of(mesh.GetHealth(gateway_pb2.GetHealthRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE and "a service that chats need is down" in details


async def test_tool_calls_as_events_and_whole_in_complete():
    tool = '{"type":"function","function":{"name":"get_weather"}}'
    pieces = [ToolCallDelta(0, "call_1", "get_weather"), ToolCallDelta(0, arguments='{"city":"Lima"}')]
    models = FakeModels(beta=Model(tokens=[], tool_calls=pieces))

    def add(server):
        gateway_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(ChatGateway(CONFIG, models.generate)), server)

    async with serving(add) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        request = {"message": "weather in Lima?", "model": "beta", "tools": [tool], "tool_choice": "required"}
        events = [e async for e in stub.Chat(gateway_pb2.ChatRequest(**request))]
        assert [e.WhichOneof("event") for e in events] == ["routing", "tool_call", "tool_call", "done"]
        assert events[1].tool_call.name == "get_weather" and events[2].tool_call.arguments == '{"city":"Lima"}'
        assert events[-1].done.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS
        answer = await stub.Complete(gateway_pb2.CompleteRequest(**request))
    assert answer.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS and answer.response == ""
    assert [(c.id, c.name, c.arguments) for c in answer.tool_calls] == [("call_1", "get_weather", '{"city":"Lima"}')]
    assert models.params[0].tools == [tool] and models.params[0].tool_choice == "required"
