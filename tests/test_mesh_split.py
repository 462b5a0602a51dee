"""The mesh as deployed: every service its own process (`capibara up --split`), calling the
others through Envoy's mesh listener. Services are killed and restarted under it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from capibara_grpc.meshproc import REPO, launched_model, mesh_config, processes_using, start_mesh, stop_mesh
from sse import read_events

SERVICES = ["gateway", "context", "inference", "consensus", "speech"]


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("split")
    config = mesh_config(directory / "state", 23000, {"gpt-oss-20b": launched_model(23080, max_tokens=200)},
                         router=False)
    mesh = start_mesh(directory, config, split=True)
    try:
        yield mesh
    finally:
        stop_mesh(mesh)
        for process in RESTARTED:
            process.terminate()
            process.wait(10)


# Services started again by the tests; they stay up for the next tests and stop with the mesh.
RESTARTED: list[subprocess.Popen] = []


def service_pid(mesh, service: str) -> int:
    (line,) = [p for p in processes_using(f"serve {service}") if str(mesh.config_path) in p]
    return int(line.split(":", 1)[0])


def admin(mesh, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.config['edge']['admin_port']}{path}", timeout=10) as r:
        return r.read().decode()


def restart(mesh, service: str) -> None:
    """Start the service again, as an operator (or an orchestrator) would."""
    RESTARTED.append(subprocess.Popen([sys.executable, "-m", "capibara_grpc.cli", "--config", str(mesh.config_path),
                                       "serve", service], cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))


async def gateway_health(mesh) -> int:
    async with grpc.aio.insecure_channel(mesh.service_address("gateway")) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return reply.status


async def eventually(check, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.25)


def test_every_service_runs_as_its_own_process(split_mesh):
    pids = {service: service_pid(split_mesh, service) for service in SERVICES}
    assert len(set(pids.values())) == len(SERVICES)


def test_services_call_each_other_through_envoy(split_mesh):
    status, body, _ = split_mesh.request("POST", "/api/chat", {"message": "hola", "conversation_id": "split-0",
                                                               "max_tokens": 3})
    assert status == 200, body
    stats = dict(line.split(": ", 1) for line in admin(split_mesh, "/stats?filter=^(cluster|http)\\.").splitlines()
                 if ": " in line)
    assert int(stats["http.mesh.downstream_rq_total"]) >= 3  # enrich, append turns, generate
    assert int(stats["cluster.inference.upstream_rq_total"]) >= 1
    assert int(stats["cluster.context.upstream_rq_total"]) >= 1
    clusters = json.loads(admin(split_mesh, "/clusters?format=json"))["cluster_statuses"]
    for cluster in clusters:
        (host,) = cluster["host_statuses"]
        assert host["health_status"]["eds_health_status"] == "HEALTHY"
        assert not host["health_status"].get("failed_active_health_check"), cluster["name"]


async def test_a_killed_service_is_reported_and_recovers_after_restart(split_mesh):
    status, body, _ = split_mesh.request("POST", "/api/chat", {"message": "me llamo Ana", "conversation_id": "split-1",
                                                               "max_tokens": 3})
    assert status == 200, body
    os.kill(service_pid(split_mesh, "context"), signal.SIGKILL)
    status, error, _ = split_mesh.request("GET", "/health")
    assert status == 503 and "capibara.context.v1.ContextService UNREACHABLE" in error["message"], error
    assert await eventually(lambda: _is(gateway_health(split_mesh), health_pb2.HealthCheckResponse.NOT_SERVING))
    started = time.monotonic()
    status, error, _ = split_mesh.request("POST", "/api/chat", {"message": "hola", "conversation_id": "split-1",
                                                                "max_tokens": 3})
    assert status == 503 and time.monotonic() - started < 10, error
    restart(split_mesh, "context")

    async def healthy():
        return split_mesh.request("GET", "/health")[0] == 200
    assert await eventually(healthy, 20), split_mesh.request("GET", "/health")
    assert await gateway_health(split_mesh) == health_pb2.HealthCheckResponse.SERVING
    status, body, _ = split_mesh.request("POST", "/api/chat", {"message": "hola", "conversation_id": "split-1",
                                                               "max_tokens": 3})
    assert status == 200, body
    status, stored, _ = split_mesh.request("GET", "/api/conversations/split-1")
    contents = [t["content"] for t in stored["turns"]]
    # The turn of the request that failed was not stored; nothing else was lost or doubled.
    assert contents.count("me llamo Ana") == 1 and contents.count("hola") == 1 and len(contents) == 4, contents


async def test_inference_killed_mid_stream_ends_in_band_and_recovers(split_mesh):
    events = []
    body = {"message": "Count from 1 to 1000, separated by commas.", "max_tokens": 200, "temperature": 0,
            "repeat_penalty": 1.0}
    async with aiohttp.ClientSession() as session:
        async with session.post(split_mesh.base_url + "/api/chat/stream", json=body,
                                ssl=split_mesh.ssl_context()) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 3:
                        os.kill(service_pid(split_mesh, "inference"), signal.SIGKILL)
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "routing" and kinds[-1] == "error" and "done" not in kinds, kinds
    assert events[-1]["error"]["code"] in ("UNAVAILABLE", "INTERNAL", "CANCELLED"), events[-1]
    restart(split_mesh, "inference")

    async def answers():
        return split_mesh.request("POST", "/api/chat", {"message": "hola", "max_tokens": 3})[0] == 200
    assert await eventually(answers, 20)
    status, events, _ = await read_events(split_mesh, "/api/chat/stream", {"message": "hola", "max_tokens": 3})
    assert status == 200 and "done" in events[-1][1]


async def _is(awaitable, expected) -> bool:
    try:
        return await awaitable == expected
    except grpc.aio.AioRpcError:
        return False
