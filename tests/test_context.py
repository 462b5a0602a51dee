"""Context service: relevance of each provider, data in TOON, memory, trimming, erase, bad input.
(TOON encode/decode over the edge: test_toon.py.)"""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import subprocess
import sys

import grpc
import pytest
import yaml

from capibara_grpc.context import providers
from capibara_grpc.stubs import context_pb2, context_pb2_grpc, inference_pb2
from tests.support.channels import edge_channel

BIN = pathlib.Path(sys.executable).parent


@pytest.mark.parametrize(
    "message, needed",
    [
        ("qué día es hoy", True),
        ("que fecha es hoy?", True),
        ("¿qué hora es?", True),
        ("how many days until Christmas", True),
        ("what day is it today", True),
        ("cuántos días faltan para navidad", True),
        ("en qué año estamos", True),
        ("qué es Python", False),
        ("escribe un poema sobre el día", False),
        ("What is a date palm?", False),
        ("cuéntame la historia de Roma", False),
        ("my birthday is on 1990-05-01", False),
    ],
)
def test_datetime_only_when_the_question_depends_on_it(message, needed):
    addition = providers.datetime_context(
        message, "Europe/Madrid", datetime.datetime(2026, 12, 20, 9, 30, tzinfo=datetime.UTC)
    )
    assert (addition is not None) == needed
    if needed:
        assert "2026-12-20 10:30" in addition.content and "Sunday" in addition.content


@pytest.mark.parametrize(
    "message, needed",
    [
        ("¿quién eres?", True),
        ("como te llamas", True),
        ("who made you?", True),
        ("what are you?", True),
        ("eres un robot?", True),
        ("tell me about yourself", True),
        ("qué es Python", False),
        ("creo que va a llover", False),
        ("que es la fotosintesis", False),
        ("who wrote Hamlet?", False),
        ("what is your favourite colour of car to recommend", False),
    ],
)
def test_identity_only_when_the_user_asks_about_the_assistant(message, needed):
    assert (providers.identity_context(message, "Capibara", "A helpful assistant.") is not None) == needed


@pytest.mark.parametrize(
    "message, fact",
    [
        ("cuánto es 345 por 27", "= 9315"),
        ("what is 2^10 + 3?", "= 1027"),
        ("(3+4)*2", "= 14"),
        ("calcula 1250 entre 25", "= 50"),
        ("what's 7 minus 10", "= -3"),
        ("0,5 + 0,25", "= 0.75"),
    ],
)
def test_arithmetic_is_computed_exactly(message, fact):
    addition = providers.arithmetic_context(message)
    assert addition is not None and fact in addition.content


@pytest.mark.parametrize(
    "message",
    [
        "tengo 3 gatos y 2 perros",
        "nací en 1990-05-01",
        "__import__('os').system('ls')",
        "2**99999",
        "1/0",
        "qué es Python",
        "9" * 400 + "**9",
    ],
)
def test_arithmetic_adds_nothing_for_non_arithmetic_or_unsafe_input(message):
    assert providers.arithmetic_context(message) is None


def test_safe_eval_refuses_anything_but_arithmetic():
    for bad in ["__import__('os')", "open('x')", "[1, 2]", "a + 1", "(lambda: 1)()", "2 ** 1000"]:
        with pytest.raises((ValueError, SyntaxError)):
            providers.safe_eval(bad)
    assert providers.safe_eval("-(2 + 3) * 4 % 7") == 1


def enrich(mesh, body):
    return mesh.request("POST", "/api/context/enrich", body)


def test_enrich_over_rest_adds_what_the_question_needs(mesh):
    status, body, _ = enrich(mesh, {"message": "¿qué día es hoy?", "model_id": "phi"})
    assert status == 200, body
    (date,) = [a for a in body["added_context"] if a["kind"] == "datetime"]
    assert datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d") in date["content"]
    assert date["reason"]
    assert body["messages"][0]["role"] == "ROLE_SYSTEM" and date["content"] in body["messages"][0]["content"]
    last = body["messages"][-1]
    assert (last["role"], last["content"]) == ("ROLE_USER", "¿qué día es hoy?")
    # A user message calls no tool: its tool fields are empty (the transcoder prints them).
    assert not last.get("tool_calls") and not last.get("tool_call_id")
    status, body, _ = enrich(mesh, {"message": "qué es Python", "model_id": "phi"})
    assert status == 200 and body["added_context"] == []
    status, body, _ = enrich(mesh, {"message": "cuánto es 345 por 27"})
    assert [a["kind"] for a in body["added_context"]] == ["arithmetic"] and "9315" in body["prompt"]


def test_uniform_records_go_in_as_toon_with_fewer_tokens(mesh):
    rows = [
        {"id": i, "name": f"user{i}", "role": "admin" if i % 3 == 0 else "member", "active": i % 2 == 0}
        for i in range(30)
    ]
    status, body, _ = enrich(mesh, {"message": "¿Cuántos usuarios activos hay?", "data": {"users": rows}})
    assert status == 200, body
    (data,) = [a for a in body["added_context"] if a["kind"] == "data"]
    # (EnrichRequest.data is a google.protobuf.Struct, which does not keep key order: the columns
    # may come in any order)
    assert "TOON" in data["content"] and "users[30]{" in data["content"]
    # The delimiter that costs fewest tokens was chosen, with every candidate's count given.
    counts = {
        form: int(data["reason"].split(f"{form} ")[1].split(",")[0].split(")")[0])
        for form in ("TOON comma", "TOON tab", "TOON pipe", "JSON")
    }
    chosen = data["content"].split("-delimited")[0].split("TOON, ")[1]
    assert counts[f"TOON {chosen}"] == min(counts.values()), (counts, chosen)
    delimiter = {"comma": ",", "tab": "\t", "pipe": "|"}[chosen]
    assert f"users[30{'' if chosen == 'comma' else delimiter}]{{" in data["content"]
    status, encoded, _ = mesh.request("POST", "/api/toon/encode", {"json": {"users": rows}})
    assert status == 200
    assert encoded["toon_tokens"] < encoded["json_tokens"] and encoded["savings"] > 0.2


def test_data_json_keeps_key_order_in_the_prompt(mesh):
    rows = [{"zeta": i, "alpha": f"row {i}", "mid": i % 2 == 0} for i in range(12)]
    body = {"message": "resume", "model_id": "phi", "data_json": json.dumps({"rows": rows})}
    status, body, _ = enrich(mesh, body)
    assert status == 200, body
    (data,) = [a for a in body["added_context"] if a["kind"] == "data"]
    assert "TOON" in data["content"] and "]{zeta" in data["content"] and "alpha" in data["content"].split("}")[0]
    status, error, _ = enrich(mesh, {"message": "resume", "data_json": '{"rows": [1,]}'})
    assert status == 400 and "data_json at line 1, column 13" in error["message"], error


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/api/toon/decode", {"toon": "users[2]{id,name}:\n  1,Ana\n  2"}, "line 3"),
        ("/api/toon/decode", {}, "toon is required"),
        ("/api/toon/decode", {"toon": "a: 1", "tone": 1}, "unknown field 'tone'"),
        ("/api/toon/encode", {"jsn": {"a": 1}}, "unknown field 'jsn'"),
        ("/api/toon/encode", {"model_id": "phi"}, "json is required"),
        ("/api/toon/encode", {"json": {"a": 1}, "model_id": "gpt-5"}, "unknown model"),
        ("/api/context/enrich", {"message": "  "}, "empty"),
        ("/api/context/enrich", {"message": "hola", "model_id": "gpt-5"}, "unknown model"),
        (
            "/api/context/enrich",
            {"message": "resume", "data": {"rows": [{"id": i, "text": "palabra " * 20} for i in range(60)]}},
            "over the budget",
        ),
    ],
)
def test_bad_context_input_is_400_or_404_with_a_reason(mesh, path, body, words):
    status, error, _ = mesh.request("POST", path, body)
    assert status in (400, 404), error
    assert words in error["message"]


@pytest.mark.parametrize(
    "data_text, where, what",
    [
        ('{\n    "rows": [1, 2,, 3]\n  }', "line 5, column 19", "unexpected ','"),
        ("{\n    \"name\": 'Ana'\n  }", "line 5, column 13", "double quotes"),
        ('{\n    "a": 1,\n  }', "line 6, column 3", "field name in double quotes"),
        ('{\n    "note": "no closing quote\n  }', "line 5, column 30", "control character"),
    ],
)
def test_invalid_json_in_data_names_line_and_column(mesh, data_text, where, what):
    raw = ('{\n  "message": "resume esto",\n  "model_id": "phi",\n  "data": ' + data_text + "\n}").encode()
    status, error, headers = mesh.request("POST", "/api/context/enrich", raw=raw)
    assert status == 400, error
    assert headers["content-type"].startswith("application/json")
    assert where in error["message"] and what in error["message"], error["message"]


def test_chat_turns_are_remembered_read_and_erased(mesh):
    conversation = "memory-test-1"
    for message in ("Me llamo Ana y vivo en Quito.", "¿Cómo me llamo?"):
        status, body, _ = mesh.request(
            "POST",
            "/api/chat",
            {"message": message, "conversation_id": conversation, "max_tokens": 8, "temperature": 0},
        )
        assert status == 200, body
    status, body, _ = mesh.request("GET", f"/api/conversations/{conversation}")
    assert status == 200
    turns = body["turns"]
    assert [t["role"] for t in turns] == ["ROLE_USER", "ROLE_ASSISTANT"] * 2
    assert turns[0]["content"] == "Me llamo Ana y vivo en Quito."
    assert turns[1]["content"] and turns[1]["model_id"]
    # The second question was sent with the first exchange as history.
    status, enriched, _ = enrich(mesh, {"message": "¿Y dónde vivo?", "conversation_id": conversation})
    assert any(a["kind"] == "history" for a in enriched["added_context"])
    assert "Me llamo Ana" in enriched["prompt"]
    status, deleted, _ = mesh.request("DELETE", f"/api/conversations/{conversation}")
    assert status == 200 and deleted["deleted_turns"] == 4
    status, body, _ = mesh.request("GET", f"/api/conversations/{conversation}")
    assert status == 200 and body["turns"] == []


def test_unknown_conversation_is_empty_history_not_an_error(mesh):
    status, body, _ = mesh.request("GET", "/api/conversations/never-seen")
    assert status == 200 and body["turns"] == []
    status, body, _ = enrich(mesh, {"message": "hola", "conversation_id": "never-seen"})
    assert status == 200 and not any(a["kind"] == "history" for a in body["added_context"])


async def test_concurrent_writes_to_one_conversation_lose_no_turn(mesh):
    conversation = "concurrent-1"
    async with edge_channel(mesh) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        await asyncio.gather(
            *(
                stub.AppendTurn(
                    context_pb2.AppendTurnRequest(
                        conversation_id=conversation, role=inference_pb2.ROLE_USER, content=f"turn {i}"
                    ),
                    timeout=30,
                )
                for i in range(100)
            )
        )
        stored = await stub.GetConversation(
            context_pb2.GetConversationRequest(conversation_id=conversation), timeout=10
        )
    contents = [t.content for t in stored.turns]
    assert sorted(contents) == sorted(f"turn {i}" for i in range(100))  # each exactly once


async def test_history_is_trimmed_to_the_context_window_keeping_the_newest(mesh):
    conversation = "long-1"
    async with edge_channel(mesh) as channel:
        stub = context_pb2_grpc.ContextServiceStub(channel)
        for i in range(40):  # ~40 x 120 tokens: far more than phi's 2048-token window
            await stub.AppendTurn(
                context_pb2.AppendTurnRequest(
                    conversation_id=conversation,
                    role=inference_pb2.ROLE_USER if i % 2 == 0 else inference_pb2.ROLE_ASSISTANT,
                    content=f"turn {i}: " + "the quick brown fox jumps over the lazy dog " * 12,
                ),
                timeout=10,
            )
        result = await stub.Enrich(
            context_pb2.EnrichRequest(message="resume", conversation_id=conversation, model_id="phi"), timeout=60
        )
    (history,) = [a for a in result.added_context if a.kind == "history"]
    kept = int(history.content.split()[0])
    assert 5 < kept < 40 and "of 40 turns" in history.reason
    history_messages = list(result.messages)[1:-1]
    assert len(history_messages) == kept
    assert history_messages[-1].content.startswith("turn 39:")  # the newest turn is kept
    assert history_messages[0].content.startswith(f"turn {40 - kept}:")


def test_history_survives_a_restart_of_the_service(mesh, tmp_path):
    config = yaml.safe_load(mesh.config_path.read_text())
    config["state_dir"] = str(tmp_path / "state")
    for i, name in enumerate(config["services"]):
        config["services"][name].update(port=27150 + i, metrics_port=27170 + i)
    config["edge"] = {"port": 27101, "admin_port": 27191, "mesh_port": 27102, "listen_address": "127.0.0.1"}
    path = tmp_path / "capibara.yaml"
    path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{config['services']['context']['port']}"

    def serve():
        process = subprocess.Popen(
            [str(BIN / "capibara"), "--config", str(path), "serve", "context"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            if "serving context" in line:
                return process
        raise AssertionError("context service did not start")

    async def call(method, request):
        async with grpc.aio.insecure_channel(address) as channel:
            return await getattr(context_pb2_grpc.ContextServiceStub(channel), method)(request, timeout=10)

    first = serve()
    try:
        for text in ("primera", "segunda"):
            asyncio.run(
                call(
                    "AppendTurn",
                    context_pb2.AppendTurnRequest(
                        conversation_id="restart-1", role=inference_pb2.ROLE_USER, content=text
                    ),
                )
            )
    finally:
        first.terminate()
        first.wait(10)
    second = serve()
    try:
        stored = asyncio.run(call("GetConversation", context_pb2.GetConversationRequest(conversation_id="restart-1")))
        assert [t.content for t in stored.turns] == ["primera", "segunda"]
    finally:
        second.terminate()
        second.wait(10)


def test_math_questions_get_a_verified_fact_and_others_nothing(mesh):
    status, body, _ = enrich(mesh, {"message": "¿cuánto es la raíz cuadrada de 1764?", "model_id": "phi"})
    assert status == 200, body
    (fact,) = [a for a in body["added_context"] if a["kind"] == "arithmetic"]
    assert fact["content"] == "Verified: sqrt(1764) = 42." and "sympy" in fact["reason"]
    assert fact["content"] in body["messages"][0]["content"]
    status, body, _ = enrich(mesh, {"message": "solve the system x + y = 10, x - y = 2"})
    assert status == 200 and "gives x = 6, y = 4" in body["prompt"], body
    for message in ("la versión 2.0 salió en 2019", "call me at 555-1234", "what is python?"):
        status, body, _ = enrich(mesh, {"message": message})
        assert status == 200 and body["added_context"] == [], (message, body)


def test_a_runaway_computation_adds_nothing_and_the_next_question_is_answered(mesh):
    semiprime = "295720860623744131884353542918956801025583845068242037678727"  # two 30-digit primes
    status, body, _ = enrich(mesh, {"message": f"factoriza {semiprime}"})
    assert status == 200 and body["added_context"] == [], body
    status, body, _ = enrich(mesh, {"message": "what is 15% of 80"})
    assert status == 200 and "Verified: 15% of 80 = 12." in body["prompt"], body
