"""Router latency and throughput over gRPC at concurrency 1, 8 and 32.

Starts `capibara serve router` on its own port (29051) and sends RouterService/Route calls from
closed-loop clients. Queries are the distinct texts of the two evaluation sets; the first pass
over them misses the embedding cache (the honest figure), later passes hit it.

    .venv/bin/python benchmarks/router_latency.py [--seconds 10]

A benchmark, not a test: it prints figures for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.router import evaluate
from capibara_grpc.stubs import router_pb2, router_pb2_grpc
from tests.support.mesh import VENV_BIN, launched_model, mesh_config

PORT_BASE = 29000


def queries() -> list[str]:
    texts = [q["text"] for q in evaluate.load_set(evaluate.DEFAULT_SET)]
    texts += [q["text"] for q in evaluate.load_set(evaluate.DEFAULT_SET.with_name("router_holdout.yaml"))]
    return list(dict.fromkeys(texts))


async def run(address: str, concurrency: int, texts: list[str], seconds: float | None, requests: int | None):
    """Closed loop: `concurrency` clients, each sending its next query as soon as one returns."""
    latencies: list[float] = []
    source = itertools.cycle(texts)
    stop_at = time.perf_counter() + seconds if seconds else None
    budget = [requests] if requests else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)

        async def client():
            while True:
                if stop_at and time.perf_counter() >= stop_at:
                    return
                if budget is not None:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                started = time.perf_counter()
                await stub.Route(router_pb2.RouteRequest(query=next(source)), timeout=10)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, elapsed


def row(label: str, latencies: list[float], elapsed: float) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return f"{label:28} {len(ms):7d} {statistics.median(ms):9.1f} {p95:9.1f} {len(ms) / elapsed:12.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each cached run")
    args = parser.parse_args()
    texts = queries()
    with tempfile.TemporaryDirectory() as tmp:
        config = mesh_config(
            pathlib.Path(tmp) / "state",
            PORT_BASE,
            {
                "gpt-oss-20b": launched_model(PORT_BASE + 80),
                "phi": launched_model(PORT_BASE + 81),
                "mixtral": launched_model(PORT_BASE + 82),
            },
        )
        path = pathlib.Path(tmp) / "capibara.yaml"
        path.write_text(yaml.safe_dump(config))
        server = subprocess.Popen(
            [str(VENV_BIN / "capibara"), "--config", str(path), "serve", "router"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            for line in server.stdout:
                if "serving router" in line:
                    break
            else:
                raise SystemExit("router did not start")
            address = f"127.0.0.1:{config['services']['router']['port']}"
            asyncio.run(run(address, 1, ["warm up"], None, 20))
            print(
                f"\nRouterService/Route over gRPC (plaintext, loopback); {len(texts)} distinct queries; "
                f"{platform.machine()}, {platform.node()}, {time.strftime('%Y-%m-%d')}"
            )
            print(f"{'run':28} {'calls':>7} {'p50 ms':>9} {'p95 ms':>9} {'decisions/s':>12}")
            # Uncached: each query encoded for the first time (split so no run repeats a query).
            thirds = [texts[i::3] for i in range(3)]
            for concurrency, part in zip((1, 8, 32), thirds, strict=True):
                latencies, elapsed = asyncio.run(run(address, concurrency, part, None, len(part)))
                print(row(f"uncached, concurrency {concurrency}", latencies, elapsed))
            for concurrency in (1, 8, 32):
                latencies, elapsed = asyncio.run(run(address, concurrency, texts, args.seconds, None))
                print(row(f"cached, concurrency {concurrency}", latencies, elapsed))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
