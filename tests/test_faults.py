"""Backends that are down or die mid-stream, and a clean Ctrl-C. Uses a mesh of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request

import aiohttp
import pytest

from tests.support.llama_slots import LONG, wait_until_idle
from tests.support.mesh import launched_model, processes_using, running_mesh, stop_mesh
from tests.support.sse import read_events


@pytest.fixture(scope="module")
def faulty_mesh(tmp_path_factory):
    models = {
        # The default model (first), and down: requests that name no model fail over to steady.
        "ghost": {"backend": {"url": "http://127.0.0.1:26099", "protocol": "llama_cpp"}, "fallbacks": ["steady"]},
        "fragile": launched_model(26080, max_tokens=1000),
        "steady": launched_model(26081),
        "doomed": launched_model(26082),
        # One generation at a time, one waiting: the third concurrent request is turned away.
        "narrow": {**launched_model(26083, parallel=1), "max_concurrent": 1, "max_queued": 1},
    }
    # Backends killed here stay down (they are the faults under test): no supervision restarts,
    # which also shows how `capibara up` reports a death it leaves alone. test_supervision.py
    # covers the restarts.
    with running_mesh(
        tmp_path_factory.mktemp("faulty"), 26000, models, router=False, supervision={"restart": "no"}
    ) as running:
        yield running


def llama_server_pid(port: int) -> int:
    (line,) = [p for p in processes_using(f"--port {port}") if "llama-server" in p]
    return int(line.split(":", 1)[0])


@pytest.mark.parametrize("path", ["/api/chat", "/api/chat/stream"])
def test_backend_down_is_503_naming_the_model(faulty_mesh, path):
    status, error, _ = faulty_mesh.request("POST", path, {"message": "hola", "model": "ghost"})
    assert status == 503, error
    assert "ghost" in error["message"] and "unavailable" in error["message"]


def test_health_is_degraded_and_names_what_is_down(faulty_mesh):
    # Chats fail over to the healthy models, so the edge stays in: 200, not 503.
    status, body, _ = faulty_mesh.request("GET", "/health")
    assert status == 200, body
    assert body["status"] == "DEGRADED"
    (down,) = body["down"]
    assert down.startswith("capibara.inference.v1.InferenceService/ghost NOT_SERVING (unreachable"), down
    statuses = {s["service"]: s["status"] for s in body["services"]}
    assert statuses["capibara.inference.v1.InferenceService/ghost"] == "NOT_SERVING"
    for model in ("fragile", "steady", "doomed", "narrow"):
        assert statuses[f"capibara.inference.v1.InferenceService/{model}"] == "SERVING"


def test_models_report_the_down_backend(faulty_mesh):
    status, body, _ = faulty_mesh.request("GET", "/api/models")
    assert status == 200
    models = {m["model_id"]: m for m in body["models"]}
    assert models["ghost"]["healthy"] is False and "unreachable" in models["ghost"]["status"]
    assert models["fragile"]["healthy"] is True


async def stream_killing_backend(mesh, path: str, body: dict, port: int, after_events: int, wait_s: float = 0.0):
    """Read an SSE stream and SIGKILL the llama-server on `port` once `after_events` events have
    arrived; return every event."""
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(mesh.base_url + path, json=body, ssl=mesh.ssl_context()) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == after_events:
                        await asyncio.sleep(wait_s)
                        os.kill(llama_server_pid(port), signal.SIGKILL)
    return events


async def test_backend_dying_mid_stream_ends_with_an_in_band_error(faulty_mesh):
    events = await stream_killing_backend(
        faulty_mesh, "/api/chat/stream", {"message": "Write a long story.", "model": "fragile"}, 26080, 3
    )
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "routing" and "token" in kinds
    assert kinds[-1] == "error" and "done" not in kinds
    assert events[-1]["error"]["code"] == "UNAVAILABLE"
    assert "fragile" in events[-1]["error"]["message"]
    # And the next request says the model is down instead of pretending.
    status, error, _ = faulty_mesh.request("POST", "/api/chat", {"message": "hola", "model": "fragile"})
    assert status == 503 and "fragile" in error["message"]


def test_consensus_tolerates_a_down_model_when_the_quorum_is_met(faulty_mesh):
    status, body, _ = faulty_mesh.request(
        "POST",
        "/api/consensus",
        {"prompt": "hola", "models": ["steady", "ghost"], "quorum": 1, "params": {"max_tokens": 5, "temperature": 0}},
    )
    assert status == 200, body
    assert [c["model_id"] for c in body["candidates"]] == ["steady"]
    assert body["failures"][0]["model_id"] == "ghost" and body["failures"][0]["code"] == "UNAVAILABLE"
    assert body["final"]["chosen_model_id"] == "steady"


async def test_consensus_below_quorum_is_unavailable_naming_the_failed_model(faulty_mesh):
    status, error, _ = faulty_mesh.request(
        "POST",
        "/api/consensus",
        {"prompt": "hola", "models": ["steady", "ghost"], "quorum": 2, "params": {"max_tokens": 5}},
    )
    assert status == 503, error
    assert "quorum not met" in error["message"] and "ghost" in error["message"]
    status, events, _ = await read_events(
        faulty_mesh,
        "/api/consensus/stream",
        {"prompt": "hola", "models": ["steady", "ghost"], "quorum": 2, "params": {"max_tokens": 5}},
    )
    assert status == 200
    kinds = [next(iter(e)) for _, e in events]
    assert kinds[-1] == "error" and "final" not in kinds
    assert events[-1][1]["error"]["code"] == "UNAVAILABLE" and "ghost" in events[-1][1]["error"]["message"]


async def test_consensus_survives_a_backend_stopped_mid_call(faulty_mesh):
    """Kill one candidate's llama-server while both generate: quorum 1 still answers."""
    body = {
        "prompt": LONG["message"],
        "models": ["steady", "doomed"],
        "quorum": 1,
        "params": {"max_tokens": 300, "temperature": 0, "repeat_penalty": 1.0},
    }
    # After the two "started" events, give both half a second of generating.
    events = await stream_killing_backend(faulty_mesh, "/api/consensus/stream", body, 26082, 2, wait_s=0.5)
    kinds = [next(iter(e)) for e in events]
    assert kinds[-1] == "final", kinds
    (failed,) = [e["failed"] for e in events if "failed" in e]
    assert failed["model_id"] == "doomed" and failed["code"] == "UNAVAILABLE"
    assert events[-1]["final"]["chosen_model_id"] == "steady"
    await wait_until_idle(faulty_mesh.backend_url("steady"))


async def test_a_down_model_fails_over_before_the_first_token_and_says_so(faulty_mesh):
    status, events, _ = await read_events(faulty_mesh, "/api/chat/stream", {"message": "hola", "max_tokens": 5})
    assert status == 200, events
    routing = events[0][1]["routing"]
    assert routing["model_id"] == "steady" and routing["failed_models"] == ["ghost"] and routing["fallback"]
    assert "failed over to steady" in routing["reasoning"] and "ghost (UNAVAILABLE" in routing["reasoning"]
    assert "done" in events[-1][1]
    with urllib.request.urlopen(faulty_mesh.metrics_url("gateway"), timeout=10) as response:
        assert 'capibara_failovers_total{from_model="ghost",to_model="steady"}' in response.read().decode()
    # Complete says the same.
    status, body, _ = faulty_mesh.request("POST", "/api/chat", {"message": "hola", "max_tokens": 5})
    assert status == 200 and body["model_id"] == "steady" and body["routing"]["failed_models"] == ["ghost"]


async def test_a_restarted_backend_is_used_again_within_10_s(faulty_mesh):
    from capibara_grpc.config import load_config
    from capibara_grpc.supervision.launch_commands import llama_server_argv

    port = 26082
    if any("llama-server" in p for p in processes_using(f"--port {port}")):
        os.kill(llama_server_pid(port), signal.SIGKILL)
    await asyncio.sleep(0.5)
    status, error, _ = faulty_mesh.request("POST", "/api/chat", {"message": "hola", "model": "doomed", "max_tokens": 3})
    assert status == 503, error
    # capibara up said what happened, and left it dead as configured.
    output = faulty_mesh.wait_for_output("llama-server-doomed (pid ", timeout_s=5)
    (death,) = [line for line in output.splitlines() if "llama-server-doomed (pid " in line][:1]
    assert "killed by SIGKILL (killed outright: by the kernel's out-of-memory killer" in death, death
    assert "not restarted (supervision.restart: no); model doomed stays down" in death, death
    assert f"log: {faulty_mesh.config['state_dir']}/logs/llama-server-doomed.log" in death, death
    config = load_config(faulty_mesh.config_path)
    argv = llama_server_argv(config, config.models["doomed"])
    backend = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # llama-server loads the model
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        up_at = time.monotonic()
        while time.monotonic() - up_at < 10:
            status, body, _ = faulty_mesh.request(
                "POST", "/api/chat", {"message": "hola", "model": "doomed", "max_tokens": 3}
            )
            if status == 200:
                break
            await asyncio.sleep(0.5)
        assert status == 200, body
        status, models, _ = faulty_mesh.request("GET", "/api/models")
        assert {m["model_id"]: m["healthy"] for m in models["models"]}["doomed"] is True
    finally:
        backend.kill()
        backend.wait()


async def test_a_full_queue_is_429_with_retry_after_and_nothing_hangs(faulty_mesh):
    long = {**LONG, "model": "narrow", "max_tokens": 400}
    async with aiohttp.ClientSession() as session:

        async def chat(body):
            async with session.post(faulty_mesh.base_url + "/api/chat", json=body, ssl=faulty_mesh.ssl_context()) as r:
                return r.status, await r.json(content_type=None), r.headers.get("retry-after")

        busy = [asyncio.create_task(chat(long)), asyncio.create_task(chat(long))]
        await asyncio.sleep(1.0)  # one generating, one queued
        status, error, retry_after = await chat({"message": "hola", "model": "narrow", "max_tokens": 3})
        assert status == 429, error
        assert "'narrow' is busy" in error["message"] and error["code"] == 8
        assert retry_after is not None and int(retry_after) >= 1
        # gRPC callers get RESOURCE_EXHAUSTED with the same hint.
        import grpc

        from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
        from tests.support.channels import edge_channel

        async with edge_channel(faulty_mesh) as channel:
            call = gateway_pb2_grpc.ChatServiceStub(channel).Chat(
                gateway_pb2.ChatRequest(message="hola", model="narrow", max_tokens=3), timeout=30
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(refused.value.trailing_metadata())["retry-after"]) >= 1
        # The accepted two both finish.
        assert [s for s, _, _ in await asyncio.gather(*busy)] == [200, 200]
    status, body, _ = faulty_mesh.request("POST", "/api/chat", {"message": "hola", "model": "narrow", "max_tokens": 3})
    assert status == 200, body


# Last: it stops the module's mesh.
def test_ctrl_c_stops_every_process_it_started(faulty_mesh):
    started = {
        "llama-server": "--port 26081",
        "envoy": faulty_mesh.config["state_dir"],
        "capibara up": str(faulty_mesh.config_path),
    }
    for what, marker in started.items():
        assert processes_using(marker), f"{what} is not running"
    assert stop_mesh(faulty_mesh) == 0
    for what, marker in started.items():
        assert processes_using(marker) == [], f"{what} left behind"
