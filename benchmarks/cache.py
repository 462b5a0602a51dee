"""Response cache: a hit against a live answer, over gRPC, straight to the gateway and through
Envoy. Starts its own mesh (ports 18xxx, one llama-server, router off, in-process cache).

    .venv/bin/python benchmarks/cache.py [--runs 50] [--max-tokens 32]

A benchmark, not a test: it prints figures for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from tests.support.mesh import launched_model, mesh_config, start_mesh, stop_mesh

PORT_BASE = 18000


async def timed_chat(stub, request) -> tuple[float, float, str]:
    """(ms to the first token, ms to done, cache_hit)."""
    started = time.perf_counter()
    first = None
    async for event in stub.Chat(request, timeout=120):
        kind = event.WhichOneof("event")
        if kind == "token" and first is None:
            first = time.perf_counter()
        elif kind == "done":
            return (first - started) * 1000, (time.perf_counter() - started) * 1000, event.done.cache_hit
    raise RuntimeError("no done event")


async def measure(channel, runs: int, max_tokens: int, tag: str) -> dict[str, list[tuple[float, float]]]:
    stub = gateway_pb2_grpc.ChatServiceStub(channel)
    results = {"live": [], "hit": []}
    for i in range(runs):
        request = gateway_pb2.ChatRequest(
            message=f"Describe the capybara, fact {tag} {i}.", max_tokens=max_tokens, temperature=0
        )
        ttft, total, hit = await timed_chat(stub, request)
        assert hit == "", hit
        results["live"].append((ttft, total))
        ttft, total, hit = await timed_chat(stub, request)
        assert hit == "exact", hit
        results["hit"].append((ttft, total))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = mesh_config(
            pathlib.Path(tmp) / "state", PORT_BASE, {"gpt-oss-20b": launched_model(PORT_BASE + 80)}, router=False
        )
        config["cache"] = {"enabled": True, "backend": "memory"}
        mesh = start_mesh(pathlib.Path(tmp), config)
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())

            async def both():
                async with (
                    grpc.aio.insecure_channel(mesh.service_address("gateway")) as direct,
                    grpc.aio.secure_channel(
                        mesh.edge, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
                    ) as edge,
                ):
                    await timed_chat(
                        gateway_pb2_grpc.ChatServiceStub(direct),
                        gateway_pb2.ChatRequest(message="warm up", max_tokens=2),
                    )
                    return (
                        await measure(direct, args.runs, args.max_tokens, "gateway"),
                        await measure(edge, args.runs, args.max_tokens, "edge"),
                    )

            gateway, edge = asyncio.run(both())
        finally:
            stop_mesh(mesh)
    print(
        f"\nChat, {args.max_tokens} tokens at temperature 0, {args.runs} distinct prompts, each asked twice; "
        f"{platform.machine()}, {platform.node()}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'path':34} {'first token p50 ms':>19} {'done p50 ms':>12} {'done p90 ms':>12}")
    for label, results in (("gRPC straight to the gateway", gateway), ("gRPC through Envoy (TLS)", edge)):
        for kind in ("live", "hit"):
            totals = sorted(total for _, total in results[kind])
            print(
                f"{label + ', ' + kind:34} {statistics.median(t for t, _ in results[kind]):19.2f} "
                f"{statistics.median(totals):12.2f} {totals[int(0.9 * (len(totals) - 1))]:12.2f}"
            )


if __name__ == "__main__":
    main()
