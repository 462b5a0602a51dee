"""Consensus over the real llama-servers: every strategy, streaming, quorum, deadlines, bad input."""

from __future__ import annotations

import asyncio

import pytest

from capibara_grpc.consensus.core import final_answer_key
from capibara_grpc.stubs import consensus_pb2, consensus_pb2_grpc, inference_pb2
from tests.support.channels import edge_channel
from tests.support.llama_slots import LONG, wait_until_idle
from tests.support.sse import read_events

MODELS = ["gpt-oss-20b", "phi", "mixtral"]
# Same GGUF behind every model and greedy decoding: the three answers are the same.
GREEDY = {"max_tokens": 16, "temperature": 0, "repeat_penalty": 1.1}


def decide(mesh, **body):
    return mesh.request(
        "POST",
        "/api/consensus",
        {"prompt": "What is the capital of France?", "models": MODELS, "params": GREEDY, **body},
    )


@pytest.mark.parametrize("strategy", ["STRATEGY_VOTE", "STRATEGY_WEIGHTED"])
def test_identical_answers_agree_fully(mesh, strategy):
    status, body, _ = decide(mesh, strategy=strategy)
    assert status == 200, body
    final, candidates = body["final"], body["candidates"]
    assert {c["model_id"] for c in candidates} == set(MODELS) and body["failures"] == []
    assert final["strategy"] == strategy and final["agreement"] == pytest.approx(1.0)
    assert final["text"] in {c["text"] for c in candidates} and final["chosen_model_id"] in MODELS
    assert {s["model_id"] for s in final["scores"]} == set(MODELS)
    assert all(c["usage"]["completion_tokens"] > 0 and c["latency_ms"] > 0 for c in candidates)


def test_vote_groups_different_answers_and_reports_the_share(mesh):
    # Different sampling per model makes different answers; agreement is a share of 3.
    status, body, _ = decide(
        mesh,
        strategy="STRATEGY_VOTE",
        prompt="Invent a name for a cat.",
        params={"max_tokens": 12, "temperature": 1.5, "seed": 7},
    )
    assert status == 200, body
    agreement = body["final"]["agreement"]
    assert any(abs(agreement - k / 3) < 1e-6 for k in (1, 2, 3))
    assert body["final"]["text"] in {c["text"] for c in body["candidates"]}
    assert "of 3 answers agree" in body["final"]["reasoning"]


def test_judge_picks_a_candidate_or_falls_back_to_vote_and_says_so(mesh):
    status, body, _ = decide(mesh, strategy="STRATEGY_JUDGE")
    assert status == 200, body
    final = body["final"]
    assert final["strategy"] == "STRATEGY_JUDGE"
    assert final["text"] in {c["text"] for c in body["candidates"]}
    assert final["reasoning"].startswith("judge gpt-oss-20b")
    assert "picked answer" in final["reasoning"] or "fell back to vote" in final["reasoning"]


async def test_fuse_streams_the_combined_answer(mesh):
    status, events, content_type = await read_events(
        mesh,
        "/api/consensus/stream",
        {"prompt": "Name two rivers of Europe.", "models": MODELS, "strategy": "STRATEGY_FUSE", "params": GREEDY},
    )
    assert status == 200 and content_type == "text/event-stream"
    kinds = [next(iter(e)) for _, e in events]
    assert kinds[:3] == ["started"] * 3
    assert kinds.count("finished") == 3 and kinds[-1] == "final"
    assert "token" in kinds and kinds.index("token") > max(i for i, k in enumerate(kinds) if k == "finished")
    final = events[-1][1]["final"]
    streamed = "".join(e["token"]["text"] for _, e in events if "token" in e)
    assert final["text"] == streamed and final["strategy"] == "STRATEGY_FUSE"
    assert final["chosen_model_id"] == "gpt-oss-20b"  # the aggregator


def test_self_consistency_takes_the_majority_final_answer(mesh):
    status, body, _ = mesh.request(
        "POST",
        "/api/consensus",
        {
            "prompt": "What is 6 times 7? Answer with the number only.",
            "models": ["phi"],
            "strategy": "STRATEGY_SELF_CONSISTENCY",
            "samples": 4,
            "params": {"max_tokens": 8, "temperature": 0.9},
        },
    )
    assert status == 200, body
    candidates = body["candidates"]
    assert len(candidates) == 4 and {c["model_id"] for c in candidates} == {f"phi#{i}" for i in range(1, 5)}
    keys = [final_answer_key(c["text"]) for c in candidates]
    winner = final_answer_key(body["final"]["text"])
    assert body["final"]["agreement"] == pytest.approx(keys.count(winner) / 4)
    assert keys.count(winner) == max(keys.count(k) for k in keys)


def test_final_answers_compare_numbers_as_numbers():
    assert final_answer_key("The answer is 42.") == final_answer_key("42,0") == final_answer_key("= 42.00")
    assert final_answer_key("París") == final_answer_key("paris!")


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"prompt": " "}, 400, "prompt: must not be empty"),
        ({"prompt": "hola", "models": ["gpt-5"]}, 404, "unknown model 'gpt-5'"),
        ({"prompt": "hola", "models": ["phi", "mixtral"], "quorum": 3}, 400, "quorum 3 is larger"),
        (
            {"prompt": "hola", "models": ["phi"], "strategy": "STRATEGY_SELF_CONSISTENCY", "samples": 1},
            400,
            "between 2 and",
        ),
        ({"prompt": "hola", "strategy": "STRATEGY_MAGIC"}, 400, "STRATEGY_MAGIC"),
    ],
)
def test_bad_consensus_input(mesh, body, status, words):
    got, error, _ = mesh.request("POST", "/api/consensus", body)
    assert got == status, error
    assert words in error["message"]


async def test_cancelling_a_consensus_stops_every_candidate(mesh):
    urls = [mesh.backend_url(m) for m in MODELS]
    for url in urls:
        await wait_until_idle(url)
    request = consensus_pb2.CombineRequest(
        prompt=LONG["message"],
        models=MODELS,
        params=inference_pb2.GenerationParams(max_tokens=1500, temperature=0, repeat_penalty=1.0),
    )
    async with edge_channel(mesh) as channel:
        call = consensus_pb2_grpc.ConsensusServiceStub(channel).Combine(request, timeout=120)
        started = 0
        async for event in call:
            started += event.WhichOneof("event") == "started"
            if started == 3:
                break
        await asyncio.sleep(1.0)  # all three are generating now
        call.cancel()
    for url in urls:
        await wait_until_idle(url)


def test_chat_with_consensus_true(mesh):
    status, body, _ = mesh.request(
        "POST",
        "/api/chat",
        {"message": "What is the capital of Italy?", "consensus": True, "max_tokens": 12, "temperature": 0},
    )
    assert status == 200, body
    assert body["routing"]["source"] == "consensus" and body["routing"]["route_name"] == "consensus"
    assert body["response"] and body["model_id"] in MODELS
    assert 0 < body["routing"]["confidence"] <= 1
