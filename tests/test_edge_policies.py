"""Edge policies on a mesh of their own: API keys, CORS and the per-client rate limit."""

from __future__ import annotations

import grpc
import pytest

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.support.channels import edge_channel
from tests.support.mesh import launched_model, mesh_config, start_mesh, stop_mesh

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "env-key-abcdef0123456789"
ORIGIN = "https://chat.example.com"
CHAT_PER_MINUTE = 3


@pytest.fixture(scope="module")
def guarded_mesh(tmp_path_factory, monkeypatch_module):
    directory = tmp_path_factory.mktemp("guarded")
    keys = directory / "api-keys.txt"
    keys.write_text(f"# one key per line\n{KEY}\n")
    monkeypatch_module.setenv("CAPIBARA_API_KEYS", OTHER_KEY)
    config = mesh_config(directory / "state", 24000, {"gpt-oss-20b": launched_model(24080)}, router=False)
    config["edge"].update(
        api_keys_file=str(keys), cors_origins=[ORIGIN], rate_limit={"chat": CHAT_PER_MINUTE, "other": 0}
    )
    mesh = start_mesh(directory, config)
    try:
        yield mesh
    finally:
        stop_mesh(mesh)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize(
    "headers, status, words",
    [
        ({}, 401, "missing API key"),
        ({"authorization": "Bearer wrong-key-0123456789"}, 401, "invalid API key"),
        ({"x-api-key": "wrong-key-0123456789"}, 401, "invalid API key"),
        ({"authorization": f"Bearer {KEY}"}, 200, None),
        ({"authorization": f"bearer {KEY}"}, 200, None),
        ({"x-api-key": KEY}, 200, None),
        ({"x-api-key": OTHER_KEY}, 200, None),  # from $CAPIBARA_API_KEYS
    ],
)
def test_rest_calls_need_a_valid_key(guarded_mesh, headers, status, words):
    got, body, response_headers = guarded_mesh.request("GET", "/api/models", headers=headers)
    assert got == status, body
    if words:
        assert body["code"] == 16 and words in body["message"]
        assert response_headers["www-authenticate"].startswith("Bearer")


def test_health_stays_open(guarded_mesh):
    status, body, _ = guarded_mesh.request("GET", "/health")
    assert status == 200, body


async def test_grpc_calls_need_a_valid_key(guarded_mesh):
    async with edge_channel(guarded_mesh) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.ListModels(
            inference_pb2.ListModelsRequest(), timeout=10, metadata=(("authorization", f"Bearer {KEY}"),)
        )
        assert [m.model_id for m in listed.models] == ["gpt-oss-20b"]


def test_cors_allows_only_the_configured_origins(guarded_mesh):
    preflight = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    status, _, headers = guarded_mesh.request("OPTIONS", "/api/chat", headers=preflight)
    assert status == 200
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in headers
    _, _, headers = guarded_mesh.request("GET", "/api/models", headers={"origin": ORIGIN, "x-api-key": KEY})
    assert headers["access-control-allow-origin"] == ORIGIN
    _, _, headers = guarded_mesh.request(
        "GET", "/api/models", headers={"origin": "https://evil.example", "x-api-key": KEY}
    )
    assert "access-control-allow-origin" not in headers


async def test_chat_is_rate_limited_per_client_with_retry_after(guarded_mesh):
    auth = {"x-api-key": KEY}
    statuses = []
    for _ in range(CHAT_PER_MINUTE):
        status, body, _ = guarded_mesh.request("POST", "/api/chat", {"message": "hola", "max_tokens": 1}, headers=auth)
        statuses.append(status)
    assert statuses == [200] * CHAT_PER_MINUTE
    status, body, headers = guarded_mesh.request(
        "POST", "/api/chat/stream", {"message": "hola", "max_tokens": 1}, headers=auth
    )
    assert status == 429 and body["code"] == 8, body
    assert int(headers["retry-after"]) >= 1
    async with edge_channel(guarded_mesh) as channel:
        call = gateway_pb2_grpc.ChatServiceStub(channel).Chat(
            gateway_pb2.ChatRequest(message="hola", max_tokens=1), timeout=10, metadata=(("x-api-key", KEY),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            async for _ in call:
                pass
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Other calls have their own (here unlimited) budget, and health is never limited.
    assert guarded_mesh.request("GET", "/api/models", headers=auth)[0] == 200
    assert guarded_mesh.request("GET", "/health")[0] == 200
