"""The mesh as deployed: every service its own process (`capibara up --split`), calling the
others through Envoy's mesh listener. Services are killed under it and `capibara up` restarts
them by itself (supervision)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from capibara_grpc.supervision.priority import thread_nice
from tests.support.mesh import launched_model, processes_using, running_mesh, stop_mesh
from tests.support.sse import read_events

SERVICES = ["gateway", "context", "inference", "consensus", "speech"]


# A first restart delay long enough to see a killed service down (the gateway notices within its
# 2 s dependency check) before `capibara up` starts it again; the default is 0.5 s.
RESTART_DELAY_S = 5


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory):
    models = {"gpt-oss-20b": launched_model(23080, max_tokens=200)}
    with running_mesh(
        tmp_path_factory.mktemp("split"),
        23000,
        models,
        router=False,
        split=True,
        supervision={"backoff_initial_s": RESTART_DELAY_S},
    ) as mesh:
        yield mesh


def admin(mesh, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.config['edge']['admin_port']}{path}", timeout=10) as r:
        return r.read().decode()


def restarted(mesh, service: str, old_pid: int) -> str:
    """up.log once `capibara up` reported the kill of `old_pid` and restarted the service; the line
    of the restart."""
    output = mesh.wait_for_output(f"restarted {service} (pid ", timeout_s=RESTART_DELAY_S + 15)
    (death,) = [line for line in output.splitlines() if f"{service} (pid {old_pid}) killed by SIGKILL" in line]
    assert f"restarting it in {RESTART_DELAY_S} s (restart 1" in death, death
    assert f"log: {mesh.config['state_dir']}/logs/{service}.log" in death, death
    (line,) = [line for line in output.splitlines() if f"restarted {service} (pid " in line]
    return line


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
    pids = {service: split_mesh.service_pid(service) for service in SERVICES}
    assert len(set(pids.values())) == len(SERVICES)
    # Each as nice as the mesh's own work (supervision.mesh_nice: 5), behind the model servers.
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert {service: thread_nice(pid) for service, pid in pids.items()} == dict.fromkeys(SERVICES, min(19, base + 5))


def test_services_call_each_other_through_envoy(split_mesh):
    status, body, _ = split_mesh.request(
        "POST", "/api/chat", {"message": "hola", "conversation_id": "split-0", "max_tokens": 3}
    )
    assert status == 200, body
    stats = dict(
        line.split(": ", 1)
        for line in admin(split_mesh, "/stats?filter=^(cluster|http)\\.").splitlines()
        if ": " in line
    )
    assert int(stats["http.mesh.downstream_rq_total"]) >= 3  # enrich, append turns, generate
    assert int(stats["cluster.inference.upstream_rq_total"]) >= 1
    assert int(stats["cluster.context.upstream_rq_total"]) >= 1
    clusters = json.loads(admin(split_mesh, "/clusters?format=json"))["cluster_statuses"]
    for cluster in clusters:
        (host,) = cluster["host_statuses"]
        assert host["health_status"]["eds_health_status"] == "HEALTHY"
        assert not host["health_status"].get("failed_active_health_check"), cluster["name"]


async def test_a_killed_service_is_reported_and_restarted_by_capibara_up(split_mesh):
    status, body, _ = split_mesh.request(
        "POST", "/api/chat", {"message": "me llamo Ana", "conversation_id": "split-1", "max_tokens": 3}
    )
    assert status == 200, body
    old_pid = split_mesh.service_pid("context")
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # Down until capibara up restarts it (RESTART_DELAY_S): reported, and chats fail fast and clearly.
    status, error, _ = split_mesh.request("GET", "/health")
    assert status == 503 and "capibara.context.v1.ContextService UNREACHABLE" in error["message"], error
    assert await eventually(lambda: _is(gateway_health(split_mesh), health_pb2.HealthCheckResponse.NOT_SERVING))
    started = time.monotonic()
    status, error, _ = split_mesh.request(
        "POST", "/api/chat", {"message": "hola", "conversation_id": "split-1", "max_tokens": 3}
    )
    assert status == 503 and time.monotonic() - started < 10, error
    # Everything above happened before the restart, so it saw the service down.
    assert time.monotonic() - killed_at < RESTART_DELAY_S, "too slow to observe the outage; raise RESTART_DELAY_S"
    assert "restarted context" not in split_mesh.output()

    # Then capibara up starts it again by itself: a new process, and the mesh recovers.
    restarted(split_mesh, "context", old_pid)
    new_pid = split_mesh.service_pid("context")
    assert new_pid != old_pid and f"restarted context (pid {new_pid}, restart 1)" in split_mesh.output()

    async def healthy():
        return split_mesh.request("GET", "/health")[0] == 200

    assert await eventually(healthy, 20), split_mesh.request("GET", "/health")
    assert await gateway_health(split_mesh) == health_pb2.HealthCheckResponse.SERVING
    status, body, _ = split_mesh.request(
        "POST", "/api/chat", {"message": "hola", "conversation_id": "split-1", "max_tokens": 3}
    )
    assert status == 200, body
    status, stored, _ = split_mesh.request("GET", "/api/conversations/split-1")
    contents = [t["content"] for t in stored["turns"]]
    # The turn of the request that failed was not stored; nothing else was lost or doubled.
    assert contents.count("me llamo Ana") == 1 and contents.count("hola") == 1 and len(contents) == 4, contents


async def test_inference_killed_mid_stream_ends_in_band_and_is_restarted(split_mesh):
    events = []
    body = {
        "message": "Count from 1 to 1000, separated by commas.",
        "max_tokens": 200,
        "temperature": 0,
        "repeat_penalty": 1.0,
    }
    old_pid = split_mesh.service_pid("inference")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            split_mesh.base_url + "/api/chat/stream", json=body, ssl=split_mesh.ssl_context()
        ) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 3:
                        os.kill(old_pid, signal.SIGKILL)
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "routing" and kinds[-1] == "error" and "done" not in kinds, kinds
    assert events[-1]["error"]["code"] in ("UNAVAILABLE", "INTERNAL", "CANCELLED"), events[-1]
    restarted(split_mesh, "inference", old_pid)
    assert split_mesh.service_pid("inference") != old_pid

    async def answers():
        return split_mesh.request("POST", "/api/chat", {"message": "hola", "max_tokens": 3})[0] == 200

    assert await eventually(answers, 20)
    status, events, _ = await read_events(split_mesh, "/api/chat/stream", {"message": "hola", "max_tokens": 3})
    assert status == 200 and "done" in events[-1][1]


def test_ctrl_c_stops_every_service_process(split_mesh):
    pids = [split_mesh.service_pid(service) for service in SERVICES]
    assert stop_mesh(split_mesh) == 0
    assert processes_using(str(split_mesh.config_path)) == [], "left behind"
    assert processes_using(split_mesh.config["state_dir"]) == [], "left behind"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), pid


async def _is(awaitable, expected) -> bool:
    try:
        return await awaitable == expected
    except grpc.aio.AioRpcError:
        return False
