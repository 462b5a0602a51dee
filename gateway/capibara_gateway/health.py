"""Aggregated mesh health from each service's grpc.health.v1.

`MeshHealth` asks every deployed service (and the inference service about each model); the
verdict over those answers is plain data (`HealthReport.verdict`), testable without gRPC:

- SERVING: every deployed service and every model is SERVING;
- DEGRADED: a chat can still be served (the gateway, the services it needs and at least one model
  are SERVING), but something is down: a model, or an optional service (router, consensus, speech);
- NOT_SERVING: no chat can be served: a service the gateway needs is down, or every model is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from capibara_grpc.config import MeshConfig
from capibara_grpc.health_names import model_health_name
from capibara_grpc.services import REQUIRED_BY_GATEWAY
from capibara_grpc.stubs import SERVICE_FULL_NAMES, inference_pb2, inference_pb2_grpc

SERVING = "SERVING"
DEGRADED = "DEGRADED"
NOT_SERVING = "NOT_SERVING"


@dataclass
class ServiceHealth:
    service: str  # grpc.health.v1 name: a service's full name, or InferenceService/<model id>
    status: str  # SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN or UNREACHABLE
    detail: str = ""

    @property
    def serving(self) -> bool:
        return self.status == SERVING

    def describe(self) -> str:
        return f"{self.service} {self.status}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Verdict:
    status: str  # SERVING, DEGRADED or NOT_SERVING
    # What is not SERVING, e.g. "capibara.inference.v1.InferenceService/phi NOT_SERVING (unreachable ...)".
    down: list[str] = field(default_factory=list)
    # Why no chat can be served (NOT_SERVING only).
    reason: str = ""

    @property
    def can_chat(self) -> bool:
        return self.status != NOT_SERVING

    @property
    def summary(self) -> str:
        """One line: the status, and why and what is down when it is not SERVING."""
        if self.status == SERVING:
            return "mesh is serving"
        head = f"mesh cannot serve chats ({self.reason})" if self.status == NOT_SERVING else "mesh is degraded"
        return f"{head}: " + "; ".join(self.down)


@dataclass
class HealthReport:
    # One entry per check: the deployed services, then the models.
    services: list[ServiceHealth]
    # grpc.health.v1 names of the services without which no chat can be served.
    required: Collection[str] = ()
    # grpc.health.v1 names of the models' entries.
    models: Collection[str] = ()

    @property
    def serving(self) -> bool:
        return all(s.serving for s in self.services)

    @property
    def verdict(self) -> Verdict:
        down = [s for s in self.services if not s.serving]
        described = [s.describe() for s in down]
        if not down:
            return Verdict(SERVING)
        # (With every model down the inference service, and so the gateway, are NOT_SERVING too.)
        if not any(s.serving for s in self.services if s.service in self.models):
            return Verdict(NOT_SERVING, described, "every model is down")
        if any(s.service in self.required for s in down):
            return Verdict(NOT_SERVING, described, "a service that chats need is down")
        return Verdict(DEGRADED, described)


def required_services(services: Collection[str]) -> list[str]:
    """grpc.health.v1 names of the deployed services a chat cannot do without: the gateway itself
    (NOT_SERVING while it drains) and the services it needs."""
    return [SERVICE_FULL_NAMES[s] for s in ("gateway", *REQUIRED_BY_GATEWAY) if s in services]


class MeshHealth:
    def __init__(self, config: MeshConfig, services: list[str], channels: dict[str, list[grpc.aio.Channel]]):
        self.config = config
        self.services = services
        # Per service, one channel per replica: the service is SERVING while any replica is.
        self.channels = channels

    def _models(self) -> list[str]:
        return [model_health_name(m) for m in sorted(self.config.models)] if "inference" in self.services else []

    def _checks(self) -> list[tuple[str, str]]:
        """(service short name, grpc.health.v1 service name) pairs to check."""
        return [(name, SERVICE_FULL_NAMES[name]) for name in self.services] + [("inference", m) for m in self._models()]

    async def _check_replica(self, channel: grpc.aio.Channel, name: str) -> ServiceHealth:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=2.0
            )
            return ServiceHealth(name, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.aio.AioRpcError as exc:
            status = "SERVICE_UNKNOWN" if exc.code() == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
            return ServiceHealth(name, status, exc.details() or exc.code().name)

    async def _check(self, service: str, name: str) -> ServiceHealth:
        replicas = await asyncio.gather(*(self._check_replica(c, name) for c in self.channels[service]))
        serving = [r for r in replicas if r.serving]
        if not serving:
            return replicas[0]
        down = len(replicas) - len(serving)
        return ServiceHealth(name, SERVING, f"{down} of {len(replicas)} replicas down" if down else "")

    async def services_serving(self, services: tuple[str, ...]) -> bool:
        """Whether each of `services` that this mesh deploys says SERVING."""
        wanted = [s for s in services if s in self.services]
        results = await asyncio.gather(*(self._check(s, SERVICE_FULL_NAMES[s]) for s in wanted))
        return all(r.serving for r in results)

    async def _model_reasons(self) -> dict[str, str]:
        """Each model's status as the inference service last probed it ("unreachable (...)", the
        backend's error): best effort, from the first replica that answers in time."""
        for channel in self.channels.get("inference", []):
            try:
                reply = await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
                    inference_pb2.ListModelsRequest(), timeout=2.0
                )
            except grpc.aio.AioRpcError:
                continue
            return {model_health_name(m.model_id): m.status for m in reply.models if not m.healthy and m.status}
        return {}

    async def check(self) -> HealthReport:
        results = list(await asyncio.gather(*(self._check(svc, name) for svc, name in self._checks())))
        models = self._models()
        # Say why a model is down, when its backend was probed (NOT_SERVING, not UNREACHABLE).
        if any(r.service in models and r.status == NOT_SERVING and not r.detail for r in results):
            reasons = await self._model_reasons()
            for result in results:
                if result.service in reasons and result.status == NOT_SERVING and not result.detail:
                    result.detail = reasons[result.service]
        return HealthReport(results, required_services(self.services), models)
