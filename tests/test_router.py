"""Router: accuracy on queries it has never seen, calibration, decisions, follow-ups, bad input.

Two labelled sets, both written without sight of config/routes.yaml: router_eval.yaml (260
queries) and router_holdout.yaml (138 queries, never used to tune the routes file).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from capibara_grpc.config import load_config
from capibara_grpc.router import evaluate
from capibara_grpc.router.core import Router
from capibara_grpc.stubs import router_pb2, router_pb2_grpc
from tests.support.channels import edge_channel
from tests.support.routes import ARCHITECTURE_DEFAULT_MODEL, ARCHITECTURE_ROUTES

HOLDOUT = evaluate.DEFAULT_SET.with_name("router_holdout.yaml")


@pytest.fixture(scope="module")
def router() -> Router:
    return evaluate.build_router(load_config())


@pytest.fixture(scope="module")
def results(router):
    return {
        name: asyncio.run(evaluate.evaluate(router, evaluate.load_set(path)))
        for name, path in (("eval", evaluate.DEFAULT_SET), ("holdout", HOLDOUT))
    }


def test_evaluation_sets_share_no_query_with_the_route_examples(router):
    for path in (evaluate.DEFAULT_SET, HOLDOUT):
        queries = evaluate.load_set(path)
        assert evaluate.leaked_examples(router, queries) == []
        assert len(queries) >= 138
        assert sum(q["lang"] == "es" for q in queries) >= len(queries) / 2


@pytest.mark.parametrize("name, bar", [("eval", 0.95), ("holdout", 0.93)])
def test_accuracy_on_unseen_queries_stays_above_the_bar(results, name, bar):
    evaluation = results[name]
    assert evaluation.accuracy() >= bar, evaluation.report()
    for lang in ("es", "en"):
        subset = [o for o in evaluation.outcomes if o.lang == lang]
        assert evaluation.accuracy(subset) >= bar - 0.03, lang


@pytest.mark.parametrize("name", ["eval", "holdout"])
def test_confidence_is_calibrated(results, name):
    evaluation = results[name]
    right_at_08, count = evaluation.accuracy_at(0.8)
    assert count >= 0.7 * len(evaluation.outcomes)
    assert right_at_08 >= 0.9
    low = [o for o in evaluation.outcomes if o.confidence < 0.7]
    # Less sure means less often right.
    assert evaluation.accuracy(low) < right_at_08


@pytest.mark.parametrize(
    "query, route",
    [
        ("escribe una funcion en go que lea un archivo linea por linea", "programming"),
        ("How do I undo git add before commit?", "programming"),
        ("hazme un poema de amor para mi novia", "creative_writing"),
        ("Write a limerick about a sleepy dog", "creative_writing"),
        ("cual es la capital de noruega", "quick_facts"),
        ("Who discovered gravity?", "quick_facts"),
        ("ventajas y desventajas de la energia eolica", "analysis"),
        ("Compare the economies of Japan and Germany", "analysis"),
        ("hola! como va todo?", "conversation"),
        ("thank you so much, you're great", "conversation"),
        ("resuelve x^2 - 4x + 4 = 0", "math"),
        ("What is 12% of 350?", "math"),
        ("como se dice 'mesa' en aleman", "translation"),
        ("Translate 'see you tomorrow' into Italian", "translation"),
    ],
)
async def test_clear_cases_through_the_rest_api(mesh, query, route):
    status, decision, _ = await asyncio.to_thread(mesh.request, "POST", "/api/router/test", {"query": query})
    assert status == 200, decision
    assert decision["route_name"] == route, decision
    assert decision["fallback"] is False and decision["confidence"] >= 0.5
    assert {s["route_name"] for s in decision["scores"]} >= {
        "programming",
        "creative_writing",
        "quick_facts",
        "analysis",
        "conversation",
        "math",
        "translation",
    }
    assert abs(sum(s["score"] for s in decision["scores"]) - 1.0) < 1e-3
    assert route in decision["reasoning"]


@pytest.mark.parametrize("query", ["asdkjh", "🙂🙂🙂", "qwpoeiru zmxncb", "!!!"])
def test_noise_goes_to_the_default_route_with_low_confidence(mesh, query):
    status, decision, _ = mesh.request("POST", "/api/router/test", {"query": query})
    assert status == 200, decision
    assert decision["route_name"] == "default" and decision["fallback"] is True
    assert decision["model_id"] == "gpt-oss-20b"
    assert decision["confidence"] < 0.5
    assert "default route" in decision["reasoning"]


def test_empty_query_is_invalid_argument(mesh):
    status, error, _ = mesh.request("POST", "/api/router/test", {"query": "   "})
    assert status == 400 and "empty" in error["message"]


def test_a_very_long_query_is_truncated_not_rejected(mesh):
    query = "Escribe un poema sobre el mar y las olas. " * 2000  # ~84 KB
    status, decision, _ = mesh.request("POST", "/api/router/test", {"query": query})
    assert status == 200, decision
    assert decision["route_name"] == "creative_writing"


def test_list_routes_shows_every_route_with_its_model(mesh):
    status, body, _ = mesh.request("GET", "/api/router/routes")
    assert status == 200
    routes = {r["name"]: r for r in body["routes"]}
    expected = {**ARCHITECTURE_ROUTES, "default": ARCHITECTURE_DEFAULT_MODEL}
    assert {name: r["model_id"] for name, r in routes.items()} == expected
    assert body["default_route"] == "default"
    assert all(len(r["examples"]) >= 3 for r in routes.values())


@pytest.mark.parametrize(
    "history, query, route",
    [
        (["cómo ordeno una lista en Python"], "¿y en Java?", "programming"),
        (["tell me a joke about cats"], "another one please", "creative_writing"),
        (["traduce 'buenas noches' al inglés"], "y al francés?", "translation"),
        (["escribe un poema sobre la lluvia"], "otro mas corto", "creative_writing"),
        # A clear new question is not pulled into the old route.
        (["cómo ordeno una lista en Python"], "¿Cuál es la capital de Perú?", "quick_facts"),
        (["cómo ordeno una lista en Python"], "calcula el 15% de 80", "math"),
        (["hola, qué tal"], "y cuanto es 7 por 8?", "math"),
    ],
)
async def test_short_follow_ups_keep_the_conversations_route(mesh, history, query, route):
    async with edge_channel(mesh) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        decision = await stub.Route(router_pb2.RouteRequest(query=query, history=history), timeout=10)
    assert decision.route_name == route, decision


async def test_an_unhealthy_model_is_replaced_by_the_next_best_healthy_one(router):
    poem = "write a poem about the autumn leaves"
    healthy = await router.route(poem)
    assert (healthy.route_name, healthy.model_id) == ("creative_writing", "mixtral")
    router.is_healthy = lambda model_id: model_id != "mixtral"
    try:
        rerouted = await router.route(poem)
    finally:
        router.is_healthy = lambda model_id: True
    assert rerouted.model_id != "mixtral"
    assert rerouted.route_name == next(r for r, m, _ in healthy.scores if m != "mixtral")
    assert "'mixtral' is unavailable" in rerouted.reasoning


def test_chat_uses_the_router_and_keeps_a_conversations_route(mesh):
    first = mesh.request(
        "POST",
        "/api/chat",
        {"message": "tell me a joke about cats", "conversation_id": "c-42", "max_tokens": 5, "temperature": 0},
    )[1]
    assert first["routing"]["source"] == "router" and first["routing"]["route_name"] == "creative_writing"
    follow_up = mesh.request(
        "POST",
        "/api/chat",
        {"message": "another one please", "conversation_id": "c-42", "max_tokens": 5, "temperature": 0},
    )[1]
    assert follow_up["routing"]["route_name"] == "creative_writing", follow_up["routing"]
    assert follow_up["model_id"] == "mixtral"
    alone = mesh.request("POST", "/api/chat", {"message": "another one please", "max_tokens": 5, "temperature": 0})[1]
    assert alone["routing"]["route_name"] != "creative_writing"


def test_use_router_false_and_explicit_models_skip_the_router(mesh):
    skipped = mesh.request("POST", "/api/chat", {"message": "write a poem", "use_router": False, "max_tokens": 3})[1]
    assert skipped["routing"]["source"] == "default" and skipped["model_id"] == "gpt-oss-20b"
    named = mesh.request("POST", "/api/chat", {"message": "write a poem", "model": "phi", "max_tokens": 3})[1]
    assert named["routing"]["source"] == "request" and named["model_id"] == "phi"


async def test_router_rejects_empty_query_over_grpc(mesh):
    async with edge_channel(mesh) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Route(router_pb2.RouteRequest(query=""), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_queries_are_scored_in_batches(router):
    queries = [f"translate 'number {i}' into French" for i in range(32)]
    before = router.batcher.batches
    decisions = await asyncio.gather(*(router.route(q) for q in queries))
    assert all(d.route_name == "translation" for d in decisions)
    assert router.batcher.batches - before <= 4  # 32 concurrent queries, a handful of scoring calls
