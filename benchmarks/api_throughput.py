"""RPS and latency of the API through Envoy, with the tools users have: h2load (gRPC over h2) and
wrk (REST), plus time to first token and tokens/s for Chat at several concurrencies, and the
mesh's overhead against calling llama-server directly.

Starts its own mesh (ports 21xxx; three llama-servers on the shipped GGUF, router on). ghz cannot
be installed here; benchmarks/ghz/ has the equivalent configs for users who have it.

    .venv/bin/python benchmarks/api_throughput.py [--seconds 10] [--chat-runs 8]

A benchmark, not a test: it prints a table for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import aiohttp
import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from ttft import direct, native_grpc, percentile

from capibara_grpc.stubs import gateway_pb2_grpc, router_pb2
from tests.support.mesh import launched_model, running_mesh

PORT_BASE = 21000
QUERY = "escribe una función en Python que ordene una lista"


def grpc_frame(message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def h2load_route(
    mesh, directory: pathlib.Path, seconds: float, clients: int, streams: int
) -> tuple[float, list[float]]:
    """(requests/s, latencies in ms) of RouterService/Route over TLS h2 with gRPC framing."""
    frame = directory / "route.bin"
    frame.write_bytes(grpc_frame(router_pb2.RouteRequest(query=QUERY)))
    log = directory / "h2load.log"
    port = mesh.edge.split(":")[1]
    subprocess.run(
        [
            "h2load",
            "-D",
            f"{int(seconds)}",
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            "-d",
            str(frame),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--log-file",
            str(log),
            f"https://localhost:{port}/capibara.router.v1.RouterService/Route",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    # --log-file: start time (µs), HTTP status, request duration (µs), tab-separated
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = [int(r[2]) / 1000 for r in rows if r[1] == "200"]
    return len(ok) / seconds, ok


def _ms(value: str) -> float:
    """wrk's '812.00us', '3.45ms' or '1.20s' in milliseconds."""
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    raise ValueError(value)


def wrk_route(mesh, directory: pathlib.Path, seconds: float, connections: int) -> tuple[float, dict[str, float]]:
    """(requests/s, {p50, p90, p99} ms) of POST /api/router/test over HTTPS/1.1."""
    script = directory / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n'
        f'wrk.body = \'{{"query": "{QUERY}"}}\'\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(min(2, connections)),
            "-c",
            str(connections),
            "-d",
            f"{int(seconds)}s",
            "--latency",
            "-s",
            str(script),
            mesh.base_url + "/api/router/test",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))
    latency = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            latency[parts[0]] = _ms(parts[1])
    non_2xx = [line for line in out.splitlines() if "Non-2xx" in line]
    if non_2xx:
        raise SystemExit(f"wrk saw errors: {non_2xx}")
    return rps, latency


async def chat_level(mesh, concurrency: int, runs: int, max_tokens: int):
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())
    async with grpc.aio.secure_channel(
        mesh.edge, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        await native_grpc(stub, 4)
        samples = []
        for _ in range(runs):
            samples += await asyncio.gather(*(native_grpc(stub, max_tokens) for _ in range(concurrency)))
    return samples


async def direct_level(url: str, runs: int, max_tokens: int):
    # A new connection per request: llama-server closes a connection after a streamed answer, and
    # reusing it back to back races that close.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        await direct(session, url, 4)
        return [await direct(session, url, max_tokens) for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--chat-runs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    for tool in ("h2load", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install nghttp2-client wrk")
    models = {
        "gpt-oss-20b": launched_model(PORT_BASE + 80, parallel=4),
        "phi": launched_model(PORT_BASE + 81, parallel=4),
        "mixtral": launched_model(PORT_BASE + 82, parallel=4),
    }
    with tempfile.TemporaryDirectory() as tmp, running_mesh(pathlib.Path(tmp), PORT_BASE, models) as mesh:
        directory = pathlib.Path(tmp)
        print(
            f"\nChat ({args.max_tokens} tokens, temperature 0), gRPC through Envoy; direct = llama-server "
            f"/v1/chat/completions"
        )
        print(f"{'what':52} {'TTFT p50':>8} {'TTFT p90':>8} {'tok/s p50':>9}")
        base = asyncio.run(direct_level(mesh.backend_url("gpt-oss-20b"), args.chat_runs * 2, args.max_tokens))
        rows = [("llama-server direct, 1 at a time", base)]
        for concurrency in (1, 4, 16):
            rows.append(
                (
                    f"mesh, {concurrency} concurrent",
                    asyncio.run(
                        chat_level(mesh, concurrency, max(1, args.chat_runs * 2 // concurrency), args.max_tokens)
                    ),
                )
            )
        for label, samples in rows:
            ttfts = [s.ttft * 1000 for s in samples]
            print(
                f"{label:52} {statistics.median(ttfts):8.1f} {percentile(ttfts, 0.9):8.1f} "
                f"{statistics.median(s.tokens_per_s for s in samples):9.1f}"
            )
        overhead = statistics.median(s.ttft for s in rows[1][1]) - statistics.median(s.ttft for s in base)
        print(f"\nmesh overhead on time to first token at concurrency 1: {overhead * 1000:.1f} ms")
        print(
            f"\nThrough Envoy (TLS) on {platform.machine()} {platform.node()}, {time.strftime('%Y-%m-%d')}, "
            f"{args.seconds:.0f} s per row"
        )
        print(f"{'what':52} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
        for clients, streams in ((1, 1), (4, 8), (8, 16)):
            rps, latencies = h2load_route(mesh, directory, args.seconds, clients, streams)
            print(
                f"{f'Route, gRPC h2load, {clients * streams} in flight':52} {rps:8.0f} "
                f"{percentile(latencies, 0.5):8.1f} {percentile(latencies, 0.9):8.1f} {percentile(latencies, 0.99):8.1f}"
            )
        for connections in (1, 32):
            rps, latency = wrk_route(mesh, directory, args.seconds, connections)
            print(
                f"{f'Route, REST wrk, {connections} connections':52} {rps:8.0f} "
                f"{latency['50%']:8.1f} {latency['90%']:8.1f} {latency['99%']:8.1f}"
            )


if __name__ == "__main__":
    main()
