"""The router as seen by the gateway: a gRPC client returning plain Python."""

from __future__ import annotations

import grpc

from capibara_grpc.chat.types import RouteDecision
from capibara_grpc.stubs import router_pb2, router_pb2_grpc


class RouterClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = router_pb2_grpc.RouterServiceStub(channel)

    async def route(self, query: str, history: list[str], timeout_s: float, metadata=()) -> RouteDecision:
        response = await self.stub.Route(
            router_pb2.RouteRequest(query=query, history=history), timeout=timeout_s, metadata=metadata
        )
        return RouteDecision(
            model_id=response.model_id,
            route_name=response.route_name,
            confidence=response.confidence,
            fallback=response.fallback,
            reasoning=response.reasoning,
            scores=[(s.route_name, s.model_id, s.score) for s in response.scores],
        )

    async def embed(self, texts: list[str], timeout_s: float) -> tuple[list[list[float]], int, str]:
        """(one embedding per text, tokens counted, the encoder's name)."""
        response = await self.stub.Embed(router_pb2.EmbedRequest(texts=texts), timeout=timeout_s)
        return [list(e.values) for e in response.embeddings], response.tokens, response.model
