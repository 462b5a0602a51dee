"""Replicas behind Envoy on one machine: two llama-servers behind one logical model (backend.balance:
least_requests) and two inference services, each balanced, health-checked and ejected when killed;
new requests keep succeeding."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request

import pytest

from tests.support.mesh import launched_model, mesh_config, processes_using, serve_replica, start_mesh, stop_mesh
from tests.support.sse import read_events

REPLICA_SERVER = "http://127.0.0.1:17083"
INFERENCE_REPLICA = 17150


@pytest.fixture(scope="module")
def replicated_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replicas")
    model = launched_model(17080)
    model["backend"]["replicas"] = [REPLICA_SERVER]
    # Envoy's balancing (the default, affinity, is the inference service's: test_replica_affinity).
    model["backend"]["balance"] = "least_requests"
    config = mesh_config(directory / "state", 17000, {"gpt-oss-20b": model}, router=False)
    config["services"]["inference"]["replicas"] = [f"127.0.0.1:{INFERENCE_REPLICA}"]
    mesh = start_mesh(directory, config, split=True)
    replica = None
    try:  # the mesh is stopped even when its replica fails to start
        replica = serve_replica(mesh.config_path, "inference", INFERENCE_REPLICA)
        yield mesh
    finally:
        if replica is not None:
            replica.terminate()
            replica.wait(10)
        stop_mesh(mesh)


def host_requests(mesh, cluster: str) -> dict[str, int]:
    """Requests Envoy sent to each host of a cluster."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.config['edge']['admin_port']}/clusters?format=json") as r:
        clusters = json.loads(r.read())["cluster_statuses"]
    (wanted,) = [c for c in clusters if c["name"] == cluster]
    counts = {}
    for host in wanted["host_statuses"]:
        address = host["address"]["socket_address"]
        stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
        counts[f"{address['address']}:{address['port_value']}"] = stats.get("rq_total", 0)
    return counts


async def chats(mesh, count: int, max_tokens: int = 12) -> list[int]:
    async def one(i):
        status, events, _ = await read_events(
            mesh, "/api/chat/stream", {"message": f"Cuenta algo del número {i}.", "max_tokens": max_tokens}
        )
        return status if status != 200 or "done" in events[-1][1] else 599

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_both_servers_of_the_model_and_both_inference_replicas_take_requests(replicated_mesh):
    assert await chats(replicated_mesh, 12) == [200] * 12
    servers = host_requests(replicated_mesh, "model-gpt-oss-20b")
    assert set(servers) == {"127.0.0.1:17080", "127.0.0.1:17083"}
    assert all(count > 0 for count in servers.values()), servers
    inference = host_requests(replicated_mesh, "inference")
    assert all(count > 0 for count in inference.values()) and len(inference) == 2, inference


async def test_killing_a_model_server_loses_no_new_request(replicated_mesh):
    (server,) = [p for p in processes_using("--port 17083") if "llama-server" in p]
    os.kill(int(server.split(":", 1)[0]), signal.SIGKILL)
    statuses = []
    for _ in range(10):  # one after another: every new request must find a live server
        statuses += await chats(replicated_mesh, 1, max_tokens=4)
    assert statuses == [200] * 10
    started = time.monotonic()
    status, models, _ = replicated_mesh.request("GET", "/api/models")
    assert status == 200 and models["models"][0]["healthy"] is True, models
    assert time.monotonic() - started < 10


async def test_killing_an_inference_replica_is_over_within_seconds(replicated_mesh):
    """Known defect: Envoy sends all of the gateway's calls to one healthy inference replica, so
    when that one dies new chats get 503 (never a hang) until a retry or the supervised restart
    finds a live replica. The chats must answer again within seconds, by themselves."""
    (inference,) = [
        p for p in processes_using("serve inference") if str(replicated_mesh.config_path) in p and "--port" not in p
    ]
    old_pid = int(inference.split(":", 1)[0])
    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    outcomes = []
    while time.monotonic() - killed < 20:
        (status,) = await chats(replicated_mesh, 1, max_tokens=4)
        outcomes.append((round(time.monotonic() - killed, 1), status))
        if [s for _, s in outcomes[-5:]] == [200] * 5:
            break
    assert {s for _, s in outcomes} <= {200, 503}, outcomes
    assert [s for _, s in outcomes[-5:]] == [200] * 5, outcomes
    assert all(t < 10 for t, s in outcomes if s == 503), outcomes
