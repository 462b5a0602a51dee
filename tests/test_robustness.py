"""Hostile and heavy traffic through the edge: malformed frames, bad encodings, oversized bodies,
slow clients and 200 concurrent streams. Each gets the right status; nothing hangs or crashes."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time

import aiohttp
import grpc
import pytest

from capibara_grpc.stubs import gateway_pb2
from tests.support.channels import edge_channel

CHAT = "/capibara.gateway.v1.ChatService/Chat"


async def raw_grpc_call(mesh, payload: bytes) -> grpc.aio.AioRpcError:
    async with edge_channel(mesh) as channel:
        call = channel.unary_stream(
            CHAT, request_serializer=lambda raw: raw, response_deserializer=gateway_pb2.ChatResponse.FromString
        )(payload, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
    return failed.value


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\xff\xff\xff\xff garbage", "not a valid Chat request message"),
        # Field 1 (message) holding bytes that are not UTF-8: proto3 strings must be.
        (b"\x0a\x02\xc3\x28", "not a valid Chat request message"),
    ],
)
async def test_malformed_protobuf_is_invalid_argument(mesh, payload, words):
    error = await raw_grpc_call(mesh, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert words in error.details()


async def test_oversized_grpc_message_is_refused(mesh):
    request = gateway_pb2.ChatRequest(message="x" * (5 * 1024 * 1024)).SerializeToString()
    error = await raw_grpc_call(mesh, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error


@pytest.mark.parametrize(
    "raw, status",
    [
        (b'{"message": "\xc3\x28 hola"}', 400),
        (b'{"message": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413),
    ],
)
def test_bad_rest_bodies_get_a_json_error(mesh, raw, status):
    got, error, headers = mesh.request("POST", "/api/chat", raw=raw)
    assert got == status, error
    assert headers["content-type"].startswith("application/json") and error["message"]


async def test_a_slow_reader_gets_the_whole_answer(mesh):
    body = {
        "message": "Count from 1 to 1000, separated by commas.",
        "model": "phi",
        "max_tokens": 150,
        "temperature": 0,
        "repeat_penalty": 1.0,
    }
    events = []
    async with aiohttp.ClientSession(read_bufsize=256) as session:
        async with session.post(mesh.base_url + "/api/chat/stream", json=body, ssl=mesh.ssl_context()) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 2:
                        await asyncio.sleep(3)  # stop reading while the model goes on
    assert "done" in events[-1], events[-1]
    tokens = [e["token"] for e in events if "token" in e]
    # Every delta arrived, in order (pieces that reached the mesh together come as one delta).
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert 2 < len(tokens) <= events[-1]["done"]["usage"]["completion_tokens"]


def test_a_client_trickling_its_headers_is_cut_off(mesh):
    context = ssl.create_default_context(cafile=str(mesh.cert))
    context.set_alpn_protocols(["http/1.1"])
    host, port = mesh.edge.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n")
            started = time.monotonic()
            reply = b""
            while True:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                reply += chunk
            waited = time.monotonic() - started
    assert waited < 25
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:100]


async def test_200_concurrent_streams_each_get_an_answer_or_a_clear_429(mesh):
    async def chat(session, i):
        body = {
            "message": f"Di el número {i}.",
            "model": "phi",
            "max_tokens": 4,
            "temperature": 0,
            "conversation_id": f"load-{i}",
        }
        async with session.post(mesh.base_url + "/api/chat/stream", json=body, ssl=mesh.ssl_context()) as response:
            if response.status != 200:
                return response.status, await response.json(content_type=None), response.headers.get("retry-after")
            events = [json.loads(line[5:]) async for line in response.content if line.startswith(b"data:")]
            return 200, events, None

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        results = await asyncio.gather(*(chat(session, i) for i in range(200)))
    answered = [i for i, (status, events, _) in enumerate(results) if status == 200]
    refused = [i for i, (status, _, _) in enumerate(results) if status != 200]
    assert answered, "nothing was answered"
    for i in answered:
        assert "done" in results[i][1][-1], results[i][1][-1]
    for i in refused:
        status, error, retry_after = results[i]
        assert status == 429 and error["code"] == 8 and int(retry_after) >= 1, results[i]
    # Exactly what was accepted is stored, once: a question and its answer per answered chat.
    for i in answered[:20] + refused[:20]:
        status, stored, _ = mesh.request("GET", f"/api/conversations/load-{i}")
        assert status == 200
        assert len(stored["turns"]) == (2 if i in answered else 0), (i, stored)
    # And the mesh still answers.
    assert mesh.request("POST", "/api/chat", {"message": "hola", "model": "phi", "max_tokens": 2})[0] == 200
