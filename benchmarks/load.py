"""Concurrent streaming chats through the whole mesh: how many are held without error, and the
time to first token under that load.

Starts its own mesh (`capibara up --split` on ports 22xxx: every service its own process, calls
between them through Envoy's mesh listener; one llama-server with --parallel 8 and 2 threads;
admission queue 1024 deep, so nothing is turned away) and, at each concurrency, opens that many
REST SSE chats at once through the HTTPS edge (each 16 tokens at temperature 0), waits for all,
and counts failures (non-200, error events, streams without `done`).

    .venv/bin/python benchmarks/load.py [--levels 25,50,100,200] [--max-tokens 16]

A benchmark, not a test: it prints figures for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.support.mesh import launched_model, mesh_config, start_mesh, stop_mesh

PORT_BASE = 22000


async def one_chat(session, mesh, i: int, max_tokens: int):
    body = {"message": f"Cuenta una cosa sobre el número {i}.", "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    first = None
    try:
        async with session.post(mesh.base_url + "/api/chat/stream", json=body, ssl=mesh.ssl_context()) as response:
            if response.status != 200:
                return None, f"HTTP {response.status}"
            last = None
            async for line in response.content:
                if line.startswith(b"data:"):
                    last = json.loads(line[5:])
                    if first is None and "token" in last:
                        first = time.perf_counter() - started
            if not last or "done" not in last:
                return None, f"ended with {last}"
            return first, None
    except (TimeoutError, aiohttp.ClientError) as exc:
        return None, type(exc).__name__


async def level(mesh, concurrency: int, max_tokens: int):
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_chat(session, mesh, i, max_tokens) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(t * 1000 for t, error in results if error is None and t is not None)
    errors = [error for _, error in results if error]
    return ttfts, errors, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="25,50,100,200")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = launched_model(PORT_BASE + 80, parallel=8, threads=2)
        model.update(max_queued=1024)
        config = mesh_config(pathlib.Path(tmp) / "state", PORT_BASE, {"gpt-oss-20b": model}, router=False)
        mesh = start_mesh(pathlib.Path(tmp), config, split=True)
        try:
            asyncio.run(level(mesh, 4, args.max_tokens))  # warm up
            print(
                f"\nConcurrent REST SSE chats through Envoy -> gateway -> context -> inference -> llama-server "
                f"({args.max_tokens} tokens each); {platform.machine()}, {platform.node()}, {time.strftime('%Y-%m-%d')}"
            )
            print(f"{'streams':>8} {'ok':>5} {'errors':>7} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'wall s':>7}")
            held = 0
            for concurrency in (int(x) for x in args.levels.split(",")):
                ttfts, errors, elapsed = asyncio.run(level(mesh, concurrency, args.max_tokens))
                p50 = statistics.median(ttfts) if ttfts else float("nan")
                p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else float("nan")
                print(f"{concurrency:8d} {len(ttfts):5d} {len(errors):7d} {p50:12.0f} {p95:12.0f} {elapsed:7.1f}")
                if errors:
                    print(f"         first errors: {errors[:3]}")
                else:
                    held = concurrency
            print(f"\nconcurrent streams held without error: {held}")
        finally:
            stop_mesh(mesh)


if __name__ == "__main__":
    main()
