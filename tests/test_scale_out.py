"""Scale-out on one machine, real processes on loopback: two replicas each of gateway, router,
context and inference, two llama-servers behind one logical model, conversation memory in
PostgreSQL and the response cache in Redis. Under a steady load one replica of each is killed:
only streams already running on a killed replica may end (in-band, never silently); every new
request succeeds; a conversation continued through the other gateway sees its whole history."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import grpc
import pytest

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from tests.support.mesh import launched_model, mesh_config, processes_using, serve_replica, start_mesh, stop_mesh
from tests.support.stores import postgres_server, redis_server

BASE = 16000
REPLICATED = ["gateway", "router", "context", "inference"]
REPLICA_PORT = {service: BASE + 150 + i for i, service in enumerate(REPLICATED)}


@pytest.fixture(scope="module")
def scaled_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scaled")
    with postgres_server(BASE + 432) as database, redis_server(BASE + 379) as cache:
        busy_model = launched_model(BASE + 80)
        busy_model["backend"]["replicas"] = [f"http://127.0.0.1:{BASE + 83}"]
        config = mesh_config(
            directory / "state",
            BASE,
            {"gpt-oss-20b": busy_model, "phi": launched_model(BASE + 81), "mixtral": launched_model(BASE + 82)},
        )
        config["context"] = {"database": database}
        config["cache"] = {"enabled": True, "backend": "redis", "redis_url": cache}
        for service, port in REPLICA_PORT.items():
            config["services"][service]["replicas"] = [f"127.0.0.1:{port}"]
        mesh = start_mesh(directory, config, split=True)
        replicas = []
        try:
            for service, port in REPLICA_PORT.items():
                replicas.append(serve_replica(mesh.config_path, service, port, port + 20))
            time.sleep(3)  # Envoy's health checks see the replicas
            yield mesh
        finally:
            for replica in replicas:
                replica.terminate()
                replica.wait(10)
            stop_mesh(mesh)


async def chat_once(session, mesh, i: int, started_log: list):
    """One streaming chat; (start time, end time, outcome)."""
    started = time.monotonic()
    body = {"message": f"Dime algo sobre el número {i}.", "max_tokens": 24, "temperature": 0.5}
    outcome = "no-done"
    try:
        async with session.post(mesh.base_url + "/api/chat/stream", json=body, ssl=mesh.ssl_context()) as response:
            if response.status != 200:
                outcome = f"http-{response.status}: {(await response.text())[:300]}"
            else:
                async for line in response.content:
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if "done" in event:
                            outcome = "ok"
                        elif "error" in event:
                            outcome = f"in-band-{event['error']['code']}"
    except aiohttp.ClientError as exc:
        outcome = f"cut-{type(exc).__name__}"
    started_log.append((started, time.monotonic(), outcome))


async def steady_load(mesh, stop: asyncio.Event, results: list, clients: int = 4):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def client(c):
            i = c
            while not stop.is_set():
                await chat_once(session, mesh, i, results)
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))


def kill_one_replica_of_each(mesh) -> None:
    for service in REPLICATED:  # the ones `capibara up --split` started; the extra replicas live on
        (line,) = [p for p in processes_using(f"serve {service}") if str(mesh.config_path) in p and "--port" not in p]
        os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    (server,) = [p for p in processes_using(f"--port {BASE + 83}") if "llama-server" in p]
    os.kill(int(server.split(":", 1)[0]), signal.SIGKILL)


async def test_killing_one_replica_of_each_under_load(scaled_mesh):
    # A conversation started through the gateway that is about to die.
    request = gateway_pb2.ChatRequest(
        message="Me llamo Ana y vivo en Quito.", conversation_id="scale-1", max_tokens=12, temperature=0
    )
    async with grpc.aio.insecure_channel(scaled_mesh.service_address("gateway")) as first_gateway:
        events = [e async for e in gateway_pb2_grpc.ChatServiceStub(first_gateway).Chat(request, timeout=60)]
    assert events[-1].WhichOneof("event") == "done"

    results: list = []
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(scaled_mesh, stop, results))
    await asyncio.sleep(4)
    before = len(results)
    killed_at = time.monotonic()
    kill_one_replica_of_each(scaled_mesh)
    await asyncio.sleep(8)
    stop.set()
    await load

    assert before > 0 and all(outcome == "ok" for _, _, outcome in results[:before]), results[:before]
    in_flight = [r for r in results if r[0] < killed_at < r[1]]
    new = [r for r in results if r[0] >= killed_at]
    assert len(new) >= 8, f"the load stalled after the kill: {len(new)} new requests"
    assert [outcome for _, _, outcome in new] == ["ok"] * len(new), new
    # A stream cut by the kill ends in-band or with the connection, never as a silent success.
    for _, _, outcome in in_flight:
        assert outcome == "ok" or outcome.startswith(("in-band-", "cut-", "http-5")), outcome

    # The conversation goes on through the other gateway (via the edge) with its whole history.
    status, body, _ = scaled_mesh.request(
        "POST",
        "/api/chat",
        {"message": "¿Dónde vivo?", "conversation_id": "scale-1", "max_tokens": 8, "temperature": 0},
    )
    assert status == 200, body
    status, stored, _ = scaled_mesh.request("GET", "/api/conversations/scale-1")
    contents = [turn["content"] for turn in stored["turns"]]
    assert contents[0] == "Me llamo Ana y vivo en Quito." and contents[2] == "¿Dónde vivo?" and len(contents) == 4, (
        contents
    )
