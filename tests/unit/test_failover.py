"""The failover module on its own: candidate order, which failures move on, what the decision says."""

from __future__ import annotations

import grpc
import pytest
from capibara_gateway import failover
from capibara_gateway.events import RoutingDecision

from capibara_grpc import metrics
from capibara_grpc.errors import InvalidArgument, MeshError, NotFound, ResourceExhausted, Unavailable
from tests.unit.fakes import FakeModels, Model, collect, mesh_config

CONFIG = mesh_config()


def decision(model_id: str = "alpha", source: str = "router", next_best: list[str] | None = None) -> RoutingDecision:
    return RoutingDecision(model_id, "programming", 0.9, source, "router picked programming", next_best=next_best or [])


def test_a_named_model_is_the_only_candidate():
    assert failover.candidates(decision("alpha", source="request", next_best=["gamma"]), CONFIG.models) == ["alpha"]


def test_candidates_are_the_model_then_its_fallbacks_then_the_routers_next_best_once_each():
    order = failover.candidates(decision("alpha", next_best=["alpha", "gamma", "beta", "unknown"]), CONFIG.models)
    assert order == ["alpha", "beta", "gamma"]


def test_a_default_decision_fails_over_too():
    assert failover.candidates(decision("alpha", source="default"), CONFIG.models) == ["alpha", "beta"]


def opener(models: FakeModels):
    async def open_stream(model_id: str):
        return models.generate(model_id, [], None, 1.0)

    return open_stream


async def test_the_first_model_that_yields_answers_and_the_failed_ones_are_listed():
    models = FakeModels(
        alpha=Model(fail_first=Unavailable("alpha is down")),
        beta=Model(fail_first=ResourceExhausted("beta is full", retry_after_s=2)),
    )
    started = await failover.first_to_answer(["alpha", "beta", "gamma"], opener(models))
    assert started.model_id == "gamma"
    assert [(f.model_id, f.code) for f in started.failed] == [("alpha", "UNAVAILABLE"), ("beta", "RESOURCE_EXHAUSTED")]
    # The failed streams are closed at once; the answering one yields its first item again.
    assert models.closed == ["alpha", "beta"]
    items = await collect(started.stream)
    assert [i.text for i in items[:-1]] == ["Hola", ", ", "mundo"] and items[-1].model_id == "gamma"
    assert models.closed == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize(
    "error", [InvalidArgument("bad"), NotFound("no such"), MeshError("bug")], ids=["invalid", "not-found", "internal"]
)
async def test_only_failures_another_model_may_not_share_move_on(error):
    models = FakeModels(alpha=Model(fail_first=error))
    if error.code in failover.FAILOVER_CODES:
        assert (await failover.first_to_answer(["alpha", "beta"], opener(models))).model_id == "beta"
    else:
        with pytest.raises(MeshError) as raised:
            await failover.first_to_answer(["alpha", "beta"], opener(models))
        assert raised.value.code == error.code and models.called == ["alpha"]


async def test_a_deadline_is_not_failed_over():
    async def open_stream(model_id: str):
        raise TimeoutError()

    with pytest.raises(MeshError) as raised:
        await failover.first_to_answer(["alpha", "beta"], open_stream)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_when_every_candidate_fails_the_last_error_names_the_others():
    models = FakeModels(
        alpha=Model(fail_first=Unavailable("alpha is down")), beta=Model(fail_first=Unavailable("beta is down"))
    )
    with pytest.raises(MeshError) as raised:
        await failover.first_to_answer(["alpha", "beta"], opener(models))
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.message == "beta is down (after failing over from alpha (UNAVAILABLE: alpha is down))"


async def test_a_failure_while_opening_counts_like_one_while_reading():
    async def open_stream(model_id: str):
        if model_id == "alpha":
            raise Unavailable("enrich failed")
        return FakeModels().generate(model_id, [], None, 1.0)

    started = await failover.first_to_answer(["alpha", "beta"], open_stream)
    assert started.model_id == "beta" and started.failed[0].message == "enrich failed"


async def test_the_decision_says_what_happened_and_failovers_are_counted():
    counter = metrics.FAILOVERS.labels("alpha", "gamma")
    before = counter._value.get()
    models = FakeModels(alpha=Model(fail_first=Unavailable("alpha is down")))
    started = await failover.first_to_answer(["alpha", "gamma"], opener(models))
    routed = failover.decided(decision("alpha"), started)
    assert routed.model_id == "gamma" and routed.fallback and routed.failed_models == ["alpha"]
    assert routed.reasoning == ("router picked programming; failed over to gamma: alpha (UNAVAILABLE: alpha is down)")
    assert counter._value.get() == before + 1
    await started.stream.aclose()


async def test_no_failover_leaves_the_decision_as_it_was():
    started = await failover.first_to_answer(["alpha"], opener(FakeModels()))
    original = decision("alpha")
    assert failover.decided(original, started) is original
    await started.stream.aclose()
