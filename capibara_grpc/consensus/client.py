"""The consensus service as seen by the gateway."""

from __future__ import annotations

import grpc

from capibara_grpc.chat import convert as chat_convert
from capibara_grpc.chat.types import ConsensusAnswer, SamplingParams
from capibara_grpc.stubs import consensus_pb2, consensus_pb2_grpc
from capibara_grpc.tracing import VALIDATED


class ConsensusClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = consensus_pb2_grpc.ConsensusServiceStub(channel)

    async def decide(self, prompt: str, params: SamplingParams, timeout_s: float) -> ConsensusAnswer:
        response = await self.stub.Decide(
            consensus_pb2.DecideRequest(
                prompt=prompt, strategy=consensus_pb2.STRATEGY_VOTE, params=chat_convert.params_to_pb(params)
            ),
            timeout=timeout_s,
            metadata=VALIDATED,
        )
        final = response.final
        return ConsensusAnswer(
            text=final.text,
            chosen_model_id=final.chosen_model_id,
            agreement=final.agreement,
            reasoning=final.reasoning,
            scores=[(s.model_id, s.score) for s in final.scores],
            prompt_tokens=sum(c.usage.prompt_tokens for c in response.candidates),
            completion_tokens=sum(c.usage.completion_tokens for c in response.candidates),
        )
