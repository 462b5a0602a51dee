"""The one import point for the generated protobuf and gRPC stubs.

`make protos` (buf generate) writes them to capibara_grpc/generated/ with import paths rooted at
`capibara/...`, as protoc does; that folder is put on sys.path here so the generated modules can
import each other. Never edit the generated files: change protos/ and run `make protos`.
"""

import importlib
import pathlib
import sys

from capibara_grpc.services import SERVICES

_GENERATED = pathlib.Path(__file__).resolve().parent / "generated"
if not (_GENERATED / "capibara").is_dir():
    raise ImportError(f"generated stubs missing in {_GENERATED}: run `make protos`")
if str(_GENERATED) not in sys.path:
    sys.path.insert(0, str(_GENERATED))

# Imported by name for the code that uses them, after sys.path holds the generated folder (E402).
from capibara.consensus.v1 import consensus_pb2, consensus_pb2_grpc  # noqa: E402
from capibara.context.v1 import context_pb2, context_pb2_grpc  # noqa: E402
from capibara.gateway.v1 import gateway_pb2, gateway_pb2_grpc, openai_pb2, openai_pb2_grpc  # noqa: E402
from capibara.inference.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from capibara.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402
from capibara.speech.v1 import speech_pb2, speech_pb2_grpc  # noqa: E402

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
