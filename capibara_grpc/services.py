"""The services of the mesh, each described once.

Everything else that lists services is derived from SERVICES: the `services.<name>` sections of
the configuration and their default ports, `capibara serve`'s choices, the stubs' full names and
proto modules, the order in which one process starts them, what the gateway needs to serve a chat,
Envoy's clusters, routes and rate-limit tiers, the Kubernetes Deployments.

Adding a service: its .proto under protos/capibara/<name>/v1/ (`make protos`), its code with an
`async def start(servers)` that builds its servicers and calls `servers.serve(...)` (see
capibara_grpc/router/wiring.py), and one row below.

This module imports nothing of the mesh: the configuration reads it, and so does every process.
Start functions are named as "module:function" strings and imported only when the service starts,
so the library never imports the gateway (a package of its own) nor torch where it is not needed.
"""

from __future__ import annotations

import functools
import importlib
import typing
from dataclasses import dataclass

CHAT, OTHER = "chat", "other"  # rate tiers: the keys of edge.rate_limit


@dataclass(frozen=True)
class Service:
    # Short name: `services.<name>` in the config, `capibara serve <name>`, Envoy's cluster.
    name: str
    # The gRPC service: Envoy's routes, grpc.health.v1 service name, reflection.
    full_name: str
    # Generated module of its messages and service (the package capibara_grpc.generated, from protos/).
    proto: str
    # Default of services.<name>.port (its metrics: port + 1000 unless services.<name>.metrics_port).
    port: int
    # One process starts its services by rank, lowest first: what the others call comes first.
    start_rank: int
    # "module:function" of `async def start(servers: MeshServers) -> None`, imported when it starts.
    start: str
    # Per-client limit at the edge (a key of edge.rate_limit): `chat` for calls that make a model
    # generate, `other` for the rest.
    rate_tier: str = OTHER
    # Without it the gateway cannot serve a chat (it says NOT_SERVING, /health 503); without any
    # other service a chat is only degraded.
    required_by_gateway: bool = False
    # Config switch (dotted path) that can leave the service out of the mesh; "" = always in.
    enabled_by: str = ""


SERVICES: tuple[Service, ...] = (
    Service(
        "gateway",
        "capibara.gateway.v1.ChatService",
        "capibara_grpc.generated.capibara.gateway.v1.gateway_pb2",
        50050,
        start_rank=60,
        start="capibara_gateway.wiring:start",
        rate_tier=CHAT,
    ),
    Service(
        "router",
        "capibara.router.v1.RouterService",
        "capibara_grpc.generated.capibara.router.v1.router_pb2",
        50051,
        start_rank=20,
        start="capibara_grpc.router.wiring:start",
        enabled_by="router.enabled",
    ),
    Service(
        "context",
        "capibara.context.v1.ContextService",
        "capibara_grpc.generated.capibara.context.v1.context_pb2",
        50052,
        start_rank=30,
        start="capibara_grpc.context.wiring:start",
        required_by_gateway=True,
    ),
    Service(
        "inference",
        "capibara.inference.v1.InferenceService",
        "capibara_grpc.generated.capibara.inference.v1.inference_pb2",
        50053,
        start_rank=10,
        start="capibara_grpc.inference.wiring:start",
        required_by_gateway=True,
    ),
    Service(
        "consensus",
        "capibara.consensus.v1.ConsensusService",
        "capibara_grpc.generated.capibara.consensus.v1.consensus_pb2",
        50054,
        start_rank=40,
        start="capibara_grpc.consensus.wiring:start",
        rate_tier=CHAT,
    ),
    Service(
        "speech",
        "capibara.speech.v1.SpeechService",
        "capibara_grpc.generated.capibara.speech.v1.speech_pb2",
        50055,
        start_rank=50,
        start="capibara_grpc.speech.wiring:start",
        enabled_by="speech.enabled",
    ),
)

SERVICE_NAMES: tuple[str, ...] = tuple(s.name for s in SERVICES)
BY_NAME: dict[str, Service] = {s.name: s for s in SERVICES}
# The services a chat cannot do without (besides the gateway itself).
REQUIRED_BY_GATEWAY: tuple[str, ...] = tuple(s.name for s in SERVICES if s.required_by_gateway)


def service(name: str) -> Service:
    """The row of `name`; KeyError naming the known services if there is none."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown service '{name}' (known: {', '.join(SERVICE_NAMES)})") from None


def start_order(names: typing.Iterable[str]) -> list[str]:
    """`names` in the order one process starts them."""
    return sorted(names, key=lambda name: service(name).start_rank)


def is_enabled(row: Service, config: object) -> bool:
    """Whether `config` (a MeshConfig) deploys the service: its enabled_by switch, if any, is on."""
    value = config
    for attribute in filter(None, row.enabled_by.split(".")):
        value = getattr(value, attribute)
    return bool(value)


@functools.cache
def start_function(name: str) -> typing.Callable[..., typing.Awaitable[None]]:
    """The service's start function, imported now (not before: it may import torch, or the gateway)."""
    module_name, _, function = service(name).start.partition(":")
    return getattr(importlib.import_module(module_name), function)
