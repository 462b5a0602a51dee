"""Load for benchmarks/mesh_overhead.py, each in its own process: the no-op grpc.aio ceiling
service, and a load generator that cycles distinct Route queries (h2load sends one body):
benchmarks/grpc_load.mjs, on Node's built-in http2, because the grpc.aio generator it replaced
used much of the machine's CPU itself and skewed the figures.

    .venv/bin/python benchmarks/mesh_load.py noop PORT
    node benchmarks/grpc_load.mjs TARGET METHOD SECONDS IN_FLIGHT CERT RATE BODIES_FILE

load_process starts the generator (writing its BODIES_FILE), load_result reads its figures.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from capibara_grpc.router import evaluate
from capibara_grpc.stubs import router_pb2

NOOP_METHOD = "/capibara.bench.v1.Noop/Call"
CONNECTIONS = 4  # grpc_load.mjs opens as many
GENERATOR = pathlib.Path(__file__).resolve().parent / "grpc_load.mjs"


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


# -- the load generator (grpc_load.mjs, its own process) ----------------------------------------


@functools.cache
def route_bodies() -> bytes:
    """Every distinct query as a framed RouteRequest, back to back: grpc_load.mjs sends them in turn."""
    return b"".join(grpc_frame(router_pb2.RouteRequest(query=t).SerializeToString()) for t in distinct_queries())


def remove_quietly(path: str) -> None:
    pathlib.Path(path).unlink(missing_ok=True)


def load_process(target: str, method: str, seconds: float, in_flight: int, cert: str = "", rate: float = 0):
    """Closed loop, `in_flight` calls over CONNECTIONS connections to `target` (TLS with the CA
    `cert`, else plaintext), each a distinct Route query (cycled); with `rate`, no faster than that
    many calls/s in all; terminate() ends it early (with its figures). Read them with load_result."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("benchmarks/grpc_load.mjs needs Node.js 18+ on PATH (Debian: apt-get install nodejs)")
    with tempfile.NamedTemporaryFile(prefix="grpc_load_", suffix=".bin", delete=False) as bodies:
        bodies.write(route_bodies())
    atexit.register(remove_quietly, bodies.name)  # if load_result never runs
    argv = [node, str(GENERATOR), target, method, str(seconds), str(in_flight), cert, str(rate), bodies.name]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    process.bodies_file = bodies.name
    return process


def load_result(process: subprocess.Popen) -> dict:
    """{"rps": ok calls/s, "p50": median ok latency in ms (nan without one), "errors": n}."""
    try:
        out, _ = process.communicate(timeout=120)
    finally:
        remove_quietly(process.bodies_file)
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"grpc_load.mjs exited {process.returncode} without figures (its stderr says why)")
    result = json.loads(lines[-1])
    if result["p50"] is None:  # no ok call: JSON has no NaN
        result["p50"] = float("nan")
    return result


def main() -> None:
    if sys.argv[1:2] != ["noop"] or len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(serve_noop(int(sys.argv[2])))


if __name__ == "__main__":
    main()
