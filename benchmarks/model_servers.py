"""The mesh in front of each kind of model server: what each is sent, and what the mesh adds.

Starts the fakes of tests/support/fake_upstreams.py (a strict hosted API behind a key that
streams reasoning, vLLM, Ollama's /v1; each in its own wire format, 20 words at --token-delay-ms),
a real llama-server that the mesh launches and calls through `protocol: openai` and a /v1 base
URL, and a mesh (`capibara up` on ports 32xxx) in front of all four. For each, one request at a
time, the same streamed chat straight to the server and through the mesh's /v1 (Envoy, TLS,
gateway, context, inference): time to the first answer token and to the end, p50 of --runs, and
the difference (what the mesh adds). Then what the server was sent beyond the OpenAI API, and how
the mesh counted tokens and found the window.

    .venv/bin/python benchmarks/model_servers.py [--runs 30] [--token-delay-ms 5]

Prints tables; this is a benchmark, not a test (figures depend on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.support.fake_upstreams import FakeUpstream
from tests.support.mesh import launched_model, running_mesh

PORT_BASE = 32000
KEY = "sk-bench-7d1e2f3a4b5c6d"
OPENAI_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed"}
PROMPT = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"


async def stream_chat(session, url: str, body: dict, headers: dict, ssl=None) -> tuple[float, float, float]:
    """(first reasoning, first answer token, end) in seconds of one streamed chat."""
    started = time.perf_counter()
    first_thought = first_token = 0.0
    async with session.post(url, json=body, headers=headers, ssl=ssl) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or ():
                delta = choice.get("delta") or {}
                if not first_thought and (delta.get("reasoning_content") or delta.get("reasoning")):
                    first_thought = time.perf_counter() - started
                if not first_token and delta.get("content"):
                    first_token = time.perf_counter() - started
    return first_thought, first_token, time.perf_counter() - started


async def measure(mesh, model_id: str, direct_url: str, direct_headers: dict, server_model: str, runs: int):
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 40, "temperature": 0}
    mesh_url = mesh.base_url + "/v1/chat/completions"
    figures = {"direct": [], "mesh": []}
    async with aiohttp.ClientSession() as session:
        for i in range(runs + 2):  # two to warm up
            for path, url, model, headers, ssl in (
                ("direct", direct_url, server_model, direct_headers, None),
                ("mesh", mesh_url, model_id, {}, mesh.ssl_context()),
            ):
                # A distinct prompt each run: the mesh's cache is off, and llama-server's prompt
                # cache is reused the same way on both paths.
                sample = await stream_chat(session, url, {**body, "model": model, "seed": i}, headers, ssl)
                if i >= 2:
                    figures[path].append(sample)
    return {
        path: [statistics.median(s[k] for s in samples) * 1000 for k in range(3)] for path, samples in figures.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--token-delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    delay = args.token_delay_ms / 1000
    fakes = {
        "hosted": FakeUpstream(
            flavor="openai",
            api_key=KEY,
            models=["gpt-test"],
            reasoning="Let me think about the numbers first.",
            reasoning_field="reasoning_content",
            token_delay_s=delay,
        ),
        "vllm": FakeUpstream(flavor="vllm", api_key=KEY, models=["org/phi-3"], max_model_len=3072, token_delay_s=delay),
        "ollama": FakeUpstream(flavor="ollama", models=["mixtral:8x7b"], token_delay_s=delay),
    }
    for fake in fakes.values():
        fake.start()
    os.environ["BENCH_MODEL_KEY"] = KEY
    keyed = {"api_key_env": "BENCH_MODEL_KEY"}
    models = {
        "gpt-oss-20b": {
            "backend": {"url": fakes["hosted"].base_url, "protocol": "openai", "model_name": "gpt-test", **keyed}
        },
        "phi": {
            "backend": {
                "url": fakes["vllm"].base_url,
                "protocol": "openai",
                "server": "vllm",
                "model_name": "org/phi-3",
                **keyed,
            }
        },
        "mixtral": {
            "backend": {
                "url": fakes["ollama"].base_url,
                "protocol": "openai",
                "server": "ollama",
                "model_name": "mixtral:8x7b",
            },
            "context_window": 8192,
        },
        "local": {
            **launched_model(PORT_BASE + 80, protocol="openai", parallel=1),
            "backend": {"url": f"http://127.0.0.1:{PORT_BASE + 80}/v1", "protocol": "openai"},
        },
    }
    rows = [
        ("hosted API (strict, key)", "gpt-oss-20b", "hosted"),
        ("vLLM", "phi", "vllm"),
        ("Ollama /v1", "mixtral", "ollama"),
        ("llama-server, protocol openai, /v1", "local", None),
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp, running_mesh(pathlib.Path(tmp), PORT_BASE, models) as mesh:
            print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.runs} runs each, p50")
            print(f"\n{'server':36} {'path':7} {'1st reasoning':>13} {'1st token':>10} {'end':>9}")
            added = {}
            for name, model_id, fake in rows:
                if fake:
                    up = fakes[fake]
                    url, server_model = up.base_url + "/chat/completions", up.models[0]
                    headers = {"Authorization": f"Bearer {KEY}"} if fake != "ollama" else {}
                else:
                    url, headers, server_model = f"http://127.0.0.1:{PORT_BASE + 80}/v1/chat/completions", {}, "local"
                result = asyncio.run(measure(mesh, model_id, url, headers, server_model, args.runs))
                for path, (thought, token, end) in result.items():
                    print(f"{name:36} {path:7} {thought:11.1f}ms {token:8.1f}ms {end:7.1f}ms")
                added[name] = (result["mesh"][1] - result["direct"][1], result["mesh"][2] - result["direct"][2])
            print(f"\n{'server':36} {'added to 1st token':>18} {'added to end':>13}")
            for name, (token, end) in added.items():
                print(f"{name:36} {token:16.1f}ms {end:11.1f}ms")
            print(f"\n{'server':36} {'sent beyond OpenAI':28} {'tokens':12} {'window':>7}")
            status, listing, _ = mesh.request("GET", "/api/models")
            windows = {m["model_id"]: m.get("context_window", 0) for m in listing["models"]}
            for name, model_id, fake in rows:
                sent = (
                    ", ".join(sorted(set(fakes[fake].chat_requests()[-1].body) - OPENAI_FIELDS)) if fake else "(real)"
                )
                _, encoded, _ = mesh.request("POST", "/api/toon/encode", {"json": {"a": [1, 2]}, "model_id": model_id})
                counted = "estimated" if encoded.get("tokens_estimated") else "its tokenizer"
                print(f"{name:36} {sent or '-':28} {counted:12} {windows.get(model_id, 0):7}")
    finally:
        for fake in fakes.values():
            fake.stop()


if __name__ == "__main__":
    main()
