"""gRPC channels for the tests: TLS through the Envoy edge, or plaintext to one service."""

from __future__ import annotations

import grpc


def edge_channel(mesh) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.cert.read_bytes())
    return grpc.aio.secure_channel(mesh.edge, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


def service_channel(mesh, service: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(mesh.service_address(service))
