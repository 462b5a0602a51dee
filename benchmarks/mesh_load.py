"""Load for benchmarks/mesh_overhead.py, each in its own process: the no-op grpc.aio ceiling
service, and a grpc.aio load generator (h2load sends one body; this one cycles distinct Route
queries).

    .venv/bin/python benchmarks/mesh_load.py noop PORT
    .venv/bin/python benchmarks/mesh_load.py generate TARGET METHOD SECONDS IN_FLIGHT [CERT] [RATE]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pathlib
import signal
import statistics
import struct
import subprocess
import sys
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.router import evaluate
from capibara_grpc.stubs import router_pb2

NOOP_METHOD = "/capibara.bench.v1.Noop/Call"
CONNECTIONS = 4


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def distinct_queries() -> list[str]:
    texts = [q["text"] for q in evaluate.load_set(evaluate.DEFAULT_SET)]
    texts += [q["text"] for q in evaluate.load_set(evaluate.DEFAULT_SET.with_name("router_holdout.yaml"))]
    return list(dict.fromkeys(texts))


# -- the no-op ceiling service (its own process) ----------------------------------------------


async def serve_noop(port: int) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    async def call(request: bytes, context) -> bytes:
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "capibara.bench.v1.Noop", {"Call": grpc.unary_unary_rpc_method_handler(call)}
            )
        ]
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print("noop serving", flush=True)
    await server.wait_for_termination()


# -- grpc.aio load generator (its own process) --------------------------------------------------


async def generate_load(target: str, tls_cert: str, method: str, seconds: float, in_flight: int, rate: float) -> dict:
    """Closed loop, `in_flight` calls over 4 connections, each a distinct query (cycled); with
    `rate`, no faster than that many calls/s in all; SIGTERM ends it early (with its figures).
    Returns {"rps", "p50", "errors"}."""
    texts = distinct_queries()
    bodies = itertools.cycle([router_pb2.RouteRequest(query=t).SerializeToString() for t in texts])
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", "localhost")]
    if tls_cert:
        credentials = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(tls_cert).read_bytes())
        channels = [grpc.aio.secure_channel(target, credentials, options=options) for _ in range(CONNECTIONS)]
    else:
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(CONNECTIONS)]
    calls = [channel.unary_unary(method) for channel in channels]
    await asyncio.gather(*(call(next(bodies), timeout=10) for call in calls))  # connect first
    latencies, errors = [], 0
    started = time.perf_counter()
    stop_at = started + seconds
    sent = 0

    def stop() -> None:
        nonlocal stop_at
        stop_at = 0.0

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)

    async def worker(call):
        nonlocal errors, sent
        while (now := time.perf_counter()) < stop_at:
            if rate:
                due = started + sent / rate
                sent += 1
                if due > now:
                    await asyncio.sleep(due - now)
            began = time.perf_counter()
            try:
                await call(next(bodies), timeout=10)
                latencies.append(time.perf_counter() - began)
            except grpc.aio.AioRpcError:
                errors += 1

    await asyncio.gather(*(worker(calls[i % CONNECTIONS]) for i in range(in_flight)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    ms = sorted(x * 1000 for x in latencies)
    return {"rps": len(ms) / elapsed, "p50": statistics.median(ms) if ms else float("nan"), "errors": errors}


def load_process(target: str, method: str, seconds: float, in_flight: int, cert: str = "", rate: float = 0):
    argv = [sys.executable, __file__, "generate", target, method, str(seconds), str(in_flight), cert, str(rate)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def load_result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1] == "noop":
        asyncio.run(serve_noop(int(sys.argv[2])))
        return
    target, method, seconds, in_flight, cert, rate = (sys.argv[2:] + ["", "0"])[:6]
    print(json.dumps(asyncio.run(generate_load(target, cert, method, float(seconds), int(in_flight), float(rate)))))


if __name__ == "__main__":
    main()
