"""The one import point for the generated protobuf and gRPC stubs.

They are the package capibara_grpc.generated (capibara_grpc/generated/capibara/<svc>/v1/), written
from protos/ by `make protos` (buf generate) or by the wheel build (setup.py), with their imports
of each other rooted there (tools/grpc_tools_plugin.py). Never edit the generated files: change
protos/ and run `make protos`.
"""

import importlib

from capibara_grpc.services import SERVICES

try:
    from capibara_grpc.generated.capibara.consensus.v1 import consensus_pb2, consensus_pb2_grpc
    from capibara_grpc.generated.capibara.context.v1 import context_pb2, context_pb2_grpc
    from capibara_grpc.generated.capibara.gateway.v1 import (
        gateway_pb2,
        gateway_pb2_grpc,
        openai_pb2,
        openai_pb2_grpc,
    )
    from capibara_grpc.generated.capibara.inference.v1 import inference_pb2, inference_pb2_grpc
    from capibara_grpc.generated.capibara.router.v1 import router_pb2, router_pb2_grpc
    from capibara_grpc.generated.capibara.speech.v1 import speech_pb2, speech_pb2_grpc
except ModuleNotFoundError as exc:
    # A stub module missing means not generated; `capibara` missing, stubs generated before they
    # were a package (imports rooted at capibara.*). grpc or protobuf missing says so itself.
    name = exc.name or ""
    if not (name.startswith("capibara_grpc.generated") or name == "capibara" or name.startswith("capibara.")):
        raise
    raise ImportError(
        f"generated stubs missing or stale ({name}): run `make protos` in a checkout (or reinstall the package)"
    ) from exc

# Full names and proto modules of the services, in the table's order (capibara_grpc/services.py).
SERVICE_FULL_NAMES = {s.name: s.full_name for s in SERVICES}
# The gateway's second service: the mesh's health, behind GET /health.
MESH_SERVICE = "capibara.gateway.v1.MeshService"
# The gateway's third: the OpenAI-compatible API (/v1/...), OpenAI's JSON carried raw in HttpBody.
OPENAI_SERVICE = "capibara.gateway.v1.OpenAIService"
# The gateway's services besides ChatService, routed by Envoy to the gateway's cluster.
GATEWAY_EXTRA_SERVICES = (MESH_SERVICE, OPENAI_SERVICE)
PROTO_MODULES = tuple(importlib.import_module(s.proto) for s in SERVICES)
# Every proto module with a service the edge serves: the transcoder's descriptor set, the REST rules.
API_MODULES = (*PROTO_MODULES, openai_pb2)

__all__ = [
    "consensus_pb2",
    "consensus_pb2_grpc",
    "context_pb2",
    "context_pb2_grpc",
    "gateway_pb2",
    "gateway_pb2_grpc",
    "openai_pb2",
    "openai_pb2_grpc",
    "inference_pb2",
    "inference_pb2_grpc",
    "router_pb2",
    "router_pb2_grpc",
    "speech_pb2",
    "speech_pb2_grpc",
    "SERVICE_FULL_NAMES",
    "MESH_SERVICE",
    "OPENAI_SERVICE",
    "GATEWAY_EXTRA_SERVICES",
    "PROTO_MODULES",
    "API_MODULES",
]
