"""Chat and consensus measurements of benchmarks/mesh_overhead.py, through a running mesh's edge:
time to first token against llama-server given the same prompt, tokens/s alone and under Route
load, and the consensus' decision time."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import grpc

from benchmarks.mesh_load import load_process, load_result
from capibara_grpc.stubs import (
    consensus_pb2,
    consensus_pb2_grpc,
    context_pb2,
    context_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

ROUTE_METHOD = "/capibara.router.v1.RouterService/Route"
CHAT_PROMPT = "Explain in a few sentences why the sky is blue."


async def sse_chat(session, mesh, body: dict, backend_speed: list | None = None) -> tuple[float, float]:
    """(time to first token s, tokens/s after the first) of /api/chat/stream through the edge, as
    the client sees them; the backend's own tokens/s (its Done timings) appended to `backend_speed`."""
    started, first, tokens = time.perf_counter(), None, 0
    async with session.post(mesh.base_url + "/api/chat/stream", json=body, ssl=mesh.ssl_context()) as response:
        async for line in response.content:
            if line.startswith(b"data:") and b'"token"' in line:
                tokens += 1
                first = first or time.perf_counter()
            elif line.startswith(b"data:") and backend_speed is not None:
                timings = json.loads(line[5:]).get("done", {}).get("timings", {})
                if timings.get("tokens_per_second"):
                    backend_speed.append(timings["tokens_per_second"])
    end = time.perf_counter()
    return first - started, (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0


async def direct_chat(session, url: str, messages: list[dict], max_tokens: int) -> float:
    """Time to first token of llama-server given `messages`, through the endpoint the mesh uses
    (/v1/chat/completions, streamed)."""
    started = time.perf_counter()
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0, "cache_prompt": True}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data:") and b'"content":"' in line:
                return time.perf_counter() - started
    raise RuntimeError("llama-server sent no token")


async def routed_model(mesh) -> str:
    async with grpc.aio.insecure_channel(mesh.service_address("router")) as channel:
        decision = await router_pb2_grpc.RouterServiceStub(channel).Route(router_pb2.RouteRequest(query=CHAT_PROMPT))
    return decision.model_id


async def final_messages(mesh, model_id: str) -> list[dict]:
    """The messages the mesh sends for CHAT_PROMPT to `model_id` (the context service's Enrich,
    asked afresh each time: what it adds, the time for one, changes)."""
    async with grpc.aio.insecure_channel(mesh.service_address("context")) as channel:
        enriched = await context_pb2_grpc.ContextServiceStub(channel).Enrich(
            context_pb2.EnrichRequest(message=CHAT_PROMPT, model_id=model_id)
        )
    roles = {1: "system", 2: "user", 3: "assistant"}
    return [{"role": roles.get(m.role, "user"), "content": m.content} for m in enriched.messages]


async def measure_chat(mesh, runs: int, max_tokens: int) -> dict:
    url = mesh.backend_url("gpt-oss-20b")
    model_id = await routed_model(mesh)
    enriched = await final_messages(mesh, model_id)
    bare = [{"role": "user", "content": CHAT_PROMPT}]
    body = {"message": CHAT_PROMPT, "max_tokens": max_tokens, "temperature": 0}
    result = {"direct_bare": [], "direct_final": [], "mesh": [], "mesh_tps": []}
    async with aiohttp.ClientSession() as session:
        await direct_chat(session, url, bare, 4), await direct_chat(session, url, enriched, 4)
        await sse_chat(session, mesh, {**body, "max_tokens": 4})
        for _ in range(runs):  # interleaved, so drift on a shared machine hits every path alike
            result["direct_bare"].append(await direct_chat(session, url, bare, max_tokens))
            enriched = await final_messages(mesh, model_id)
            result["direct_final"].append(await direct_chat(session, url, enriched, max_tokens))
            ttft, tps = await sse_chat(session, mesh, body)
            result["mesh"].append(ttft)
            result["mesh_tps"].append(tps)
    result["final_prompt_chars"] = sum(len(m["content"]) for m in enriched)
    return result


def tokens_per_s_under_load(mesh, edge: str, cert: str, rate: float, runs: int, max_tokens: int) -> dict:
    """Chat tokens/s alone and while the generator offers Route at `rate`, `runs` chats each,
    interleaved chat by chat (the generator is paused with SIGSTOP for the chats alone), so drift
    on a shared machine hits both alike; the generator runs only around the loaded chats. Returns
    tps_alone, tps_loaded, backend_alone, backend_loaded (llama-server's own tokens/s), served
    (Route/s answered while loaded) and goal_rate."""
    body = {"message": CHAT_PROMPT, "max_tokens": max_tokens, "temperature": 0, "model": "gpt-oss-20b"}
    speeds = {False: [], True: []}  # as the client sees them: alone, loaded
    backend = {False: [], True: []}  # llama-server's own
    loaded_s = 0.0

    async def chats(background):
        nonlocal loaded_s
        async with aiohttp.ClientSession() as session:
            for run in range(2 * runs):
                under_load = run % 2 == 1
                background.send_signal(signal.SIGCONT if under_load else signal.SIGSTOP)
                await asyncio.sleep(0.5)  # the calls in flight end, or the load is back up
                started = time.perf_counter()
                speeds[under_load].append((await sse_chat(session, mesh, body, backend[under_load]))[1])
                if under_load:
                    loaded_s += time.perf_counter() - started

    async def warm():
        async with aiohttp.ClientSession() as session:
            await sse_chat(session, mesh, body)

    asyncio.run(warm())
    background = load_process(edge, ROUTE_METHOD, 3600, 64, cert, rate)
    background.send_signal(signal.SIGSTOP)  # nothing sent before the first loaded chat
    asyncio.run(chats(background))
    background.send_signal(signal.SIGCONT)
    background.terminate()  # it reports what it served in all
    served = load_result(background)
    return {
        "tps_alone": speeds[False],
        "tps_loaded": speeds[True],
        "backend_alone": backend[False],
        "backend_loaded": backend[True],
        # It ran only during the loaded chats and the half second before each.
        "served": served["ok"] / (loaded_s + 0.5 * runs),
        "goal_rate": rate,
    }


async def consensus_gaps(mesh, runs: int) -> tuple[list[float], list[float]]:
    """Vote of three, ms: (from the last CandidateFinished to the FinalAnswer as the client sees
    them; the whole call less the slowest candidate's own generation time, an upper bound on the
    decision's cost that also holds the hops to the consensus service and back)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    gaps, bounds = [], []
    async with grpc.aio.secure_channel(mesh.edge, credentials, options=options) as channel:
        stub = consensus_pb2_grpc.ConsensusServiceStub(channel)
        request = consensus_pb2.CombineRequest(
            models=["gpt-oss-20b", "phi", "mixtral"],
            strategy=consensus_pb2.STRATEGY_VOTE,
        )
        request.params.max_tokens, request.params.temperature = 32, 0
        for run in range(runs + 1):
            request.prompt = f"Name three primary colours, then count to {run + 3}."  # distinct: no cache
            last_finished, slowest = None, 0.0
            started = time.perf_counter()
            async for event in stub.Combine(request, timeout=120):
                kind = event.WhichOneof("event")
                if kind == "finished":
                    last_finished = time.perf_counter()
                    slowest = max(slowest, event.finished.latency_ms)
                elif kind == "final" and run:  # the first run warms up
                    now = time.perf_counter()
                    gaps.append((now - last_finished) * 1000)
                    bounds.append((now - started) * 1000 - slowest)
    return gaps, bounds
