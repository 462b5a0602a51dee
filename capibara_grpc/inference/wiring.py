"""How a process starts the inference service (its row in capibara_grpc/services.py names `start`)."""

from __future__ import annotations

from grpc_health.v1._async import HealthServicer

from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.inference.servicer import InferenceServicer, publish_health
from capibara_grpc.server import MeshServers
from capibara_grpc.stubs import inference_pb2_grpc


async def start(servers: MeshServers) -> None:
    engine = InferenceEngine(servers.config)
    # Its health is per model, published as the backends come and go.
    health = HealthServicer()
    publish_health(engine, health)
    await engine.start()
    servers.on_stop(engine.stop)
    servicer = InferenceServicer(engine)
    await servers.serve(
        "inference",
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
        health=health,
    )
