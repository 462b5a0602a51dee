"""gRPC face of the inference core: InferenceService and per-model health."""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from capibara_grpc import tracing
from capibara_grpc.chat import convert
from capibara_grpc.chat.request import resolve
from capibara_grpc.chat.types import SamplingParams
from capibara_grpc.health_names import model_health_name
from capibara_grpc.inference.core import InferenceEngine
from capibara_grpc.stubs import SERVICE_FULL_NAMES, inference_pb2, inference_pb2_grpc

SERVICE = SERVICE_FULL_NAMES["inference"]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: InferenceEngine):
        self.engine = engine

    async def Generate(self, request, context):
        stream = self.engine.generate(
            request.model_id,
            convert.messages_from_pb(request.messages),
            convert.params_from_pb(request.params),
            validated=tracing.validated(context.invocation_metadata()),
        )
        async for item in stream:
            yield convert.chunk_to_pb(item)

    async def ListModels(self, request, context):
        models = []
        for status in await self.engine.list_models():
            model = self.engine.config.model(status.model_id)
            models.append(
                inference_pb2.ModelInfo(
                    model_id=status.model_id,
                    backend_url=status.backend_url,
                    protocol=status.protocol,
                    chat_template=status.chat_template,
                    # What a request that sets nothing is resolved to.
                    defaults=convert.params_to_pb(resolve(SamplingParams(), model.defaults)),
                    healthy=status.healthy,
                    status=status.status,
                    context_window=status.context_window,
                )
            )
        return inference_pb2.ListModelsResponse(models=models)


def publish_health(engine: InferenceEngine, health) -> None:
    """Keep grpc.health.v1 in step with the backends: one entry per model, and the service
    SERVING while at least one model can answer."""

    async def update(statuses):
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for model_id, status in statuses.items():
            await health.set(model_health_name(model_id), serving if status.healthy else not_serving)
        overall = serving if any(s.healthy for s in statuses.values()) else not_serving
        await health.set(SERVICE, overall)

    engine.on_health_change(update)
