"""Time to first token and tokens/s: straight from llama-server vs through the mesh.

Starts its own mesh (`capibara up` on ports 28xxx, one llama-server) and, for the same prompt,
measures three paths, one request at a time:
  direct   llama-server: /v1/chat/completions (stream), what a hand-written client does
  rest     Envoy (HTTPS, HTTP/1.1) -> transcoder -> gateway -> inference -> llama-server, SSE
  grpc     Envoy (TLS, h2) -> gateway -> inference -> llama-server, native gRPC stream
  openai   Envoy (HTTPS, HTTP/1.1) -> transcoder (HttpBody) -> gateway -> inference -> llama-server,
           POST /v1/chat/completions with stream: true (OpenAI's SSE chunks)

    .venv/bin/python benchmarks/ttft.py [--runs 20] [--max-tokens 64]

Prints a table; this is a benchmark, not a test (figures depend on the machine).
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
import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.stubs import gateway_pb2, gateway_pb2_grpc
from tests.support.mesh import launched_model, running_mesh

PROMPT = "Explain in a few sentences why the sky is blue."
SYSTEM = "You are Capibara, a helpful assistant. Answer in the user's language."


class Sample:
    def __init__(self, ttft: float, duration: float, tokens: int):
        self.ttft, self.duration, self.tokens = ttft, duration, tokens

    @property
    def tokens_per_s(self) -> float:
        streaming = self.duration - self.ttft
        return (self.tokens - 1) / streaming if self.tokens > 1 and streaming > 0 else 0.0


async def direct(session: aiohttp.ClientSession, url: str, max_tokens: int) -> Sample:
    started = time.perf_counter()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0, "cache_prompt": True}
    first, tokens = None, 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
                event = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    tokens += 1
                    first = first or time.perf_counter()
    return Sample(first - started, time.perf_counter() - started, tokens)


async def rest(session: aiohttp.ClientSession, mesh, max_tokens: int) -> Sample:
    started = time.perf_counter()
    body = {"message": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    first, tokens = None, 0
    async with session.post(mesh.base_url + "/api/chat/stream", json=body, ssl=mesh.ssl_context()) as response:
        async for line in response.content:
            if line.startswith(b"data:") and b'"token"' in line:
                tokens += 1
                first = first or time.perf_counter()
    return Sample(first - started, time.perf_counter() - started, tokens)


async def openai_api(session: aiohttp.ClientSession, mesh, max_tokens: int) -> Sample:
    started = time.perf_counter()
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    first, tokens = None, 0
    async with session.post(mesh.base_url + "/v1/chat/completions", json=body, ssl=mesh.ssl_context()) as response:
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                tokens += 1
                first = first or time.perf_counter()
    return Sample(first - started, time.perf_counter() - started, tokens)


async def native_grpc(stub, max_tokens: int) -> Sample:
    started = time.perf_counter()
    first, tokens = None, 0
    request = gateway_pb2.ChatRequest(message=PROMPT, max_tokens=max_tokens, temperature=0)
    async for event in stub.Chat(request, timeout=120):
        if event.WhichOneof("event") == "token":
            tokens += 1
            first = first or time.perf_counter()
    return Sample(first - started, time.perf_counter() - started, tokens)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def measure(mesh, runs: int, max_tokens: int) -> dict[str, list[Sample]]:
    results: dict[str, list[Sample]] = {"direct": [], "rest": [], "grpc": [], "openai": []}
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())
    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.secure_channel(
            mesh.edge, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel,
    ):
        stub = gateway_pb2_grpc.ChatServiceStub(channel)
        url = mesh.backend_url("bench")
        # Warm up every path (connections, prompt cache).
        await direct(session, url, 4), await rest(session, mesh, 4), await native_grpc(stub, 4)
        await openai_api(session, mesh, 4)
        for _ in range(runs):  # interleaved, so drift on a noisy machine hits all paths alike
            results["direct"].append(await direct(session, url, max_tokens))
            results["rest"].append(await rest(session, mesh, max_tokens))
            results["grpc"].append(await native_grpc(stub, max_tokens))
            results["openai"].append(await openai_api(session, mesh, max_tokens))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with running_mesh(pathlib.Path(tmp), 28000, {"bench": launched_model(28080, threads=2)}, router=False) as mesh:
            results = asyncio.run(measure(mesh, args.runs, args.max_tokens))
    print(
        f"\nSmolLM2-135M Q4_1 on llama-server, {args.runs} runs per path, {args.max_tokens} tokens, "
        f"temperature 0, one request at a time; {platform.machine()}, {platform.node()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(f"{'path':8} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'tokens/s p50':>13} {'TTFT overhead ms':>17}")
    base = statistics.median(s.ttft for s in results["direct"]) * 1000
    for path, samples in results.items():
        ttfts = [s.ttft * 1000 for s in samples]
        p50 = statistics.median(ttfts)
        print(
            f"{path:8} {p50:12.1f} {percentile(ttfts, 0.9):12.1f} "
            f"{statistics.median(s.tokens_per_s for s in samples):13.1f} {p50 - base:17.1f}"
        )


if __name__ == "__main__":
    main()
