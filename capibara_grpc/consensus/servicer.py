"""gRPC face of the consensus core: ConsensusService (Combine streams, Decide answers once)."""

from __future__ import annotations

from capibara_grpc import tracing
from capibara_grpc.chat import convert as chat_convert
from capibara_grpc.chat.request import validate_params
from capibara_grpc.chat.types import Token
from capibara_grpc.consensus.core import (
    CandidateDone,
    CandidateFailed,
    ConsensusEngine,
    Final,
    Request,
    Started,
)
from capibara_grpc.errors import StreamError, remaining_s
from capibara_grpc.stubs import consensus_pb2 as pb
from capibara_grpc.stubs import consensus_pb2_grpc, inference_pb2
from capibara_grpc.telemetry import spans

STRATEGY_FROM_PB = {
    pb.STRATEGY_UNSPECIFIED: "vote",
    pb.STRATEGY_VOTE: "vote",
    pb.STRATEGY_WEIGHTED: "weighted",
    pb.STRATEGY_JUDGE: "judge",
    pb.STRATEGY_FUSE: "fuse",
    pb.STRATEGY_SELF_CONSISTENCY: "self_consistency",
}
STRATEGY_TO_PB = {v: k for k, v in STRATEGY_FROM_PB.items() if k != pb.STRATEGY_UNSPECIFIED}


def request_from_pb(request, context) -> Request:
    """CombineRequest and DecideRequest have the same fields. Their sampling parameters are
    validated here unless the gateway did (a chat with consensus)."""
    params = chat_convert.params_from_pb(request.params)
    if not tracing.validated(context.invocation_metadata()):
        validate_params(params)
    strategy = STRATEGY_FROM_PB.get(request.strategy, f"#{request.strategy}")
    if spans.recording():  # on the call's span (telemetry): which strategy, over which models
        spans.annotate({"capibara.consensus.strategy": strategy, "capibara.consensus.models": list(request.models)})
    return Request(
        prompt=request.prompt,
        models=list(request.models),
        strategy=strategy,
        quorum=request.quorum,
        per_model_timeout_s=request.per_model_timeout_ms / 1000,
        params=params,
        samples=request.samples,
    )


def candidate_done_to_pb(event: CandidateDone) -> pb.CandidateFinished:
    return pb.CandidateFinished(
        model_id=event.model_id,
        text=event.text,
        latency_ms=event.latency_ms,
        usage=chat_convert.usage_pb(event.prompt_tokens, event.completion_tokens),
    )


def final_to_pb(event: Final) -> pb.FinalAnswer:
    return pb.FinalAnswer(
        text=event.text,
        strategy=STRATEGY_TO_PB[event.strategy],
        agreement=event.agreement,
        scores=[pb.CandidateScore(model_id=m, score=s) for m, s in event.scores],
        chosen_model_id=event.chosen_model_id,
        reasoning=event.reasoning,
    )


def event_to_pb(event) -> pb.CombineResponse:
    if isinstance(event, Started):
        return pb.CombineResponse(started=pb.CandidateStarted(model_id=event.model_id))
    if isinstance(event, CandidateDone):
        return pb.CombineResponse(finished=candidate_done_to_pb(event))
    if isinstance(event, CandidateFailed):
        return pb.CombineResponse(
            failed=pb.CandidateFailed(model_id=event.model_id, code=event.code, message=event.message)
        )
    if isinstance(event, Token):
        return pb.CombineResponse(token=inference_pb2.TokenChunk(text=event.text, index=event.index))
    if isinstance(event, Final):
        return pb.CombineResponse(final=final_to_pb(event))
    if isinstance(event, StreamError):
        return pb.CombineResponse(error=pb.ConsensusError(code=event.code, message=event.message))
    raise TypeError(f"unknown consensus event {event!r}")


class ConsensusServicer(consensus_pb2_grpc.ConsensusServiceServicer):
    def __init__(self, engine: ConsensusEngine):
        self.engine = engine

    def _deadline(self, context) -> float:
        return remaining_s(context, self.engine.config.gateway.default_deadline_s)

    async def Combine(self, request, context):
        async for event in self.engine.combine(request_from_pb(request, context), self._deadline(context)):
            yield event_to_pb(event)

    async def Decide(self, request, context):
        response = pb.DecideResponse()
        async for event in self.engine.combine(request_from_pb(request, context), self._deadline(context)):
            if isinstance(event, CandidateDone):
                response.candidates.append(candidate_done_to_pb(event))
            elif isinstance(event, CandidateFailed):
                response.failures.append(
                    pb.CandidateFailed(model_id=event.model_id, code=event.code, message=event.message)
                )
            elif isinstance(event, Final):
                response.final.CopyFrom(final_to_pb(event))
            elif isinstance(event, StreamError):
                raise event.to_exception()
        return response
