"""The inference service as seen by other services: a gRPC client yielding plain Python."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from capibara_grpc.chat import convert as chat_convert
from capibara_grpc.chat.types import Finished, Message, SamplingParams, Token
from capibara_grpc.stubs import inference_pb2, inference_pb2_grpc
from capibara_grpc.tracing import VALIDATED


class InferenceClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def generate(
        self, model_id: str, messages: list[Message], params: SamplingParams, timeout_s: float
    ) -> AsyncIterator[Token | Finished]:
        call = self.stub.Generate(
            inference_pb2.GenerateRequest(
                model_id=model_id,
                messages=chat_convert.messages_to_pb(messages),
                params=chat_convert.params_to_pb(params),
            ),
            timeout=timeout_s,
            # The caller (gateway, consensus) validated and resolved the request.
            metadata=VALIDATED,
        )
        try:
            async for response in call:
                if response.HasField("done"):
                    # The last message: the call is read to its end (its status) before the
                    # caller, who stops listening here, gets it. In this process that runs the
                    # handler's own end (its slot freed, its call counted OK, not cancelled).
                    async for _ in call:
                        pass
                yield chat_convert.chunk_from_pb(response)
        finally:
            # Ends the upstream generation when our caller stops listening (client gone).
            call.cancel()
