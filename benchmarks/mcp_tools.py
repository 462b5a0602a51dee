"""What the MCP layer adds to a call of the mesh: `list_models` (no generation) and a short `chat`
through the SDK's client over stdio (`capibara mcp`, kept session) and over Streamable HTTP
(`/mcp` on the edge, one kept HTTP client, modern and handshake-era modes), against the same gRPC
call through the same TLS edge. Its own mesh (tests' ports 30000-30901, so not while
tests/test_mcp_server.py runs): one llama-server (SmolLM2) serving phi, with an API key.

    .venv/bin/python benchmarks/mcp_tools.py [--calls 50]

A benchmark, not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import httpx2  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402
from tests.support.mesh import VENV_BIN, launched_model, mesh_config, start_mesh, stop_mesh  # noqa: E402

BASE = 30000
KEY = "bench-key-0123456789abcdef"
CHAT = {"message": "Name a colour.", "model": "phi", "max_tokens": 8, "temperature": 0}


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"p50 {statistics.median(ms):8.2f} ms   p95 {ms[max(0, int(len(ms) * 0.95) - 1)]:8.2f} ms   n={len(ms)}"


async def timed(call, calls: int) -> list[float]:
    await call()  # warm-up: connections, the first import of anything lazy
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def over_grpc(mesh, calls: int) -> dict[str, list[float]]:
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())
    metadata = (("authorization", f"Bearer {KEY}"),)
    async with grpc.aio.secure_channel(
        mesh.edge, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        gateway = gateway_pb2_grpc.ChatServiceStub(channel)

        async def list_models():
            await inference.ListModels(inference_pb2.ListModelsRequest(), timeout=30, metadata=metadata)

        async def chat():
            request = gateway_pb2.CompleteRequest(message=CHAT["message"], model="phi", max_tokens=8, temperature=0)
            await gateway.Complete(request, timeout=60, metadata=metadata)

        return {"list_models": await timed(list_models, calls), "chat": await timed(chat, calls)}


async def over_mcp(client: Client, calls: int) -> dict[str, list[float]]:
    async def list_models():
        assert not (await client.call_tool("list_models", {})).is_error

    async def chat():
        assert not (await client.call_tool("chat", CHAT)).is_error

    return {"list_models": await timed(list_models, calls), "chat": await timed(chat, calls)}


async def measure(mesh, calls: int) -> dict[str, dict[str, list[float]]]:
    results = {"gRPC through the edge (baseline)": await over_grpc(mesh, calls)}
    stdio = StdioServerParameters(
        command=str(VENV_BIN / "capibara"),
        args=["--config", str(mesh.config_path), "mcp"],
        env={"CAPIBARA_API_KEY": KEY},
        cwd=str(REPO),
    )
    async with Client(stdio) as client:
        results["MCP stdio (capibara mcp)"] = await over_mcp(client, calls)
    for mode in ("auto", "legacy"):
        async with httpx2.AsyncClient(
            verify=mesh.ssl_context(), headers={"authorization": f"Bearer {KEY}"}, timeout=60
        ) as http:
            transport = streamable_http_client(mesh.base_url + "/mcp", http_client=http)
            async with Client(transport, mode=mode) as client:
                label = "MCP HTTP /mcp, " + ("modern (JSON)" if mode == "auto" else "handshake-era (SSE)")
                results[label] = await over_mcp(client, calls)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capibara-mcp-bench-") as tmp:
        directory = pathlib.Path(tmp)
        (directory / "keys.txt").write_text(KEY + "\n")
        config = mesh_config(directory / "state", BASE, {"phi": launched_model(BASE + 80)}, router=False)
        config["edge"]["api_keys_file"] = str(directory / "keys.txt")
        mesh = start_mesh(directory, config)
        try:
            results = asyncio.run(measure(mesh, args.calls))
        finally:
            stop_mesh(mesh)
    for label, tools in results.items():
        print(label)
        for tool, samples in tools.items():
            print(f"  {tool:12} {percentiles(samples)}")


if __name__ == "__main__":
    main()
