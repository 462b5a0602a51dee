"""Failover: when a model cannot start an answer, the next candidate answers instead.

Rules:
- only before the first token: once a model has produced something, it is never switched (a
  later failure is the stream's in-band error);
- only for failures another model may not share (FAILOVER_CODES: the backend is down, full or
  broken); bad input, an unknown model or a deadline fail the request at once;
- a model the request named is the only candidate: it never fails over;
- otherwise the order is the decision's model, its configured fallbacks, then the router's other
  models best first;
- the routing decision then says what happened: fallback, the failed models, and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import (
    Generic,
    TypeVar,
)

import grpc

from capibara_gateway.events import RoutingDecision
from capibara_grpc import metrics
from capibara_grpc.config import ModelConfig
from capibara_grpc.errors import to_mesh_error

# Failures of a model that another model may not share: its backend is down, full or broken.
FAILOVER_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)

Item = TypeVar("Item")
# model id -> that model's answer stream (opening may already fail, e.g. enriching the prompt)
OpenFn = Callable[[str], Awaitable[AsyncGenerator[Item, None]]]


def candidates(decision: RoutingDecision, models: Mapping[str, ModelConfig]) -> list[str]:
    """Models to try in order: the decision's, its configured fallbacks, then the router's
    next-best; each once, and only configured ones. A model the request named is the only one."""
    if decision.source == "request":
        return [decision.model_id]
    order = [decision.model_id, *models[decision.model_id].fallbacks, *decision.next_best]
    return [m for m in dict.fromkeys(order) if m in models]


@dataclass
class Failed:
    """A candidate that failed before its first token."""

    model_id: str
    code: str  # gRPC status name
    message: str

    def describe(self) -> str:
        return f"{self.model_id} ({self.code}: {self.message})"


@dataclass
class Started(Generic[Item]):
    """The candidate that answered: its stream (the first item again, then the rest) and the
    candidates that failed before it."""

    model_id: str
    stream: AsyncGenerator[Item, None]
    failed: list[Failed]


async def first_to_answer(models: list[str], open_stream: OpenFn[Item]) -> Started[Item]:
    """Open each model in turn until one yields its first item. Raises the last model's error,
    or the first error that failover cannot help with, naming the models that failed before."""
    failed: list[Failed] = []
    for attempt, model_id in enumerate(models):
        stream = None
        try:
            stream = await open_stream(model_id)
            first = await anext(stream)
        except Exception as exc:
            if stream is not None:
                await stream.aclose()
            error = to_mesh_error(exc, f"model {model_id}")
            if error.code not in FAILOVER_CODES or attempt == len(models) - 1:
                if failed:
                    error.message += f" (after failing over from {', '.join(f.describe() for f in failed)})"
                raise error from exc
            failed.append(Failed(model_id, error.code.name, error.message))
            continue
        return Started(model_id, _again(first, stream), failed)
    raise ValueError("no candidate model")


def decided(decision: RoutingDecision, started: Started) -> RoutingDecision:
    """The decision as it was carried out: unchanged, or naming the model that answered, the
    ones that failed and why. Failovers are counted (capibara_failovers_total)."""
    if not started.failed:
        return decision
    for failure in started.failed:
        metrics.FAILOVERS.labels(failure.model_id, started.model_id).inc()
    return dataclasses.replace(
        decision,
        model_id=started.model_id,
        fallback=True,
        failed_models=[f.model_id for f in started.failed],
        reasoning=f"{decision.reasoning}; failed over to {started.model_id}: "
        + "; ".join(f.describe() for f in started.failed),
    )


async def _again(first: Item, rest: AsyncGenerator[Item, None]) -> AsyncIterator[Item]:
    """`first`, then the rest of the stream it was read from; closing this closes that stream."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()
