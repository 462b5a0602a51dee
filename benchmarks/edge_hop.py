"""Where a chat's CPU goes in the services' process: the chat itself against the gRPC call that
brings it in from Envoy (issue 29's CPU per chat goal).

In this one process, on uvloop as the mesh runs, against the peers benchmark's mock model server
(benchmarks/openai_mock.py, 8 tokens, no delay), 32 at once:
  1. a bare grpc.aio server (OpenAIService/ChatCompletions, h2load) whose handler answers at once,
     and one whose handler first makes an aiohttp call to the mock, as a chat does; and that aiohttp
     call alone: what grpc.aio costs per call when its handler yields to the event loop;
  2. every service of a mesh (router and cache off, no Envoy) started here (MeshServers): the same
     `/v1` chat called through a local channel (the services' own in-process path), then sent by
     h2load to the gateway's gRPC port. CPU is this process's utime+stime per chat.

    .venv/bin/python benchmarks/edge_hop.py [--chats 6000]

A benchmark, not a test: it prints figures for this machine (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import time

import aiohttp
import grpc
import uvloop
import yaml
from google.api import httpbody_pb2

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc import tracing
from capibara_grpc.config import load_config
from capibara_grpc.local_calls import LocalChannel
from capibara_grpc.server import MeshServers
from capibara_grpc.stubs import openai_pb2_grpc
from tests.support.mesh import mesh_config

BASE = 6300  # the mesh's ports; the mock on BASE + 90, the bare server on BASE + 91
IN_FLIGHT = 32
METHOD = "/capibara.gateway.v1.OpenAIService/ChatCompletions"
CHAT = {"model": "mock-8", "messages": [{"role": "user", "content": "Tell me one thing about capybaras."}]}
UPSTREAM_BODY = json.dumps({**CHAT, "stream": True}).encode()


def cpu_s() -> float:
    fields = pathlib.Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_frame(message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


async def h2load(port: int, frame: pathlib.Path, calls: int) -> float:
    """CPU of this process per call while h2load sends `calls` calls, 4 connections x 8 streams."""
    started = cpu_s()
    process = await asyncio.create_subprocess_exec(
        *("h2load", "-n", str(calls), "-c", "4", "-m", str(IN_FLIGHT // 4), "-d", str(frame)),
        *("-H", "content-type: application/grpc", "-H", "te: trailers", f"http://127.0.0.1:{port}{METHOD}"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if f"{calls} succeeded" not in out.decode():
        raise RuntimeError(f"h2load: not every call succeeded:\n{out.decode()}")
    return (cpu_s() - started) / calls * 1e6


async def concurrently(call, calls: int) -> float:
    """CPU of this process per call, `calls` calls IN_FLIGHT at a time."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await call()

    await worker(50)
    started = cpu_s()
    await asyncio.gather(*(worker(calls // IN_FLIGHT) for _ in range(IN_FLIGHT)))
    return (cpu_s() - started) / (calls // IN_FLIGHT * IN_FLIGHT) * 1e6


async def bare_server(directory: pathlib.Path, mock_url: str, calls: int) -> None:
    session = aiohttp.ClientSession()

    async def model_call() -> None:
        response = await session.post(
            f"{mock_url}/chat/completions", data=UPSTREAM_BODY, headers={"Content-Type": "application/json"}
        )
        async for _ in response.content.iter_any():
            pass
        response.close()

    class Servicer(openai_pb2_grpc.OpenAIServiceServicer):
        calls_model = False

        async def ChatCompletions(self, request, context):
            if self.calls_model:
                await model_call()
            await context.send_initial_metadata((("x-capibara-model", "mock-8"),))
            yield httpbody_pb2.HttpBody(content_type="application/json", data=b'{"object":"chat.completion"}')

    servicer = Servicer()
    server = grpc.aio.server()
    openai_pb2_grpc.add_OpenAIServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{BASE + 91}")
    await server.start()
    frame = directory / "empty.bin"
    frame.write_bytes(grpc_frame(httpbody_pb2.HttpBody(content_type="application/json", data=b"{}")))
    try:
        at_once = await h2load(port, frame, calls)
        servicer.calls_model = True
        with_call = await h2load(port, frame, calls)
        call_alone = await concurrently(model_call, calls)
    finally:
        await server.stop(None)
        await session.close()
    print(f"  grpc.aio server, handler that answers at once            {at_once:7.0f} us per call")
    print(f"  grpc.aio server, handler that calls the mock (aiohttp)   {with_call:7.0f} us per call")
    print(f"  that aiohttp call alone                                  {call_alone:7.0f} us per call")


async def mesh_in_process(directory: pathlib.Path, mock_url: str, calls: int) -> None:
    models = {
        "mock-8": {
            "backend": {"url": mock_url, "protocol": "openai", "server": "openai"},
            "max_concurrent": 2 * IN_FLIGHT,
        }
    }
    config_path = directory / "capibara.yaml"
    config_path.write_text(yaml.safe_dump(mesh_config(directory / "state", BASE, models, router=False)))
    config = load_config(str(config_path))
    servers = await MeshServers(config, config.deployed_services).start()
    body = httpbody_pb2.HttpBody(content_type="application/json", data=json.dumps(CHAT).encode())
    network = grpc.aio.insecure_channel(config.services.address("gateway"))
    stub = openai_pb2_grpc.OpenAIServiceStub(LocalChannel(servers.local_methods, network))

    async def chat() -> None:
        answer = [message async for message in stub.ChatCompletions(body, timeout=30)]
        if not answer or b"chat.completion" not in answer[-1].data:
            raise RuntimeError(f"no answer: {answer}")

    frame = directory / "chat.bin"
    frame.write_bytes(grpc_frame(body))
    try:
        local = await concurrently(chat, calls)
        over_grpc = await h2load(config.services.endpoint("gateway").port, frame, calls)
    finally:
        await network.close()
        await servers.stop()
    print(f"  the /v1 chat through a local channel (no gRPC server)    {local:7.0f} us per chat")
    print(f"  the same chat sent to the gateway's gRPC port (h2load)   {over_grpc:7.0f} us per chat")
    print(f"  so the gRPC call in from Envoy costs                     {over_grpc - local:7.0f} us per chat")


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-hop-") as tmp:
        directory = pathlib.Path(tmp)
        # As `capibara up` logs: JSON lines to stderr and a file (here both files).
        tracing.configure_logging(
            json_lines=True, stream=open(directory / "stderr.log", "w"), log_file=directory / "capibara.log"
        )
        mock_port = BASE + 90
        mock = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).with_name("openai_mock.py")), str(mock_port)],
            stdout=subprocess.PIPE,
        )
        try:
            mock.stdout.readline()  # it says when it listens
            mock_url = f"http://127.0.0.1:{mock_port}/v1"
            print(f"edge_hop.py: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
            await bare_server(directory, mock_url, calls)
            await mesh_in_process(directory, mock_url, calls)
        finally:
            mock.terminate()
            mock.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=6000, help="calls per figure (default 6000)")
    uvloop.run(main(parser.parse_args().chats))
