"""gRPC channels for the tests: TLS through the Envoy edge, or plaintext to one service."""

from __future__ import annotations

import grpc

# Greedy decoding of this prompt runs to max_tokens on the shipped SmolLM2 (no early end-of-sequence),
# so the generation is surely still running when the client leaves.
LONG = {"message": "Count from 1 to 1000, separated by commas.", "max_tokens": 1500, "temperature": 0, "repeat_penalty": 1.0}


def edge_channel(mesh) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())
    return grpc.aio.secure_channel(mesh.edge, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


def service_channel(mesh, service: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(mesh.service_address(service))
