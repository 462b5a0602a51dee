"""gRPC face of the router: RouterService, plus the model health it routes around."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from capibara_grpc.errors import InvalidArgument, Unimplemented
from capibara_grpc.health_names import model_health_name
from capibara_grpc.router.classifier import DEFAULT
from capibara_grpc.router.core import Router
from capibara_grpc.stubs import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class ModelHealthWatcher:
    """Reads each model's grpc.health.v1 status from the inference service every few seconds.
    A model whose health is unknown (inference unreachable) counts as healthy: rerouting on no
    information would only move traffic at random."""

    def __init__(self, channel: grpc.aio.Channel, model_ids: list[str], interval_s: float):
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.model_ids = model_ids
        self.interval_s = interval_s
        self.healthy: dict[str, bool] = {}
        self._task: asyncio.Task | None = None

    def is_healthy(self, model_id: str) -> bool:
        return self.healthy.get(model_id, True)

    async def refresh(self) -> None:
        for model_id in self.model_ids:
            try:
                response = await self.stub.Check(
                    health_pb2.HealthCheckRequest(service=model_health_name(model_id)), timeout=1.0
                )
                self.healthy[model_id] = response.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                self.healthy.pop(model_id, None)

    def start(self) -> None:
        async def loop():
            while True:
                await self.refresh()
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router, encoder=None):
        self.router = router
        self.encoder = encoder  # the SentenceEncoder the router scores with (Embed)

    async def Embed(self, request, context):
        texts = list(request.texts)
        if not texts or any(not t for t in texts):
            raise InvalidArgument("texts must be a non-empty list of non-empty strings")
        if self.encoder is None:
            raise Unimplemented("this router has no sentence encoder")
        vectors = await asyncio.to_thread(self.encoder.encode, texts)
        tokens = await asyncio.to_thread(self.encoder.count_tokens, texts)
        return router_pb2.EmbedResponse(
            embeddings=[router_pb2.Embedding(values=v.tolist()) for v in vectors],
            tokens=tokens,
            model=self.encoder.name,
        )

    async def Route(self, request, context):
        decision = await self.router.route(request.query, list(request.history))
        return router_pb2.RouteResponse(
            model_id=decision.model_id,
            route_name=decision.route_name,
            confidence=decision.confidence,
            scores=[router_pb2.RouteScore(route_name=r, model_id=m, score=s) for r, m, s in decision.scores],
            fallback=decision.fallback,
            reasoning=decision.reasoning,
        )

    async def ListRoutes(self, request, context):
        routes = self.router.routes
        return router_pb2.ListRoutesResponse(
            routes=[
                router_pb2.RouteDefinition(name=name, model_id=r.model, examples=r.examples, keywords=r.keywords)
                for name, r in routes.routes.items()
            ]
            + [
                router_pb2.RouteDefinition(
                    name=DEFAULT, model_id=routes.default.model, examples=routes.default.examples
                )
            ],
            default_route=DEFAULT,
        )
