"""Aggregated mesh health from each service's grpc.health.v1."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from capibara_grpc.config import MeshConfig
from capibara_grpc.inference.servicer import model_health_name
from capibara_grpc.stubs import SERVICE_FULL_NAMES


@dataclass
class ServiceHealth:
    service: str
    status: str  # SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN or UNREACHABLE
    detail: str = ""


@dataclass
class HealthReport:
    services: list[ServiceHealth]

    @property
    def serving(self) -> bool:
        return all(s.status == "SERVING" for s in self.services)


class MeshHealth:
    def __init__(self, config: MeshConfig, services: list[str], channels: dict[str, list[grpc.aio.Channel]]):
        self.config = config
        self.services = services
        # Per service, one channel per replica: the service is SERVING while any replica is.
        self.channels = channels

    def _checks(self) -> list[tuple[str, str]]:
        """(service short name, grpc.health.v1 service name) pairs to check."""
        checks = [(name, SERVICE_FULL_NAMES[name]) for name in self.services]
        if "inference" in self.services:
            checks += [("inference", model_health_name(m)) for m in sorted(self.config.models)]
        return checks

    async def _check_replica(self, channel: grpc.aio.Channel, name: str) -> ServiceHealth:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name),
                                                                        timeout=2.0)
            return ServiceHealth(name, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.aio.AioRpcError as exc:
            status = "SERVICE_UNKNOWN" if exc.code() == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
            return ServiceHealth(name, status, exc.details() or exc.code().name)

    async def _check(self, service: str, name: str) -> ServiceHealth:
        replicas = await asyncio.gather(*(self._check_replica(c, name) for c in self.channels[service]))
        serving = [r for r in replicas if r.status == "SERVING"]
        if not serving:
            return replicas[0]
        down = len(replicas) - len(serving)
        return ServiceHealth(name, "SERVING", f"{down} of {len(replicas)} replicas down" if down else "")

    async def services_serving(self, services: tuple[str, ...]) -> bool:
        """Whether each of `services` that this mesh deploys says SERVING."""
        wanted = [s for s in services if s in self.services]
        results = await asyncio.gather(*(self._check(s, SERVICE_FULL_NAMES[s]) for s in wanted))
        return all(r.status == "SERVING" for r in results)

    async def check(self) -> HealthReport:
        results = await asyncio.gather(*(self._check(svc, name) for svc, name in self._checks()))
        return HealthReport(list(results))
