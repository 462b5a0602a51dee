"""A client that goes away (or runs out of time) leaves no generation running on llama-server."""

from __future__ import annotations

import grpc

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from tests.support.channels import edge_channel
from tests.support.llama_slots import LONG, busy_slots, wait_until_idle
from tests.support.sse import read_events


async def test_rest_client_disconnect_stops_generation(mesh):
    url = mesh.backend_url("phi")
    await wait_until_idle(url)
    status, events, _ = await read_events(mesh, "/api/chat/stream", {**LONG, "model": "phi"}, stop_after=4)
    assert status == 200 and len(events) == 4  # routing + 3 tokens, then we hang up
    await wait_until_idle(url)


async def test_grpc_cancel_stops_generation(mesh):
    url = mesh.backend_url("gpt-oss-20b")
    await wait_until_idle(url)
    async with edge_channel(mesh) as channel:
        call = gateway_pb2_grpc.ChatServiceStub(channel).Chat(gateway_pb2.ChatRequest(**LONG), timeout=120)
        tokens = 0
        async for event in call:
            tokens += event.WhichOneof("event") == "token"
            if tokens == 3:
                break
        assert await busy_slots(url) == 1  # generating for us right now
        call.cancel()
        await wait_until_idle(url)


async def test_openai_backend_stops_too(mesh):
    url = mesh.backend_url("mixtral")
    await wait_until_idle(url)
    status, events, _ = await read_events(mesh, "/api/chat/stream", {**LONG, "model": "mixtral"}, stop_after=4)
    assert status == 200
    await wait_until_idle(url)


async def test_deadline_stops_generation(mesh):
    url = mesh.backend_url("gpt-oss-20b")
    await wait_until_idle(url)
    async with edge_channel(mesh) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        try:
            async for _ in stub.Chat(gateway_pb2.ChatRequest(**LONG), timeout=1.0):
                pass
            raise AssertionError("a 1500-token answer finished within 1 s")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until_idle(url)
